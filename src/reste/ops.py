"""The operations binary layers and estimators compute with: one place decides C kernel or PyTorch formula.

- :func:`sign` (``reste.binary_sign``): ``sign`` with ``sign(0) = +1``;
- :func:`transient_sign`: the same, into a reused buffer, for a value used within one call;
- :func:`reste_backward`: ReSTE's backward rule ``grad * g_o(z)`` (:func:`reste_grad`);
- :func:`recomputes_sign`: whether a binary layer takes the path that recomputes ``sign(x)`` in
  its backward instead of saving it (:attr:`reste.estimators.Estimator.recompute_sign_in_backward`).

The compiled kernels (``reste._kernels``, ``csrc/estimators.c``, loaded by :mod:`reste._ext`) do
an elementwise chain in one pass. They apply to dense float32 CPU tensors outside
``torch.compile``, ``torch.jit.trace`` and ``torch.onnx.export`` tracing; everything else
(CUDA, bf16, float64, compiled graphs, where inductor fuses the torch formula itself) takes
the PyTorch formula, which computes the same values. ``RESTE_NO_EXT=1`` turns the kernels off
(to compare or debug); :func:`set_kernels_enabled` switches them at run time.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from . import _ext

__all__ = [
    "sign",
    "sign_torch",
    "transient_sign",
    "reste_grad",
    "reste_backward",
    "recomputes_sign",
    "kernels_built",
    "kernels_enabled",
    "set_kernels_enabled",
]

_kernels = _ext.KERNELS.built()  # imported whatever RESTE_NO_EXT says, so the kernels can be switched on later
_ENABLED = _ext.KERNELS.available() is not None
_warned = False
#: buffers for :func:`transient_sign`: one per shape in use, kept (training reuses the same few shapes)
_scratch = _ext.BufferPool(math.inf)


def kernels_built() -> bool:
    """Whether the compiled kernels were built (they may still be switched off)."""
    return _kernels is not None


def kernels_enabled() -> bool:
    """Whether the compiled kernels are built and switched on."""
    return _ENABLED


def set_kernels_enabled(enabled: bool) -> bool:
    """Switch the compiled kernels on or off; returns the previous setting."""
    global _ENABLED, _warned
    previous = _ENABLED
    if enabled and _kernels is None:
        if not _warned:
            warnings.warn(
                "reste's compiled kernels are not built (no C compiler at install time?); using PyTorch ops",
                RuntimeWarning,
                stacklevel=2,
            )
            _warned = True
        enabled = False
    _ENABLED = bool(enabled)
    return previous


def _dense(t: Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def _applies(*tensors: Tensor) -> bool:
    """Kernels walk memory linearly: every tensor dense, CPU float32, all with the same strides."""
    if not _ENABLED or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False  # a tracer (jit.trace, the TorchScript ONNX exporter) must see torch ops, not pointers
    first = tensors[0]
    return all(
        t.device.type == "cpu"
        and t.dtype == torch.float32
        and t.numel() > 0
        and _dense(t)
        and t.stride() == first.stride()
        and t.shape == first.shape
        for t in tensors
    )


# ----------------------------------------------------------------------------- sign
def sign_torch(z: Tensor) -> Tensor:
    """``sign`` with ``sign(0) = +1``: every output is exactly -1 or +1.

    ``sign(sign(z) + 0.5)`` maps {-1, 0, +1} to {-1, +1, +1} in two cheap
    elementwise passes, avoiding boolean tensors (slow on CPU). ``torch.sign`` maps
    NaN to 0 on CPU, so NaN becomes +1 here: a diverged run shows in its loss and
    gradients (which stay NaN), not in the binary activations.
    """
    return torch.sign(torch.sign(z) + 0.5)


def _sign_kernel(z: Tensor, out: Tensor | None = None) -> Tensor | None:
    """``sign`` with ``sign(0) = +1`` in one pass (into ``out`` if given), or None when the kernel does not apply."""
    if _kernels is None or not _applies(z) or (out is not None and not _applies(z, out)):
        return None  # (_applies is False without kernels; the first test tells the type checker)
    out = torch.empty_like(z) if out is None else out
    _kernels.sign(z.data_ptr(), out.data_ptr(), z.numel(), torch.get_num_threads())
    return out


def sign(z: Tensor) -> Tensor:
    """``sign`` with ``sign(0) = +1``: every output is exactly -1 or +1.

    One fused pass with the compiled kernel where it applies (CPU float32),
    else :func:`sign_torch`.
    """
    out = _sign_kernel(z)
    return sign_torch(z) if out is None else out


def transient_sign(x: Tensor) -> Tensor:
    """``sign(x)`` for use within one call only: where the kernel applies it goes into a reused
    buffer (no fresh pages to fault in), elsewhere into a new tensor."""
    if _applies(x):
        out = _sign_kernel(x, out=_scratch.empty(tuple(x.shape), x.dtype, x.stride()))
        if out is not None:  # always, as the buffer has x's shape and strides
            return out
    return sign_torch(x)


# ----------------------------------------------------------------------------- ReSTE
def _param(buf: Tensor, like: Tensor) -> Tensor:
    """A scalar buffer on the data's device and dtype (a no-op in the common case)."""
    return buf.to(device=like.device, dtype=like.dtype)


