"""Binary convolution and linear layers.

A binary layer computes ``conv(sign(x), alpha * sign(W))``: latent real weights
``W`` binarized by a weight estimator and scaled by ``alpha``; inputs binarized by
an input estimator (or kept real, 1W/32A). Both are ordinary ``nn.Conv2d`` /
``nn.Linear`` subclasses with the same constructor arguments plus the
binarization options, so they drop into any model and load float checkpoints.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..estimators import Estimator, WeightBinarizer, binary_sign, weight_binarizer, weight_binarizers
from ..estimators import estimator as make_estimator

__all__ = ["BinaryConv2d", "BinaryLinear", "BinaryLayer", "WEIGHT_SCALES", "INPUT_PADDINGS", "binary_layers"]

WEIGHT_SCALES = ("layer_mean", "channel_mean", "none")
INPUT_PADDINGS = {"zero": 0.0, "+1": 1.0, "-1": -1.0}

EstimatorSpec = str | Estimator | None


def _build(spec: EstimatorSpec, params: dict | None, for_inputs: bool) -> Estimator | None:
    if spec is None:
        return None
    if not for_inputs and isinstance(spec, str) and spec in weight_binarizers():
        return weight_binarizer(spec)  # e.g. "dorefa"; estimator_params are for the estimators
    est = make_estimator(spec, **(params or {})) if not isinstance(spec, Estimator) else spec
    return est.for_inputs() if for_inputs else est


class _BinaryInputConvFn(torch.autograd.Function):
    """``conv2d(sign(x), w)`` that keeps only ``x`` (not ``sign(x)`` too) for backward: the
    recompute path of :func:`reste.ops.recomputes_sign`.

    The plain path saves ``x`` in the estimator and ``sign(x)`` in the conv: twice the
    activation memory of a float conv. Here ``sign(x)`` is recomputed in backward (one
    cheap pass), and the estimator's rule is applied to the conv's input gradient.

    Given ``alpha`` (``w = alpha * sign(W)``: binary weights; alpha per output channel or one for the
    layer, as :meth:`BinaryLayer.weight_alpha` gives it, without gradient) the forward computes
    ``conv(sign(x), sign(W)) * alpha + bias``, as :class:`_BinaryInputLinearFn` does: the integer
    sums exact before one rounding by ``alpha``, the packed layer's value bit for bit. Rounded the
    other way, a sum of exactly 0 came out as about +-1e-8, and a ReLU after the conv passed the
    gradient of about half of those outputs, a different half in float64, channels_last or another
    thread count. The backward is that of ``conv(sign(x), w)`` either way.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, est, stride, padding, dilation, groups, pad_value, alpha=None):
        xb = _pad_binary(ops.transient_sign(x), padding, pad_value)
        conv_padding = padding if pad_value is None else (0, 0)
        ctx.save_for_backward(x, weight)
        ctx.conf = (
            est,
            stride,
            padding,
            dilation,
            groups,
            pad_value,
            conv_padding,
            None if bias is None else tuple(bias.shape),
        )
        if alpha is None:
            return F.conv2d(xb, weight, bias, stride, conv_padding, dilation, groups)
        dot = F.conv2d(xb, binary_sign(weight), None, stride, conv_padding, dilation, groups)
        alpha = alpha.reshape(-1).to(dot.dtype)
        out = dot * (alpha.reshape(-1, 1, 1) if alpha.numel() > 1 else alpha.reshape(()))
        return out if bias is None else out + bias.to(out.dtype).reshape(-1, 1, 1)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        est, stride, padding, dilation, groups, pad_value, conv_padding, bias_shape = ctx.conf
        dtype = grad_out.dtype  # under autocast the forward conv ran in bf16: stay in it
        xb = _pad_binary(ops.transient_sign(x), padding, pad_value).to(dtype)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias_shape is not None and ctx.needs_input_grad[2]]
        grad_xb, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out,
            xb,
            weight.to(dtype),
            list(bias_shape) if bias_shape else None,
            list(stride),
            list(conv_padding),
            list(dilation),
            False,
            [0, 0],
            groups,
            mask,
        )
        grad_x = None
        if mask[0]:
            if pad_value is not None and any(padding):
                ph, pw = padding
                grad_xb = grad_xb[:, :, ph : grad_xb.shape[2] - ph, pw : grad_xb.shape[3] - pw]
            # grad_xb is ours (fresh from convolution_backward): the rule may overwrite it
            grad_x = est.surrogate_grad_(x, grad_xb.to(x.dtype).contiguous(memory_format=_layout(x)))
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


