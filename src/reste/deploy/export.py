"""Export a trained binary model with 1-bit weights, and load it back for inference.

File format (``.safetensors``, format version 2, see docs/deploy.md):

- The stored tensors are the inference state of the *deploy model*: the model with every
  binary layer replaced by its packed twin (:mod:`reste.deploy.packed`). Its named tensors
  are the entries of ``deploy.state_dict()``, in that order, except:

  - ``num_batches_tracked`` counters are left out;
  - each eval-mode BatchNorm stored as the two per-channel coefficients PyTorch evaluates it
    with, ``y = x * scale + shift`` (every ``BatchNorm1d/2d/3d`` with affine parameters and
    running statistics, unless the graph lists it in ``unfolded_batchnorms``): its
    ``weight, bias, running_mean, running_var`` are replaced, at the place of ``weight``, by
    ``<bn>.scale`` and ``<bn>.shift`` (``float32 [C]``).

  A packed layer holds ``<layer>.weight_bits`` (``uint8 [out, ceil(k/8)]``, 1 bit per weight),
  ``<layer>.alpha`` (``float32 [1]``, or ``[out]`` with the option ``"alpha": "channel"``) and
  ``<layer>.bias`` (``float32 [out]``) if the architecture's layer has one. Every other
  parameter and buffer (full-precision layers) is stored as it is. Nothing of training
  survives: no latent float weights of binary layers, no estimator parameters, no optimizer
  state, no ``num_batches_tracked`` counters.
- The file holds one safetensors tensor per dtype, named by the dtype (``"float32"``,
  ``"uint8"``, ...; PyTorch's name without ``torch.``), 1-D: the named tensors of that dtype
  flattened (row-major) and concatenated in the order above. Offsets and shapes are not
  stored; they follow from the rebuilt deploy model, so reading a file needs its
  architecture (:func:`read_tensors` rebuilds it and returns the named tensors).
- metadata (safetensors' string map): ``format = "reste.packed"``, ``format_version``,
  ``reste_version`` and ``graph``, a compact JSON document: ``architecture`` (the
  ``reste.models.create`` arguments, or null for a model the caller rebuilds),
  ``binary_layers`` (each binary layer's name with the options that differ from the
  defaults, usually ``{}``), ``unfolded_batchnorms`` (BatchNorms stored with their four
  tensors because their ``scale, shift`` could not be checked bit for bit; usually ``[]``),
  ``layout`` (``fingerprint``: the first 16 hex digits of the SHA-256 of
  ``json.dumps([[name, dtype, shape], ...], separators=(",", ":"))`` over the named tensors in
  order, dtype as in the blob names, shape a list; ``blobs``: each blob's number of
  elements), ``source`` (the run and checkpoint it came from, or null) and ``checksum``:
  ``"sha256:<hex>"`` of the graph description without ``checksum`` (compact JSON, sorted
  keys) followed by, for each blob in dtype-name order, its name, a zero byte and its raw
  bytes. :func:`load` rebuilds the architecture on the meta device first, recomputes the
  fingerprint and the blob sizes and compares them with the file's before anything is
  allocated, checks each binary layer's options against the architecture, and verifies the
  checksum (``verify=False`` skips it; a file without one, written by an earlier reste,
  loads with a warning). The checksum detects damage and edits, it does not authenticate:
  whoever can edit the file can recompute it.

safetensors stores raw tensors and a JSON header only, so loading a file never runs
code; the architecture is rebuilt from the model registry, never unpickled.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import warnings
from pathlib import Path

import torch
from torch import nn

from ..estimators import Estimator
from ..nn.convert import rebuild_attention
from ..nn.layers import BinaryLayer
from .packed import PackedBinaryConv2d, PackedBinaryLinear, _PackedBinary, packed_layer

__all__ = ["FORMAT", "FORMAT_VERSION", "ExportError", "to_deploy", "export", "export_run", "load", "read_graph",
           "read_tensors", "architecture_from_config"]

FORMAT = "reste.packed"
FORMAT_VERSION = 2
#: buffers that only count training steps; BatchNorm rebuilds them as zeros
_TRAINING_COUNTERS = ("num_batches_tracked",)
#: BatchNorm classes stored as (scale, shift), with the input rank their forward takes for a probe
_BN_PROBE_RANK = {nn.BatchNorm1d: 2, nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}
_BN_STATE = ("weight", "bias", "running_mean", "running_var")
#: probe magnitudes that read a BatchNorm's scale back exactly, largest first (see _bn_coefficients)
_PROBE_POWERS = tuple(2.0 ** k for k in range(127, 23, -1))
#: a graph description is a few KB; a longer one is not read (nor a JSON nested deeper than Python recurses)
MAX_GRAPH_BYTES = 1 << 20
#: what building a recorded architecture raises for absurd arguments (width: .inf, image_size: 1e5, ...)
_BUILD_ERRORS = (KeyError, TypeError, ValueError, OverflowError, RuntimeError, MemoryError, ZeroDivisionError)


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


# ----------------------------------------------------------------------------- batch norms as (scale, shift)
def _bn_coefficients(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """PyTorch's own per-channel ``(scale, shift)`` of an eval-mode BatchNorm, read back exactly.

    PyTorch evaluates it as ``x * scale + shift`` (one rounding, or two) with coefficients it
    derives from the statistics. Read back per channel, without a rounding of ours:

    - ``scale = BN(P) / P`` for the largest power of two ``P`` with ``BN(P) == -BN(-P)``, both
      finite: ``P * scale`` is exact, and if rounding ``P * scale + shift`` and
      ``-P * scale + shift`` gives opposite values, both are ``±P * scale`` (else the float
      ``P * scale``, lying between the two sums, would be nearer to one of them);
    - ``scale = 0`` where ``BN(max) == BN(-max)`` (the float32 extremes): rounding is monotone,
      so the channel outputs one constant for every finite input;
    - ``shift = BN(z)`` with a zero ``z`` whose product with ``scale`` is ``-0``: ``-0 + shift``
      is ``shift`` exactly, signed zeros included.

    :func:`_fold_bn` checks the result. None for BatchNorms this does not apply to (no affine
    parameters or running statistics, not float32, a subclass) or channels it cannot read.
    """
    rank = _BN_PROBE_RANK.get(type(bn))
    if rank is None or bn.training or not bn.affine or bn.running_mean is None or bn.running_var is None:
        return None
    if any(getattr(bn, k).dtype != torch.float32 for k in _BN_STATE):
        return None
    c = bn.num_features

    def run(values: torch.Tensor) -> torch.Tensor:  # [n, c] probe values -> [n, c] outputs
        with torch.no_grad():
            return bn(values.reshape((values.shape[0], c) + (1,) * (rank - 2)).contiguous()).reshape(values.shape[0], c)

    powers = torch.tensor(_PROBE_POWERS).reshape(-1, 1).expand(-1, c)
    pos, neg = run(powers), run(-powers)
    symmetric = torch.isfinite(pos) & torch.isfinite(neg) & (pos == -neg)
    biggest = torch.finfo(torch.float32).max
    top, bottom = run(torch.full((1, c), biggest))[0], run(torch.full((1, c), -biggest))[0]
    constant = torch.isfinite(top) & (top == bottom)
    if not (symmetric.any(0) | constant).all():
        return None
    first = symmetric.to(torch.uint8).argmax(0)  # the largest P that reads the channel's scale exactly
    channels = torch.arange(c)
    scale = torch.where(symmetric.any(0), pos[first, channels] / powers[first, channels], torch.zeros(c))
    shift = run(torch.where(torch.signbit(scale), 0.0, -0.0).reshape(1, c))[0]
    if not (torch.isfinite(scale).all() and torch.isfinite(shift).all()):
        return None
    return scale.clone(), shift.clone()


def _unit_variance(eps: float) -> float | None:
    """A float32 ``v`` with ``v + float32(eps) == 1`` in float32, so ``1 / sqrt(v + eps) == 1`` exactly."""
    e = torch.tensor(eps, dtype=torch.float32)
    v = 1 - e
    for _ in range(8):
        total = (v + e).item()
        if total == 1.0:
            return v.item()
        v = torch.nextafter(v, torch.tensor(2.0 if total < 1.0 else -2.0))
    return None


def _restore_bn(bn: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Set an eval-mode BatchNorm's state so that PyTorch evaluates it as ``x * scale + shift``, bit for bit.

    PyTorch computes ``a = (1 / sqrt(var + eps)) * weight`` and ``b = bias - mean * a``. With
    ``var + eps == 1`` exactly, ``weight = scale``, ``bias = shift`` and ``mean`` a zero whose
    sign makes ``mean * a == +0``, ``a = scale`` and ``b = shift`` exactly (``-0`` included).
    The statistics are then no longer the training ones: the module is for inference only.
    """
    var = _unit_variance(bn.eps)
    if var is None:
        raise ExportError(f"BatchNorm eps={bn.eps} admits no unit variance in float32")
    with torch.no_grad():
        bn.weight.copy_(scale)
        bn.bias.copy_(shift)
        bn.running_mean.copy_(torch.where(torch.signbit(scale), -0.0, 0.0))
        bn.running_var.fill_(var)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def _bn_probes(bn: nn.Module, gen: torch.Generator) -> list[torch.Tensor]:
    """Inputs for the export-time check: signed zeros, +-1, powers of two up to the float32
    extremes, and random values of many magnitudes, in every memory layout and in shapes
    that take PyTorch's vectorised, per-pixel and tail paths."""
    c, rank = bn.num_features, _BN_PROBE_RANK[type(bn)]
    one = (1, c) + (1,) * (rank - 2)
    specials = (0.0, -0.0, 1.0, -1.0, 2.0 ** 100, -(2.0 ** 100), torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max)
    probes = [torch.full(one, v) for v in specials]
    # BatchNorm1d takes [N, C] and [N, C, L]
    spatial = {2: [(), (5,)], 4: [(9, 7), (1, 1), (3, 5)], 5: [(3, 4, 5), (1, 1, 1)]}[rank]
    for n, size in zip((37, 4, 2), spatial):
        x = torch.randn((n, c) + size, generator=gen) * torch.pow(10.0, 3 * torch.randn((n, c) + size, generator=gen))
        probes.append(x)
        if x.dim() == 4:
            probes.append(x.contiguous(memory_format=torch.channels_last))
        elif x.dim() == 5:
            probes.append(x.contiguous(memory_format=torch.channels_last_3d))
    return probes


