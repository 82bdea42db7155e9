"""Gradient estimators for the sign function.

Every estimator here has the same forward, ``sign(z)`` with outputs exactly in
``{-1, +1}`` (``sign(0) = +1``, so a binary network really is binary), and a
backward rule of its own: ``dL/dz = g(z) * dL/dy``. Each is a small
``torch.autograd.Function`` plus an :class:`Estimator` module registered under a
name; ``reste.estimator(name, **params)`` builds one, ``reste.estimators()``
lists the names.

Weight binarizers (:class:`WeightBinarizer`, registered apart with
:func:`register_weight_binarizer`) are for weights only and apply a scale of
their own: DoReFa-Net's ``E|W| sign(W)`` (``weight_estimator="dorefa"``).

Parameters that change while training runs (ReSTE's ``o``; EDE's and RBNN's
``t`` and ``k``; FDA's ``n``) live in buffers, so they are part of the model's
``state_dict`` and a resumed run continues with the right value. They are kept
as 0-dim tensors and passed to the backward as tensors: no backward ever calls
``.item()``, ``math.pow`` on a tensor, or indexes with a boolean mask, so no
backward synchronises with the host.

Longer than 500 lines on purpose: this is the registry and every registered estimator
and weight binarizer, each a short class whose docstring carries its forward and backward
formulas; side by side in one file they can be read and compared like the paper's table
of estimators.
"""

from __future__ import annotations

import copy
import math
import sys
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from . import ops
from .errors import did_you_mean
from .ops import _param
from .ops import reste_grad as reste_grad  # re-exported: estimators.reste_grad was public before reste.ops
from .ops import sign as binary_sign
from .ops import sign_torch as binary_sign_torch  # noqa: F401 (re-exported for users of the old name)

__all__ = [
    "Estimator",
    "ReSTE",
    "STE",
    "ClippedSTE",
    "ApproxSign",
    "SwishSign",
    "EDE",
    "RBNN",
    "FDA",
    "DSQ",
    "WeightBinarizer",
    "DoReFa",
    "binary_sign",
    "estimator",
    "estimators",
    "register",
    "register_weight_binarizer",
    "weight_binarizer",
    "weight_binarizers",
]

_REGISTRY: dict[str, type[Estimator]] = {}
_WEIGHT_BINARIZERS: dict[str, type[WeightBinarizer]] = {}


def _registrar(registry: dict, name: str) -> Callable:
    """The class decorator of :func:`register` and :func:`register_weight_binarizer`: one name space
    for both registries, so a name means one class whichever list it is in."""

    def wrap(cls):
        taken = _REGISTRY.get(name) or _WEIGHT_BINARIZERS.get(name)
        if taken is not None:
            raise ValueError(f"estimator name {name!r} is already registered by {taken.__name__}")
        cls.name = name
        registry[name] = cls
        return cls

    return wrap


def register(name: str) -> Callable[[type[Estimator]], type[Estimator]]:
    """Class decorator: make an :class:`Estimator` subclass available by ``name``."""
    return _registrar(_REGISTRY, name)


def register_weight_binarizer(name: str) -> Callable[[type[WeightBinarizer]], type[WeightBinarizer]]:
    """Class decorator: make a :class:`WeightBinarizer` subclass available by ``name`` as a layer's
    ``weight_estimator`` (not listed by :func:`estimators`: it cannot binarize inputs)."""
    return _registrar(_WEIGHT_BINARIZERS, name)


def weight_binarizers() -> list[str]:
    """Names of all registered weight binarizers, sorted."""
    return sorted(_WEIGHT_BINARIZERS)


def weight_binarizer(name: str) -> WeightBinarizer:
    """Build the weight binarizer registered as ``name`` (they take no parameters)."""
    try:
        return _WEIGHT_BINARIZERS[name]()
    except KeyError:
        raise ValueError(f"unknown weight binarizer {name!r}; known: {', '.join(weight_binarizers())}") from None


def estimators() -> list[str]:
    """Names of all registered estimators, sorted."""
    return sorted(_REGISTRY)


