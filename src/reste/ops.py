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

On CUDA the same chains run as Triton kernels (:mod:`reste._triton`, registered with
``torch.library``): :func:`sign`, the estimators' backward rules (:func:`rule_backward`, for
the estimators whose :meth:`~reste.estimators.Estimator.kernel_rule` names one) and the weight
binarization ``mean|W| * sign(W)`` with its backward (:func:`binarize_weight`). They apply to
dense CUDA tensors (float32 for the rules and weights, any float dtype for the sign) outside
``torch.jit.trace``, when ``triton`` is importable (it is imported on the first CUDA tensor, so a
CPU run never imports it). Inside ``torch.compile`` the PyTorch formula is traced, which inductor
fuses into the neighbouring kernels; ``RESTE_TRITON=compile`` traces the Triton ops instead (to
compare). ``RESTE_TRITON=0`` or ``RESTE_NO_EXT=1`` turn them off; :func:`set_triton_enabled`
switches them at run time; :func:`kernel_info` says which path each device takes.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import NamedTuple

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
    "KernelRule",
    "rule_backward",
    "binarize_weight",
    "triton_enabled",
    "set_triton_enabled",
    "kernel_info",
    "TRITON_ENV",
]

_kernels = _ext.KERNELS.built()  # imported whatever RESTE_NO_EXT says, so the kernels can be switched on later
_ENABLED = _ext.KERNELS.available() is not None
_warned = False
#: RESTE_TRITON: 0 turns the Triton kernels off, ``compile`` also traces them inside torch.compile
TRITON_ENV = "RESTE_TRITON"
_TRITON_SETTING = os.environ.get(TRITON_ENV, "").strip().lower()
_TRITON_OFF_BY_ENV = _ext.disabled_by_env() or (
    f"disabled by {TRITON_ENV}={_TRITON_SETTING}" if _TRITON_SETTING in ("0", "off", "false") else None
)
_TRITON_ENABLED = _TRITON_OFF_BY_ENV is None
_TRITON_IN_COMPILE = _TRITON_SETTING == "compile"
#: the devices whose tensors the Triton kernels take (the tests add "cpu" under Triton's interpreter)
_TRITON_DEVICES: tuple[str, ...] = ("cuda",)
_triton_module = None  # reste._triton once imported (on the first tensor of a Triton device)
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


# ----------------------------------------------------------------------------- Triton (CUDA)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT32 = (torch.float32,)


def _triton():
    """:mod:`reste._triton`, imported on first use (importing triton takes a while); None without triton."""
    global _triton_module, _TRITON_ENABLED
    if _triton_module is None:
        from . import _triton as module

        _triton_module = module
        if not module.AVAILABLE:
            _TRITON_ENABLED = False
    return _triton_module if _triton_module.AVAILABLE else None


def _triton_applies(*tensors: Tensor, dtypes: tuple = _FLOAT32) -> bool:
    """The Triton kernels walk memory linearly: every tensor dense on a Triton device (CUDA), of
    ``dtypes``, all with the same shape and strides; not under ``torch.jit.trace``, and inside
    ``torch.compile`` only with ``RESTE_TRITON=compile``."""
    first = tensors[0]
    if first.device.type not in _TRITON_DEVICES or not _TRITON_ENABLED or torch.jit.is_tracing():
        return False
    if torch.compiler.is_compiling() and not _TRITON_IN_COMPILE:
        return False
    if not all(
        t.device == first.device
        and t.dtype in dtypes
        and t.numel() > 0
        and _dense(t)
        and t.stride() == first.stride()
        and t.shape == first.shape
        for t in tensors
    ):
        return False
    return _triton() is not None


class KernelRule(NamedTuple):
    """An estimator's backward rule as the Triton kernels take it (:data:`reste._triton.RULES`):
    its name, up to two scalar tensors read on the device (``p0``, ``p1``: parameters a schedule
    changes) and two constants (``c0``, ``c1``)."""

    name: str
    p0: Tensor | None = None
    p1: Tensor | None = None
    c0: float = 0.0
    c1: float = 0.0