class _BinaryInputLinearFn(torch.autograd.Function):
    """``linear(sign(x), w)`` saving only ``x``; see :class:`_BinaryInputConvFn`.

    Given ``alpha`` (``w = alpha * sign(W)``, alpha per row or for the layer, without gradient) the
    forward computes ``linear(sign(x), sign(W)) * alpha + bias``: the same value, but with the integer
    sums exact before one rounding by ``alpha``, which is what packed inference
    (:mod:`reste.deploy`) computes. Rounded the other way, the ~1e-7 differences turned into
    flipped signs after a ViT's LayerNorms and the deployed ViT disagreed with the trained one.
    The backward is that of ``linear(sign(x), w)`` either way.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, est, alpha=None):
        ctx.save_for_backward(x, weight)
        ctx.est = est
        ctx.has_bias = bias is not None
        xb = binary_sign(x)
        if alpha is None:
            return F.linear(xb, weight, bias)
        dot = F.linear(xb, binary_sign(weight))
        alpha = alpha.reshape(-1).to(dot.dtype)
        out = dot * (alpha if alpha.numel() > 1 else alpha.reshape(()))
        return out if bias is None else out + bias.to(out.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        dtype = grad_out.dtype  # bf16 under autocast
        if ctx.needs_input_grad[0]:
            grad_x = ctx.est.surrogate_grad(x, grad_out.matmul(weight.to(dtype)).to(x.dtype))
        if ctx.needs_input_grad[1]:
            xb = binary_sign(x).to(dtype)
            grad_w = grad_out.reshape(-1, grad_out.shape[-1]).t().matmul(xb.reshape(-1, xb.shape[-1])).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None


class _PassThrough:
    """The rule of a conv/linear function whose input is already ``sign(x)`` through an estimator
    that could not take the recompute path (DSQ: its backward trains alpha): the gradient as it is."""

    @staticmethod
    def surrogate_grad(x: Tensor, grad: Tensor) -> Tensor:
        return grad

    surrogate_grad_ = surrogate_grad


_PASS_THROUGH = _PassThrough()


def _layout(x: Tensor):
    return (
        torch.channels_last
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format
    )


def _pad_binary(xb: Tensor, padding, pad_value):
    if pad_value is None or not any(padding):
        return xb
    ph, pw = padding
    return F.pad(xb, (pw, pw, ph, ph), value=pad_value)


class BinaryLayer:
    """What binary conv and linear layers share: weight and input binarization."""

    weight: Tensor  # a Parameter; Tensor as nn.Conv2d and nn.Linear declare it
    weight_estimator: Estimator | None
    input_estimator: Estimator | None

    def _init_binary(self, weight_estimator, input_estimator, weight_scale, input_padding, estimator_params):
        if weight_scale not in WEIGHT_SCALES:
            raise ValueError(f"weight_scale must be one of {WEIGHT_SCALES}, got {weight_scale!r}")
        if str(input_padding) not in INPUT_PADDINGS:
            raise ValueError(f"input_padding must be one of {tuple(INPUT_PADDINGS)}, got {input_padding!r}")
        self.weight_estimator = _build(weight_estimator, estimator_params, for_inputs=False)
        if isinstance(self.weight_estimator, WeightBinarizer):
            self.weight_estimator.check_weight_scale(weight_scale)
        self.input_estimator = _build(input_estimator, estimator_params, for_inputs=True)
        self.weight_scale = weight_scale
        self.input_padding = str(input_padding)

    def _exact_inference_possible(self, x: Tensor) -> bool:
        """Whether the forward may compute ``op(sign(x), sign(W)) * alpha + bias`` (integer sums exact,
        one rounding by alpha, as packed inference does): binary weights and inputs, float32, no
        autocast, eager mode."""
        if not (self.binary_weights and self.binary_inputs and x.dtype == torch.float32):
            return False
        if torch.compiler.is_compiling():
            return False
        if x.device.type == "meta":  # shapes only (reste summary's check): autocast knows no meta device
            return False
        try:
            return not torch.is_autocast_enabled(x.device.type)  # bf16 would round the integer sums
        except TypeError:  # torch < 2.4 takes no device type
            return not torch.is_autocast_enabled()

    @property
    def binary_weights(self) -> bool:
        return self.weight_estimator is not None

    @property
    def binary_inputs(self) -> bool:
        return self.input_estimator is not None

    def _exact_alpha(self) -> Tensor | None:
        """``alpha`` for the exact-sums forward (no gradient: the backward takes it through the
        weights), or None when the weights are real (1W/32A's float weights have no integer sums)."""
        if not self.binary_weights:
            return None
        with torch.no_grad():
            return self.weight_alpha()

    def _exact_training(self) -> bool:
        """Whether the training forward may take the exact-sums functions with an input already
        binarized (an estimator that keeps its own backward, DSQ): binary inputs, eager mode."""
        return self.input_estimator is not None and not torch.compiler.is_compiling()

    def weight_alpha(self, weight: Tensor | None = None) -> Tensor:
        """The scale ``alpha`` of the binary weights (differentiable, shape broadcastable to W)."""
        w = self.weight if weight is None else weight
        if isinstance(self.weight_estimator, WeightBinarizer):
            return self.weight_estimator.alpha(w)
        if self.weight_scale == "layer_mean":
            return w.abs().mean()
        if self.weight_scale == "channel_mean":
            return w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)
        return torch.ones((), dtype=w.dtype, device=w.device)

    def quantized_weight(self) -> Tensor:
        """The weights the layer computes with: ``alpha * sign(W)`` (real W when weights are not binary)."""
        w = self.weight
        if self.weight_estimator is None:
            return w
        if isinstance(self.weight_estimator, WeightBinarizer):
            return self.weight_estimator(w)  # alpha * sign(W) already (e.g. DoReFa's E|W| sign(W))
        if self.weight_scale != "none":  # scale, sign and their backward in one Triton kernel each (CUDA)
            fused = ops.binarize_weight(w, self.weight_estimator.kernel_rule(), self.weight_scale == "channel_mean")
            if fused is not None:
                return fused
        return self.weight_alpha(w) * self.weight_estimator(w)

    def quantized_input(self, x: Tensor) -> Tensor:
        return x if self.input_estimator is None else self.input_estimator(x)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling it
        raise RuntimeError(
            f"torch.jit.script cannot compile reste's {type(self).__name__} (its estimators are Python objects and "
            "its training forward a custom autograd function). Use torch.jit.trace(model.eval(), example) under "
            "torch.no_grad(), "
            "torch.onnx.export(model.eval(), (example,)) or `reste export RUN_DIR --format onnx` "
            "(reste.deploy.export_onnx); see docs/deploy.md, Interoperability"
        )

    def _binary_repr(self) -> str:
        w = self.weight_estimator.name if self.weight_estimator is not None else "real"
        a = self.input_estimator.name if self.input_estimator is not None else "real"
        return f"weights={w}, inputs={a}, weight_scale={self.weight_scale}, input_padding={self.input_padding}"