def estimator(name: str, **params: Any) -> Estimator:
    """Build the estimator registered as ``name`` with the given parameters.

    >>> est = estimator("reste", o=3.0)
    >>> est(torch.tensor([-0.5, 0.0, 2.0]))
    tensor([-1.,  1.,  1.])
    """
    if isinstance(name, Estimator):
        if params:
            raise TypeError("cannot pass parameters together with an Estimator instance")
        return copy.deepcopy(name)
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown estimator {name!r}; known: {', '.join(estimators())}.{did_you_mean(name, _REGISTRY)}"
        ) from None
    try:
        return cls(**params)
    except TypeError as err:
        raise TypeError(f"estimator {name!r}: {err}") from None


def _scalar(value, name: str) -> Tensor:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return value.detach().clone().reshape(()).to(torch.float32)
    return torch.tensor(float(value), dtype=torch.float32)


class Estimator(nn.Module):
    """Base class: forward ``sign(z)`` in {-1, +1}; the subclass defines the backward.

    Subclasses implement :meth:`forward`. Estimators whose parameters follow
    training progress implement :meth:`set_progress` (``progress`` in [0, 1]).
    """

    name: str = "?"
    #: names of the buffers a schedule may set with ``reste.set_params``
    scheduled: tuple[str, ...] = ()

    def set_progress(self, progress: float) -> None:
        """Update the parameters that depend on training progress (default: none)."""

    def for_inputs(self) -> Estimator:
        """A copy configured for binarizing activations (same rule unless overridden)."""
        return copy.deepcopy(self)

    #: whether a binary layer may recompute ``sign(z)`` in its backward instead of saving it, and
    #: apply this rule to its input gradient itself (:meth:`surrogate_grad`, see
    #: :func:`reste.ops.recomputes_sign`): true when the rule depends on nothing trainable;
    #: DSQ's learnable alpha opts out
    recompute_sign_in_backward: bool = True

    def surrogate_grad(self, z: Tensor, grad_out: Tensor) -> Tensor:
        """The backward rule: ``dL/dz = g(z) * dL/dy`` (what this estimator's backward returns)."""
        raise NotImplementedError

    def kernel_rule(self) -> ops.KernelRule | None:
        """This rule as the fused CUDA kernels take it (:class:`reste.ops.KernelRule`), or None
        when they have none for it (the PyTorch formula is then used everywhere)."""
        return None

    def _fused(self, z: Tensor, grad_out: Tensor) -> Tensor | None:
        """:meth:`surrogate_grad` in one Triton kernel where it applies (CUDA), else None."""
        return ops.rule_backward(self.kernel_rule(), z, grad_out)

    def surrogate_grad_(self, z: Tensor, grad_out: Tensor) -> Tensor:
        """:meth:`surrogate_grad`, allowed to overwrite ``grad_out`` (for callers that own it)."""
        return self.surrogate_grad(z, grad_out)

    def forward(self, z: Tensor) -> Tensor:
        """``sign(z)`` in {-1, +1} (``sign(0) = +1``); its backward is this estimator's
        :meth:`surrogate_grad`."""
        return _SignFn.apply(z, self)

    def set_param(self, name: str, value) -> None:
        """Set a scheduled parameter in place (keeps device and dtype, no reallocation)."""
        buf = getattr(self, name)
        with torch.no_grad():
            buf.fill_(float(value))

    def _scalar_buffer(self, name: str, value) -> None:
        self.register_buffer(name, _scalar(value, name))

    def extra_repr(self) -> str:
        parts = []
        for key, buf in self.named_buffers(recurse=False):
            parts.append(f"{key}={float(buf):.4g}")
        return ", ".join(parts)


class _SignFn(torch.autograd.Function):
    """Forward: sign in {-1, +1}. Backward: the estimator's :meth:`Estimator.surrogate_grad`."""

    @staticmethod
    def forward(ctx, z: Tensor, est: Estimator) -> Tensor:
        ctx.save_for_backward(z)
        ctx.est = est
        return binary_sign(z)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (z,) = ctx.saved_tensors
        return ctx.est.surrogate_grad(z, grad_out), None


