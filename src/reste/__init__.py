"""reste: binary neural networks in PyTorch with the Rectified Straight-Through Estimator.

Binarize a model in three lines::

    import reste
    model = reste.binarize(my_float_model, estimator="reste")           # 1W/1A, first/last layer real
    scheduler = reste.EstimatorScheduler(model, reste.o_schedule("cosine", o_end=3), epochs, steps)

See the README for the command-line tool (``reste train``, ``reste eval``, ...).
"""

from . import deploy, models, nn
from .deploy import summary
from .estimators import Estimator, estimator, estimators, register
from .nn import binarize
from .schedules import EstimatorScheduler, o_schedule, o_schedule_ways, set_params, set_progress

__version__ = "0.1.0"

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