#: a scalar 1 per device and dtype, for a rule's unused parameters (no launch to make one per call)
_ones: dict = {}


def _one(like: Tensor, which: int) -> Tensor:
    if torch.compiler.is_compiling():  # a constant of the graph (a traced function may not fill a global dict)
        return torch.ones((), device=like.device, dtype=like.dtype)
    key = (like.device, like.dtype, which)
    if key not in _ones:
        _ones[key] = torch.ones((), device=like.device, dtype=like.dtype)
    return _ones[key]


def _rule_args(rule: KernelRule, like: Tensor) -> tuple:
    module = _triton()
    assert module is not None  # (checked by _triton_applies)
    # two distinct tensors: an autograd.Function traced by torch.compile refuses one tensor passed twice
    p0 = _param(rule.p0, like) if rule.p0 is not None else _one(like, 0)
    p1 = _param(rule.p1, like) if rule.p1 is not None else _one(like, 1)
    return module.RULES[rule.name], p0, p1, float(rule.c0), float(rule.c1)


def rule_backward(rule: KernelRule | None, z: Tensor, grad: Tensor) -> Tensor | None:
    """``g(z) * grad`` of ``rule`` in one Triton kernel where it applies (CUDA float32, ``z`` and
    ``grad`` alike), else None (the caller applies its PyTorch formula)."""
    if rule is None or not _triton_applies(z, grad):
        return None
    module = _triton()
    assert module is not None
    return module.rule_backward(z, grad, *_rule_args(rule, z))


def binarize_weight(w: Tensor, rule: KernelRule | None, per_channel: bool) -> Tensor | None:
    """``alpha * sign(W)`` with ``alpha = mean|W|`` (per output channel, else for the layer),
    differentiable in ``W`` through ``rule`` (weights and scale, as autograd differentiates
    ``mean|W| * estimator(W)``): one Triton kernel forward, one backward, where they apply (CUDA
    float32, ``W`` whose output channels are contiguous blocks: contiguous or channels-last);
    else None (the caller computes the PyTorch formula)."""
    if rule is None or w.dim() < 1 or not _triton_applies(w) or (w.stride(0) * w.shape[0] != w.numel()):
        return None
    module = _triton()
    assert module is not None
    rule_id, p0, p1, c0, c1 = _rule_args(rule, w)
    wq, _ = module.binarize_weight(w, w.shape[0] if per_channel else 1, rule_id, p0, p1, c0, c1)
    return wq


def triton_enabled() -> bool:
    """Whether the Triton kernels are switched on (they still need triton and a CUDA tensor)."""
    return _TRITON_ENABLED


def set_triton_enabled(enabled: bool) -> bool:
    """Switch the Triton kernels (CUDA) on or off; returns the previous setting. Switching them on
    without triton warns and leaves them off."""
    global _TRITON_ENABLED
    previous = _TRITON_ENABLED
    if enabled and _triton() is None:
        warnings.warn(
            f"reste's Triton kernels need triton ({_triton_module.REASON if _triton_module else ''}); "
            "using PyTorch ops on CUDA",
            RuntimeWarning,
            stacklevel=2,
        )
        enabled = False
    _TRITON_ENABLED = bool(enabled)
    return previous


