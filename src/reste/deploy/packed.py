"""Bit-packed binary layers for inference: 1 bit per weight, XNOR-popcount arithmetic.

A trained :class:`~reste.nn.BinaryConv2d` computes ``conv(sign(x), alpha * sign(W)) + bias``.
Its packed twin :class:`PackedBinaryConv2d` stores ``sign(W)`` as bits (bit 1 = +1,
bit 0 = -1), the scale ``alpha`` (one per layer or one per output channel) and the
bias, and computes the same thing: the dot product of two +-1 vectors of length
``K`` is ``K - 2 * popcount(bits_x XOR bits_w)``, an integer, times ``alpha``.

Two implementations compute the identical integers:

- the compiled kernel ``reste.deploy._bitops`` (AVX-512 VPOPCNTDQ, AVX2, ARM NEON or
  portable POPCNT, whichever the CPU has, or the one ``RESTE_DEPLOY_ISA`` forces; OpenMP
  threads), used on CPU for float inputs when it is available;
- a PyTorch reference: a float convolution of the unpacked +-1 weights with the
  +-1 inputs, exact because sums of at most 2**24 integers are exact in float32.
  It runs on any device (CUDA included) and is what the kernel is tested against.

Without the extension (not built, or ``RESTE_NO_EXT=1``) the reference is used,
with one warning. Layers whose inputs stay real (1W/32A) always use a float
convolution with the unpacked ``alpha * sign(W)`` weights, the very operation
the trained layer performs; their weights are still stored packed.

The canonical stored form, ``weight_bits``, is ``uint8 [out_channels, ceil(k / 8)]``
with ``k = in_channels/groups * kh * kw`` (or ``in_features``): the signs of
``W[o].flatten()`` (PyTorch order: channel, row, column), bit ``t`` of byte ``b``
holding element ``8b + t``, unused bits 0.

Longer than 500 lines on purpose: the packed layers, the bit layout they store and the choice
between the C kernel and the exact PyTorch reference are one unit that must agree bit for bit;
PackedBinaryConv2d alone (its kernel plan, the fused BatchNorm/ReLU prologue and epilogue, the
residual add) is about 240 lines.
"""

from __future__ import annotations

import os
import threading
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_mod

from .. import _ext as _loader
from .._ext import BufferPool
from ..errors import UsageError
from ..nn.layers import INPUT_PADDINGS, BinaryConv2d, BinaryLayer, BinaryLinear

__all__ = [
    "PackedBinaryConv2d",
    "PackedBinaryLinear",
    "pack_signs",
    "unpack_signs",
    "kernel_info",
    "slow_kernel_note",
    "packed_layer",
    "set_output_pool",
    "NO_EXTENSION_ENV",
]

#: set to 1 to force the PyTorch reference path (the extension is not loaded)
NO_EXTENSION_ENV = _loader.NO_EXTENSION_ENV
#: force a kernel path: portable, avx2, avx512, neon or auto (a path the CPU lacks is an error)
ISA_ENV = _loader.ISA_ENV
#: output channels per block of the compiled kernel's weight layout
_LANES = 16

_warned = False


def _ext():
    """The compiled ``_bitops`` module, or None (the loader, :data:`reste._ext.BITOPS`, keeps the
    reason for :func:`kernel_info`).

    Its first load applies ``RESTE_DEPLOY_ISA``; a path this CPU cannot run raises ``RuntimeError``
    (on every call, not only the first): a forced path never silently becomes another one.
    """
    bitops = _loader.BITOPS
    ext = bitops.available()
    if bitops.forced_error is not None:
        raise KernelPathError(bitops.forced_error)
    return ext


class KernelPathError(UsageError, RuntimeError):
    """``RESTE_DEPLOY_ISA`` forces a kernel path this CPU or build lacks (a setting to fix: exit 2)."""


#: the packed layers' float32 outputs, reused once nothing refers to them (see :class:`reste._ext.BufferPool`)
_pool = BufferPool(int(os.environ.get("RESTE_OUTPUT_POOL_MB", "1024")) << 20)


class _ChainLink:
    """A packed conv's link to the binary conv that alone consumes its output (set by
    :func:`reste.deploy.fuse.fuse_chains`): ``target`` that conv, ``between`` the ``nn.Identity``
    modules (absorbed ReLU/BatchNorm) the value passes on the way. A plain object, not a module,
    so the target is not registered as a child."""

    __slots__ = ("target", "between")

    def __init__(self, target: PackedBinaryConv2d, between: tuple):
        self.target, self.between = target, between

    def usable(self, source: nn.Module) -> bool:
        """Whether the packed input may replace the float tensor on this call: no hook could see
        the value on its way (a hook would get the placeholder), and the target runs the kernel."""
        if global_forward_hooks():
            return False
        for m in (source, self.target, *self.between):
            if m._forward_hooks or m._forward_pre_hooks:
                return False
        t = self.target
        return t.binary_inputs and t._kernel_supported() and t.weight_bits.device.type == "cpu"


def global_forward_hooks() -> bool:
    """Whether a global forward (pre-)hook is registered: it would see every module's values."""
    return bool(_module_mod._global_forward_hooks or _module_mod._global_forward_pre_hooks)


class _PackedInput:
    """The packed input a chained conv wrote for ``target`` (its ``xbits`` layout, see ``_build_plan``),
    riding on the placeholder tensor that stands where the float output would be."""

    __slots__ = ("target", "bits")

    def __init__(self, target: PackedBinaryConv2d, bits: Tensor):
        self.target, self.bits = target, bits