def reste_grad(z: Tensor, o: Tensor, t: float, m: float) -> Tensor:
    """The ReSTE gradient g_o(z) (without the incoming gradient).

    ``g = (1/o) |z|^((1-o)/o)`` on ``m < |z| <= t``, the secant slope
    ``m^(1/o) / m`` on ``|z| <= m`` and 0 beyond ``t``. Written as
    ``c(|z|) * max(|z|, m)^((1-o)/o)`` where ``c`` is ``1`` inside ``[0, m]``
    (``m^((1-o)/o) = m^(1/o)/m``), ``1/o`` on ``(m, t]`` and ``0`` beyond.
    """
    o = _param(o, z)
    a = z.abs()
    # exp(e log a) rather than pow(a, e): with a tensor exponent, inductor vectorises exp and
    # log but not pow, which made the compiled backward 3x slower
    power = torch.exp((1.0 - o) / o * torch.log(a.clamp(min=m)))
    coef = torch.where(a <= m, torch.ones_like(o), torch.where(a <= t, 1.0 / o, torch.zeros_like(o)))
    return coef * power


def _reste_backward_kernel(
    z: Tensor, grad: Tensor, o: Tensor, t: float, m: float, inplace: bool = False
) -> Tensor | None:
    """``grad * g_o(z)`` in one pass (written over ``grad`` when ``inplace``), or None
    when the kernel does not apply.

    ``o`` is a CPU scalar tensor here, so reading it is a memory load, not a device sync.
    """
    if _kernels is None or not (_applies(z, grad) and o.device.type == "cpu"):
        return None
    out = grad if inplace else torch.empty_like(z)
    _kernels.reste_backward(
        z.data_ptr(), grad.data_ptr(), out.data_ptr(), z.numel(), float(o), t, m, torch.get_num_threads()
    )
    return out


def reste_backward(z: Tensor, grad: Tensor, o: Tensor, t: float, m: float, inplace: bool = False) -> Tensor:
    """ReSTE's backward rule ``dL/dz = g_o(z) * dL/dy`` (:func:`reste_grad`), written over ``grad``
    when ``inplace`` (for callers that own it): one kernel pass where it applies, else the formula."""
    out = _reste_backward_kernel(z, grad, o, t, m, inplace)
    if out is not None:
        return out
    return grad.mul_(reste_grad(z, o, t, m)) if inplace else reste_grad(z, o, t, m) * grad


# ----------------------------------------------------------------------------- layer paths
def recomputes_sign(est) -> bool:
    """Whether a binary layer with input estimator ``est`` takes its recompute path (saves ``x``
    only and recomputes ``sign(x)`` in backward): in eager mode when the estimator allows it
    (:attr:`~reste.estimators.Estimator.recompute_sign_in_backward`); compiled graphs get the
    plain ops (inductor fuses and recomputes them itself)."""
    return est is not None and est.recompute_sign_in_backward and not torch.compiler.is_compiling()
