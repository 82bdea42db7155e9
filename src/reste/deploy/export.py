"""Export a trained binary model with 1-bit weights, and load it back for inference: the public API.

- :func:`to_deploy`: an eval-mode copy of a model with its binary layers swapped for packed twins;
- :func:`export` (and :func:`export_run` for a training run) writes a file; :func:`load` reads one
  back as an inference model, :func:`read_tensors` as named tensors;
- :func:`load_run_model` and :func:`architecture_from_config`: the model of a training run.

The file format (what the tensors are, the graph description, the layout fingerprint and the
checksum) is described and read in :mod:`reste.deploy.fileformat`; BatchNorms stored as
``(scale, shift)`` are read back and rebuilt exactly by :mod:`reste.deploy.batchnorm`. Their
names stay importable from here.

safetensors stores raw tensors and a JSON header only, so loading a file never runs
code; the architecture is rebuilt from the model registry, never unpickled.
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from pathlib import Path
from typing import cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..estimators import Estimator
from ..nn.convert import _no_fused_encoders, every_name, rebuild_attention
from ..nn.layers import BinaryLayer
from .batchnorm import (
    _BN_PROBE_RANK,
    _PROBE_POWERS,
    _bn_coefficients,
    _bn_probes,
    _fold_bn,  # noqa: F401
    _foldable,
    _restore_bn,
    _same_bits,
    _unit_variance,
)
from .fileformat import (
    _BN_STATE,
    _TRAINING_COUNTERS,
    FORMAT,
    FORMAT_VERSION,
    MAX_GRAPH_BYTES,  # noqa: F401
    ExportError,
    _blob_sizes,
    _check_layout,
    _checksum,
    _describe,
    _dtype_name,
    _fingerprint,
    _layout,
    _stored_sizes,
    read_graph,
)
from .packed import PackedBinaryConv2d, PackedBinaryLinear, _PackedBinary, fused_batchnorm, packed_layer

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ExportError",
    "to_deploy",
    "export",
    "export_run",
    "load",
    "read_graph",
    "read_tensors",
    "architecture_from_config",
]

#: what building a recorded architecture raises for absurd arguments (width: .inf, image_size: 1e5, ...)
_BUILD_ERRORS = (KeyError, TypeError, ValueError, OverflowError, RuntimeError, MemoryError, ZeroDivisionError)


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
    deploy = copy.deepcopy(model).cpu().eval().requires_grad_(False)  # inference only, as load()
    # every name: a layer registered twice (``self.b = self.a``) is packed once and installed under both
    binary = [(n, m) for n, m in every_name(deploy) if isinstance(m, BinaryLayer)]
    if not binary:
        raise ExportError(
            "the model has no binary layers (BinaryConv2d/BinaryLinear); binarize it or create it with precision "
            "'1w1a'/'1w32a'"
        )
    packed: dict[int, nn.Module] = {}
    for name, layer in binary:
        if not layer.binary_weights:
            raise ExportError(
                f"layer {name!r} binarizes its inputs but keeps real weights; only layers with binary weights can "
                "be packed"
            )
        if name == "":
            raise ExportError("the model is a single binary layer; wrap it in an nn.Sequential to export it")
        if id(layer) not in packed:
            try:
                packed[id(layer)] = packed_layer(layer)
            except (TypeError, ValueError) as err:
                raise ExportError(
                    f"layer {name!r} ({type(layer).__name__}) cannot be packed: {err}. Keep it real when binarizing "
                    f"(reste.binarize(..., keep=[{name!r}])) or change it, then train again"
                ) from err
        _set_module(deploy, name, packed[id(layer)])
    leftover = [n for n, m in deploy.named_modules() if isinstance(m, Estimator)]
    if leftover:
        raise ExportError(
            f"estimators outside binary layers ({', '.join(leftover[:3])}) cannot be exported; "
            "use reste.nn.BinaryConv2d/BinaryLinear for every binarized operation"
        )
    return deploy


def _inference_state(deploy: nn.Module) -> tuple[dict, list[str]]:
    """The named tensors an export stores, in layout order, and the BatchNorms that did not fold exactly.

    Each foldable BatchNorm (:func:`_foldable`) whose ``(scale, shift)`` reproduces it bit for bit
    (:func:`_fold_bn`) is stored as those two tensors; the others as they are.
    """
    coeffs, unfolded = {}, []
    for index, (name, module) in enumerate(deploy.named_modules()):
        if not _foldable(module):
            continue
        pair = _fold_bn(module, seed=index)
        if pair is None:
            unfolded.append(name)
        else:
            prefix = f"{name}." if name else ""
            coeffs[prefix + "scale"], coeffs[prefix + "shift"] = pair
    folded = {name for name, module in deploy.named_modules() if _foldable(module) and name not in unfolded}
    state = deploy.state_dict()
    tensors = {}
    for name, _, _ in _layout(deploy, folded):
        value = coeffs[name] if name in coeffs else state[name]
        tensors[name] = value.detach().cpu().contiguous()
    return tensors, unfolded


def _graph(deploy: nn.Module, architecture: dict | None, source: dict | None, unfolded: list, tensors: dict) -> dict:
    layers = {name: m.options() for name, m in deploy.named_modules() if isinstance(m, _PackedBinary)}
    entries = [(name, _dtype_name(t.dtype), tuple(t.shape)) for name, t in tensors.items()]
    return {
        "architecture": architecture,
        "binary_layers": layers,
        "unfolded_batchnorms": unfolded,
        "layout": {"fingerprint": _fingerprint(entries), "blobs": _blob_sizes(entries)},
        "source": source,
    }


# ----------------------------------------------------------------------------- export
def export(
    model: nn.Module, path: str | os.PathLike[str], architecture: dict | None = None, source: dict | None = None
) -> Path:
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
    from safetensors.torch import save

    from .. import __version__
    from ..train.checkpoint import atomic_write

    deploy = to_deploy(model)
    tensors, unfolded = _inference_state(deploy)
    graph = _graph(deploy, architecture, source, unfolded, tensors)
    parts: dict = {}
    for t in tensors.values():
        parts.setdefault(_dtype_name(t.dtype), []).append(t.reshape(-1))
    blobs = {dtype: torch.cat(chunks) for dtype, chunks in parts.items()}
    try:
        graph["checksum"] = _checksum(graph, blobs)
        text = json.dumps(graph, sort_keys=True, separators=(",", ":"))
    except TypeError as err:
        raise ExportError(
            f"architecture/source must be JSON-serialisable (plain dicts, lists, numbers, strings): {err}"
        ) from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = save(
        blobs,
        metadata={
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "reste_version": __version__,
            "graph": text,
        },
    )
    return atomic_write(path, lambda handle: handle.write(data))  # an older export survives a failed one


# ----------------------------------------------------------------------------- load


def build_architecture(architecture: dict) -> nn.Module:
    """The model described by an export's ``architecture`` entry (``reste.models.create`` arguments)."""
    from .. import models

    args = dict(architecture)
    name = args.pop("name")
    kwargs = args.pop("kwargs", {}) or {}
    return models.create(name, **args, **kwargs)


