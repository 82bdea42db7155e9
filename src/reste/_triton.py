"""Triton kernels for CUDA tensors: the binary layers' elementwise chains in one launch each.

In eager mode a binary layer on a GPU used to launch about 40 small kernels (the sign as three
elementwise ops, about 20 for the ReSTE backward formula, the weight scale and its gradient);
these kernels do each chain in one pass:

- ``reste::sign(z)``: ``sign`` with ``sign(0) = +1`` (``z < 0 ? -1 : +1``; NaN gives +1, as
  :func:`reste.ops.sign_torch` does);
- ``reste::rule_backward(z, grad, ...)``: an estimator's backward rule ``g(z) * grad`` (the
  rules of :data:`RULES`, chosen by a compile-time constant);
- ``reste::binarize_weight(w, ...)``: ``alpha = mean |W|`` per row (one row per output channel,
  or the whole tensor as one row for a per-layer scale) and ``alpha * sign(W)``, one program per
  row; its backward ``reste::binarize_weight_backward``:
  ``dW = g(W) * (G * alpha) + (sum_row(G * sign(W)) / K) * sgn(W)`` (``K`` the row's length,
  ``sgn(0) = 0``, the derivative of ``|W|``), what autograd computes for
  ``mean|W| * estimator(W)``.

Each is registered with ``torch.library.triton_op`` (the launches through ``wrap_triton``), so
``torch.compile`` traces through them without a graph break. :mod:`reste.ops` decides when they
run (CUDA tensors, Triton importable, not switched off); nothing else launches them. Triton's
interpreter (``TRITON_INTERPRET=1`` before ``triton`` is imported) runs them on CPU tensors,
which is how ``tests/test_triton_kernels.py`` checks them against the PyTorch formulas.

The arithmetic follows the PyTorch formulas of :mod:`reste.estimators` operation by operation
(same order, float32 throughout, divisions and square roots correctly rounded with ``div_rn``,
no fused multiply-add: launched with ``enable_fp_fusion=False``), so the piecewise-linear rules
(clipped STE, ApproxSign, RBNN) and the sign give the same bits; the rules with ``exp``, ``log``,
``sin`` or ``tanh`` (ReSTE, SwishSign, EDE, FDA) differ from PyTorch's only in the last bits of
those functions (tanh and cosh are written with ``exp``, which Triton has), and the weight scale
in the order of the sum.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

__all__ = ["RULES", "AVAILABLE", "REASON", "sign", "rule_backward", "binarize_weight"]

#: the backward rules the kernels implement, by estimator name: the id is the kernel's
#: compile-time ``RULE``; ``p0``, ``p1`` are scalar tensors read on the device, ``c0``, ``c1`` floats
#:
#: - ``ste`` (0): ``grad``
#: - ``reste`` (1): ``c(|z|) * clamp(|z|, m, t)^((1-o)/o) * grad``; p0 = o, c0 = t, c1 = m
#: - ``clipped_ste`` (2): ``grad * (|z| <= clip)``; c0 = clip
#: - ``approx_sign`` (3): ``grad * max(2 - 2|z|, 0)``
#: - ``swish_sign`` (4): ``grad * b (2 - bz tanh(bz/2)) / (1 + cosh(bz))``, bz clamped to +-80; c0 = beta
#: - ``ede`` (5): ``grad * (k t) * (1 - tanh^2(t z))``; p0 = t, p1 = k
#: - ``rbnn`` (6): ``grad * k max(sqrt(2) t - t^2 |z|, 0)``; p0 = t, p1 = k
#: - ``fda`` (7): ``grad * (4w/pi) * sin(2(n+1)wz) / (2 sin(wz)) * (|z| <= 1)``; p0 = n, c0 = w, c1 = 4w/pi
RULES = {"ste": 0, "reste": 1, "clipped_ste": 2, "approx_sign": 3, "swish_sign": 4, "ede": 5, "rbnn": 6, "fda": 7}

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError as err:  # no triton (CPU wheels of torch, macOS): the PyTorch formulas are used
    triton = None
    AVAILABLE = False
    REASON: str | None = f"triton is not importable ({err}); pip install triton"
else:
    AVAILABLE = True
    REASON = None

try:  # whether wrap_triton traces (torch.compile) or launches (eager): a private torch function
    from torch._library.triton import is_wrap_triton_enabled as _is_wrap_triton_enabled
except ImportError:
    _is_wrap_triton_enabled = None  # type: ignore[assignment]

#: elements per program of the elementwise kernels, and of one pass over a weight row
BLOCK = 1024
#: launch option: no fused multiply-add, so ``a - b * c`` rounds twice, as PyTorch's two kernels do
_NO_FMA = {"enable_fp_fusion": False}


def _launch() -> dict:
    """The launch options: no FMA when the kernel is launched directly (eager mode, where ``triton_op``
    turns ``wrap_triton`` off, and the interpreter); none when it is traced (``torch.compile`` passes
    only its own options to a user kernel, and inductor compiles it with its settings)."""
    if _is_wrap_triton_enabled is None:  # another torch: launch with Triton's defaults
        return {}
    return {} if _is_wrap_triton_enabled() and not INTERPRETED else _NO_FMA


if triton is not None:

    @triton.jit
    def _tanh(x):
        """``tanh(x) = sign(x) (1 - e) / (1 + e)`` with ``e = exp(-2|x|)`` (no overflow); NaN stays NaN."""
        e = tl.exp(-2.0 * tl.abs(x))
        th = tl.math.div_rn(1.0 - e, 1.0 + e)
        return tl.where(x < 0, -th, th)

    @triton.jit
    def _rule(z, g, p0, p1, c0, c1, RULE: tl.constexpr):
        """The backward rule ``RULE`` (:data:`RULES`) applied to the incoming gradient ``g``."""
        if RULE == 0:
            out = g
        elif RULE == 1:  # ReSTE: coef(|z|) * exp((1-o)/o * log(clamp(|z|, m, t))) * grad
            a = tl.abs(z)
            e = tl.math.div_rn(1.0 - p0, p0)
            power = tl.exp(e * tl.log(tl.where(a < c1, c1, tl.where(a > c0, c0, a))))  # NaN stays NaN
            coef = tl.where(a <= c1, 1.0, tl.where(a <= c0, tl.math.div_rn(1.0, p0), 0.0))
            out = coef * power * g
        elif RULE == 2:  # clipped STE
            out = g * tl.where(tl.abs(z) <= c0, 1.0, 0.0)
        elif RULE == 3:  # ApproxSign
            v = 2.0 - 2.0 * tl.abs(z)
            out = g * tl.where(v < 0.0, 0.0, v)
        elif RULE == 4:  # SwishSign
            bz = c0 * z
            bz = tl.where(bz < -80.0, -80.0, tl.where(bz > 80.0, 80.0, bz))
            cosh = 0.5 * (tl.exp(bz) + tl.exp(-bz))
            out = g * tl.math.div_rn(c0 * (2.0 - bz * _tanh(tl.math.div_rn(bz, 2.0))), 1.0 + cosh)
        elif RULE == 5:  # EDE
            th = _tanh(p0 * z)
            out = g * (p1 * p0) * (1.0 - th * th)
        elif RULE == 6:  # RBNN
            v = 1.4142135623730951 * p0 - p0 * p0 * tl.abs(z)
            out = g * (p1 * tl.where(v < 0.0, 0.0, v))
        else:  # FDA, closed form of the cosine series
            x = c0 * z
            s = tl.sin(x)
            small = tl.abs(s) < 1e-6
            series = tl.where(
                small, p0 + 1.0, tl.math.div_rn(tl.sin(2.0 * (p0 + 1.0) * x), tl.where(small, 1.0, 2.0 * s))
            )
            out = g * tl.where(tl.abs(z) <= 1.0, c1 * series, 0.0)  # where: the series is NaN at +-inf
        return out

    @triton.jit
    def _sign_kernel(z_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        z = tl.load(z_ptr + offs, mask=mask).to(tl.float32)  # exact for every float dtype but float64's range
        tl.store(out_ptr + offs, tl.where(z < 0, -1.0, 1.0).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rule_kernel(z_ptr, g_ptr, out_ptr, p0_ptr, p1_ptr, c0, c1, n, RULE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        z = tl.load(z_ptr + offs, mask=mask, other=0.0)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        p0 = tl.load(p0_ptr)
        p1 = tl.load(p1_ptr)
        tl.store(out_ptr + offs, _rule(z, g, p0, p1, c0, c1, RULE), mask=mask)

    @triton.jit
    def _weight_forward_kernel(w_ptr, wq_ptr, alpha_ptr, K, k_float, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base = row.to(tl.int64) * K
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, K, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            acc += tl.abs(tl.load(w_ptr + base + offs, mask=offs < K, other=0.0))
        alpha = tl.math.div_rn(tl.sum(acc, axis=0), k_float)  # (K may arrive as a constant 1: not .to())
        tl.store(alpha_ptr + row, alpha)
        for start in range(0, K, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < K
            w = tl.load(w_ptr + base + offs, mask=mask, other=0.0)
            tl.store(wq_ptr + base + offs, alpha * tl.where(w < 0, -1.0, 1.0), mask=mask)

    @triton.jit
    def _weight_backward_kernel(
        w_ptr, g_ptr, alpha_ptr, dw_ptr, p0_ptr, p1_ptr, c0, c1, K, k_float, RULE: tl.constexpr, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0)
        base = row.to(tl.int64) * K
        alpha = tl.load(alpha_ptr + row)
        p0 = tl.load(p0_ptr)
        p1 = tl.load(p1_ptr)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, K, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < K
            w = tl.load(w_ptr + base + offs, mask=mask, other=0.0)
            g = tl.load(g_ptr + base + offs, mask=mask, other=0.0)
            acc += g * tl.where(w < 0, -1.0, 1.0)
        grad_mean = tl.math.div_rn(tl.sum(acc, axis=0), k_float)  # d alpha, through the mean
        for start in range(0, K, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < K
            w = tl.load(w_ptr + base + offs, mask=mask, other=0.0)
            g = tl.load(g_ptr + base + offs, mask=mask, other=0.0)
            sgn = tl.where(w > 0, 1.0, tl.where(w < 0, -1.0, 0.0))  # d|w|/dw, 0 at 0
            dw = _rule(w, g * alpha, p0, p1, c0, c1, RULE) + grad_mean * sgn
            tl.store(dw_ptr + base + offs, dw, mask=mask)

    def _grid(n: int) -> tuple[int]:
        return (triton.cdiv(n, BLOCK),)

    #: Triton's interpreter (``TRITON_INTERPRET=1``) hands ``wrap_triton`` the plain Python kernel,
    #: which no tracer can run on fake or functional tensors: there the ops are opaque custom ops
    #: with their shapes given (``register_fake`` below), so ``torch.compile``'s capture of the
    #: layers can be tested on a CPU; on a GPU ``triton_op`` lets inductor see the kernels
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")
    _register = torch.library.custom_op if INTERPRETED else triton_op

    @_register("reste::sign", mutates_args=())
    def _sign_op(z: Tensor) -> Tensor:
        out = torch.empty_like(z)
        n = z.numel()
        wrap_triton(_sign_kernel)[_grid(n)](z, out, n, BLOCK=BLOCK, **_launch())
        return out

    @_register("reste::rule_backward", mutates_args=())
    def _rule_op(z: Tensor, grad: Tensor, p0: Tensor, p1: Tensor, c0: float, c1: float, rule: int) -> Tensor:
        out = torch.empty_like(grad)
        n = z.numel()
        wrap_triton(_rule_kernel)[_grid(n)](z, grad, out, p0, p1, c0, c1, n, RULE=rule, BLOCK=BLOCK, **_launch())
        return out

    @_register("reste::binarize_weight", mutates_args=())
    def _weight_op(w: Tensor, rows: int) -> tuple[Tensor, Tensor]:
        wq = torch.empty_like(w)
        alpha = torch.empty(rows, dtype=w.dtype, device=w.device)
        k = w.numel() // rows
        wrap_triton(_weight_forward_kernel)[(rows,)](w, wq, alpha, k, float(k), BLOCK=BLOCK, **_launch())
        return wq, alpha

    @_register("reste::binarize_weight_backward", mutates_args=())
    def _weight_backward_op(
        w: Tensor, grad: Tensor, alpha: Tensor, p0: Tensor, p1: Tensor, c0: float, c1: float, rule: int
    ) -> Tensor:
        dw = torch.empty_like(w)
        rows = alpha.numel()
        k = w.numel() // rows
        wrap_triton(_weight_backward_kernel)[(rows,)](
            w, grad, alpha, dw, p0, p1, c0, c1, k, float(k), RULE=rule, BLOCK=BLOCK, **_launch()
        )
        return dw

    if INTERPRETED:
        _sign_op.register_fake(lambda z: torch.empty_like(z))
        _rule_op.register_fake(lambda z, grad, p0, p1, c0, c1, rule: torch.empty_like(grad))
        _weight_op.register_fake(
            lambda w, rows: (torch.empty_like(w), torch.empty(rows, dtype=w.dtype, device=w.device))
        )
        _weight_backward_op.register_fake(lambda w, grad, alpha, p0, p1, c0, c1, rule: torch.empty_like(w))


class _BinarizeWeightFn(torch.autograd.Function):
    """``(alpha * sign(W), alpha)`` with ``alpha = mean |W|`` per row; backward through the rule.

    The scale ``alpha`` is returned for the caller's use only: its gradient is not taken (the
    layer computes with ``alpha * sign(W)``, whose backward already includes ``alpha``'s part)."""

    @staticmethod
    def forward(ctx, w: Tensor, rows: int, p0: Tensor, p1: Tensor, c0: float, c1: float, rule: int):
        wq, alpha = torch.ops.reste.binarize_weight(w, rows)
        ctx.save_for_backward(w, alpha, p0, p1)
        ctx.consts = (c0, c1, rule)
        ctx.mark_non_differentiable(alpha)
        return wq, alpha

    @staticmethod
    def backward(ctx, grad_wq: Tensor, grad_alpha: Tensor | None):
        w, alpha, p0, p1 = ctx.saved_tensors
        c0, c1, rule = ctx.consts
        if grad_wq.stride() != w.stride():
            grad_wq = torch.empty_like(w).copy_(grad_wq)
        dw = torch.ops.reste.binarize_weight_backward(w, grad_wq, alpha, p0, p1, c0, c1, rule)
        return dw, None, None, None, None, None, None


def sign(z: Tensor) -> Tensor:
    """``sign(z)`` with ``sign(0) = +1`` in one kernel (``z`` dense; any floating dtype)."""
    return torch.ops.reste.sign(z)


def rule_backward(z: Tensor, grad: Tensor, rule: int, p0: Tensor, p1: Tensor, c0: float, c1: float) -> Tensor:
    """``g(z) * grad`` of rule ``rule`` (:data:`RULES`) in one kernel (float32, same shape and strides)."""
    return torch.ops.reste.rule_backward(z, grad, p0, p1, float(c0), float(c1), int(rule))


def binarize_weight(
    w: Tensor, rows: int, rule: int, p0: Tensor, p1: Tensor, c0: float, c1: float
) -> tuple[Tensor, Tensor]:
    """``(alpha * sign(W), alpha)`` with ``alpha = mean |W|`` over each of ``rows`` equal blocks of
    ``w`` (memory order; ``rows = 1``: the whole tensor), differentiable in ``w`` through rule ``rule``
    (one forward and one backward kernel)."""
    wq, alpha = _BinarizeWeightFn.apply(w, rows, p0, p1, float(c0), float(c1), int(rule))
    return wq, alpha
