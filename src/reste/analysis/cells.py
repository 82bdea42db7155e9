"""Cells: finished runs whose settings are equal except for the seed, and the statistics over their seeds.

Part of ``reste report`` (:mod:`reste.analysis.report` has the whole picture and re-exports these names).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .runs import RunRecord

__all__ = ["Cell", "make_cells"]


def _stats(values: Sequence[float]) -> tuple[float | None, float | None]:
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else None
    return mean, std


@dataclass
class Cell:
    """Runs with the same settings (different seeds)."""

    runs: list[RunRecord]

    @property
    def first(self) -> RunRecord:
        return self.runs[0]

    def get(self, key, default=None):
        return self.first.get(key, default)

    def summary_values(self, key: str) -> list[float]:
        return [r.summary.get(key) for r in self.runs if r.summary and r.summary.get(key) is not None]

    def aggregate_values(self, key: str) -> list[float]:
        return [r.aggregates[key] for r in self.runs if r.aggregates[key] is not None]

    @property
    def seeds(self) -> list:
        return [r.get("seed") for r in self.runs]

    @property
    def label(self) -> str:
        """FP, DoReFa, or the estimator name."""
        if self.get("model.precision") == "fp":
            return "FP"
        if self.get("model.kwargs.weight_estimator") == "dorefa" or self.get("model.weight_estimator") == "dorefa":
            return "DoReFa"
        est = self.get("model.estimator", "?")
        return "ReSTE" if est == "reste" else str(est)

    @property
    def schedule(self) -> str | None:
        return self.get("estimator.schedule")

    @property
    def o_end(self) -> float | None:
        value = self.get("estimator.o_end")
        return None if value is None else float(value)

    @property
    def epochs(self):
        return self.get("train.epochs", self.first.summary.get("epochs") if self.first.summary else None)

    @property
    def scale(self) -> tuple:
        """(data set, model, training images, test images, epochs) of the cell's runs."""
        train, test = _image_counts(self.first)
        return (self.get("data.name", "?"), self.get("model.name", "?"), train, test, self.epochs)


def _image_counts(run: RunRecord) -> tuple[int | None, int | None]:
    """Training and test images of a run: as its summary.json records them, else derived from
    ``data.subset`` and ``data.test_subset`` the way the loaders apply them, else
    the data set's full sizes."""
    summary = run.summary or {}
    if summary.get("train_images") is not None and summary.get("test_images") is not None:
        return int(summary["train_images"]), int(summary["test_images"])
    from ..data import info, test_image_count

    subset = run.get("data.subset")
    test = test_image_count(subset, run.get("data.test_subset"))
    try:
        meta = info(str(run.get("data.name")))
    except ValueError:
        meta = None
    train = int(subset) if subset is not None else (meta.train_size if meta else None)
    return train, (test if test is not None or meta is None else meta.test_size)


def make_cells(runs: Iterable[RunRecord]) -> list[Cell]:
    """Group finished runs by setting, keeping first-seen order."""
    cells: dict[tuple, Cell] = {}
    for run in runs:
        if run.finished:
            cells.setdefault(run.setting, Cell([])).runs.append(run)
    return list(cells.values())


def _differing_keys(cells: Sequence[Cell]) -> set[str]:
    flats = [dict(c.first.setting) for c in cells]
    keys = set().union(*flats) if flats else set()
    return {k for k in keys if len({f.get(k) for f in flats}) > 1}


def _families(cells: Sequence[Cell], free: Sequence[str]) -> list[list[Cell]]:
    """Cells grouped by every setting except the ``free`` keys (and keys under them)."""

    def is_free(key):
        return any(key == f or key.startswith(f + ".") for f in free)

    groups: dict[tuple, list[Cell]] = {}
    for cell in cells:
        context = tuple((k, v) for k, v in cell.first.setting if not is_free(k))
        groups.setdefault(context, []).append(cell)
    return [g for g in groups.values() if len(g) >= 2]