def kernel_info(device: str | torch.device = "cpu") -> dict:
    """Which path the estimators' elementwise chains take on ``device``, and why.

    ``{"device", "path", "why", "c_kernels": {...}, "triton": {...}}`` with ``path`` one of
    ``"c"`` (the compiled CPU kernels, float32), ``"triton"`` (CUDA) or ``"torch"`` (the PyTorch
    formulas). Inside ``torch.compile`` the formulas are traced unless ``RESTE_TRITON=compile``.
    Asking about a CUDA device imports triton."""
    kind = torch.device(device).type
    c = {"built": kernels_built(), "enabled": kernels_enabled(), "reason": _ext.KERNELS.reason}
    tri: dict = {"enabled": _TRITON_ENABLED, "in_compile": _TRITON_IN_COMPILE, "reason": _TRITON_OFF_BY_ENV}
    if kind in _TRITON_DEVICES:
        module = _triton() if _TRITON_OFF_BY_ENV is None else None
        tri["available"] = module is not None
        if module is None and _triton_module is not None:
            tri["reason"] = _triton_module.REASON
        tri["enabled"] = _TRITON_ENABLED
    if kind == "cpu" and c["enabled"]:
        path, why = "c", "compiled C kernels (float32; other dtypes take the formulas)"
    elif kind in _TRITON_DEVICES and tri["enabled"] and tri.get("available"):
        path, why = "triton", "Triton kernels (float32 rules and weights; the sign in any float dtype)"
    else:
        reason = c["reason"] if kind == "cpu" else (tri["reason"] or "switched off by set_triton_enabled(False)")
        path, why = "torch", f"PyTorch formulas ({reason or 'kernels switched off'})"
    return {"device": kind, "path": path, "why": why, "c_kernels": c, "triton": tri}


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

    One fused pass with the compiled kernel where it applies (CPU float32) or the Triton
    kernel (CUDA), else :func:`sign_torch`.
    """
    out = _sign_kernel(z)
    if out is not None:
        return out
    if _triton_applies(z, dtypes=_FLOATS):
        return _triton().sign(z)
    return sign_torch(z)


def transient_sign(x: Tensor) -> Tensor:
    """``sign(x)`` for use within one call only: where the kernel applies it goes into a reused
    buffer (no fresh pages to fault in), elsewhere into a new tensor."""
    if _applies(x):
        out = _sign_kernel(x, out=_scratch.empty(tuple(x.shape), x.dtype, x.stride()))
        if out is not None:  # always, as the buffer has x's shape and strides
            return out
    return sign(x)


# ----------------------------------------------------------------------------- ReSTE
def _param(buf: Tensor, like: Tensor) -> Tensor:
    """A scalar buffer on the data's device and dtype (a no-op in the common case)."""
    return buf.to(device=like.device, dtype=like.dtype)


def reste_grad(z: Tensor, o: Tensor, t: float, m: float) -> Tensor:
    """The ReSTE gradient g_o(z) (without the incoming gradient).

    ``g = (1/o) |z|^((1-o)/o)`` on ``m < |z| <= t``, the secant slope
    ``m^(1/o) / m`` on ``|z| <= m`` and 0 beyond ``t``. Written as
    ``c(|z|) * clamp(|z|, m, t)^((1-o)/o)`` where ``c`` is ``1`` inside ``[0, m]``
    (``m^((1-o)/o) = m^(1/o)/m``), ``1/o`` on ``(m, t]`` and ``0`` beyond (the clamp at
    ``t`` keeps the power finite there, so ``|z| = inf`` gives 0, not ``0 * inf``).
    """
    o = _param(o, z)
    a = z.abs()
    # exp(e log a) rather than pow(a, e): with a tensor exponent, inductor vectorises exp and
    # log but not pow, which made the compiled backward 3x slower
    power = torch.exp((1.0 - o) / o * torch.log(a.clamp(min=m, max=t)))
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
    out = rule_backward(KernelRule("reste", o, None, t, m), z, grad)
    if out is not None:
        return out  # a new tensor even when inplace: allowed to overwrite is not obliged to
    return grad.mul_(reste_grad(z, o, t, m)) if inplace else reste_grad(z, o, t, m) * grad


# ----------------------------------------------------------------------------- layer paths
def recomputes_sign(est) -> bool:
    """Whether a binary layer with input estimator ``est`` takes its recompute path (saves ``x``
    only and recomputes ``sign(x)`` in backward): in eager mode when the estimator allows it
    (:attr:`~reste.estimators.Estimator.recompute_sign_in_backward`); compiled graphs get the
    plain ops (inductor fuses and recomputes them itself)."""
    return est is not None and est.recompute_sign_in_backward and not torch.compiler.is_compiling()
