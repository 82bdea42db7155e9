"""The compiled extensions of reste, loaded in one place, and the buffer pool their callers share.

Two C extensions, both optional (``setup.py`` builds them at install; without a C compiler
reste runs its pure PyTorch code, which computes the same values):

- :data:`KERNELS`, ``reste._kernels`` (``csrc/estimators.c``): the estimators' sign and ReSTE
  backward in one pass each, used by :mod:`reste.ops` during training;
- :data:`BITOPS`, ``reste.deploy._bitops`` (``deploy/csrc/``): the XNOR-popcount inference
  kernels of :mod:`reste.deploy.packed` (loaded only by ``reste.deploy``).

Each :class:`Extension` records whether it is available and, when it is not, why (the
``reason`` that ``reste.deploy.kernel_info()`` and the fallback warnings print):
``RESTE_NO_EXT=1`` turns both off, and a module that was not built says so.

:class:`BufferPool` hands out reusable CPU buffers for tensors whose pages would otherwise be
fresh from the OS on every call (the packed layers' outputs, the transient ``sign(x)`` of a
binary conv in training).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import threading
from types import ModuleType

import torch
from torch import Tensor

__all__ = ["Extension", "KERNELS", "BITOPS", "NO_EXTENSION_ENV", "ISA_ENV", "BufferPool", "disabled_by_env"]

#: set to 1 to turn the compiled extensions off (the PyTorch paths are used)
NO_EXTENSION_ENV = "RESTE_NO_EXT"
#: force a deploy kernel path: portable, avx2, avx512, neon or auto (a path the CPU lacks is an error)
ISA_ENV = "RESTE_DEPLOY_ISA"
_OLD_ISA_ENV = "RESTE_BITOPS_ISA"  # its former name, still accepted


def disabled_by_env() -> str | None:
    """Why the extensions are off by the environment (``RESTE_NO_EXT``), or None when they are not."""
    value = os.environ.get(NO_EXTENSION_ENV, "")
    return None if value in ("", "0") else f"disabled by {NO_EXTENSION_ENV}={value}"


class Extension:
    """One compiled extension: imported on first use, with the reason when it is not available.

    Args:
        module: the module's name relative to the ``reste`` package (``"._kernels"``).
        select_env: environment variables, first set one wins, naming a code path the module
            is told to take when it is loaded (``module.select(name, why)``); a name it refuses
            is kept in :attr:`forced_error` (the caller raises it on every use: a forced path
            never silently becomes another one).
    """

    def __init__(self, module: str, select_env: tuple[str, ...] = ()):
        self.module_name = module
        self.select_env = select_env
        self._imported = False
        self._built: ModuleType | None = None
        self._build_error: str | None = None
        self._checked = False
        #: the module when available (after :meth:`available`), else None
        self.module: ModuleType | None = None
        #: why :attr:`module` is None: ``"disabled by RESTE_NO_EXT=1"`` or ``"not built (...); ..."``
        self.reason: str | None = None
        #: ``"VAR=name: <why the module refused it>"`` when ``select_env`` forced a path it lacks
        self.forced_error: str | None = None

    def fresh(self) -> Extension:
        """A record of the same extension as if the process started now (the environment is read again)."""
        return Extension(self.module_name, self.select_env)

    def built(self) -> ModuleType | None:
        """The module if it was built, whatever ``RESTE_NO_EXT`` says; else None (imported once)."""
        if not self._imported:
            self._imported = True
            try:
                # torch is imported first (above), so an extension linking libgomp shares torch's copy
                self._built = importlib.import_module(self.module_name, __package__)
            except ImportError as err:
                self._build_error = (
                    f"not built ({err}); install a C compiler (gcc), then rebuild reste from its source, past "
                    "pip's cache of the wheel built without it: `pip install --force-reinstall --no-deps "
                    "--no-cache-dir --no-binary reste reste` (from a clone: `pip install --force-reinstall "
                    "--no-deps --no-cache-dir -e .` in it); RESTE_REQUIRE_EXT=1 makes a failed build fail the install"
                )
        return self._built

    def available(self) -> ModuleType | None:
        """The module, or None when ``RESTE_NO_EXT`` turns it off (then it is not even imported) or it
        was not built; :attr:`reason` says which. Decided on the first call; ``select_env`` is applied then."""
        if not self._checked:
            self._checked = True
            self.reason = disabled_by_env()
            if self.reason is None:
                self.module = self.built()
                self.reason = self._build_error
            if self.module is not None:
                for var in self.select_env:
                    name = os.environ.get(var, "").strip().lower()  # AVX2 as avx2
                    if name:
                        try:
                            self.module.select(name, f"{var}={name}")
                        except ValueError as err:
                            self.forced_error = f"{var}={name}: {err}"
                        break
        return self.module


#: the estimators' CPU kernels (``csrc/estimators.c``), used by :mod:`reste.ops`
KERNELS = Extension("._kernels")
#: the XNOR-popcount inference kernels (``deploy/csrc/``), used by :mod:`reste.deploy.packed`; loading it
#: imports ``reste.deploy``, so only deploy code asks for it
BITOPS = Extension(".deploy._bitops", select_env=(ISA_ENV, _OLD_ISA_ENV))


# ----------------------------------------------------------------------------- buffer pool
class BufferPool:
    """CPU buffers reused once nothing refers to them.

    A fresh large tensor costs a page fault per 4 KiB on first touch (glibc serves
    allocations above 32 MiB, and often smaller ones, with new pages); on the 2-core VM
    that was a third of a 128-channel batch-64 layer's time, and most of the gap between
    the kernel and the whole layer on ResNet-20's small ones. Callers get a view of a
    buffer, never the buffer itself, and a buffer is handed out again only when no tensor
    shares its memory: no view, detached alias or NumPy array (the storage's use count, a
    PyTorch internal read through ``torch._C._storage_Use_Count``; without it nothing is
    reused), no Python reference to the buffer object (reachable through a view's
    ``_base``), and only within the same inference-mode state. Buffers are kept up to
    ``max_bytes`` in total.
    """

    def __init__(self, max_bytes: float):
        self.max_bytes = max_bytes
        self.buffers: list[Tensor] = []
        self.lock = threading.Lock()

    def empty(self, shape: tuple, dtype: torch.dtype = torch.float32, stride: tuple | None = None) -> Tensor:
        """An uninitialised CPU tensor of ``shape`` (with ``stride``, dense, if given), from the pool when it can."""
        numel = math.prod(shape)

        def handed_out(buf: Tensor) -> Tensor:
            return buf.view(shape) if stride is None else buf.as_strided(shape, stride)

        if self.max_bytes <= 0 or _storage_use_count is None:
            if stride is None:
                return torch.empty(shape, dtype=dtype)
            return torch.empty_strided(shape, stride, dtype=dtype)
        inference = torch.is_inference_mode_enabled()  # an inference tensor outside that mode refuses in-place ops
        with self.lock:
            for buf in self.buffers:
                if buf.numel() == numel and buf.dtype == dtype and buf.is_inference() == inference and _unused(buf):
                    return handed_out(buf)  # a view: while the caller holds it, the buffer is in use
            out = torch.empty(shape, dtype=dtype)
            size = numel * out.element_size()
            kept = sum(b.numel() * b.element_size() for b in self.buffers)
            if kept + size > self.max_bytes:  # make room: drop buffers nobody uses
                busy = []
                for buf in self.buffers:
                    if not _unused(buf):
                        busy.append(buf)
                self.buffers = busy
                kept = sum(b.numel() * b.element_size() for b in self.buffers)
            if kept + size <= self.max_bytes:
                self.buffers.append(out)
                return handed_out(out)
            return out if stride is None else out.as_strided(shape, stride)


def _storage_use_count_fn():
    fn = getattr(torch._C, "_storage_Use_Count", None)
    if fn is None:
        return None
    return lambda t: fn(t.untyped_storage()._cdata)


_storage_use_count = _storage_use_count_fn()


def _references(buf: Tensor) -> int:
    return sys.getrefcount(buf)


def _references_through_a_call(buf: Tensor) -> int:
    return _references(buf)  # the same call depth as in _unused


def _calibrate_references() -> int:
    """What :func:`_unused` sees for a tensor nobody else holds, measured through the same
    calls the pool makes (from the loop variable of a loop over a list): the count differs
    between Python versions, so it is measured, not assumed."""
    for buf in [torch.empty(0)]:
        return _references_through_a_call(buf)
    return 0


_UNREFERENCED = _calibrate_references()


def _unused(buf: Tensor) -> bool:
    # storage users: buf itself and the temporary storage object that reads the count
    return _references(buf) <= _UNREFERENCED and _storage_use_count(buf) == 2
