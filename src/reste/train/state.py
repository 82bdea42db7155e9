"""Where a run stands: :class:`TrainState`, the progress a checkpoint saves and a resume restores
besides the model, the optimizer, the schedulers and the RNG states."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .rundir import _clean

__all__ = ["TrainState"]


@dataclass
class TrainState:
    """The run's position and what it has measured so far.

    ``epoch`` counts finished epochs; ``step_in_epoch`` the steps done of the next one (a
    mid-epoch checkpoint), with ``partial`` that epoch's running sums and seconds so far.
    ``history`` holds one metrics row per finished epoch, ``skipped_total`` the batches skipped
    for a non-finite loss or gradient, ``elapsed_before`` the seconds trained in earlier sessions
    (this session's start is ``session_start``, a ``time.perf_counter()`` value).
    """

    epoch: int = 0
    step_in_epoch: int = 0
    partial: dict | None = None
    history: list[dict] = field(default_factory=list)
    skipped_total: int = 0
    elapsed_before: float = 0.0
    session_start: float = field(default_factory=time.perf_counter)

    @property
    def elapsed(self) -> float:
        """Seconds trained so far, earlier sessions included."""
        return self.elapsed_before + time.perf_counter() - self.session_start

    def move_to(self, epoch: int, step_in_epoch: int = 0, partial: dict | None = None) -> None:
        """Record the position a checkpoint is written at."""
        self.epoch, self.step_in_epoch, self.partial = int(epoch), int(step_in_epoch), partial

    def best_row(self) -> dict | None:
        """The epoch with the best test top-1 (the earliest of equals), None before the first."""
        return max(self.history, key=lambda r: (r["test_top1"], -r["epoch"])) if self.history else None

    def state_dict(self) -> dict:
        """The checkpoint's entries for this state (NaN/inf in the metrics saved as None)."""
        return {
            "epoch": int(self.epoch),
            "step_in_epoch": int(self.step_in_epoch),
            "partial": self.partial,
            "metrics": [{k: _clean(v) for k, v in row.items()} for row in self.history],
            "elapsed": self.elapsed,
            "skipped_total": self.skipped_total,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from a checkpoint (older ones may lack the mid-epoch and timing entries)."""
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state.get("step_in_epoch", 0))
        self.history = list(state["metrics"])
        self.elapsed_before = float(state.get("elapsed", 0.0))
        self.partial = state.get("partial")
        self.skipped_total = int(state.get("skipped_total", 0))