def _packed_twin(path: Path, name: str, old: nn.Module, options: dict) -> _PackedBinary:
    """The empty packed layer that replaces the architecture's layer ``name`` (geometry and bias from ``old``)."""
    cls: type[PackedBinaryConv2d] | type[PackedBinaryLinear]
    if isinstance(old, (nn.Conv2d, PackedBinaryConv2d)):
        cls, kind, out = PackedBinaryConv2d, "conv", old.out_channels
    elif isinstance(old, (nn.Linear, PackedBinaryLinear)):
        cls, kind, out = PackedBinaryLinear, "linear", old.out_features
    else:
        raise ExportError(
            f"{path}: layer {name!r} is a {type(old).__name__} in this architecture, but a binary conv or "
            "linear layer in the file; it is not the architecture the file was exported from"
        )
    if not isinstance(options, dict):
        raise ExportError(
            f"{path}: binary layer {name!r} has options {options!r}, not a JSON object; the file is damaged, "
            "re-export it"
        )
    options = dict(options)
    alpha = options.pop("alpha", "layer")
    if alpha not in ("layer", "channel"):
        raise ExportError(
            f"{path}: binary layer {name!r} has alpha={alpha!r}; expected 'layer' or 'channel' (re-export the model)"
        )
    if isinstance(old, BinaryLayer):
        # the architecture fixes every option that changes the computation: the file must agree
        implied = {
            "inputs": "binary" if old.binary_inputs else "real",
            "alpha": "channel" if old.weight_scale == "channel_mean" and out > 1 else "layer",
        }
        if kind == "conv":
            implied["input_padding"] = old.input_padding
        recorded = {
            "inputs": options.get("inputs", "binary"),
            "alpha": alpha,
            "input_padding": options.get("input_padding", "zero"),
        }
        differ = [
            f"{key} {recorded[key]!r} (the architecture has {value!r})"
            for key, value in implied.items()
            if recorded[key] != value
        ]
        if differ:
            raise ExportError(
                f"{path}: binary layer {name!r} is recorded with {', '.join(differ)}; the file was edited or "
                "is of another architecture, re-export it"
            )
    try:
        return cls.like(
            old, alpha_size=out if alpha == "channel" else 1, bias=getattr(old, "bias", None) is not None, **options
        )
    except (TypeError, ValueError) as err:
        raise ExportError(
            f"{path}: cannot rebuild binary {kind} layer {name!r} with options {options}: {err}"
        ) from None