def _fold_bn(bn: nn.Module, seed: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(scale, shift)`` of ``bn`` if a BatchNorm restored from them by :func:`_restore_bn` computes
    exactly what ``bn`` computes (checked bit for bit on probe and random inputs); else None."""
    coeffs = _bn_coefficients(bn)
    if coeffs is None or _unit_variance(bn.eps) is None:
        return None
    twin = copy.deepcopy(bn)
    _restore_bn(twin, *coeffs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if all(_same_bits(bn(x), twin(x)) for x in _bn_probes(bn, gen)):
            return coeffs
    return None


def _foldable(module: nn.Module) -> bool:
    """A BatchNorm that a file stores as ``(scale, shift)`` unless the graph lists it in ``unfolded_batchnorms``:
    exactly ``BatchNorm1d/2d/3d`` (no subclass) with affine parameters and running statistics."""
    return (type(module) in _BN_PROBE_RANK and bool(module.affine)
            and module.running_mean is not None and module.running_var is not None)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _layout(deploy: nn.Module, folded) -> list[tuple[str, str, tuple[int, ...]]]:
    """The named tensors a file stores for ``deploy``, in order: ``(name, dtype, shape)``.

    ``deploy.state_dict()`` in order without ``num_batches_tracked``; each BatchNorm named in
    ``folded`` contributes ``scale, shift`` (float32, its channels) at the place of its weight,
    and nothing for its bias and running statistics.
    """
    folded = set(folded)
    entries = []
    for key, value in deploy.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if leaf in _TRAINING_COUNTERS:
            continue
        if owner in folded and leaf in _BN_STATE:
            if leaf == "weight":
                prefix = f"{owner}." if owner else ""
                entries += [(prefix + "scale", "float32", tuple(value.shape)), (prefix + "shift", "float32", tuple(value.shape))]
            continue
        entries.append((key, _dtype_name(value.dtype), tuple(value.shape)))
    return entries


def _fingerprint(entries) -> str:
    """First 16 hex digits of the SHA-256 of the compact JSON list ``[[name, dtype, shape], ...]``."""
    text = json.dumps([[name, dtype, list(shape)] for name, dtype, shape in entries], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _blob_sizes(entries) -> dict:
    sizes: dict = {}
    for _, dtype, shape in entries:
        sizes[dtype] = sizes.get(dtype, 0) + math.prod(shape)
    return sizes


def _checksum(graph: dict, blobs: dict) -> str:
    """``sha256:<hex>`` of the graph description (compact JSON, sorted keys, without ``checksum``)
    and of every blob's bytes (by dtype name): an edited option, architecture or weight changes it."""
    digest = hashlib.sha256()
    body = {k: v for k, v in graph.items() if k != "checksum"}
    digest.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    for dtype in sorted(blobs):
        blob = blobs[dtype].contiguous()
        digest.update(dtype.encode() + b"\0")
        digest.update(memoryview(blob.view(torch.uint8).numpy()))  # no copy
    return "sha256:" + digest.hexdigest()


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
    return {"architecture": architecture, "binary_layers": layers, "unfolded_batchnorms": unfolded,
            "layout": {"fingerprint": _fingerprint(entries), "blobs": _blob_sizes(entries)}, "source": source}


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
        raise ExportError(f"architecture/source must be JSON-serialisable (plain dicts, lists, numbers, strings): {err}") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = save(blobs, metadata={
        "format": FORMAT, "format_version": str(FORMAT_VERSION), "reste_version": __version__, "graph": text,
    })
    return atomic_write(path, lambda handle: handle.write(data))  # an older export survives a failed one


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
    try:
        version = int(meta.get("format_version", "0"))
    except ValueError:
        version = 0
    if version > FORMAT_VERSION:
        raise ExportError(f"{path} uses format version {version}, newer than this reste reads ({FORMAT_VERSION}); upgrade reste")
    if version < FORMAT_VERSION:
        raise ExportError(f"{path} uses format version {version}, which this reste no longer reads (it reads version "
                          f"{FORMAT_VERSION}); re-export it with this reste: `reste export RUN_DIR --out {path.name}`")
    if len(meta.get("graph", "")) > MAX_GRAPH_BYTES:
        raise ExportError(f"{path}: the graph description is longer than {MAX_GRAPH_BYTES >> 20} MiB (an export's is a few KB); "
                          "the file is damaged, re-export the model")
    try:
        graph = json.loads(meta["graph"])
    except (KeyError, ValueError, RecursionError) as err:
        raise ExportError(f"{path} has no readable graph description ({type(err).__name__}: {str(err)[:100]}); "
                          "re-export the model") from None
    if not isinstance(graph, dict) or not isinstance(graph.get("binary_layers"), dict):
        raise ExportError(f"{path}: the graph description lists no binary layers; re-export the model")
    layout = graph.get("layout")
    if (not isinstance(layout, dict) or not isinstance(layout.get("fingerprint"), str) or not isinstance(layout.get("blobs"), dict)
            or not isinstance(graph.get("unfolded_batchnorms", []), list) or not isinstance(graph.get("checksum", ""), str)):
        raise ExportError(f"{path}: the graph description has no readable tensor layout; the file is damaged, re-export the model")
    return graph


def build_architecture(architecture: dict) -> nn.Module:
    """The model described by an export's ``architecture`` entry (``reste.models.create`` arguments)."""
    from .. import models

    args = dict(architecture)
    name = args.pop("name")
    kwargs = args.pop("kwargs", {}) or {}
    return models.create(name, **args, **kwargs)


def _packed_twin(path: Path, name: str, old: nn.Module, options: dict) -> _PackedBinary:
    """The empty packed layer that replaces the architecture's layer ``name`` (geometry and bias from ``old``)."""
    if isinstance(old, (nn.Conv2d, PackedBinaryConv2d)):
        cls, kind, out = PackedBinaryConv2d, "conv", old.out_channels
    elif isinstance(old, (nn.Linear, PackedBinaryLinear)):
        cls, kind, out = PackedBinaryLinear, "linear", old.out_features
    else:
        raise ExportError(f"{path}: layer {name!r} is a {type(old).__name__} in this architecture, but a binary conv or "
                          "linear layer in the file; it is not the architecture the file was exported from")
    if not isinstance(options, dict):
        raise ExportError(f"{path}: binary layer {name!r} has options {options!r}, not a JSON object; the file is damaged, re-export it")
    options = dict(options)
    alpha = options.pop("alpha", "layer")
    if alpha not in ("layer", "channel"):
        raise ExportError(f"{path}: binary layer {name!r} has alpha={alpha!r}; expected 'layer' or 'channel' (re-export the model)")
    if isinstance(old, BinaryLayer):
        # the architecture fixes every option that changes the computation: the file must agree
        implied = {"inputs": "binary" if old.binary_inputs else "real",
                   "alpha": "channel" if old.weight_scale == "channel_mean" and out > 1 else "layer"}
        if kind == "conv":
            implied["input_padding"] = old.input_padding
        recorded = {"inputs": options.get("inputs", "binary"), "alpha": alpha, "input_padding": options.get("input_padding", "zero")}
        differ = [f"{key} {recorded[key]!r} (the architecture has {value!r})" for key, value in implied.items() if recorded[key] != value]
        if differ:
            raise ExportError(f"{path}: binary layer {name!r} is recorded with {', '.join(differ)}; the file was edited or "
                              "is of another architecture, re-export it")
    try:
        return cls.like(old, alpha_size=out if alpha == "channel" else 1, bias=getattr(old, "bias", None) is not None, **options)
    except (TypeError, ValueError) as err:
        raise ExportError(f"{path}: cannot rebuild binary {kind} layer {name!r} with options {options}: {err}") from None


def _describe(sizes: dict) -> str:
    return " + ".join(f"{n:,} {dtype}" if isinstance(n, int) else f"{n!r} {dtype}" for dtype, n in sorted(sizes.items())) or "nothing"


def _skeleton(path: Path, graph: dict, model: nn.Module) -> tuple[nn.Module, set, list]:
    """``model`` with its binary layers replaced by empty packed twins, the BatchNorms stored as
    ``(scale, shift)``, and the layout it stores; ExportError where the file does not fit it."""
    # a float architecture's nn.MultiheadAttention holds raw projections; binarize rebuilt those it converted
    rebuild_attention(model, inside=graph["binary_layers"])
    for name, options in graph["binary_layers"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ExportError(f"{path}: the architecture has no layer {name!r}; it is not the architecture the file was exported from") from None
        _set_module(model, name, _packed_twin(path, name, old, options))
    leftover = [n for n, m in model.named_modules() if isinstance(m, Estimator)]
    if leftover:
        raise ExportError(f"{path}: layers {', '.join(leftover[:3])} of the architecture are binary but not in the file; "
                          "the file was exported from a different precision")
    unfolded = set(graph.get("unfolded_batchnorms", []))
    folded = {n for n, m in model.named_modules() if _foldable(m) and n not in unfolded}
    return model, folded, _layout(model, folded)


def _check_layout(path: Path, graph: dict, entries: list, stored_sizes: dict) -> None:
    """The layout rebuilt from the architecture against the file's fingerprint and its blobs' real sizes."""
    want, stored = _blob_sizes(entries), graph["layout"]
    if _fingerprint(entries) != stored["fingerprint"]:
        raise ExportError(
            f"{path} was written for a different architecture / model arguments: layout fingerprint differs "
            f"(file {stored['fingerprint']}, this architecture {_fingerprint(entries)}; the file holds "
            f"{_describe(stored_sizes)} values, this architecture stores {_describe(want)}); re-export it, "
            "or pass the model it came from: reste.deploy.load(path, model=...)")
    if stored["blobs"] != want:
        raise ExportError(f"{path}: the graph's blob sizes ({_describe(stored['blobs'])}) do not match its layout "
                          f"({_describe(want)}); the file is damaged, re-export it")
    if stored_sizes != want:
        raise ExportError(f"{path} holds tensors of {_describe(stored_sizes)} values, but its layout needs 1-D blobs "
                          f"{_describe(want)}; the file is damaged, re-export it")


def _stored_sizes(path: Path) -> dict:
    """Elements of each stored blob, from the safetensors header (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: math.prod(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise ExportError(f"{path} is truncated or corrupt ({err}); re-export the model") from None


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
            raise ExportError(f"{path} records no architecture (it was exported from a model outside reste.models); "
                              "pass the architecture: reste.deploy.load(path, model=MyNet())")
        label = json.dumps(arch)[:120] if isinstance(arch, dict) else repr(arch)[:120]
        try:
            with torch.device("meta"):
                shape_only = build_architecture(arch)
                problem = check_size(shape_only, copies=2)  # the float model and its packed twin
        except _BUILD_ERRORS as err:
            raise ExportError(f"{path}: cannot rebuild the recorded architecture {label}: {str(err)[:200]}") from None
        if problem:
            raise ExportError(f"{path}: the recorded architecture {label} is too big to build: {problem}; "
                              "the file is damaged, re-export it")
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
        raise ExportError(f"{path} holds tensors {found}, but its layout needs 1-D blobs {_describe(want)}; "
                          "the file is damaged, re-export it")
    if verify:
        if "checksum" not in graph:
            warnings.warn(f"{path} has no content checksum (exported by an earlier reste), so its weights cannot be "
                          "verified; re-export it to add one", stacklevel=3)
        elif _checksum(graph, blobs) != graph["checksum"]:
            raise ExportError(f"{path}: content checksum differs (the weights or the graph description were changed "
                              "after export, or the file is damaged); re-export the model")
    offsets = {dtype: 0 for dtype in want}
    tensors = {}
    for name, dtype, shape in entries:
        n = math.prod(shape)
        tensors[name] = blobs[dtype][offsets[dtype]:offsets[dtype] + n].reshape(shape)
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


def load(path, model: nn.Module | None = None, fuse: bool = True, verify: bool = True) -> nn.Module:
    """Load an exported file as an eval-mode inference model with packed binary layers.

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
        parts = [f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                 for label, keys in (("missing in file", missing), ("not in architecture", unexpected)) if keys]
        raise ExportError(f"{path} does not fit the architecture ({'; '.join(parts)})")
    for name, (scale, shift) in coeffs.items():
        _restore_bn(model.get_submodule(name), scale, shift)
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
    from ..models.build import model_arguments
    from ..train.config import config_from_dict

    cfg = config_from_dict(config) if isinstance(config, dict) else config
    return model_arguments(cfg, data.info(cfg.data.name))


def load_run_model(run_dir, checkpoint: str = "best") -> tuple[nn.Module, dict, dict]:
    """The trained model of a run directory: ``(model, architecture, source)``.

    ``checkpoint`` is ``"best"`` or ``"last"`` (``checkpoints/<checkpoint>.pt``) or a path to a ``.pt`` file.
    """
    from ..train.checkpoint import load_checkpoint, load_model_weights
    from ..train.rundir import CONFIG, checkpoint_path, read_config

    run_dir = Path(run_dir)
    if checkpoint in ("best", "last"):
        ckpt_path = checkpoint_path(run_dir, checkpoint)
        if not ckpt_path.is_file():
            other = "last" if checkpoint == "best" else "best"
            hint = f"; try --checkpoint {other}" if checkpoint_path(run_dir, other).is_file() else ""
            raise ExportError(f"{ckpt_path} does not exist{hint} (is {run_dir} a run directory written by `reste train`?)")
    else:
        ckpt_path = Path(checkpoint)
    state = load_checkpoint(ckpt_path, required=("model",))
    config = state.get("config")
    if not config:
        cfg_file = run_dir / CONFIG
        if not cfg_file.is_file():
            raise ExportError(f"{ckpt_path} holds no config and {cfg_file} is missing; cannot tell which architecture to build")
        config = read_config(run_dir)
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