#: attribute of a placeholder tensor that carries a _PackedInput
_PACKED_ATTR = "_reste_packed_input"
#: the placeholder's value: expanded to the output's shape (no memory); NaN, should anything read it
_NAN = torch.tensor(float("nan"))


def _address(t: Tensor, keep: list | None) -> int:
    """``t.data_ptr()``, or with ``keep`` that of a private copy appended to ``keep``: an address a
    caller holds for long (reste.deploy.capture) must not point into a module's buffer, whose
    memory ``share_memory_()``, torch.multiprocessing or an in-place load can move or change."""
    if keep is None:
        return t.data_ptr()
    copy = t.detach().clone()
    keep.append(copy)
    return copy.data_ptr()


def _kernel_adds(residual: Tensor, x: Tensor) -> bool:
    """Whether the kernel can add ``residual`` as it writes the output of input ``x``: float32 both,
    on x's device, no autograd, channels-last memory (its shape is checked against the plan's output)."""
    return (
        x.dtype == residual.dtype == torch.float32
        and residual.device == x.device
        and not residual.requires_grad
        and residual.is_contiguous(memory_format=torch.channels_last)
    )


def _packed_input(x: Tensor) -> _PackedInput | None:
    return getattr(x, _PACKED_ATTR, None)


class _scratch:
    """The packed-input buffer of a plan, reused from call to call (no allocation per call);
    a call that finds it in use by another thread packs into a fresh one instead."""

    __slots__ = ("plan", "locked")

    def __init__(self, plan: dict):
        self.plan = plan

    def __enter__(self) -> Tensor:
        plan = self.plan
        self.locked = plan["xbits_lock"].acquire(blocking=False)  # the lock comes with the plan (_plan)
        if not self.locked:
            return torch.empty(plan["xbits"], dtype=torch.uint8)
        if "xbits_buf" not in plan:
            plan["xbits_buf"] = torch.empty(plan["xbits"], dtype=torch.uint8)
        return plan["xbits_buf"]

    def __exit__(self, *exc) -> None:
        if self.locked:
            self.plan["xbits_lock"].release()


def set_output_pool(max_bytes: int) -> int:
    """Cap (in bytes) the memory the packed layers keep for reusing their outputs; 0 turns
    reuse off. Returns the previous cap. Default 1 GiB (``RESTE_OUTPUT_POOL_MB``)."""
    previous = int(_pool.max_bytes)
    with _pool.lock:
        _pool.max_bytes = int(max_bytes)
        if _pool.max_bytes <= 0:
            _pool.buffers = []
    return previous


class FusedStateDictError(UsageError, RuntimeError):
    """``load_state_dict`` into a model whose packed convs apply fused BatchNorms."""

    def __init__(self, layer: str):
        super().__init__(
            f"cannot load a state_dict into a fused deployed model: {layer} applies a fused BatchNorm, whose "
            "statistics a state_dict does not hold (the absorbed BatchNorm is an nn.Identity), so the result would "
            "mix two models. Load the exported file with reste.deploy.load(path), or load state_dicts into models "
            "loaded with fuse=False"
        )


