"""Reading the equilibrium indicators a run wrote (estimating error, gradient instability, flip ratio).

What they are and how they are measured is in :mod:`reste.nn.indicators`, where
:class:`IndicatorTracker` and the formulas live (the trainer measures with them, and
``reste.train`` imports nothing of ``reste.analysis``); this module re-exports them and reads
what they wrote: :func:`load_snapshot`, :func:`read_metrics`.

The reference samples ``e`` and ``s`` at the last iteration of every epoch and summarises a
run by the mean of ``e`` over epochs and the sum of ``s`` over epochs:
:func:`reference_aggregates` computes both from a run's ``metrics.jsonl``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np

# the tracker is measured while training, so it lives in the core (reste.train uses it from there); its
# names stay importable from here
from ..nn.indicators import (
    FIT_RANGE,
    GRAD_LOG10_RANGE,
    HIST_BINS,
    IndicatorTracker,
    estimating_error,
    fitting_error,
    gradient_instability,
)

__all__ = [
    "IndicatorTracker",
    "fitting_error",
    "estimating_error",
    "gradient_instability",
    "read_metrics",
    "reference_aggregates",
    "load_snapshot",
    "FIT_RANGE",
    "GRAD_LOG10_RANGE",
    "HIST_BINS",
]


def load_snapshot(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a snapshot written by :meth:`IndicatorTracker.snapshot` (no pickle involved)."""
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` (one dict per epoch), in file order
    (:func:`reste.train.rundir.read_metrics`: that module owns the run folder)."""
    # imported here: the tracker above is used by the trainer, so this module does not import reste.train
    from ..train.rundir import read_metrics as read

    return read(run_dir)


def reference_aggregates(rows_or_run_dir: Iterable[dict] | str | os.PathLike) -> dict:
    """Summarise a run's indicators the way the reference does.

    From per-epoch rows (or a run directory's ``metrics.jsonl``), sampled at the last
    iteration of each epoch:

    - ``est_error_end_mean``: mean over epochs of ``e`` at ``o_end`` (the reference's number);
    - ``est_error_mean``: mean over epochs of ``e`` at the current ``o`` (None without ReSTE);
    - ``grad_instability_sum``: sum over epochs of ``s``;
    - ``epochs``: how many epochs had the indicators (had ``e`` at ``o_end``);
    - ``logged_epochs``: how many epochs the rows hold;
    - ``est_error_end_epochs``, ``est_error_epochs``, ``grad_instability_epochs``: how many epochs each
      of the three was taken over.

    Epochs without a value are skipped; a key is None when no epoch has it. A value over fewer epochs
    than ``logged_epochs`` (the last step of an epoch skipped as non-finite, ``train.nonfinite: skip``,
    leaves that epoch without indicators) is a mean or sum over other epochs than a full run's: the
    report marks it.
    """
    if isinstance(rows_or_run_dir, (str, os.PathLike)):
        rows = read_metrics(rows_or_run_dir)
    else:
        rows = list(rows_or_run_dir)

    def values(key):
        return [float(r[key]) for r in rows if r.get(key) is not None]

    e_end, e_cur, s = values("est_error_end"), values("est_error"), values("grad_instability")
    return {
        "est_error_end_mean": sum(e_end) / len(e_end) if e_end else None,
        "est_error_mean": sum(e_cur) / len(e_cur) if e_cur else None,
        "grad_instability_sum": sum(s) if s else None,
        "epochs": len(e_end),
        "logged_epochs": len({r.get("epoch", ("row", i)) for i, r in enumerate(rows)}),
        "est_error_end_epochs": len(e_end),
        "est_error_epochs": len(e_cur),
        "grad_instability_epochs": len(s),
    }
