"""ONNX export of a trained binary model, checked with onnxruntime.

ONNX has no 1-bit tensors, so the graph holds each binary layer as a float32 layer whose
weights are folded to constants, and spells out what the layer computes::

    binary inputs (1W/1A):  y = conv(s(x), S) * alpha + b,   s(x) = Where(x < 0, -1, +1),  S = sign(W) in {-1, +1}
    real inputs (1W/32A):   y = conv(x, alpha * S) + b

``s`` is written as ``Where(Less(x, 0), -1, 1)`` rather than ONNX's ``Sign``, which maps 0
to 0: sign(0) = +1 is explicit in the graph. With ±1 inputs and weights every sum is an
integer (exact in float32 below 2**24), scaled by ``alpha`` once: the computation of the
trained model's eval mode and of the packed ``.safetensors`` export, so onnxruntime's
logits agree with the trained model to float rounding in the real layers. The batch
dimension is dynamic (input ``input [N, C, H, W]``, output ``logits [N, classes]``).

The file's ``metadata_props`` record ``reste.version``, ``reste.source`` (run and
checkpoint), ``reste.data`` (as the ``data`` entry of a packed export, see
:mod:`reste.deploy.verify`) and, after the check, ``reste.verification``.

Needs ``onnx`` and ``onnxscript`` (dynamo exporter) to write and ``onnxruntime`` to check:
``pip install 'reste[onnx]'``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.layers import INPUT_PADDINGS
from .export import ExportError, _set_module, to_deploy
from .packed import PackedBinaryConv2d, PackedBinaryLinear
from .packed import _pm1 as _sign  # Where(x < 0, -1, +1) in the graph: sign(0) = +1, as in training

__all__ = [
    "EXPORTERS",
    "SignConv2d",
    "SignLinear",
    "to_onnx_module",
    "export_onnx",
    "OnnxRuntimeModel",
    "check_onnx",
    "write_onnx_metadata",
    "read_onnx_metadata",
]

#: ``dynamo``: torch.export-based (PyTorch's default since 2.9, needs onnxscript);
#: ``torchscript``: the older tracing exporter (deprecated by PyTorch, faster to run)
EXPORTERS = ("dynamo", "torchscript")
INSTALL_HINT = "pip install 'reste[onnx]' (onnx, onnxscript, onnxruntime)"


class _SignLayer(nn.Module):
    weight: Tensor  # buffers (_init_from), for the type checker
    alpha: Tensor | None  # None without binary inputs
    bias: Tensor | None

    def _init_from(self, packed) -> None:
        self.binary_inputs = packed.binary_inputs
        if packed.binary_inputs:  # ±1 constants, alpha after the integer sums
            self.register_buffer("weight", packed.sign_weight().clone())
            self.register_buffer("alpha", packed.alpha.detach().float().clone())
        else:  # ±alpha constants: the trained layer's own conv(x, alpha * sign(W))
            self.register_buffer("weight", packed.scaled_weight().clone())
            self.alpha = None
        self.register_buffer("bias", None if packed.bias is None else packed.bias.detach().float().clone())

    def _scale(self, dot: Tensor, trailing: int) -> Tensor:
        a = cast(Tensor, self.alpha)  # set: _scale runs for binary inputs only
        alpha = a.reshape((-1,) + (1,) * trailing) if a.numel() > 1 else a.reshape(())
        out = dot * alpha
        return out if self.bias is None else out + self.bias.reshape((-1,) + (1,) * trailing)


class SignConv2d(_SignLayer):
    """ONNX-exportable twin of a packed binary convolution (see the module docstring)."""

    def __init__(self, packed: PackedBinaryConv2d):
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = (
            packed.stride,
            packed.padding,
            packed.dilation,
            packed.groups,
        )
        self.input_padding = packed.input_padding
        self._init_from(packed)

    def forward(self, x: Tensor) -> Tensor:
        if not self.binary_inputs:
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        xs, padding = _sign(x), self.padding
        if self.input_padding != "zero" and any(padding):
            ph, pw = padding
            xs = F.pad(xs, (pw, pw, ph, ph), value=INPUT_PADDINGS[self.input_padding])
            padding = (0, 0)
        return self._scale(F.conv2d(xs, self.weight, None, self.stride, padding, self.dilation, self.groups), 2)


class SignLinear(_SignLayer):
    """ONNX-exportable twin of a packed binary linear layer (see the module docstring)."""

    def __init__(self, packed: PackedBinaryLinear):
        super().__init__()
        self._init_from(packed)

    def forward(self, x: Tensor) -> Tensor:
        if not self.binary_inputs:
            return F.linear(x, self.weight, self.bias)
        return self._scale(F.linear(_sign(x), self.weight), 0)


def to_onnx_module(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every binary layer as a :class:`SignConv2d` / :class:`SignLinear`
    (plain PyTorch ops on folded constants, which both ONNX exporters and ``torch.jit.trace`` take)."""
    twin = to_deploy(model)  # checks the model and packs: the signs and alphas of the .safetensors export
    for name, layer in list(twin.named_modules()):
        if isinstance(layer, PackedBinaryConv2d):
            _set_module(twin, name, SignConv2d(layer))
        elif isinstance(layer, PackedBinaryLinear):
            _set_module(twin, name, SignLinear(layer))
    return twin.eval()


