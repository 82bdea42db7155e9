"""The file format of ``reste export``: what a ``.safetensors`` file holds, its graph description
(metadata), layout fingerprint and checksum. :mod:`reste.deploy.export` writes and loads it.

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
  architecture (:func:`~reste.deploy.export.read_tensors` rebuilds it and returns the named tensors).
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
  bytes. :func:`~reste.deploy.export.load` rebuilds the architecture on the meta device first, recomputes the
  fingerprint and the blob sizes and compares them with the file's before anything is
  allocated, checks each binary layer's options against the architecture, and verifies the
  checksum (``verify=False`` skips it; a file without one, written by an earlier reste,
  loads with a warning). The checksum detects damage and edits, it does not authenticate:
  whoever can edit the file can recompute it.

safetensors stores raw tensors and a JSON header only, so loading a file never runs
code; the architecture is rebuilt from the model registry, never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from torch import nn

from ..errors import ReSTEError

__all__ = ["FORMAT", "FORMAT_VERSION", "MAX_GRAPH_BYTES", "ExportError", "read_graph"]

FORMAT = "reste.packed"
FORMAT_VERSION = 2
#: buffers that only count training steps; BatchNorm rebuilds them as zeros
_TRAINING_COUNTERS = ("num_batches_tracked",)
#: the tensors of a BatchNorm that a file stores as ``<bn>.scale, <bn>.shift`` (see reste.deploy.batchnorm)
_BN_STATE = ("weight", "bias", "running_mean", "running_var")
#: a graph description is a few KB; a longer one is not read (nor a JSON nested deeper than Python recurses)
MAX_GRAPH_BYTES = 1 << 20


class ExportError(ReSTEError, ValueError):
    """A model, run directory or exported file that cannot be exported or loaded; the message says why
    (exit code 1)."""


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
                entries += [
                    (prefix + "scale", "float32", tuple(value.shape)),
                    (prefix + "shift", "float32", tuple(value.shape)),
                ]
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
        raise ExportError(
            f"{path} is not a reste export (metadata format={meta.get('format')!r}); export one with `reste export`"
        )
    try:
        version = int(meta.get("format_version", "0"))
    except ValueError:
        version = 0
    if version > FORMAT_VERSION:
        raise ExportError(
            f"{path} uses format version {version}, newer than this reste reads ({FORMAT_VERSION}); upgrade reste"
        )
    if version < FORMAT_VERSION:
        raise ExportError(
            f"{path} uses format version {version}, which this reste no longer reads (it reads version "
            f"{FORMAT_VERSION}); re-export it with this reste: `reste export RUN_DIR --out {path.name}`"
        )
    if len(meta.get("graph", "")) > MAX_GRAPH_BYTES:
        raise ExportError(
            f"{path}: the graph description is longer than {MAX_GRAPH_BYTES >> 20} MiB (an export's is a few KB); "
            "the file is damaged, re-export the model"
        )
    try:
        graph = json.loads(meta["graph"])
    except (KeyError, ValueError, RecursionError) as err:
        raise ExportError(
            f"{path} has no readable graph description ({type(err).__name__}: {str(err)[:100]}); re-export the model"
        ) from None
    if not isinstance(graph, dict) or not isinstance(graph.get("binary_layers"), dict):
        raise ExportError(f"{path}: the graph description lists no binary layers; re-export the model")
    layout = graph.get("layout")
    if (
        not isinstance(layout, dict)
        or not isinstance(layout.get("fingerprint"), str)
        or not isinstance(layout.get("blobs"), dict)
        or not isinstance(graph.get("unfolded_batchnorms", []), list)
        or not isinstance(graph.get("checksum", ""), str)
    ):
        raise ExportError(
            f"{path}: the graph description has no readable tensor layout; the file is damaged, re-export the model"
        )
    return graph


def _describe(sizes: dict) -> str:
    return (
        " + ".join(f"{n:,} {dtype}" if isinstance(n, int) else f"{n!r} {dtype}" for dtype, n in sorted(sizes.items()))
        or "nothing"
    )


_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")
_CAST = {"float16": "half", "bfloat16": "bfloat16", "float32": "float", "float64": "double"}
#: the tensors an export stores as float32 whatever the model's dtype: weight scales, folded BatchNorms
_ALWAYS_FLOAT32 = ("alpha", "scale", "shift")


def _float_dtype_only_difference(entries: list, stored: dict) -> str | None:
    """The file's float dtype when the layouts differ only in it (a model cast to another float
    dtype than the one exported), else None."""
    for candidate in (d for d in stored.get("blobs", {}) if d in _FLOAT_NAMES):
        # the weight scales and folded BatchNorms are float32 in every export: a float64 file keeps them
        # float32, so a float32 model differs from it only in the other tensors
        for keep in ((), _ALWAYS_FLOAT32):
            recast = [
                (n, candidate if d in _FLOAT_NAMES and n.rpartition(".")[2] not in keep else d, s)
                for n, d, s in entries
            ]
            if _fingerprint(recast) == stored["fingerprint"]:
                return candidate
    return None


def _check_layout(path: Path, graph: dict, entries: list, stored_sizes: dict) -> None:
    """The layout rebuilt from the architecture against the file's fingerprint and its blobs' real sizes."""
    want, stored = _blob_sizes(entries), graph["layout"]
    if _fingerprint(entries) != stored["fingerprint"]:
        file_dtype = _float_dtype_only_difference(entries, stored)
        if file_dtype is not None:
            here = sorted({d for _, d, _ in entries if d in _FLOAT_NAMES and d != file_dtype})
            raise ExportError(
                f"{path} holds {file_dtype} values, but the model given has {', '.join(here)} tensors; the "
                f"architecture is the same: load into a {file_dtype} model (reste.deploy.load(path, model="
                f"model.{_CAST[file_dtype]}())), then convert the loaded model if you need another dtype"
            )
        raise ExportError(
            f"{path} was written for a different architecture / model arguments: layout fingerprint differs "
            f"(file {stored['fingerprint']}, this architecture {_fingerprint(entries)}; the file holds "
            f"{_describe(stored_sizes)} values, this architecture stores {_describe(want)}); re-export it, "
            "or pass the model it came from: reste.deploy.load(path, model=...)"
        )
    if stored["blobs"] != want:
        raise ExportError(
            f"{path}: the graph's blob sizes ({_describe(stored['blobs'])}) do not match its layout "
            f"({_describe(want)}); the file is damaged, re-export it"
        )
    if stored_sizes != want:
        raise ExportError(
            f"{path} holds tensors of {_describe(stored_sizes)} values, but its layout needs 1-D blobs "
            f"{_describe(want)}; the file is damaged, re-export it"
        )


def _stored_sizes(path: Path) -> dict:
    """Elements of each stored blob, from the safetensors header (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: math.prod(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise ExportError(f"{path} is truncated or corrupt ({err}); re-export the model") from None