def fused_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a packed conv that applies a fused BatchNorm (before or after its conv)."""
    return getattr(module, "post_bn", None) is not None or getattr(module, "pre_bn", None) is not None


def refuse_state_dict_into_fused(module: nn.Module, *args, **kwargs) -> None:
    """A ``load_state_dict`` pre-hook of a fused model (set by the fusions of :mod:`reste.deploy.fuse`):
    refuses before anything is loaded when a packed conv in it applies a fused BatchNorm."""
    for name, m in module.named_modules():
        if fused_batchnorm(m):
            raise FusedStateDictError(repr(name))


def _warn_fallback() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"reste.deploy: the compiled XNOR-popcount kernel is unavailable ({_loader.BITOPS.reason}); "
            "binary layers run the exact but slower PyTorch reference",
            RuntimeWarning,
            stacklevel=3,
        )


def kernel_info() -> dict:
    """Which implementation packed layers use on CPU.

    ``{"extension", "isa", "why", "available", "openmp", "reason"}``: ``isa`` is the kernel path
    (``portable``, ``avx2``, ``avx512``, ``neon``), ``why`` says why it runs (``"auto: ..."`` or
    ``"forced by RESTE_DEPLOY_ISA=..."``), ``available`` lists the paths this CPU supports (best
    first), ``reason`` why the extension is not used (when it is not). A ``RESTE_DEPLOY_ISA`` naming
    a path this CPU lacks is reported, not raised (this is the function to call to find out what
    is wrong): ``isa`` None and ``reason`` the refusal; packed layers refuse to run
    (:class:`KernelPathError`).
    """
    bitops = _loader.BITOPS
    ext = bitops.available()
    if ext is None:
        return {
            "extension": False,
            "isa": None,
            "why": None,
            "available": [],
            "openmp": False,
            "reason": bitops.reason,
        }
    refused = bitops.forced_error  # a forced path this CPU lacks: no path runs
    return {
        "extension": True,
        "isa": None if refused else ext.isa(),
        "why": None if refused else ext.why(),
        "available": ext.available().split(", "),
        "openmp": bool(ext.openmp()),
        "reason": refused,
    }


def slow_kernel_note() -> str | None:
    """A warning for this machine when packed layers cannot run fast here (only the portable
    kernel, or no compiled extension), else None. ``reste export`` prints it."""
    info = kernel_info()
    if info["extension"] and info["isa"] is None:  # a forced path this CPU lacks
        return info["reason"]
    where = "docs/deploy.md, 'Kernel paths and speed'"
    if not info["extension"]:
        return (
            f"the compiled XNOR-popcount kernel is unavailable here ({info['reason']}): binary layers run the exact "
            "but slow PyTorch reference, slower than the float model. The exported file is the same anywhere; see "
            f"{where}"
        )
    if info["available"] == ["portable"]:
        return (
            "this CPU has only the portable XNOR-popcount kernel (no AVX2, AVX-512 or NEON path): the binary model may "
            "run slower than the float one here. The exported file is the same anywhere and runs fast on CPUs with "
            f"AVX2, AVX-512 or NEON; see {where}"
        )
    return None


# ----------------------------------------------------------------------------- canonical bits
def pack_signs(weight: Tensor) -> Tensor:
    """Pack ``sign(weight)`` per output row: ``uint8 [rows, ceil(k / 8)]``, bit 1 unless ``w < 0``.

    ``sign(0) = +1``, as the binary layers' forward.
    """
    flat = (~(weight.detach().reshape(weight.shape[0], -1) < 0)).cpu().numpy()
    return torch.from_numpy(np.packbits(flat, axis=1, bitorder="little"))


def unpack_signs(bits: Tensor, count: int, dtype=torch.float32) -> Tensor:
    """Inverse of :func:`pack_signs`: ``[rows, count]`` of +-1 in ``dtype``."""
    arr = np.unpackbits(bits.cpu().numpy(), axis=1, count=count, bitorder="little")
    return torch.from_numpy(arr).to(dtype).mul_(2).sub_(1)


def _pm1(x: Tensor) -> Tensor:
    """``sign(x)`` in {-1, +1} with sign(0) = +1 (the binary layers' forward); NaN -> +1 like the packing."""
    one = torch.ones((), dtype=x.dtype, device=x.device)
    return torch.where(x < 0, -one, one)


def _binary_inputs(inputs: str) -> bool:
    """The ``inputs`` option of :meth:`_PackedBinary.options`: ``"binary"`` (1W/1A) or ``"real"`` (1W/32A)."""
    if inputs not in ("binary", "real"):
        raise ValueError(f"inputs must be 'binary' or 'real', got {inputs!r}")
    return inputs == "binary"


# ----------------------------------------------------------------------------- common base
class _PackedBinary(nn.Module):
    """Buffers and caches shared by packed conv and linear layers."""

    weight_bits: Tensor
    alpha: Tensor
    bias: Tensor | None

    def _init_packed(self, out_channels: int, taps: int, has_bias: bool, binary_inputs: bool, alpha_size: int):
        if alpha_size not in (1, out_channels):
            raise ValueError(f"alpha must have 1 or out_channels={out_channels} values, got {alpha_size}")
        self.binary_inputs = bool(binary_inputs)
        self.taps = taps
        self.register_buffer("weight_bits", torch.zeros(out_channels, (taps + 7) // 8, dtype=torch.uint8))
        self.register_buffer("alpha", torch.ones(alpha_size))
        self.register_buffer("bias", torch.zeros(out_channels) if has_bias else None)
        self._cache: dict = {}
        self._plans: dict = {}

    def _load_from_state_dict(self, *args, **kwargs):
        if fused_batchnorm(self):  # see refuse_state_dict_into_fused (the model's own check comes first)
            raise FusedStateDictError(f"this {type(self).__name__}")  # loaded into directly, past the model's hook
        self._cache, self._plans = {}, {}
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        # copies and pickles leave the caches behind: plans hold raw addresses into this
        # layer's tensors and a lock, none of which belongs to a copy
        state = dict(super().__getstate__())
        state["_cache"], state["_plans"] = {}, {}
        # nor the chain link: a copy of one conv must not write packed inputs for the original's
        # next conv; a copied model runs its convs unchained (fuse_chains links them again)
        state.pop("_chain", None)
        return state

    def _apply(self, fn, *args, **kwargs):
        self._cache, self._plans = {}, {}
        return super()._apply(fn, *args, **kwargs)

    def _stamp(self) -> tuple:
        # the buffers' identity and version: in-place edits invalidate what was derived from them
        bufs = self._buffers
        w, a, b = bufs["weight_bits"], bufs["alpha"], bufs["bias"]
        assert w is not None and a is not None  # registered in _init_packed, never None
        return (w.data_ptr(), w._version, a.data_ptr(), a._version) + (
            (b.data_ptr(), b._version) if b is not None else ()
        )

    def _cached(self, key, build):
        stamp = (key,) + self._stamp()
        if stamp not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k[0] != key}
            self._cache[stamp] = build()
        return self._cache[stamp]

    def _plan(self, shape: tuple, build):
        """Per input shape: the kernel's arguments and the tensors they point into (cheap to reuse)."""
        plan = self._plans.get(shape)
        stamp = self._stamp()
        if plan is None or plan["stamp"] != stamp:
            plan = build(shape)
            plan["stamp"] = stamp
            plan["xbits_lock"] = threading.Lock()  # guards the plan's packed-input buffer (_scratch)
            self._plans[shape] = plan
        return plan

    def _epilogue_args(self, keep: list | None = None) -> tuple:
        """relu, post_scale, post_shift, post_fma arguments of the kernel (see fuse_epilogue); with
        ``keep``, the addresses are of private copies appended to it (see :func:`_address`)."""
        return 0, 0, 0, 0

    def sign_weight(self, dtype=torch.float32, device=None) -> Tensor:
        """The +-1 weights, unpacked, in the shape of the original layer's weight."""
        device = torch.device(device) if device is not None else self.weight_bits.device
        return self._cached(
            ("signs", dtype, device),
            lambda: unpack_signs(self.weight_bits, self.taps, dtype).reshape(self._weight_shape()).to(device),
        )

    def _alpha_view(self, ndim_after: int) -> Tensor:
        return self.alpha.reshape((-1,) + (1,) * ndim_after) if self.alpha.numel() > 1 else self.alpha.reshape(())

    def scaled_weight(self, dtype=torch.float32, device=None) -> Tensor:
        """``alpha * sign(W)``: the weights the trained layer computed with."""
        signs = self.sign_weight(dtype, device)
        return signs * self._alpha_view(signs.dim() - 1).to(device=signs.device, dtype=dtype)

    def _use_kernel(self, x: Tensor) -> bool:
        if not self.binary_inputs or x.device.type != "cpu" or not self._kernel_supported():
            return False
        if x.numel() == 0:  # an empty batch: PyTorch's path gives the empty output
            return False
        if torch.is_grad_enabled() and x.requires_grad:
            return False  # inference kernel: no autograd through it
        if _ext() is None:
            _warn_fallback()
            return False
        return True

    def _kernel_supported(self) -> bool:
        return True

    def _alpha_bias_f32(self):
        # copies, never the buffers themselves: a plan's addresses must stay valid whatever happens to
        # the buffers' memory (share_memory_() and torch.multiprocessing move it in place)
        alpha = self.alpha.detach().float().contiguous().clone()
        bias = self.bias.detach().float().contiguous().clone() if self.bias is not None else None
        return alpha, bias

    def _weight_shape(self) -> tuple:
        raise NotImplementedError

    def options(self) -> dict:
        """What an export records for this layer beside the architecture: the options that
        differ from the defaults (binary inputs, one scale per layer, zero input padding);
        ``{}`` for most layers. The geometry and whether there is a bias come from the rebuilt
        architecture's layer.
        """
        opts = {} if self.binary_inputs else {"inputs": "real"}
        if self.alpha.numel() > 1:
            opts["alpha"] = "channel"
        return opts


def _kernel_weights(signs: Tensor, pix_bytes: int) -> tuple[Tensor, Tensor, int]:
    """The compiled kernel's weight layout from +-1 weights ``[O, C, kh, kw]``.

    Returns ``(words int64 [OB, kh, Kw, 16], wsum int32 [kh + 1, kw + 1, OB * 16], Kw)``: word
    ``k`` of kernel row ``i`` holds bits ``64k .. 64k + 63`` of the row's ``kw * Cb`` bit
    segment (tap ``j``, channel ``c`` at bit ``j * Cb + c``); ``wsum`` holds 2-D prefix sums
    over taps of the +-1 weights summed over channels, for the zero-padding correction.
    """
    O, C, kh, kw = signs.shape
    cb = pix_bytes * 8
    kw_words = (kw * cb + 63) // 64
    blocks = (O + _LANES - 1) // _LANES
    w = signs.detach().cpu().numpy() > 0  # [O, C, kh, kw]
    seg = np.zeros((blocks * _LANES, kh, kw, cb), dtype=bool)
    seg[:O, :, :, :C] = w.transpose(0, 2, 3, 1)
    bits = np.zeros((blocks * _LANES, kh, kw_words * 64), dtype=bool)
    bits[:, :, : kw * cb] = seg.reshape(blocks * _LANES, kh, kw * cb)
    words = np.packbits(bits, axis=2, bitorder="little").view("<u8").view(np.int64)  # [Opad, kh, Kw]
    words = words.reshape(blocks, _LANES, kh, kw_words).transpose(0, 2, 3, 1)
    # 2-D prefix sums over taps of the per-tap weight sums: entry (i, j) sums taps i' < i, j' < j
    per_tap = signs.detach().cpu().sum(dim=1).to(torch.int64).permute(1, 2, 0).numpy()  # [kh, kw, O]
    wsum = np.zeros((kh + 1, kw + 1, blocks * _LANES), dtype=np.int32)
    wsum[1:, 1:, :O] = per_tap.cumsum(axis=0).cumsum(axis=1)
    return torch.from_numpy(np.ascontiguousarray(words)), torch.from_numpy(wsum), kw_words


# ----------------------------------------------------------------------------- conv
def _weight_nibbles(words: Tensor) -> Tensor:
    """The AVX2 kernel's copy of the kernel weights ``[OB, kh, Kw, LANES]``: per group of LANES
    words, their low nibbles (``w & 0x0f`` in every byte), then their high ones (``(w >> 4) & 0x0f``),
    as the extension's ``split_nibbles``; built once per plan, so no call splits them."""
    groups = words.reshape(-1, 1, _LANES)
    low4 = 0x0F0F0F0F0F0F0F0F  # the arithmetic shift's sign bits land in the masked-off nibble
    return torch.cat([groups & low4, (groups >> 4) & low4], dim=1).contiguous()


def _fill_packed(new, layer, alpha):
    """Copy a trained binary layer's weight signs (packed), scale and bias into ``new``."""
    new.weight_bits.copy_(pack_signs(layer.weight))
    new.alpha.copy_(alpha)
    if layer.bias is not None:
        new.bias.copy_(layer.bias.detach().float().cpu())
    return new


def _bn_state(bn: nn.BatchNorm2d) -> dict:
    """A copy of what ``F.batch_norm`` needs to apply an eval-mode ``bn`` (the reference path of a
    fused ReLU/BatchNorm)."""
    copy = lambda t: t.detach().clone() if t is not None else None  # noqa: E731
    return {
        "mean": copy(bn.running_mean),
        "var": copy(bn.running_var),
        "weight": copy(bn.weight),
        "bias": copy(bn.bias),
        "eps": float(bn.eps),
    }


class PackedBinaryConv2d(_PackedBinary):
    """Inference-only binary convolution holding 1-bit weights (see the module docstring).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias:
            as ``nn.Conv2d`` (``padding`` must be integers).
        binary_inputs: inputs are binarized by sign (1W/1A); False keeps them real (1W/32A).
        input_padding: the border value of the binarized input, ``"zero"``, ``"+1"`` or ``"-1"``.
        alpha_size: 1 (one scale for the layer) or ``out_channels`` (one per channel).
    """

    # the fused maps (fuse_epilogue, fuse_prologue): their state and the kernel's per-channel buffers
    post_bn: dict | None
    pre_bn: dict | None
    post_scale: Tensor
    post_shift: Tensor
    pre_scale: Tensor
    pre_shift: Tensor

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias=False,
        binary_inputs=True,
        input_padding="zero",
        alpha_size=1,
    ):
        super().__init__()
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride = pair(kernel_size), pair(stride)
        self.padding, self.dilation, self.groups = pair(padding), pair(dilation), int(groups)
        if not all(isinstance(p, int) for p in self.padding):
            raise ValueError(f"PackedBinaryConv2d needs integer padding, got {padding!r}")
        if str(input_padding) not in INPUT_PADDINGS:
            raise ValueError(f"input_padding must be one of {tuple(INPUT_PADDINGS)}, got {input_padding!r}")
        self.input_padding = str(input_padding)
        taps = self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]
        self._init_packed(self.out_channels, taps, bias, binary_inputs, alpha_size)

    def _weight_shape(self):
        return (self.out_channels, self.in_channels // self.groups) + self.kernel_size

    def _kernel_supported(self):
        return self.groups == 1 and self.dilation == (1, 1)

    @classmethod
    def from_binary(cls, layer: BinaryConv2d) -> PackedBinaryConv2d:
        """Pack a trained binary conv (its eval-mode forward is reproduced exactly)."""
        if not isinstance(layer, BinaryConv2d) or not layer.binary_weights:
            raise TypeError(f"expected a BinaryConv2d with binary weights, got {type(layer).__name__}")
        if layer.padding_mode != "zeros":
            raise ValueError(f"padding_mode={layer.padding_mode!r}: only padding_mode='zeros' can be packed")
        if isinstance(layer.padding, str):
            raise ValueError(
                f"padding={layer.padding!r}: only integer padding can be packed; build the layer with padding=(ph, pw)"
            )
        with torch.no_grad():
            alpha = layer.weight_alpha().detach().float().reshape(-1).cpu()
        new = cls(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            layer.bias is not None,
            layer.binary_inputs,
            layer.input_padding,
            alpha.numel(),
        )
        return _fill_packed(new, layer, alpha)

    @classmethod
    def like(
        cls, module: nn.Module, alpha_size: int, bias: bool, inputs: str = "binary", input_padding: str = "zero"
    ) -> PackedBinaryConv2d:
        """An empty packed conv with the geometry of ``module`` (an ``nn.Conv2d``, a ``BinaryConv2d`` or a
        packed conv of the architecture) and the given options (:meth:`options`); ``load_state_dict`` fills it."""
        if not isinstance(module, (PackedBinaryConv2d, nn.Conv2d)):
            raise TypeError(f"expected a conv layer, got {type(module).__name__}")
        if isinstance(module, nn.Conv2d) and (module.padding_mode != "zeros" or isinstance(module.padding, str)):
            raise ValueError(
                f"the architecture's conv has padding={module.padding!r}, padding_mode={module.padding_mode!r}; "
                "a packed conv needs integer zero padding"
            )
        return cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            bias,
            _binary_inputs(inputs),
            input_padding,
            alpha_size,
        )

    def options(self) -> dict:
        opts = super().options()
        if self.input_padding != "zero":
            opts["input_padding"] = self.input_padding
        return opts

    #: the chained next conv (fuse_chains), or None
    _chain: _ChainLink | None = None

    def forward(self, x: Tensor, residual: Tensor | None = None, chained: bool = False) -> Tensor:
        """The layer's output, plus ``residual`` if given: ``layer(x) + residual`` as one call, so
        the sum can land in the layer's own output buffer (see :mod:`reste.deploy.fuse`).

        ``chained`` (passed only by a graph :func:`reste.deploy.fuse.fuse_chains` rewrote, where the
        next binary conv is this output's only consumer): the kernel writes that conv's packed input
        instead of the float output, and the result is a placeholder carrying it (NaN if read),
        which only that conv accepts. Whenever that cannot be done (no kernel, no link, a hook, a
        residual the kernel cannot add) the float output is returned as without ``chained``."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects input [N, {self.in_channels}, H, W], got {tuple(x.shape)}")
        link = self._chain if chained else None
        packed = _packed_input(x)
        if packed is not None:
            if packed.target is not self or not self._use_kernel(x):
                raise RuntimeError(
                    f"{type(self).__name__} got the packed input a chained conv wrote for another layer (or cannot run "
                    "the kernel); only the conv that reste.deploy.fuse.fuse_chains linked may consume it. Call the "
                    "chained conv without chained=True to get its float output"
                )
        if link is not None and not (
            link.usable(self) and (packed is not None or (x.dtype == torch.float32 and self._use_kernel(x)))
        ):
            link = None
        if packed is not None or link is not None:
            if residual is None or _kernel_adds(residual, x):
                return self._kernel_forward(x, residual, into=link.target if link is not None else None)
            return self._kernel_forward(x) + residual
        if not self.binary_inputs:
            # 1W/32A: the trained layer's own operation on the unpacked alpha * sign(W)
            w = self.scaled_weight(x.dtype, x.device)
            b = self.bias.to(x.dtype) if self.bias is not None else None
            y = F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)
        elif getattr(self, "pre_bn", None) is not None and not self._use_kernel(x):
            y = self._epilogue_reference(self.reference_forward(self._prologue_reference(x)))
        elif self._use_kernel(x):
            if residual is not None and _kernel_adds(residual, x):
                # the kernel adds it as it writes each output (no second pass over the output);
                # the shape is checked against the plan's output there
                return self._kernel_forward(x, residual)
            y = self._kernel_forward(x)
            if (
                residual is not None
                and residual.shape == y.shape
                and residual.dtype == y.dtype == torch.float32
                and residual.device == y.device
                and not residual.requires_grad
            ):
                # y is a fresh view of a pooled buffer nobody else holds: add in place, no new
                # tensor (a new 4 MB one costs its page faults, more than the add itself)
                return y.add_(residual)
        else:
            y = self._epilogue_reference(self.reference_forward(x))
        return y if residual is None else y + residual

    # -- fused epilogue: ReLU and/or an eval-mode BatchNorm applied by the kernel as it writes the output
    def fuse_epilogue(
        self,
        relu: bool,
        bn: nn.BatchNorm2d | None,
        kernel_scale: Tensor | None = None,
        kernel_shift: Tensor | None = None,
        kernel_fma: bool = True,
    ) -> None:
        """Absorb a following ``ReLU`` and/or eval-mode ``BatchNorm2d`` (see :mod:`reste.deploy.fuse`).

        ``bn``'s statistics are kept to apply it with ``F.batch_norm`` on the reference path;
        ``kernel_scale``/``kernel_shift`` are the per-channel ``y = x * scale + shift`` the kernel
        applies (as one fused multiply-add when ``kernel_fma``), chosen to match ``bn`` bit for bit.
        """
        self._plans = {}
        self.post_relu = bool(relu)
        self.post_bn = None
        if bn is not None:
            assert kernel_scale is not None and kernel_shift is not None, (
                "a fused BatchNorm needs its kernel scale and shift"
            )
            self.post_bn = _bn_state(bn)
            self.register_buffer("post_scale", kernel_scale.detach().float().contiguous().clone(), persistent=False)
            self.register_buffer("post_shift", kernel_shift.detach().float().contiguous().clone(), persistent=False)
            self.post_fma = bool(kernel_fma)

    # -- fused prologue: a ReLU and an eval-mode BatchNorm before the conv, applied while packing the signs
    def fuse_prologue(
        self, relu: bool, bn: nn.BatchNorm2d, kernel_scale: Tensor, kernel_shift: Tensor, kernel_fma: bool
    ) -> None:
        """Absorb a preceding ``[ReLU ->] BatchNorm2d`` whose output only this conv reads (see
        :mod:`reste.deploy.fuse`): the kernel maps each input value with ``max(x, 0)`` and
        ``x * kernel_scale + kernel_shift`` (one fused multiply-add when ``kernel_fma``) before
        taking its sign, chosen to equal ``bn`` bit for bit; the reference path applies ``bn``."""
        self._plans = {}
        self.pre_relu = bool(relu)
        self.pre_bn = _bn_state(bn)
        self.register_buffer("pre_scale", kernel_scale.detach().float().contiguous().clone(), persistent=False)
        self.register_buffer("pre_shift", kernel_shift.detach().float().contiguous().clone(), persistent=False)
        self.pre_fma = bool(kernel_fma)

    def unfuse_prologue(self) -> None:
        self._plans = {}
        self.pre_relu, self.pre_bn = False, None

    def _prologue_reference(self, x: Tensor) -> Tensor:
        if getattr(self, "pre_relu", False):
            x = torch.relu(x)
        bn = self.pre_bn
        assert bn is not None  # called only with a fused prologue
        dev = x.device
        opt = lambda t: t.to(dev) if t is not None else None  # noqa: E731
        return F.batch_norm(
            x, bn["mean"].to(dev), bn["var"].to(dev), opt(bn["weight"]), opt(bn["bias"]), False, 0.0, bn["eps"]
        )

    def _prologue_args(self, keep: list | None = None) -> tuple:
        """relu, pre_scale, pre_shift, pre_fma arguments of ``pack_rows`` (``()`` without a fused
        prologue); with ``keep``, of private copies (see :func:`_address`)."""
        if getattr(self, "pre_bn", None) is None:
            return ()
        return int(self.pre_relu), _address(self.pre_scale, keep), _address(self.pre_shift, keep), int(self.pre_fma)

    def _epilogue_reference(self, y: Tensor) -> Tensor:
        if getattr(self, "post_relu", False):
            y = torch.relu(y)
        bn = getattr(self, "post_bn", None)
        if bn is not None:
            dev = y.device
            opt = lambda t: t.to(dev) if t is not None else None  # noqa: E731
            y = F.batch_norm(
                y, bn["mean"].to(dev), bn["var"].to(dev), opt(bn["weight"]), opt(bn["bias"]), False, 0.0, bn["eps"]
            )
        return y

    def reference_forward(self, x: Tensor) -> Tensor:
        """The exact PyTorch path: +-1 inputs, +-1 weights, integer sums in float32, then alpha and bias.

        This is the convolution alone; a fused ReLU/BatchNorm is not applied here.
        """
        with torch.autocast(device_type=x.device.type, enabled=False):  # bf16 would round the integer sums
            xs = _pm1(x.float())
            padding = self.padding
            if self.input_padding != "zero" and any(padding):
                ph, pw = padding
                xs = F.pad(xs, (pw, pw, ph, ph), value=INPUT_PADDINGS[self.input_padding])
                padding = (0, 0)
            dot = F.conv2d(
                xs, self.sign_weight(torch.float32, x.device), None, self.stride, padding, self.dilation, self.groups
            )
            out = dot * self._alpha_view(2).to(x.device)
            if self.bias is not None:
                out = out + self.bias.float().to(x.device).reshape(-1, 1, 1)
        return out.to(x.dtype)

    def _epilogue_args(self, keep: list | None = None) -> tuple:
        bn = getattr(self, "post_bn", None) is not None
        return (
            int(getattr(self, "post_relu", False)),
            _address(self.post_scale, keep) if bn else 0,
            _address(self.post_shift, keep) if bn else 0,
            int(bn and self.post_fma),
        )

    def _build_plan(self, shape: tuple) -> dict:
        N, C, H, W = shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        OH, OW = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
        if OH < 1 or OW < 1:
            raise ValueError(f"input {H}x{W} is smaller than the {kh}x{kw} kernel with padding {self.padding}")
        pix_bytes = (C + 7) // 8  # each pixel's channel bits, rounded up to whole bytes
        words, wsum, kw_words = _kernel_weights(self.sign_weight(), pix_bytes)
        nibbles = _weight_nibbles(words)
        alpha, bias = self._alpha_bias_f32()
        hp, wp = H + 2 * ph, W + 2 * pw
        row_bytes = -(-(wp * pix_bytes + 8) // 8) * 8  # 8 spare bytes: word loads never leave the row
        tail_bits = (kw * pix_bytes * 8) % 64
        zero_fix = self.input_padding == "zero" and (ph or pw)
        return {
            "keep": (words, wsum, alpha, bias, nibbles),  # the tensors the addresses below point into
            "nibbles": nibbles.data_ptr(),
            "xbits": N * hp * row_bytes,
            "out": (N, OH, OW, self.out_channels),
            "pack": (N, H, W, C, ph, pw, pix_bytes, row_bytes, int(self.input_padding == "+1")),
            "conv": (
                N,
                H,
                W,
                hp,
                row_bytes,
                pix_bytes,
                kh,
                kw,
                sh,
                sw,
                ph,
                pw,
                OH,
                OW,
                words.data_ptr(),
                self.out_channels,
                words.shape[0],
                kw_words,
                (1 << tail_bits) - 1 if tail_bits else (1 << 64) - 1,
                wsum.data_ptr() if zero_fix else 0,
                C * kh * kw,
                alpha.data_ptr(),
                int(alpha.numel() > 1),
                bias.data_ptr() if bias is not None else 0,
            ),
        }

    def _kernel_forward(
        self, x: Tensor, residual: Tensor | None = None, into: PackedBinaryConv2d | None = None
    ) -> Tensor:
        """The kernel's output, plus ``residual`` if given: one of the output's shape (float32,
        channels-last, as ``forward`` checks) is added by the kernel as it writes each output
        value; any other shape is added afterwards (``layer(x) + residual``, torch's broadcasting).

        ``x`` may be a placeholder carrying this conv's packed input (then nothing is packed).
        With ``into`` (the chained next conv) the kernel writes ``into``'s packed input instead of
        the float output: ``into``'s prologue map, then the sign, in its padded row layout, border
        included, byte for byte what its own ``pack_rows`` would make of the float output; the
        result is then a placeholder of the output's shape carrying those bits."""
        ext = _ext()
        packed = _packed_input(x)
        plan = self._plan(tuple(x.shape), self._build_plan)
        N, OH, OW, O = plan["out"]
        if residual is not None and tuple(residual.shape) != (N, O, OH, OW):
            return self._kernel_forward(x) + residual  # broadcasting or an error, as torch decides (floats)
        threads = torch.get_num_threads()
        if "maps" not in plan:  # the fused maps, copied into the plan (a new fusion or _apply clears the plans)
            keep: list = []  # copies: the stamp does not cover the maps' buffers, whose memory can move
            plan["maps"] = (self._prologue_args(keep), self._epilogue_args(keep))
            plan["maps_keep"] = keep
        pre, post = plan["maps"]
        nxt: tuple = ()
        if into is not None:  # the next conv's layout, from its own plan: pack_rows' arguments for this output
            into_plan = into._plan((N, O, OH, OW), into._build_plan)
            _, _, _, _, nph, npw, npix, nrow_bytes, nplus_one = into_plan["pack"]
            assert npix == (O + 7) // 8, "the next conv's pixels hold this conv's channels"
            next_bits = _pool.empty((into_plan["xbits"],), dtype=torch.uint8)
            nxt = (next_bits.data_ptr(), nph, npw, nrow_bytes, nplus_one, *into._prologue_args())
            out = None
        else:
            out = _pool.empty(plan["out"])

        def conv(xbits: Tensor) -> None:
            ext.conv(
                xbits.data_ptr(),
                *plan["conv"],
                *post,
                out.data_ptr() if out is not None else 0,
                threads,
                residual.data_ptr() if residual is not None else 0,
                plan["nibbles"],
                *nxt,
            )

        if packed is not None:  # packed by the previous conv's epilogue
            conv(packed.bits)
        else:
            xin = (
                x
                if x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
                else x.detach().float().contiguous(memory_format=torch.channels_last)
            )  # NHWC in memory
            with _scratch(plan) as xbits:
                ext.pack_rows(xin.data_ptr(), *plan["pack"], xbits.data_ptr(), threads, *pre)
                conv(xbits)
        if into is not None:
            placeholder = _NAN.expand(N, O, OH, OW)
            setattr(placeholder, _PACKED_ATTR, _PackedInput(into, next_bits))
            return placeholder
        assert out is not None
        out = out.permute(0, 3, 1, 2)  # NCHW view of channels-last memory
        return out if x.dtype == torch.float32 else out.to(x.dtype)

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}"
        )
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        s += (
            f", bias={self.bias is not None}, inputs={'binary' if self.binary_inputs else 'real'}, "
            f"input_padding={self.input_padding}, alpha={'per channel' if self.alpha.numel() > 1 else 'per layer'}"
        )
        fused = [
            name
            for name, on in (
                ("ReLU", getattr(self, "post_relu", False)),
                ("BatchNorm2d", getattr(self, "post_bn", None) is not None),
            )
            if on
        ]
        before = [
            name
            for name, on in (
                ("ReLU", getattr(self, "pre_relu", False)),
                ("BatchNorm2d", getattr(self, "pre_bn", None) is not None),
            )
            if on
        ]
        return (
            s
            + (f", fused_before={'+'.join(before)}" if before else "")
            + (f", fused={'+'.join(fused)}" if fused else "")
        )


