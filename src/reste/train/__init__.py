"""Training: the configuration schema, the trainer, checkpoints and distributed runs.

Python API (the ``reste train`` / ``reste eval`` commands call the same functions)::

    from reste.train import train, load_config, evaluate

    summary = train()                                          # the main job, defaults
    summary = train("configs/fashion_mnist/resnet20_reste.yaml", train={"epochs": 2})
    summary = train(overrides=["optim.lr=0.05", "data.subset=2000"])
    summary = train(resume="runs/fashion_mnist-resnet20_bireal-1w1a-reste-20261126-000235")
    cfg = load_config("my.yaml", ["estimator.o_end=4"])        # validated Config
    result = evaluate("runs/<run>", which="best")              # {"top1", "top5", "loss", ...}
    report = init_from(binary_model, "runs/<float run>")       # float weights in, estimators fresh

See ``docs/training.md`` for every option.
"""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import Config, ConfigError, config_to_dict, config_to_yaml, load_config
from .trainer import (
    DistributedFailure,
    NonFiniteLossError,
    Trainer,
    TrainingInterrupted,
    evaluate,
    evaluate_model,
    train,
)
from .warmstart import init_from

__all__ = [
    "Config",
    "ConfigError",
    "CheckpointError",
    "DistributedFailure",
    "NonFiniteLossError",
    "Trainer",
    "TrainingInterrupted",
    "config_to_dict",
    "config_to_yaml",
    "evaluate",
    "evaluate_model",
    "init_from",
    "load_checkpoint",
    "load_config",
    "save_checkpoint",
    "train",
]