def _skeleton(path: Path, graph: dict, model: nn.Module) -> tuple[nn.Module, set, list]:
    """``model`` with its binary layers replaced by empty packed twins, the BatchNorms stored as
    ``(scale, shift)``, and the layout it stores; ExportError where the file does not fit it."""
    # a float architecture's nn.MultiheadAttention holds raw projections; binarize rebuilt those it converted
    rebuild_attention(model, inside=graph["binary_layers"])
    names_of: dict[int, list[str]] = {}  # a layer registered under several names gets its twin under each
    for alias, module in every_name(model):
        names_of.setdefault(id(module), []).append(alias)
    for name, options in graph["binary_layers"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ExportError(
                f"{path}: the architecture has no layer {name!r}; it is not the architecture the file was exported from"
            ) from None
        twin = _packed_twin(path, name, old, options)
        for alias in names_of.get(id(old), [name]):
            _set_module(model, alias, twin)
    # an encoder layer whose attention stayed real (keep=nn.MultiheadAttention) was not rebuilt above,
    # but its packed feed-forward layers must keep torch's fused encoder kernel off too
    _no_fused_encoders(model, also=(_PackedBinary,))
    leftover = [n for n, m in model.named_modules() if isinstance(m, Estimator)]
    if leftover:
        raise ExportError(
            f"{path}: layers {', '.join(leftover[:3])} of the architecture are binary but not in the file; "
            "the file was exported from a different precision"
        )
    unfolded = set(graph.get("unfolded_batchnorms", []))
    folded = {n for n, m in model.named_modules() if _foldable(m) and n not in unfolded}
    return model, folded, _layout(model, folded)


def _open(path, model: nn.Module | None, verify: bool = True) -> tuple[nn.Module, dict, set]:
    """The deploy model of a file (packed layers in place, weights not loaded), its named tensors, and the
    BatchNorms stored as ``(scale, shift)``; ExportError where the file does not fit the architecture.

    A recorded architecture is first built on the meta device (shapes, no memory) and its layout
    checked against the fingerprint and the sizes of the blobs actually stored, so a file cannot
    make this build more than the architecture its own bytes hold (see docs/reliability.md).
    """
    from safetensors.torch import load_file

    from ..models import check_size

    path = Path(path)
    graph = read_graph(path)
    stored_sizes = _stored_sizes(path)
    if model is None:
        arch = graph.get("architecture")
        if not arch:
            raise ExportError(
                f"{path} records no architecture (it was exported from a model outside reste.models); "
                "pass the architecture: reste.deploy.load(path, model=MyNet())"
            )
        label = json.dumps(arch)[:120] if isinstance(arch, dict) else repr(arch)[:120]
        try:
            with torch.device("meta"):
                shape_only = build_architecture(arch)
                problem = check_size(shape_only, copies=2)  # the float model and its packed twin
        except _BUILD_ERRORS as err:
            raise ExportError(f"{path}: cannot rebuild the recorded architecture {label}: {str(err)[:200]}") from None
        if problem:
            raise ExportError(
                f"{path}: the recorded architecture {label} is too big to build: {problem}; "
                "the file is damaged, re-export it"
            )
        with torch.device("meta"):
            _, _, entries = _skeleton(path, graph, shape_only)
        _check_layout(path, graph, entries, stored_sizes)
        try:
            model = build_architecture(arch)
        except _BUILD_ERRORS as err:
            raise ExportError(f"{path}: cannot rebuild the recorded architecture {label}: {str(err)[:200]}") from None
    model, folded, entries = _skeleton(path, graph, model.cpu().eval())
    _check_layout(path, graph, entries, stored_sizes)
    want = _blob_sizes(entries)
    try:
        blobs = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise ExportError(f"{path} is truncated or corrupt ({err}); re-export the model") from None
    found = {k: (_dtype_name(v.dtype), tuple(v.shape)) for k, v in blobs.items()}
    if found != {dtype: (dtype, (n,)) for dtype, n in want.items()}:
        raise ExportError(
            f"{path} holds tensors {found}, but its layout needs 1-D blobs {_describe(want)}; "
            "the file is damaged, re-export it"
        )
    if verify:
        if "checksum" not in graph:
            warnings.warn(
                f"{path} has no content checksum (exported by an earlier reste), so its weights cannot be "
                "verified; re-export it to add one",
                stacklevel=3,
            )
        elif _checksum(graph, blobs) != graph["checksum"]:
            raise ExportError(
                f"{path}: content checksum differs (the weights or the graph description were changed "
                "after export, or the file is damaged); re-export the model"
            )
    offsets = {dtype: 0 for dtype in want}
    tensors = {}
    for name, dtype, shape in entries:
        n = math.prod(shape)
        tensors[name] = blobs[dtype][offsets[dtype] : offsets[dtype] + n].reshape(shape)
        offsets[dtype] += n
    return model, tensors, folded


def read_tensors(path, model: nn.Module | None = None, verify: bool = True) -> dict:
    """The named tensors stored in an exported file, ``{name: tensor}`` in file order.

    The file holds one blob per dtype; this rebuilds the layout from the architecture (the
    recorded one, or ``model`` for files exported without one, as in :func:`load`) and cuts
    the blobs into the deploy model's tensors: ``<layer>.weight_bits``, ``<layer>.alpha``,
    ``<bn>.scale``, ``<bn>.shift``, the real layers' parameters and buffers. ``model`` is not changed.
    """
    return _open(path, copy.deepcopy(model) if model is not None else None, verify)[1]


def load(
    path: str | os.PathLike[str], model: nn.Module | None = None, fuse: bool = True, verify: bool = True
) -> nn.Module:
    """Load an exported file as an eval-mode inference model with packed binary layers (parameters
    that do not require grad, so the kernels run with or without ``torch.no_grad()``).

    Args:
        path: a file written by :func:`export` / ``reste export``.
        model: the architecture to fill, for files exported without one (any instance of
            the trained architecture, float or binary; it is changed in place and its weights
            overwritten). By default the architecture recorded in the file is rebuilt with
            ``reste.models.create``.
        fuse: let the compiled kernel apply the ReLU and BatchNorm that follow a binary conv
            as it writes the conv output (:func:`reste.deploy.fuse.fuse_epilogues`; checked to be
            bit-exact, else skipped). The absorbed modules become ``nn.Identity``.
        verify: check the file's content checksum (SHA-256 of the graph description and the
            tensors; docs/reliability.md has its cost); False skips it. A file without one
            (exported by an earlier reste) loads with a warning.

    The file's layout (names, dtypes and shapes of its tensors) is recomputed from the
    architecture and checked against the fingerprint stored in the file: a file written for
    another architecture or other model arguments is refused, never loaded into the wrong
    tensors. BatchNorms stored as ``(scale, shift)`` are rebuilt as the same BatchNorm modules
    with statistics that make PyTorch evaluate exactly ``x * scale + shift`` (weight = scale,
    bias = shift, mean = 0, ``var + eps = 1``): identical eval-mode outputs in float32, but
    not the training statistics, so the model is for inference only.
    """
    path = Path(path)
    if model is not None and any(fused_batchnorm(m) for m in model.modules()):
        # checked before anything changes it: a fused model cannot be filled (its BatchNorms are gone)
        raise ExportError(
            f"model= is a deployed model whose BatchNorms are fused into its binary convs, which cannot be loaded "
            f"into; pass a fresh instance of the architecture (e.g. MyNet()): reste.deploy.load({str(path)!r}, "
            "model=MyNet())"
        )
    model, state, folded = _open(path, model, verify)
    coeffs = {}
    for name in folded:
        prefix = f"{name}." if name else ""
        coeffs[name] = (state.pop(prefix + "scale"), state.pop(prefix + "shift"))
    result = model.load_state_dict(state, strict=False)
    restored = {f"{n}.{k}" if n else k for n in folded for k in _BN_STATE}
    missing = [k for k in result.missing_keys if k.rpartition(".")[2] not in _TRAINING_COUNTERS and k not in restored]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:  # cannot happen once the fingerprint matched; kept as a last check
        parts = [
            f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for label, keys in (("missing in file", missing), ("not in architecture", unexpected))
            if keys
        ]
        raise ExportError(f"{path} does not fit the architecture ({'; '.join(parts)})")
    for name, (scale, shift) in coeffs.items():
        _restore_bn(cast(_BatchNorm, model.get_submodule(name)), scale, shift)  # a folded BatchNorm of the file
    # inference only: with parameters that require grad, activations did too under autograd (PyTorch's
    # default), and every binary conv fed by a real layer fell back to the slow exact PyTorch path
    model.eval().requires_grad_(False)
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
    from ..models.build import model_arguments
    from ..train.config import config_from_dict, data_info

    cfg = config_from_dict(config) if isinstance(config, dict) else config
    return model_arguments(cfg, data_info(cfg))


def load_run_model(run_dir, checkpoint: str = "best") -> tuple[nn.Module, dict, dict]:
    """The trained model of a run directory: ``(model, architecture, source)``.

    ``checkpoint`` is ``"best"`` or ``"last"`` (``checkpoints/<checkpoint>.pt``) or a path to a ``.pt`` file.
    """
    from ..train.checkpoint import load_checkpoint, load_model_weights
    from ..train.rundir import CONFIG, locate_checkpoint, read_config

    run_dir = Path(run_dir)
    # a run without that checkpoint: CheckpointError (exit 1) naming the other one, if the run has it
    ckpt_path = (
        locate_checkpoint(run_dir, checkpoint, option="--checkpoint")
        if checkpoint in ("best", "last")
        else Path(checkpoint)
    )
    state = load_checkpoint(ckpt_path, required=("model",))
    config = state.get("config")
    if not config:
        cfg_file = run_dir / CONFIG
        if not cfg_file.is_file():
            raise ExportError(
                f"{ckpt_path} holds no config and {cfg_file} is missing; cannot tell which architecture to build"
            )
        config = read_config(run_dir)
    architecture = architecture_from_config(config)
    if architecture["precision"] == "fp":
        raise ExportError(
            f"{run_dir} trained a full-precision model (model.precision: fp); there are no binary layers to pack"
        )
    model = build_architecture(architecture)
    load_model_weights(model, state["model"], ckpt_path)
    source = {"run": run_dir.name, "checkpoint": ckpt_path.name, "epoch": int(state.get("epoch", 0))}
    return model, architecture, source


def export_run(run_dir, out, checkpoint: str = "best") -> Path:
    """Export the model of a training run directory (``reste export RUN_DIR --out FILE``)."""
    model, architecture, source = load_run_model(run_dir, checkpoint)
    return export(model, out, architecture=architecture, source=source)
