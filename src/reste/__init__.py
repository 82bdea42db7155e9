"""reste: binary neural networks in PyTorch with the Rectified Straight-Through Estimator.

Binarize a model in three lines::

    import reste
    model = reste.binarize(my_float_model, estimator="reste")           # 1W/1A, first/last layer real
    scheduler = reste.EstimatorScheduler(model, reste.o_schedule("cosine", o_end=3), epochs, steps)

See the README for the command-line tool (``reste train``, ``reste eval``, ...).
"""

import importlib
import sys
import types

__version__ = "0.1.0"

# Imported on first use (PEP 562), so `reste --help` and other light commands start without
# loading torch: name -> (module, attribute or None for the module itself).
_LAZY = {
    "deploy": (".deploy", None),
    "models": (".models", None),
    "nn": (".nn", None),
    "data": (".data", None),
    "train": (".train", None),
    "analysis": (".analysis", None),
    "summary": (".deploy", "summary"),
    "Estimator": (".estimators", "Estimator"),
    "estimator": (".estimators", "estimator"),
    "estimators": (".estimators", "estimators"),
    "register": (".estimators", "register"),
    "binarize": (".nn", "binarize"),
    "EstimatorScheduler": (".schedules", "EstimatorScheduler"),
    "o_schedule": (".schedules", "o_schedule"),
    "o_schedule_ways": (".schedules", "o_schedule_ways"),
    "set_params": (".schedules", "set_params"),
    "set_progress": (".schedules", "set_progress"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'reste' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name, __name__)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Importing a submodule sets it as an attribute of its package; for ``reste.estimators``
    (a module and, as part of the API, a function) the function must win, as it did when this
    file imported everything eagerly, so that attribute is not replaced by the module."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _LAZY.get(name, (None, None))[1] is not None:
            return  # sys.modules still has the submodule; __getattr__ serves the function
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "Estimator",
    "EstimatorScheduler",
    "binarize",
    "estimator",
    "estimators",
    "models",
    "nn",
    "o_schedule",
    "o_schedule_ways",
    "register",
    "set_params",
    "set_progress",
    "summary",
    "deploy",
    "__version__",
]