# --------------------------------------------------------------------------- ReSTE
def _check_o(o) -> None:
    # not `o < 1` alone: NaN compares false and would pass, then turn every gradient into NaN
    if not (math.isfinite(float(o)) and float(o) >= 1.0):
        raise ValueError(f"ReSTE needs a finite o >= 1, got o={float(o)}")


@register("reste")
class ReSTE(Estimator):
    r"""Rectified Straight-Through Estimator.

    Forward: :math:`y = \mathrm{sign}(z) \in \{-1, +1\}`.

    Backward: the derivative of the rectified power function
    :math:`f_o(z) = \mathrm{sign}(z)\,|z|^{1/o}` (:math:`o \ge 1`), rectified
    near zero and clipped at ``t``:

    .. math::
        g_o(z) = \begin{cases}
            m^{1/o} / m & |z| \le m \quad\text{(secant slope of } f_o \text{ on } [0, m])\\
            \frac{1}{o} |z|^{(1-o)/o} & m < |z| \le t\\
            0 & |z| > t
        \end{cases}

    ``o = 1`` is the identity gradient clipped at ``|z| <= t`` (plain STE); as
    ``o`` grows ``f_o`` approaches sign: smaller estimating error, larger and
    less stable gradients. ``o`` is a buffer set by an o schedule.

    Args:
        o: the power, ``>= 1`` (default 1; a schedule raises it to ``o_end``).
        t: gradient threshold (default 1.5).
        m: half-width of the interval around zero (default 0.1).
    """

    scheduled = ("o",)
    o: Tensor  # a scalar buffer (_scalar_buffer), for the type checker

    def __init__(self, o: float = 1.0, t: float = 1.5, m: float = 0.1):
        super().__init__()
        _check_o(o)
        if not 0.0 < float(m) < float(t):
            raise ValueError(f"ReSTE needs 0 < m < t, got m={m}, t={t}")
        self._scalar_buffer("o", o)
        self.t = float(t)
        self.m = float(m)

    def set_param(self, name: str, value) -> None:
        if name == "o":
            _check_o(value)
        super().set_param(name, value)

    def kernel_rule(self) -> ops.KernelRule:
        return ops.KernelRule("reste", self.o, None, self.t, self.m)

    def surrogate_grad(self, z: Tensor, grad_out: Tensor) -> Tensor:
        """``g_o(z) * grad_out`` (:func:`reste.ops.reste_grad`; the compiled or Triton kernel where it applies)."""
        return ops.reste_backward(z, grad_out, self.o, self.t, self.m)

    def surrogate_grad_(self, z: Tensor, grad_out: Tensor) -> Tensor:
        return ops.reste_backward(z, grad_out, self.o, self.t, self.m, inplace=True)

    def extra_repr(self) -> str:
        return f"o={float(self.o):.4g}, t={self.t:g}, m={self.m:g}"


# --------------------------------------------------------------------------- STE family
class _STEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:
        return binary_sign(z)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return grad_out


@register("ste")
class STE(Estimator):
    r"""Straight-through estimator. Forward :math:`\mathrm{sign}(z)`; backward :math:`g(z) = 1`."""

    def kernel_rule(self) -> ops.KernelRule:
        return ops.KernelRule("ste")

    def surrogate_grad(self, z: Tensor, grad_out: Tensor) -> Tensor:
        return grad_out

    def forward(self, z: Tensor) -> Tensor:
        return _STEFn.apply(z)  # saves nothing for backward


@register("clipped_ste")
class ClippedSTE(Estimator):
    r"""Clipped STE. Forward :math:`\mathrm{sign}(z)`; backward :math:`g(z) = 1` if :math:`|z| \le c` else 0.

    Args:
        clip: the clipping threshold ``c`` (default 1.0).
    """

    def __init__(self, clip: float = 1.0):
        super().__init__()
        if float(clip) <= 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        self.clip = float(clip)

    def kernel_rule(self) -> ops.KernelRule:
        return ops.KernelRule("clipped_ste", c0=self.clip)

    def surrogate_grad(self, z: Tensor, grad_out: Tensor) -> Tensor:
        fused = self._fused(z, grad_out)
        if fused is not None:
            return fused
        return grad_out * (z.abs() <= self.clip).to(grad_out.dtype)

    def extra_repr(self) -> str:
        return f"clip={self.clip:g}"


