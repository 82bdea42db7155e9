"""SIGINT/SIGTERM during training: the handlers that ask the loop to stop after the current step
(:class:`_StopRequest`), and the error raised once the checkpoint is written (:class:`TrainingInterrupted`)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from ..errors import ReSTEError
from .distributed import launched_as_rank_0
from .rundir import checkpoint_path

__all__ = ["TrainingInterrupted", "resume_command"]


class TrainingInterrupted(ReSTEError):
    """SIGINT/SIGTERM stopped training after a checkpoint was written; ``exit_code`` is 128 + signal.
    The command line prints the message (with the resume command) on rank 0 only, without ``error:``."""

    exit_code: int

    def __init__(self, signum: int, run_dir: Path, resume_command: str):
        self.signum = signum
        self.exit_code = 128 + int(signum)
        self.run_dir = run_dir
        self.resume_command = resume_command
        name = signal.Signals(signum).name
        super().__init__(
            f"training stopped by {name}; checkpoint written to {checkpoint_path(run_dir, 'last')}. "
            f"Resume with:\n  {resume_command}"
        )

    def cli_message(self, rank: str = "0") -> str | None:
        return str(self) if rank in ("0", "") else None


def resume_command(run_dir: Path) -> str:
    """The command that continues ``run_dir`` (under torchrun when this is a distributed run)."""
    distributed = "WORLD_SIZE" in os.environ and os.environ.get("WORLD_SIZE") != "1"
    launcher = "torchrun --nproc_per_node=N -m reste" if distributed else "reste"
    return f"{launcher} train --resume {run_dir}"


class _StopRequest:
    """SIGINT/SIGTERM handlers that ask the loop to stop after the current step.

    A second SIGINT while stopping raises KeyboardInterrupt at once (the user insists).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if not launched_as_rank_0():
            return  # torchrun signals every rank: rank 0 says it once for the job
        print(
            f"\n{signal.Signals(signum).name} received: finishing the current step and writing a checkpoint "
            "(press Ctrl-C again to abort without one)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers only work there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False