# ----------------------------------------------------------------------------- linear
class PackedBinaryLinear(_PackedBinary):
    """Inference-only binary linear layer holding 1-bit weights (see the module docstring)."""

    def __init__(self, in_features, out_features, bias=False, binary_inputs=True, alpha_size=1):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._init_packed(self.out_features, self.in_features, bias, binary_inputs, alpha_size)

    def _weight_shape(self):
        return (self.out_features, self.in_features)

    @classmethod
    def from_binary(cls, layer: BinaryLinear) -> PackedBinaryLinear:
        """Pack a trained binary linear layer (its eval-mode forward is reproduced exactly)."""
        if not isinstance(layer, BinaryLinear) or not layer.binary_weights:
            raise TypeError(f"expected a BinaryLinear with binary weights, got {type(layer).__name__}")
        with torch.no_grad():
            alpha = layer.weight_alpha().detach().float().reshape(-1).cpu()
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, layer.binary_inputs, alpha.numel())
        return _fill_packed(new, layer, alpha)

    @classmethod
    def like(cls, module: nn.Module, alpha_size: int, bias: bool, inputs: str = "binary") -> PackedBinaryLinear:
        """An empty packed linear layer with the geometry of ``module`` (``nn.Linear``, ``BinaryLinear`` or packed)."""
        if isinstance(module, (PackedBinaryLinear, nn.Linear)):
            return cls(module.in_features, module.out_features, bias, _binary_inputs(inputs), alpha_size)
        raise TypeError(f"expected a linear layer, got {type(module).__name__}")

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} expects inputs [..., {self.in_features}], got {tuple(x.shape)}")
        if not self.binary_inputs:
            w = self.scaled_weight(x.dtype, x.device)
            return F.linear(x, w, self.bias.to(x.dtype) if self.bias is not None else None)
        if self._use_kernel(x):
            return self._kernel_forward(x)
        return self.reference_forward(x)

    def reference_forward(self, x: Tensor) -> Tensor:
        """The exact PyTorch path: +-1 inputs times +-1 weights, integer sums, then alpha and bias."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            dot = F.linear(_pm1(x.float()), self.sign_weight(torch.float32, x.device))
            out = dot * self._alpha_view(0).to(x.device)
            if self.bias is not None:
                out = out + self.bias.float().to(x.device)
        return out.to(x.dtype)

    def _build_plan(self, shape: tuple) -> dict:
        # a linear layer is a 1x1 convolution over a 1 x M "image" of the M input rows
        M, C = shape
        pix_bytes = (C + 7) // 8
        words, _, kw_words = _kernel_weights(self.sign_weight().reshape(self.out_features, C, 1, 1), pix_bytes)
        alpha, bias = self._alpha_bias_f32()
        row_bytes = -(-(M * pix_bytes + 8) // 8) * 8
        tail_bits = (pix_bytes * 8) % 64
        return {
            "keep": (words, alpha, bias),
            "xbits": row_bytes,
            "out": (M, self.out_features),
            "pack": (1, 1, M, C, 0, 0, pix_bytes, row_bytes, 0),
            "conv": (
                1,
                1,
                M,
                1,
                row_bytes,
                pix_bytes,
                1,
                1,
                1,
                1,
                0,
                0,
                1,
                M,
                words.data_ptr(),
                self.out_features,
                words.shape[0],
                kw_words,
                (1 << tail_bits) - 1 if tail_bits else (1 << 64) - 1,
                0,
                C,
                alpha.data_ptr(),
                int(alpha.numel() > 1),
                bias.data_ptr() if bias is not None else 0,
            ),
        }

    def _kernel_forward(self, x: Tensor) -> Tensor:
        ext = _ext()
        lead = x.shape[:-1]
        rows = x.detach().float().reshape(-1, self.in_features).contiguous()
        plan = self._plan(tuple(rows.shape), self._build_plan)
        threads = torch.get_num_threads()
        out = _pool.empty(plan["out"])
        with _scratch(plan) as xbits:
            ext.pack_rows(rows.data_ptr(), *plan["pack"], xbits.data_ptr(), threads)
            ext.conv(xbits.data_ptr(), *plan["conv"], *self._epilogue_args(), out.data_ptr(), threads)
        return out.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"inputs={'binary' if self.binary_inputs else 'real'}, "
            f"alpha={'per channel' if self.alpha.numel() > 1 else 'per layer'}"
        )


def packed_layer(layer: BinaryLayer) -> _PackedBinary:
    """The packed inference twin of a trained binary conv or linear layer."""
    if isinstance(layer, BinaryConv2d):
        return PackedBinaryConv2d.from_binary(layer)
    if isinstance(layer, BinaryLinear):
        return PackedBinaryLinear.from_binary(layer)
    raise TypeError(f"cannot pack a {type(layer).__name__}; only BinaryConv2d and BinaryLinear are supported")