def export_onnx(
    model: nn.Module,
    path,
    input_shape,
    *,
    exporter: str = "dynamo",
    opset: int | None = None,
    metadata: dict | None = None,
) -> Path:
    """Write ``model`` (a trained binary model) as an ONNX graph with a dynamic batch dimension.

    Args:
        input_shape: ``(C, H, W)`` of one input.
        exporter: one of :data:`EXPORTERS`.
        opset: ONNX opset (default: the exporter's).
        metadata: extra ``metadata_props`` (values JSON-encoded unless strings).

    The file is written next to ``path`` and renamed into place, so a failed export leaves a
    previous file intact.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    try:
        import onnx  # noqa: F401

        if exporter == "dynamo":
            import onnxscript  # noqa: F401
    except ImportError as err:
        raise ExportError(f"ONNX export needs the onnx packages ({err.name} is missing): {INSTALL_HINT}") from None
    path = Path(path)
    twin = to_onnx_module(model)
    example = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    tmp = path.with_name(path.name + ".tmp")
    kwargs: dict[str, Any] = {"input_names": ["input"], "output_names": ["logits"]}
    if opset is not None:
        kwargs["opset_version"] = opset
    if exporter == "dynamo":
        kwargs.update(dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False)
    else:
        kwargs.update(dynamo=False, dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    try:
        with torch.no_grad():
            torch.onnx.export(twin, (example,), str(tmp), **kwargs)
        from .. import __version__

        write_onnx_metadata(tmp, {"reste.version": __version__, **(metadata or {})})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_onnx_metadata(path, entries: dict) -> None:
    """Set ``metadata_props`` entries of an ONNX file (dicts and lists stored as compact JSON)."""
    import onnx

    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    props.update({k: v if isinstance(v, str) else json.dumps(v, separators=(",", ":")) for k, v in entries.items()})
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def read_onnx_metadata(path) -> dict:
    """The ``metadata_props`` of an ONNX file, JSON values decoded."""
    import onnx

    out = {}
    for p in onnx.load(str(path), load_external_data=False).metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except ValueError:
            out[p.key] = p.value
    return out


class OnnxRuntimeModel:
    """An ONNX file run by onnxruntime on the CPU, called like a model: ``logits = m(images)``."""

    def __init__(self, path):
        try:
            import onnxruntime
        except ImportError:
            raise ExportError(f"checking or running an ONNX file needs onnxruntime: {INSTALL_HINT}") from None
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: Tensor) -> Tensor:
        out = self.session.run(None, {self.input: x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out)

    def eval(self):
        return self


def check_onnx(model: nn.Module, path, input_shape, loader=None, images: int | None = 1000) -> dict:
    """onnxruntime against the trained ``model``: on 8 random inputs (a batch size other than the
    export's, so the dynamic batch dimension is exercised) and, with a ``loader``, on its first
    ``images`` test images. Passes under the packed export's rules (:mod:`reste.deploy.verify`):
    at most ``LOGIT_TOLERANCE`` on random inputs, the same class on ``MIN_AGREEMENT`` of the images."""
    from .verify import LOGIT_TOLERANCE, MIN_AGREEMENT, RANDOM_INPUTS, compare

    session = OnnxRuntimeModel(path)
    model = model.cpu().eval()
    x = torch.randn(RANDOM_INPUTS, *input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        random_diff = (session(x) - model(x).float()).abs().max().item()
    # an OnnxRuntimeModel has what compare uses of a module (eval(), calling it)
    result = compare(model, session, loader, images) if loader is not None else {"images": 0}  # type: ignore[arg-type]
    result.update({"runtime": "onnxruntime", "random_inputs": RANDOM_INPUTS, "random_max_abs_logit_diff": random_diff})
    problem = None
    if result["images"] and result["agreement"] < MIN_AGREEMENT:
        problem = (
            f"onnxruntime predicts another class than the trained model on {100 * (1 - result['agreement']):.2f}% "
            f"of {result['images']} test images (at most {100 * (1 - MIN_AGREEMENT):g}% expected)"
        )
    elif random_diff > LOGIT_TOLERANCE:
        problem = (
            f"onnxruntime's logits differ from the trained model's by {random_diff:.3g} on random inputs "
            f"(at most {LOGIT_TOLERANCE:g} expected)"
        )
    result["passed"] = problem is None
    result["problem"] = problem
    return result
