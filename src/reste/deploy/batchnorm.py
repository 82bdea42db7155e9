"""Eval-mode BatchNorms as two per-channel coefficients ``y = x * scale + shift``, read back exactly.

PyTorch evaluates an eval-mode BatchNorm as ``x * scale + shift`` with coefficients it derives
from the statistics (the rounding of that derivation is its own). :func:`_bn_coefficients` reads
them back from the module itself, without a rounding of ours; an export stores them in place of
the four BatchNorm tensors (:func:`_fold_bn` checks the result bit for bit, :func:`_restore_bn`
rebuilds a BatchNorm that computes exactly them), and :mod:`reste.deploy.fuse` gives them to the
kernel that applies a BatchNorm as it writes or packs.
"""

from __future__ import annotations

import copy
from typing import cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .fileformat import _BN_STATE, ExportError

#: BatchNorm classes stored as (scale, shift), with the input rank their forward takes for a probe
_BN_PROBE_RANK: dict[type[nn.Module], int] = {nn.BatchNorm1d: 2, nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}
#: probe magnitudes that read a BatchNorm's scale back exactly, largest first (see _bn_coefficients)
_PROBE_POWERS = tuple(2.0**k for k in range(127, 23, -1))


def _bn_coefficients(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor] | None:
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

    :func:`_fold_bn` checks the result (an export folds only BatchNorms with affine parameters,
    :func:`_foldable`; :mod:`reste.deploy.fuse` also those without). None for BatchNorms this does
    not apply to (in training mode, no running statistics, not float32, a subclass) or channels it
    cannot read.
    """
    rank = _BN_PROBE_RANK.get(type(bn))
    if rank is None or bn.training or bn.running_mean is None or bn.running_var is None:
        return None
    if any(t is not None and t.dtype != torch.float32 for t in (getattr(bn, k) for k in _BN_STATE)):
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


def _restore_bn(bn: _BatchNorm, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Set an eval-mode BatchNorm's state so that PyTorch evaluates it as ``x * scale + shift``, bit for bit.

    PyTorch computes ``a = (1 / sqrt(var + eps)) * weight`` and ``b = bias - mean * a``. With
    ``var + eps == 1`` exactly, ``weight = scale``, ``bias = shift`` and ``mean`` a zero whose
    sign makes ``mean * a == +0``, ``a = scale`` and ``b = shift`` exactly (``-0`` included).
    The statistics are then no longer the training ones: the module is for inference only.
    """
    var = _unit_variance(bn.eps)
    if var is None:
        raise ExportError(f"BatchNorm eps={bn.eps} admits no unit variance in float32")
    # a folded BatchNorm has running statistics (_bn_coefficients reads only those)
    running_mean, running_var = cast(torch.Tensor, bn.running_mean), cast(torch.Tensor, bn.running_var)
    with torch.no_grad():
        bn.weight.copy_(scale)
        bn.bias.copy_(shift)
        running_mean.copy_(torch.where(torch.signbit(scale), -0.0, 0.0))
        running_var.fill_(var)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def _bn_probes(bn: _BatchNorm, gen: torch.Generator) -> list[torch.Tensor]:
    """Inputs for the export-time check: signed zeros, +-1, powers of two up to the float32
    extremes, and random values of many magnitudes, in every memory layout and in shapes
    that take PyTorch's vectorised, per-pixel and tail paths."""
    c, rank = bn.num_features, _BN_PROBE_RANK[type(bn)]
    one = (1, c) + (1,) * (rank - 2)
    specials = (
        0.0,
        -0.0,
        1.0,
        -1.0,
        2.0**100,
        -(2.0**100),
        torch.finfo(torch.float32).max,
        -torch.finfo(torch.float32).max,
    )
    probes = [torch.full(one, v) for v in specials]
    # BatchNorm1d takes [N, C] and [N, C, L]
    spatials: dict[int, list[tuple[int, ...]]] = {2: [(), (5,)], 4: [(9, 7), (1, 1), (3, 5)], 5: [(3, 4, 5), (1, 1, 1)]}
    spatial = spatials[rank]
    for n, size in zip((37, 4, 2), spatial):
        x = torch.randn((n, c) + size, generator=gen) * torch.pow(10.0, 3 * torch.randn((n, c) + size, generator=gen))
        probes.append(x)
        if x.dim() == 4:
            probes.append(x.contiguous(memory_format=torch.channels_last))
        elif x.dim() == 5:
            probes.append(x.contiguous(memory_format=torch.channels_last_3d))
    return probes


def _fold_bn(bn: _BatchNorm, seed: int) -> tuple[torch.Tensor, torch.Tensor] | None:
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
    return (
        type(module) in _BN_PROBE_RANK
        and bool(module.affine)
        and module.running_mean is not None
        and module.running_var is not None
    )