@register("approx_sign")
class ApproxSign(Estimator):
    r"""ApproxSign (Bi-Real Net). Forward :math:`\mathrm{sign}(z)`;
    backward :math:`g(z) = \max(0, 2 - 2|z|)` (that is ``2 - 2|z|`` on ``|z| <= 1``, else 0)."""

    def kernel_rule(self) -> ops.KernelRule:
        return ops.KernelRule("approx_sign")

    def surrogate_grad(self, z: Tensor, grad_out: Tensor) -> Tensor:
        fused = self._fused(z, grad_out)
        if fused is not None:
            return fused
        return grad_out * (2.0 - 2.0 * z.abs()).clamp(min=0.0)


@register("swish_sign")
class SwishSign(Estimator):
    r"""SwishSign. Forward :math:`\mathrm{sign}(z)`; backward
    :math:`g(z) = \beta (2 - \beta z \tanh(\beta z / 2)) / (1 + \cosh(\beta z))`.

    Args:
        beta: sharpness (default 5.0).
    """

    def __init__(self, beta: float = 5.0):
        super().__init__()
        if float(beta) <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.beta = float(beta)

    def kernel_rule(self) -> ops.KernelRule:
        return ops.KernelRule("swish_sign", c0=self.beta)

    def surrogate_grad(self, z: Tensor, grad_out: Tensor) -> Tensor:
        fused = self._fused(z, grad_out)
        if fused is not None:
            return fused
        b = self.beta
        # cosh overflows to inf for |bz| > ~89 in float32; the fraction then tends to 0,
        # so guard the numerator's inf * 0 by clamping the argument.
        bz = (b * z).clamp(-80.0, 80.0)
        return grad_out * (b * (2.0 - bz * torch.tanh(bz / 2.0)) / (1.0 + torch.cosh(bz)))

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}"


# --------------------------------------------------------------------------- EDE (IR-Net)
def _log_interp(lo: float, hi: float, progress: float) -> float:
    """``10^(log10(lo) + (log10(hi) - log10(lo)) * progress)``."""
    return 10.0 ** (math.log10(lo) + (math.log10(hi) - math.log10(lo)) * progress)


@register("ede")
class EDE(Estimator):
    r"""Error Decay Estimator (IR-Net). Forward :math:`\mathrm{sign}(z)`; backward
    :math:`g(z) = k\,t\,(1 - \tanh^2(t z))` with
    :math:`t = 10^{\log_{10} T_{min} + (\log_{10} T_{max} - \log_{10} T_{min})\,r}`,
    :math:`k = \max(1/t, 1)` and ``r`` the training progress in [0, 1].

    Args:
        t_min: ``T_min`` (default 1e-3, IR-Net's CIFAR code).
        t_max: ``T_max`` (default 10).
    """

    scheduled = ("t", "k")
    t: Tensor  # scalar buffers (_scalar_buffer), for the type checker
    k: Tensor

    def __init__(self, t_min: float = 1e-3, t_max: float = 10.0):
        super().__init__()
        if not 0 < float(t_min) < float(t_max):
            raise ValueError(f"EDE needs 0 < t_min < t_max, got {t_min}, {t_max}")
        self.t_min, self.t_max = float(t_min), float(t_max)
        self._scalar_buffer("t", t_min)
        self._scalar_buffer("k", max(1.0 / t_min, 1.0))

    def set_progress(self, progress: float) -> None:
        t = _log_interp(self.t_min, self.t_max, progress)
        self.set_param("t", t)
        self.set_param("k", max(1.0 / t, 1.0))

    def kernel_rule(self) -> ops.KernelRule:
        return ops.KernelRule("ede", self.t, self.k)

    def surrogate_grad(self, z: Tensor, grad_out: Tensor) -> Tensor:
        fused = self._fused(z, grad_out)
        if fused is not None:
            return fused
        if z.dtype in (torch.float16, torch.bfloat16):
            # 1 - tanh^2 cancels: in bfloat16 tanh(t z) rounds to 1 from |t z| ~ 3.5, which zeroed the
            # gradient well inside the support (t = 10, |z| >= 0.35); evaluated in float32, then rounded
            return self.surrogate_grad(z.float(), grad_out.float()).to(grad_out.dtype)
        t, k = _param(self.t, z), _param(self.k, z)
        th = torch.tanh(t * z)
        return grad_out * (k * t) * (1.0 - th * th)


