"""Models from other runs: ``model.init_from`` (start from a trained run's weights) and the
teacher of ``train.teacher`` (see :mod:`reste.train.distill`).

A source is a run directory of ``reste train`` (its ``checkpoints/best.pt``, else ``last.pt``),
a checkpoint file of one, or, for ``init_from`` only, a ``.pt`` file holding a plain
``state_dict`` (e.g. ``torch.save(float_model.state_dict(), "fp.pt")``).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .checkpoint import CheckpointError, load_checkpoint
from .rundir import CONFIG, checkpoint_path, read_config

__all__ = ["checkpoint_of", "source_config", "init_from"]


def checkpoint_of(source, key: str) -> Path:
    """The checkpoint file a source names; ``key`` (the config key) goes into the errors."""
    path = Path(source)
    if path.is_dir():
        for which in ("best", "last"):
            candidate = checkpoint_path(path, which)
            if candidate.is_file():
                return candidate
        raise CheckpointError(
            f"{key}={str(source)!r}: no checkpoints/best.pt or last.pt there; give a run directory "
            "written by `reste train` or a checkpoint file"
        )
    if not path.is_file():
        raise CheckpointError(
            f"{key}={str(source)!r} does not exist; give a run directory of `reste train` or a .pt file "
            "(run the first step of a two-step recipe before the second)"
        )
    return path


def source_config(path: Path, state: dict) -> dict | None:
    """The training config of a checkpoint: stored in it, else the run directory's config.yaml."""
    if isinstance(state.get("config"), dict):
        return state["config"]
    for folder in (path.parent, path.parent.parent):
        if (folder / CONFIG).is_file():
            return read_config(folder)
    return None


def init_from(model: nn.Module, source, key: str = "model.init_from"):
    """Load the weights of ``source`` (a run directory or ``.pt`` file) into ``model``.

    Matching tensors are copied; estimator state stays fresh; what did not fit is reported by
    name (:class:`reste.nn.weights.WeightLoadReport`). No weight copied at all is an error (the
    wrong architecture, or another width: BatchNorm step counters and a bias alone may still fit).
    The optimizer is the caller's, built afterwards: it starts fresh.
    """
    from ..nn.weights import load_float_weights

    path = checkpoint_of(source, key)
    state = load_checkpoint(path)
    weights = state["model"] if isinstance(state.get("model"), dict) else state
    report = load_float_weights(model, weights)
    if not any(name.rpartition(".")[2] == "weight" for name in report.copied):
        config = source_config(path, state) or {}
        model_cfg = config.get("model") or {}
        arch = model_cfg.get("name", "an unknown architecture")
        kwargs = f" with model.kwargs={model_cfg['kwargs']}" if model_cfg.get("kwargs") else ""
        fits = f" (only {len(report.copied)} counters or biases do)" if report.copied else ""
        raise CheckpointError(
            f"{key}={str(source)!r}: none of its {len(weights)} tensors' weights fits this model{fits}; {path} "
            f"holds {arch}{kwargs}; start from a run of the same model.name and model.kwargs"
        )
    report.source = str(path)
    return report
