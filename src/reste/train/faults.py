"""Fault injection, a testing hook: one rank fails on purpose at a chosen step (docs/reliability.md).

:func:`fault_from_env` returns a :class:`FaultInjection` on the rank it names, else a
:class:`NoFaults`, whose hooks do nothing: the training loop calls the hooks unconditionally.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
from torch import nn

from .config import ConfigError

__all__ = ["FAULT_KINDS", "FaultInjection", "NoFaults", "fault_from_env"]

FAULT_KINDS = ("kill", "raise", "hang", "nan_loss", "nan_grad")


class NoFaults:
    """The null fault: every hook leaves the step alone."""

    def before_step(self, global_step: int) -> None:
        """Called before each step with its 1-based global index."""

    def on_loss(self, global_step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def on_grads(self, global_step: int, model: nn.Module) -> None:
        pass


class FaultInjection(NoFaults):
    """A testing hook that makes one rank fail on purpose, to test how runs survive it.

    Set by environment variables (read once, when training starts; nothing happens when
    ``RESTE_FAULT_STEP`` is unset)::

        RESTE_FAULT_STEP=7      1-based global training step at which the fault happens
        RESTE_FAULT_RANK=1      which rank (default 0; a single process is rank 0)
        RESTE_FAULT=kill        kill (SIGKILL itself), raise (RuntimeError), hang (stop
                                responding, ignoring signals), nan_loss (the loss becomes
                                NaN) or nan_grad (a gradient becomes NaN, the loss stays finite)

    Only meant for tests and drills (see docs/reliability.md).
    """

    def __init__(self, kind: str, step: int, rank: int):
        self.kind, self.step, self.rank = kind, step, rank

    @classmethod
    def from_env(cls, rank: int) -> FaultInjection | None:
        step = os.environ.get("RESTE_FAULT_STEP")
        if not step:
            return None
        kind = os.environ.get("RESTE_FAULT", "kill")
        if kind not in FAULT_KINDS or not step.isdigit():
            raise ConfigError(
                f"RESTE_FAULT={kind!r} RESTE_FAULT_STEP={step!r}: the fault kind must be one of "
                f"{', '.join(FAULT_KINDS)} and the step a positive whole number (this is a testing hook; "
                "unset RESTE_FAULT_STEP to train normally)"
            )
        fault_rank = int(os.environ.get("RESTE_FAULT_RANK", "0"))
        return cls(kind, int(step), fault_rank) if fault_rank == rank else None

    def before_step(self, global_step: int) -> None:
        """Called before each step with its 1-based global index."""
        if global_step != self.step:
            return
        print(f"RESTE_FAULT: injecting {self.kind!r} at step {global_step}", file=sys.stderr, flush=True)
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "raise":
            raise RuntimeError(f"RESTE_FAULT: injected failure at step {global_step}")
        if self.kind == "hang":
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)  # a hung process in C code does not answer signals either
            while True:
                time.sleep(3600)

    def on_loss(self, global_step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if self.kind == "nan_loss" and global_step == self.step else loss

    def on_grads(self, global_step: int, model: nn.Module) -> None:
        if self.kind == "nan_grad" and global_step == self.step:
            grad = next(p.grad for p in model.parameters() if p.grad is not None)
            grad.view(-1)[0] = float("nan")


def fault_from_env(rank: int) -> FaultInjection | NoFaults:
    """This rank's fault from ``RESTE_FAULT*`` (see :class:`FaultInjection`), or :class:`NoFaults`."""
    return FaultInjection.from_env(rank) or NoFaults()
