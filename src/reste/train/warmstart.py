"""Models from other runs: ``model.init_from`` (start from a trained run's weights) and the
teacher of ``train.teacher`` (see :mod:`reste.train.distill`).

A source is a run directory of ``reste train`` (its ``checkpoints/best.pt``, else ``last.pt``),
a checkpoint file of one, or, for ``init_from`` only, a ``.pt`` file holding a plain
``state_dict`` (e.g. ``torch.save(float_model.state_dict(), "fp.pt")``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from torch import nn

from .checkpoint import CheckpointError, load_checkpoint
from .config import ConfigError
from .rundir import CONFIG, checkpoint_path, looks_like_run, read_config

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


def _architecture(model_cfg: dict) -> tuple:
    """``(name, options)`` of a config's model section (:func:`reste.models.registry.architecture_options`:
    a ``downsample: avgpool`` written out is the run that left it out), whole numbers as floats."""
    from ..models.registry import architecture_options

    name = model_cfg.get("name")
    options = architecture_options(name, model_cfg.get("kwargs"))
    return name, {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in options.items()}


def init_from(model: nn.Module, source, key: str = "model.init_from", model_config: dict | None = None):
    """Load the weights of ``source`` (a run directory or ``.pt`` file) into ``model``.

    Matching tensors are copied; estimator state stays fresh; what did not fit is reported by
    name (:class:`reste.nn.weights.WeightLoadReport`). No weight copied at all is an error (the
    wrong architecture, or another width: BatchNorm step counters and a bias alone may still fit).
    The optimizer is the caller's, built afterwards: it starts fresh. Given the target's config
    section ``model_config`` (``name``, ``kwargs``), a source trained as another architecture whose
    tensors still fit (ImageNet ResNets' ``downsample``: the same shapes, another network) is warned about.
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
    if model_config is None:
        return report
    # advisory: the architecture a reste run recorded (in its checkpoint, or its run folder's config.yaml);
    # a plain state_dict file beside some other config.yaml says nothing
    try:
        if isinstance(state.get("config"), dict):
            source_model = state["config"].get("model")
        else:
            folder = next((f for f in (path.parent, path.parent.parent) if looks_like_run(f)), None)
            source_model = (read_config(folder) or {}).get("model") if folder is not None else None
    except (ConfigError, ValueError, OSError):
        source_model = None
    if isinstance(source_model, dict) and isinstance(source_model.get("name"), str):
        (name, kwargs), (src_name, src_kwargs) = _architecture(model_config), _architecture(source_model)
        differ = sorted(k for k in set(kwargs) | set(src_kwargs) if kwargs.get(k) != src_kwargs.get(k))
        if name != src_name or differ:
            said = f"model.name {src_name}" if name != src_name else ""
            said += ", " if said and differ else ""
            said += ", ".join(f"model.kwargs.{k}={src_kwargs.get(k)!r}" for k in differ)
            here = f"model.name {name}" if name != src_name else ""
            here += ", " if here and differ else ""
            here += ", ".join(f"model.kwargs.{k}={kwargs.get(k)!r}" for k in differ)
            warnings.warn(
                f"{key}={str(source)!r} was trained with {said}, this model has {here}: its tensors that fit "
                f"({len(report.copied)}) were copied into another network; start from a run of the same "
                "architecture if that is not what you want",
                stacklevel=2,
            )
    return report
