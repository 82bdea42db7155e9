"""Dispatch to the compiled CPU kernels (``reste._kernels``) when they apply.

The kernels fuse an elementwise chain into one pass (see ``csrc/estimators.c``).
They apply to contiguous float32 CPU tensors outside ``torch.compile``, ``torch.jit.trace``
and ``torch.onnx.export`` tracing;
everything else (CUDA, bf16, float64, compiled graphs, where inductor fuses the
torch formula itself) takes the pure PyTorch path, which computes the same
values. ``RESTE_NO_EXT=1`` turns the kernels off (to compare or debug).
"""

from __future__ import annotations

import os
import threading
import warnings

import torch
from torch import Tensor

try:
    from . import _kernels
except ImportError:  # built without a C compiler: pure PyTorch everywhere
    _kernels = None

_ENABLED = _kernels is not None and os.environ.get("RESTE_NO_EXT", "") in ("", "0")
_warned = False


def kernels_enabled() -> bool:
    """Whether the compiled kernels are built and switched on."""
    return _ENABLED


def set_kernels_enabled(enabled: bool) -> bool:
    """Switch the compiled kernels on or off; returns the previous setting."""
    global _ENABLED, _warned
    previous = _ENABLED
    if enabled and _kernels is None:
        if not _warned:
            warnings.warn("reste's compiled kernels are not built (no C compiler at install time?); using PyTorch ops", RuntimeWarning, stacklevel=2)
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
        t.device.type == "cpu" and t.dtype == torch.float32 and t.numel() > 0 and _dense(t) and t.stride() == first.stride() and t.shape == first.shape
        for t in tensors
    )


def sign(z: Tensor, out: Tensor | None = None) -> Tensor | None:
    """``sign`` with ``sign(0) = +1`` in one pass (into ``out`` if given), or None when the kernel does not apply."""
    if not _applies(z) or (out is not None and not _applies(z, out)):
        return None
    out = torch.empty_like(z) if out is None else out
    _kernels.sign(z.data_ptr(), out.data_ptr(), z.numel(), torch.get_num_threads())
    return out


def reste_backward(z: Tensor, grad: Tensor, o: Tensor, t: float, m: float, inplace: bool = False) -> Tensor | None:
    """``grad * g_o(z)`` in one pass (written over ``grad`` when ``inplace``), or None
    when the kernel does not apply.

    ``o`` is a CPU scalar tensor here, so reading it is a memory load, not a device sync.
    """
    if not (_applies(z, grad) and o.device.type == "cpu"):
        return None
    out = grad if inplace else torch.empty_like(z)
    _kernels.reste_backward(z.data_ptr(), grad.data_ptr(), out.data_ptr(), z.numel(), float(o), t, m, torch.get_num_threads())
    return out


class ScratchBuffers(threading.local):
    """Reusable CPU buffers for tensors that live only inside one call (the binary input
    of a fused layer: made, consumed by the convolution, dropped). Large CPU allocations
    come back from the OS as fresh pages, and touching them costs as much as the kernel
    that fills them; reusing one buffer per shape avoids that. Per thread, so concurrent
    models in different threads never share one."""

    def __init__(self):
        self.buffers: dict = {}

    def like(self, x: Tensor) -> Tensor:
        key = (tuple(x.shape), x.stride(), x.dtype)
        buf = self.buffers.get(key)
        if buf is None:
            buf = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype)
            self.buffers[key] = buf
        return buf

    def clear(self) -> None:
        self.buffers.clear()


scratch = ScratchBuffers()