# --------------------------------------------------------------------------- RBNN
@register("rbnn")
class RBNN(Estimator):
    r"""RBNN's training-aware approximation. Forward :math:`\mathrm{sign}(z)`; backward
    :math:`g(z) = k \max(0, \sqrt{2}\,t - t^2 |z|)` with
    :math:`t = 10^{\log_{10} T_{min} + (\log_{10} T_{max} - \log_{10} T_{min})\,r}`
    (``T_min = 1e-2``, ``T_max = 10``) and :math:`k = \max(1/t, 1)`. For activations
    (``activation=True``, what :meth:`for_inputs` returns) ``k = 1`` and ``t = max(t, 1)``.
    """

    scheduled = ("t", "k")
    t: Tensor  # scalar buffers (_scalar_buffer), for the type checker
    k: Tensor

    def __init__(self, t_min: float = 1e-2, t_max: float = 10.0, activation: bool = False):
        super().__init__()
        if not 0 < float(t_min) < float(t_max):
            raise ValueError(f"RBNN needs 0 < t_min < t_max, got {t_min}, {t_max}")
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.activation = bool(activation)
        self._scalar_buffer("t", 0.0)
        self._scalar_buffer("k", 0.0)
        self.set_progress(0.0)

    def set_progress(self, progress: float) -> None:
        t = _log_interp(self.t_min, self.t_max, progress)
        self.set_param("t", t)
        self.set_param("k", max(1.0 / t, 1.0))  # for activations set_param makes them k = 1, t = max(t, 1)

    def set_param(self, name: str, value) -> None:
        if self.activation:  # the activation rule whatever sets it: k = 1, t = max(t, 1)
            value = 1.0 if name == "k" else max(float(value), 1.0) if name == "t" else value
        super().set_param(name, value)

    def for_inputs(self) -> RBNN:
        return RBNN(self.t_min, self.t_max, activation=True).to(self.t.device)

    def kernel_rule(self) -> ops.KernelRule:
        return ops.KernelRule("rbnn", self.t, self.k)

    def surrogate_grad(self, z: Tensor, grad_out: Tensor) -> Tensor:
        fused = self._fused(z, grad_out)
        if fused is not None:
            return fused
        t, k = _param(self.t, z), _param(self.k, z)
        return grad_out * (k * (math.sqrt(2.0) * t - t * t * z.abs()).clamp(min=0.0))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation}"


# --------------------------------------------------------------------------- FDA
def fda_grad(z: Tensor, n: Tensor, w: float) -> Tensor:
    """FDA's gradient ``(4w/pi) sum_{i=0..n} cos((2i+1) w z)`` on ``|z| <= 1``, else 0.

    Uses the closed form ``sum_{i=0..n} cos((2i+1)x) = sin(2(n+1)x) / (2 sin x)``
    (limit ``n + 1`` at ``x = 0``), so the cost does not grow with ``n``.
    """
    n = _param(n, z)
    x = w * z
    s = torch.sin(x)
    small = s.abs() < 1e-6
    series = torch.where(
        small, n + 1.0, torch.sin(2.0 * (n + 1.0) * x) / torch.where(small, torch.ones_like(s), 2.0 * s)
    )
    # where, not a 0/1 mask: the series is NaN at z = +-inf, and NaN * 0 is NaN
    return torch.where(z.abs() <= 1.0, (4.0 * w / math.pi) * series, 0.0)