class BinaryConv2d(BinaryLayer, nn.Conv2d):
    """``nn.Conv2d`` with binary weights and (optionally) binary inputs.

    Args: those of ``nn.Conv2d``, plus

    - ``weight_estimator``: estimator name or instance for the weights, a weight binarizer
      (``"dorefa"`` for DoReFa-Net's ``E|W| sign(W)`` with identity gradient, see
      :class:`reste.estimators.DoReFa`), or None to keep them real;
    - ``input_estimator``: estimator for the inputs; None keeps inputs real (1W/32A);
    - ``weight_scale``: ``layer_mean`` (one ``mean |W|`` for the layer, the reference),
      ``channel_mean`` (per output channel) or ``none``;
    - ``input_padding``: value the binarized input is padded with: ``zero`` (the reference;
      the padded border is then not binary) or ``+1`` / ``-1`` (truly binary, what
      bit-packed inference wants);
    - ``estimator_params``: keyword arguments for the estimators built from names.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: Literal["zeros", "reflect", "replicate", "circular"] = "zeros",
        device=None,
        dtype=None,
        *,
        weight_estimator: EstimatorSpec = "reste",
        input_estimator: EstimatorSpec = "reste",
        weight_scale: str = "layer_mean",
        input_padding: str = "zero",
        estimator_params: dict | None = None,
    ):
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        if isinstance(self.padding, str) and input_padding != "zero":
            raise ValueError(
                "input_padding other than 'zero' needs explicit integer padding, not padding='same'/'valid'"
            )
        if padding_mode != "zeros" and input_padding != "zero":
            raise ValueError(f"input_padding={input_padding!r} replaces padding_mode; leave padding_mode='zeros'")
        self._init_binary(weight_estimator, input_estimator, weight_scale, input_padding, estimator_params)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() and self._exact_inference(x):
            return self._inference_forward(x)
        w = self.quantized_weight()
        est = self.input_estimator
        exact_conv = self.padding_mode == "zeros" and not isinstance(self.padding, str)
        if ops.recomputes_sign(est) and exact_conv:
            return self._exact_conv(x, w, est)
        x = self.quantized_input(x)
        if self._exact_training() and exact_conv:
            # x is sign(x) already, through the estimator's own backward (DSQ): the same exact sums
            return self._exact_conv(x, w, _PASS_THROUGH)
        padding = self.padding
        if (
            self.input_estimator is not None
            and self.input_padding != "zero"
            and not isinstance(padding, str)
            and any(padding)
        ):  # (a str padding, "same"/"valid", was refused with input_padding in __init__)
            ph, pw = padding
            x = F.pad(x, (pw, pw, ph, ph), value=INPUT_PADDINGS[self.input_padding])
            return F.conv2d(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        return self._conv_forward(x, w, self.bias)

    def _exact_conv(self, x: Tensor, w: Tensor, rule) -> Tensor:
        """:class:`_BinaryInputConvFn` of ``x`` (sign taken inside; ``rule`` applied to its gradient)."""
        pad_value = None if self.input_padding == "zero" else INPUT_PADDINGS[self.input_padding]
        # weight_scale="none" too: alpha is then 1, and the bias is added after the exact sums
        return _BinaryInputConvFn.apply(
            x, w, self.bias, rule, self.stride, self.padding, self.dilation, self.groups, pad_value, self._exact_alpha()
        )

    def _exact_inference(self, x: Tensor) -> bool:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return False
        return self._exact_inference_possible(x)

    def _inference_forward(self, x: Tensor) -> Tensor:
        """Without autograd: ``conv(sign(x), sign(W)) * alpha + bias``. The same value as the
        training forward ``conv(sign(x), alpha * sign(W)) + bias``, but the integer sums are
        exact (|sum| < 2**24 in float32) before one rounding by ``alpha``: what packed
        inference (:mod:`reste.deploy`) computes, so an exported model gives bit-identical
        outputs. Rounded the other way, activations within ~1e-6 of 0 took the other sign in
        the next binary layer and deployed ResNets disagreed with trained ones on a few images.
        """
        xb = binary_sign(x)
        padding = self.padding
        if self.input_padding != "zero" and not isinstance(padding, str) and any(padding):
            ph, pw = padding
            xb = F.pad(xb, (pw, pw, ph, ph), value=INPUT_PADDINGS[self.input_padding])
            padding = (0, 0)
        dot = F.conv2d(xb, binary_sign(self.weight), None, self.stride, padding, self.dilation, self.groups)
        alpha = self.weight_alpha().reshape(-1)
        out = dot * (alpha.reshape(-1, 1, 1) if alpha.numel() > 1 else alpha.reshape(()))
        return out if self.bias is None else out + self.bias.reshape(-1, 1, 1)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._binary_repr()

    @classmethod
    def from_float(cls, conv: nn.Conv2d, **binary_kwargs) -> BinaryConv2d:
        """A binary twin of ``conv`` that shares its weight and bias parameters."""
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            **binary_kwargs,
        )
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        return new.to(conv.weight.device)


class BinaryLinear(BinaryLayer, nn.Linear):
    """``nn.Linear`` with binary weights and (optionally) binary inputs.

    Same extra arguments as :class:`BinaryConv2d` (``input_padding`` does not apply).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        weight_estimator: EstimatorSpec = "reste",
        input_estimator: EstimatorSpec = "reste",
        weight_scale: str = "layer_mean",
        input_padding: str = "zero",
        estimator_params: dict | None = None,
    ):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_binary(weight_estimator, input_estimator, weight_scale, input_padding, estimator_params)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() and self._exact_inference_possible(x):
            # first, as BinaryConv2d: DoReFa's straight-through weights are not exactly +-alpha, so the
            # function below, which reads alpha back from them, rounded apart from the packed layer
            return self._inference_forward(x)
        if ops.recomputes_sign(self.input_estimator):
            # weight_scale="none" too: alpha is then 1, and the bias is added after the exact sums
            return _BinaryInputLinearFn.apply(
                x, self.quantized_weight(), self.bias, self.input_estimator, self._exact_alpha()
            )
        if self._exact_training():  # sign(x) through the estimator's own backward (DSQ): the same exact sums
            return _BinaryInputLinearFn.apply(
                self.quantized_input(x), self.quantized_weight(), self.bias, _PASS_THROUGH, self._exact_alpha()
            )
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)

    def _inference_forward(self, x: Tensor) -> Tensor:
        """Without autograd: ``linear(sign(x), sign(W)) * alpha + bias``, the training forward's value
        with the integer sums exact before one rounding by alpha, as packed inference computes."""
        dot = F.linear(binary_sign(x), binary_sign(self.weight))
        alpha = self.weight_alpha().reshape(-1)
        out = dot * (alpha if alpha.numel() > 1 else alpha.reshape(()))
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._binary_repr()

    @classmethod
    def from_float(cls, linear: nn.Linear, **binary_kwargs) -> BinaryLinear:
        """A binary twin of ``linear`` that shares its weight and bias parameters."""
        new = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
            **binary_kwargs,
        )
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new.to(linear.weight.device)


def binary_layers(model: nn.Module):
    """``(name, layer)`` for every binary layer of ``model`` whose weights are binary."""
    for name, module in model.named_modules():
        if isinstance(module, BinaryLayer) and module.binary_weights:
            yield name, module
