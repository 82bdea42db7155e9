"""Export a trained binary model with 1-bit weights, and load it back for inference.

File format (``.safetensors``, see docs/deploy.md):

- tensors: the inference ``state_dict`` of the model in which every binary layer was
  replaced by its packed twin (:mod:`reste.deploy.packed`): ``<layer>.weight_bits``
  (``uint8``, 1 bit per weight), ``<layer>.alpha`` (``float32``, per layer or per
  output channel), ``<layer>.bias`` if any; every other parameter and buffer (batch
  norms, full-precision layers) as it is. Nothing of training survives: no latent
  float weights of binary layers, no estimator parameters, no optimizer state, no
  ``num_batches_tracked`` counters.
- metadata (safetensors' string map): ``format = "reste.packed"``, ``format_version``,
  ``reste_version`` and ``graph``, a JSON document with the architecture to rebuild
  (``reste.models.create`` arguments, or null for a model the caller rebuilds) and
  one entry per binary layer with its geometry and options, plus ``source`` (the
  run and checkpoint it came from) when exported from a run directory.

safetensors stores raw tensors and a JSON header only, so loading a file never runs
code; the architecture is rebuilt from the model registry, never unpickled.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from ..estimators import Estimator
from ..nn.layers import BinaryLayer
from .packed import PackedBinaryConv2d, PackedBinaryLinear, _PackedBinary, packed_layer

__all__ = ["FORMAT", "FORMAT_VERSION", "ExportError", "to_deploy", "export", "export_run", "load", "read_graph",
           "architecture_from_config"]

FORMAT = "reste.packed"
FORMAT_VERSION = 1
_PACKED_TYPES = {"conv2d": PackedBinaryConv2d, "linear": PackedBinaryLinear}
#: buffers that only count training steps; BatchNorm rebuilds them as zeros
_TRAINING_COUNTERS = ("num_batches_tracked",)


class ExportError(ValueError):
    """A model, run directory or exported file that cannot be exported or loaded; the message says why."""


# ----------------------------------------------------------------------------- model -> deploy model
def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def to_deploy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every binary layer replaced by its packed twin.

    The copy computes the trained model's eval-mode outputs (binary layers' integer sums
    exactly) and holds no estimator. ``model`` itself is not changed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_deploy expects an nn.Module, got {type(model).__name__}")
    deploy = copy.deepcopy(model).cpu().eval()
    binary = [(n, m) for n, m in deploy.named_modules() if isinstance(m, BinaryLayer)]
    if not binary:
        raise ExportError("the model has no binary layers (BinaryConv2d/BinaryLinear); binarize it or create it with precision '1w1a'/'1w32a'")
    for name, layer in binary:
        if not layer.binary_weights:
            raise ExportError(f"layer {name!r} binarizes its inputs but keeps real weights; only layers with binary weights can be packed")
        if name == "":
            raise ExportError("the model is a single binary layer; wrap it in an nn.Sequential to export it")
        _set_module(deploy, name, packed_layer(layer))
    leftover = [n for n, m in deploy.named_modules() if isinstance(m, Estimator)]
    if leftover:
        raise ExportError(f"estimators outside binary layers ({', '.join(leftover[:3])}) cannot be exported; "
                          "use reste.nn.BinaryConv2d/BinaryLinear for every binarized operation")
    return deploy


def _inference_state(deploy: nn.Module) -> dict:
    return {
        k: v.detach().cpu().contiguous()
        for k, v in deploy.state_dict().items()
        if k.rpartition(".")[2] not in _TRAINING_COUNTERS
    }


def _graph(deploy: nn.Module, architecture: dict | None, source: dict | None) -> dict:
    layers = {name: m.spec() for name, m in deploy.named_modules() if isinstance(m, _PackedBinary)}
    return {"architecture": architecture, "binary_layers": layers, "source": source}


# ----------------------------------------------------------------------------- export
def export(model: nn.Module, path, architecture: dict | None = None, source: dict | None = None) -> Path:
    """Write ``model`` with 1-bit packed binary layers to ``path`` (a ``.safetensors`` file).

    Args:
        model: a trained model with :class:`~reste.nn.BinaryConv2d` / ``BinaryLinear`` layers.
        architecture: keyword arguments of :func:`reste.models.create` that rebuild the
            architecture (``name``, ``num_classes``, ``in_channels``, ``precision``, ...), so
            :func:`load` needs nothing but the file; None for models not in the registry
            (then pass the architecture to :func:`load` yourself).
        source: free-form JSON-able description of where the weights came from.

    Returns the path written.
    """
    from safetensors.torch import save_file

    from .. import __version__

    deploy = to_deploy(model)
    graph = _graph(deploy, architecture, source)
    try:
        text = json.dumps(graph, sort_keys=True, separators=(",", ":"))
    except TypeError as err:
        raise ExportError(f"architecture/source must be JSON-serialisable (plain dicts, lists, numbers, strings): {err}") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_inference_state(deploy), str(path), metadata={
        "format": FORMAT, "format_version": str(FORMAT_VERSION), "reste_version": __version__, "graph": text,
    })
    return path


# ----------------------------------------------------------------------------- load
def read_graph(path) -> dict:
    """The JSON graph description stored in an exported file (without loading tensors)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"no exported model at {path}; create one with `reste export RUN_DIR --out {path.name}`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for bad headers
        raise ExportError(f"{path} is not a readable safetensors file ({err}); re-export the model") from None
    if meta.get("format") != FORMAT:
        raise ExportError(f"{path} is not a reste export (metadata format={meta.get('format')!r}); export one with `reste export`")
    version = int(meta.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise ExportError(f"{path} uses format version {version}, newer than this reste reads ({FORMAT_VERSION}); upgrade reste")
    return json.loads(meta["graph"])


def build_architecture(architecture: dict) -> nn.Module:
    """The model described by an export's ``architecture`` entry (``reste.models.create`` arguments)."""
    from .. import models

    args = dict(architecture)
    name = args.pop("name")
    kwargs = args.pop("kwargs", {}) or {}
    return models.create(name, **args, **kwargs)


def load(path, model: nn.Module | None = None, fuse: bool = True) -> nn.Module:
    """Load an exported file as an eval-mode inference model with packed binary layers.

    Args:
        path: a file written by :func:`export` / ``reste export``.
        model: the architecture to fill, for files exported without one (any instance of
            the trained architecture, float or binary; its weights are overwritten). By
            default the architecture recorded in the file is rebuilt with ``reste.models.create``.
        fuse: let the compiled kernel apply the ReLU and BatchNorm that follow a binary conv
            as it writes the conv output (:func:`reste.deploy.fuse.fuse_epilogues`; checked to be
            bit-exact, else skipped). The absorbed modules become ``nn.Identity``.
    """
    from safetensors.torch import load_file

    path = Path(path)
    graph = read_graph(path)
    if model is None:
        if not graph.get("architecture"):
            raise ExportError(f"{path} records no architecture (it was exported from a model outside reste.models); "
                              "pass the architecture: reste.deploy.load(path, model=MyNet())")
        model = build_architecture(graph["architecture"])
    model = model.cpu().eval()
    for name, spec in graph["binary_layers"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ExportError(f"{path}: the architecture has no layer {name!r}; it is not the architecture the file was exported from") from None
        if not isinstance(old, (nn.Conv2d, nn.Linear, _PackedBinary)):
            raise ExportError(f"{path}: layer {name!r} is a {type(old).__name__} in this architecture, but a binary {spec['type']} in the file")
        _set_module(model, name, _PACKED_TYPES[spec["type"]].from_spec(spec))
    state = load_file(str(path))
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k.rpartition(".")[2] not in _TRAINING_COUNTERS]
    if missing or result.unexpected_keys:
        parts = [f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                 for label, keys in (("missing in file", missing), ("not in architecture", result.unexpected_keys)) if keys]
        raise ExportError(f"{path} does not fit the architecture ({'; '.join(parts)})")
    leftover = [n for n, m in model.named_modules() if isinstance(m, Estimator)]
    if leftover:
        raise ExportError(f"{path}: layers {', '.join(leftover[:3])} of the architecture are binary but not in the file; "
                          "the file was exported from a different precision")
    model.eval()
    if fuse:
        from .fuse import fuse_epilogues

        fuse_epilogues(model)
    return model


# ----------------------------------------------------------------------------- run directories
def architecture_from_config(config) -> dict:
    """``reste.models.create`` arguments that rebuild the model of a training config.

    Mirrors what ``reste train`` builds: classes, channels and image size from the data
    set, estimator parameters from the ``estimator.params`` section.
    """
    from .. import data
    from ..train.config import config_from_dict
    from ..train.trainer import model_arguments

    cfg = config_from_dict(config) if isinstance(config, dict) else config
    return model_arguments(cfg, data.info(cfg.data.name))


def load_run_model(run_dir, checkpoint: str = "best") -> tuple[nn.Module, dict, dict]:
    """The trained model of a run directory: ``(model, architecture, source)``.

    ``checkpoint`` is ``"best"`` or ``"last"`` (``checkpoints/<checkpoint>.pt``) or a path to a ``.pt`` file.
    """
    from ..train.checkpoint import load_checkpoint, load_model_weights

    run_dir = Path(run_dir)
    if checkpoint in ("best", "last"):
        ckpt_path = run_dir / "checkpoints" / f"{checkpoint}.pt"
        if not ckpt_path.is_file():
            other = "last" if checkpoint == "best" else "best"
            hint = f"; try --checkpoint {other}" if (run_dir / "checkpoints" / f"{other}.pt").is_file() else ""
            raise ExportError(f"{ckpt_path} does not exist{hint} (is {run_dir} a run directory written by `reste train`?)")
    else:
        ckpt_path = Path(checkpoint)
    state = load_checkpoint(ckpt_path, required=("model",))
    config = state.get("config")
    if not config:
        cfg_file = run_dir / "config.yaml"
        if not cfg_file.is_file():
            raise ExportError(f"{ckpt_path} holds no config and {cfg_file} is missing; cannot tell which architecture to build")
        from ..train.config import read_yaml

        config = read_yaml(cfg_file)
    architecture = architecture_from_config(config)
    if architecture["precision"] == "fp":
        raise ExportError(f"{run_dir} trained a full-precision model (model.precision: fp); there are no binary layers to pack")
    model = build_architecture(architecture)
    load_model_weights(model, state["model"], ckpt_path)
    source = {"run": run_dir.name, "checkpoint": ckpt_path.name, "epoch": int(state.get("epoch", 0))}
    return model, architecture, source


def export_run(run_dir, out, checkpoint: str = "best") -> Path:
    """Export the model of a training run directory (``reste export RUN_DIR --out FILE``)."""
    model, architecture, source = load_run_model(run_dir, checkpoint)
    return export(model, out, architecture=architecture, source=source)