@register("fda")
class FDA(Estimator):
    r"""Frequency Domain Approximation. Forward :math:`\mathrm{sign}(z)`; backward
    :math:`g(z) = \frac{4w}{\pi} \sum_{i=0}^{n} \cos((2i+1) w z)` on :math:`|z| \le 1`, else 0.

    ``n`` grows from ``n_start`` to ``n_end`` over training, each value for an equal share of it:
    ``n = n_start + min(floor((n_end - n_start + 1) * r), n_end - n_start)`` (this project's reading
    of "n from 9 to 18 over training"; progress ``r`` stays below 1, so the earlier
    ``floor((n_end - n_start) * r)`` never reached ``n_end``). Every value is reached when ``n`` is
    updated at least ``n_end - n_start + 1`` times: per step always in practice; per epoch
    (``estimator.per=epoch``) only with that many epochs (2 epochs give 9, then 14).

    Args:
        w: base frequency (default 0.1).
        n_start, n_end: number of terms at the start and end of training (9, 18).
    """

    scheduled = ("n",)
    n: Tensor  # a scalar buffer (_scalar_buffer), for the type checker

    def __init__(self, w: float = 0.1, n_start: int = 9, n_end: int = 18):
        super().__init__()
        if int(n_start) < 0 or int(n_end) < int(n_start):
            raise ValueError(f"FDA needs 0 <= n_start <= n_end, got {n_start}, {n_end}")
        self.w = float(w)
        self.n_start, self.n_end = int(n_start), int(n_end)
        self._scalar_buffer("n", n_start)

    def set_progress(self, progress: float) -> None:
        progress = min(max(float(progress), 0.0), 1.0)
        span = self.n_end - self.n_start
        self.set_param("n", self.n_start + min(math.floor((span + 1) * progress), span))

    def kernel_rule(self) -> ops.KernelRule:
        return ops.KernelRule("fda", self.n, None, self.w, 4.0 * self.w / math.pi)

    def surrogate_grad(self, z: Tensor, grad_out: Tensor) -> Tensor:
        fused = self._fused(z, grad_out)
        if fused is not None:
            return fused
        return grad_out * fda_grad(z, self.n, self.w)

    def extra_repr(self) -> str:
        return f"n={int(self.n)}, w={self.w:g}"


# --------------------------------------------------------------------------- DSQ
def _dsq_k(alpha: Tensor) -> Tensor:
    return 0.5 * torch.log(2.0 / alpha - 1.0)


def _dsq_parts(z: Tensor, a: Tensor):
    """``(k, tanh(k z), inside, slope)`` with ``slope = s k (1 - tanh^2(k z))`` on ``|z| <= 1``."""
    k = _dsq_k(a)
    th = torch.tanh(k * z)
    inside = (z.abs() <= 1.0).to(z.dtype)
    return k, th, inside, k / torch.tanh(k) * (1.0 - th * th) * inside


class _DSQFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, alpha: Tensor) -> Tensor:
        ctx.save_for_backward(z, alpha)
        return binary_sign(z)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        z, alpha = ctx.saved_tensors
        a = alpha.to(z.dtype)
        k, th, inside, slope = _dsq_parts(z, a)
        s = 1.0 / torch.tanh(k)
        grad_z = grad_out * slope
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            # dphi/dalpha of the soft function phi(z) = s(alpha) tanh(k(alpha) z) that
            # sign stands in for: dphi/dalpha = ds/dalpha tanh(kz) + s z (1 - tanh^2(kz)) dk/dalpha,
            # with dk/dalpha = -1 / (alpha (2 - alpha)) and s = 1/tanh(k) => ds/dk = -(1 - tanh^2 k)/tanh^2 k.
            dk_da = -1.0 / (a * (2.0 - a))
            tk = torch.tanh(k)
            ds_da = -(1.0 - tk * tk) / (tk * tk) * dk_da
            dphi = (ds_da * th + s * z * (1.0 - th * th) * dk_da) * inside
            grad_alpha = (grad_out * dphi).sum().to(alpha.dtype).reshape(alpha.shape)
        return grad_z, grad_alpha


