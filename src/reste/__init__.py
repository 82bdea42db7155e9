"""reste: binary neural networks in PyTorch with the Rectified Straight-Through Estimator.

Binarize a model in three lines::

    import reste
    model = reste.binarize(my_float_model, estimator="reste")           # 1W/1A, first/last layer real
    scheduler = reste.EstimatorScheduler(model, reste.o_schedule("cosine", o_end=3), epochs, steps)

See the README for the command-line tool (``reste train``, ``reste eval``, ...).
"""

import importlib as _importlib

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
    "estimators": (".estimators", None),  # a module that is also the function: reste.estimators() lists names
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
    module = _importlib.import_module(module_name, __name__)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted({n for n in globals() if not n.startswith("_") or n == "__version__"} | set(_LAZY))


__all__ = [
    "Estimator",
    "EstimatorScheduler",
    "analysis",
    "binarize",
    "data",
    "deploy",
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
    "train",
    "__version__",
]