@register("dsq")
class DSQ(Estimator):
    r"""Differentiable Soft Quantization, 1 bit, clipping range [-1, 1].

    The soft function :math:`\varphi(z) = s \tanh(k z)` with
    :math:`k = \tfrac12 \ln(2/\alpha - 1)` and :math:`s = 1/(1-\alpha) = 1/\tanh(k)`
    stands in for sign. Forward :math:`\mathrm{sign}(z)`; backward
    :math:`g(z) = s\,k\,(1 - \tanh^2(k z))` on :math:`|z| \le 1`, else 0.
    ``alpha`` in (0, 1) is a learnable parameter (init 0.2), trained through
    :math:`\partial\varphi/\partial\alpha`, clamped to [1e-4, 1 - 1e-4].
    """

    def __init__(self, alpha: float = 0.2, learnable: bool = True):
        super().__init__()
        if not 0.0 < float(alpha) < 1.0:
            raise ValueError(f"DSQ needs 0 < alpha < 1, got {alpha}")
        self.alpha = nn.Parameter(torch.tensor(float(alpha)), requires_grad=bool(learnable))

    recompute_sign_in_backward = False  # alpha is trained through the backward

    def surrogate_grad(self, z: Tensor, grad_out: Tensor) -> Tensor:
        a = self.alpha.detach().clamp(1e-4, 1.0 - 1e-4).to(z.dtype)
        return grad_out * _dsq_parts(z, a)[3]

    def forward(self, z: Tensor) -> Tensor:
        return _DSQFn.apply(z, self.alpha.clamp(1e-4, 1.0 - 1e-4))

    def extra_repr(self) -> str:
        return f"alpha={float(self.alpha.detach()):.4g}"


# --------------------------------------------------------------------------- weight binarizers
class WeightBinarizer(Estimator):
    """A binarizer for a layer's weights that applies its own scale.

    Its forward returns the weights the layer computes with, ``alpha * sign(W)`` (not +-1),
    and :meth:`alpha` the scale, so the layer adds none of its own; the layer's
    ``weight_scale`` must be :attr:`weight_scale`. Weights only: it cannot binarize inputs.
    """

    #: the layer ``weight_scale`` this binarizer's own scale is
    weight_scale = "layer_mean"
    #: how the error message names the binarizer and its scale
    title = "?"
    scale_text = "?"

    def alpha(self, w: Tensor) -> Tensor:
        """The scale ``alpha`` of the binary weights ``w`` (shape broadcastable to ``w``)."""
        raise NotImplementedError

    def check_weight_scale(self, weight_scale: str) -> None:
        """Refuse a layer ``weight_scale`` other than the scale this binarizer applies itself."""
        if weight_scale != self.weight_scale:
            raise ValueError(
                f"the {self.title} weight binarizer always uses {self.scale_text} as its scale; "
                f"leave weight_scale={self.weight_scale!r}"
            )

    def for_inputs(self) -> Estimator:
        raise ValueError(
            f"{self.name!r} binarizes weights only; choose an estimator for the inputs ({', '.join(estimators())})"
        )


@register_weight_binarizer("dorefa")
class DoReFa(WeightBinarizer):
    r"""The weight binarizer of DoReFa-Net.

    Forward: :math:`w_b = \mathbb{E}|W| \cdot \mathrm{sign}(W)` (one scale for the layer,
    ``sign(0) = +1``). Backward: the identity, :math:`\partial L / \partial W = \partial L / \partial w_b`;
    the scale :math:`\mathbb{E}|W|` is under stop-gradient, so it is not trained.
    """

    title = "DoReFa"
    scale_text = "the layer mean |W|"

    def alpha(self, w: Tensor) -> Tensor:
        return w.abs().mean()

    def surrogate_grad(self, z: Tensor, grad_out: Tensor) -> Tensor:
        return grad_out

    def forward(self, w: Tensor) -> Tensor:
        # forward E|W| sign(W); backward identity (scale under stop-gradient)
        return w + (w.abs().mean() * binary_sign(w) - w).detach()


class _CallableModule(types.ModuleType):
    """This module is also the function ``reste.estimators()`` of the API: calling it lists the
    names. So ``reste.estimators`` is one object whichever was reached first, and
    ``import reste.estimators as E; E.ReSTE`` works as well as ``reste.estimators()``."""

    def __call__(self) -> list[str]:
        return estimators()


sys.modules[__name__].__class__ = _CallableModule
