"""Cells: finished runs whose settings are equal except for the seed, and the statistics over their seeds.

Part of ``reste report`` (:mod:`reste.analysis.report` has the whole picture and re-exports these names).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .._platform import describe_machine
from .runs import RunRecord, _same_repr

__all__ = ["Cell", "Duplicate", "make_cells", "Paired", "paired", "T_CRITICAL_95"]

#: two-sided 5% critical values of Student's t, by degrees of freedom (1-30); beyond 30, 2.0
T_CRITICAL_95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


#: how the report and the docs write each estimator (the config's names are lower case)
ESTIMATOR_NAMES = {
    "reste": "ReSTE",
    "ste": "STE",
    "clipped_ste": "clipped STE",
    "approx_sign": "ApproxSign",
    "swish_sign": "SwishSign",
    "dsq": "DSQ",
    "ede": "EDE",
    "fda": "FDA",
    "rbnn": "RBNN",
}


def _stats(values: Sequence[float]) -> tuple[float | None, float | None]:
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else None
    return mean, std


@dataclass(frozen=True)
class Paired:
    """``a - b`` over the seeds two cells share: the mean difference, its paired t statistic
    ``mean / (sd / sqrt(n))`` and the seed count ``n``.

    ``t`` is None when every per-seed difference is the same (sd = 0): the t statistic is then
    undefined, and no significance is claimed from it (two seeds can agree by chance, and
    accuracies on a small test set move in steps, so equal differences are common)."""

    mean: float
    t: float | None
    n: int

    @property
    def significant(self) -> bool:
        """|t| above the two-sided 5% critical value for ``n - 1`` degrees of freedom; False when t is undefined."""
        if self.t is None:
            return False
        critical = T_CRITICAL_95[self.n - 2] if self.n - 1 <= len(T_CRITICAL_95) else 2.0
        return abs(self.t) > critical

    def __str__(self) -> str:
        if self.t is None:
            return f"{self.mean:+.2f} (the same on each of {self.n} seeds)"
        return f"{self.mean:+.2f} (t = {self.t:.2f}, {self.n} seeds{', p < 0.05' if self.significant else ''})"


def paired(a: Cell, b: Cell, key: str = "final_top1") -> Paired | None:
    """``a - b`` of a summary value over the seeds both cells ran (None with fewer than 2)."""
    of_b = {r.get("seed"): float(r.summary[key]) for r in b.runs if r.summary and r.summary.get(key) is not None}
    diffs = [
        float(r.summary[key]) - of_b[r.get("seed")]
        for r in a.runs
        if r.summary and r.summary.get(key) is not None and r.get("seed") in of_b
    ]
    if len(diffs) < 2:
        return None
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    # accuracies are 100 * correct / count, unrounded: equal differences can come out 1e-14 apart,
    # which must not read as an enormous t
    same = sd <= 1e-9 * max(1.0, abs(mean))
    return Paired(mean, None if same else mean / (sd / math.sqrt(len(diffs))), len(diffs))


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
        return [float(r.summary[key]) for r in self.runs if r.summary and r.summary.get(key) is not None]

    def aggregate_values(self, key: str) -> list[float]:
        return [float(r.aggregates[key]) for r in self.runs if r.aggregates[key] is not None]

    @property
    def seeds(self) -> list:
        return [r.get("seed") for r in self.runs]

    @property
    def label(self) -> str:
        """FP, DoReFa, or the estimator's display name (:data:`ESTIMATOR_NAMES`: STE, clipped STE, ReSTE, ...)."""
        if self.get("model.precision") == "fp":
            return "FP"
        if self.get("model.kwargs.weight_estimator") == "dorefa" or self.get("model.weight_estimator") == "dorefa":
            return "DoReFa"
        est = self.get("model.estimator", "?")
        return ESTIMATOR_NAMES.get(est, str(est))

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


@dataclass(frozen=True)
class Duplicate:
    """A finished run with the same setting and seed as another: one of them is counted."""

    run: RunRecord  # left out
    kept: RunRecord  # the one counted (the first by path)

    def __str__(self) -> str:
        def top1(r: RunRecord) -> str:
            value = (r.summary or {}).get("final_top1")
            return "?" if value is None else f"{float(value):.2f}"

        same = top1(self.run) == top1(self.kept)
        text = (
            f"`{self.run.dir}` has the same setting and seed ({self.run.get('seed')}) as `{self.kept.dir}`; "
            f"only `{self.kept.dir}` is counted"
            + ("" if same else f" (final top-1 {top1(self.kept)}; the run left out has {top1(self.run)})")
        )
        machines = [describe_machine((r.summary or {}).get("machine")) for r in (self.kept, self.run)]
        if None not in machines and machines[0] != machines[1]:
            # not a copy: the same training on another machine or thread count, whose float roundings differ
            text += f"; they ran on {machines[0]} and {machines[1]}, which round differently (not a copy)"
        return text


def make_cells(runs: Iterable[RunRecord], duplicates: list[Duplicate] | None = None) -> list[Cell]:
    """Group finished runs by setting, keeping first-seen order.

    A run with the same setting and seed as another (a run copied, given twice through two sweep
    directories, or trained again, perhaps with another thread count) is not a second seed: one is
    kept, the same whatever order the runs come in (the first by path), and the others are appended
    to ``duplicates`` when a list is given."""
    # (run, its setting and seed, its folder), each computed once
    finished = [
        (run, (run.setting, _same_repr(run.get("seed"))), str(run.dir.resolve())) for run in runs if run.finished
    ]
    # which of a setting's runs of one seed is counted: the first by path, so a report does not change
    # with the order of its arguments
    chosen: dict[tuple, tuple[RunRecord, str]] = {}
    for run, key, where in finished:
        if key not in chosen or where < chosen[key][1]:
            chosen[key] = (run, where)
    cells: dict[tuple, Cell] = {}
    for run, key, where in finished:
        cell = cells.setdefault(key[0], Cell([]))
        kept, kept_where = chosen[key]
        if run is not kept:
            if duplicates is not None and kept_where != where:  # not the same folder given twice
                duplicates.append(Duplicate(run, kept))
            continue
        cell.runs.append(run)
    for cell in cells.values():  # in seed order, whatever order the runs came in
        cell.runs.sort(key=_seed_order)
    return list(cells.values())


def _seed_order(run: RunRecord) -> tuple:
    seed = run.get("seed")
    numeric = isinstance(seed, (int, float)) and not isinstance(seed, bool)
    return (0, seed, "") if numeric else (1, 0, str(seed))


def _differing_keys(cells: Sequence[Cell]) -> set[str]:
    """The settings that take two or more values among ``cells`` (a cell that does not use an option,
    :attr:`RunRecord.unused_keys`, gives it no value)."""
    flats = [dict(c.first.setting) for c in cells]
    keys = set().union(*flats) if flats else set()
    return {k for k in keys if len({f[k] for f in flats if k in f}) > 1}


def _is_free(key: str, free: Sequence[str]) -> bool:
    return any(key == f or key.startswith(f + ".") for f in free)


def _context(cell: Cell, free: Sequence[str]) -> tuple:
    return tuple((k, v) for k, v in cell.first.setting if not _is_free(k, free))


def _families(cells: Sequence[Cell], free: Sequence[str]) -> list[list[Cell]]:
    """Cells grouped by every setting except the ``free`` keys (and keys under them), in first-seen order.

    A cell that does not use an option (:attr:`RunRecord.unused_keys`: an FP model has no o schedule,
    only the power way has ``estimator.p``) also stands in each family whose cells set it, their other
    settings being equal: the FP row belongs in an estimator comparison at any o_end, and the linear
    and cosine rows beside the power row at any p."""
    order = {id(c): i for i, c in enumerate(cells)}
    groups: dict[tuple, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(_context(cell, free), []).append(cell)
    unused = {ctx: frozenset().union(*(c.first.unused_keys for c in group)) for ctx, group in groups.items()}

    def joins(a: tuple, b: tuple) -> bool:
        """Whether group ``a``'s cells belong in group ``b``'s family: ``b`` sets more options, and the
        options ``a`` leaves out are ones it does not use."""
        da, db = dict(a), dict(b)
        return (
            set(da) < set(db)
            and all(db[k] == v for k, v in da.items())
            and all(k in unused[a] for k in set(db) - set(da))
        )

    families = []
    for b in groups:
        if any(joins(b, c) for c in groups):
            continue  # its cells stand in the families of the groups that set more
        members = [cell for a in groups if a == b or joins(a, b) for cell in groups[a]]
        families.append(sorted(members, key=lambda c: order[id(c)]))
    return [f for f in families if len(f) >= 2]


def _distinct(families: Sequence[Sequence[Cell]]) -> list[int]:
    """The indexes of the families to draw: none whose cells another family holds all of (an equal
    one drawn before it, or a larger one). A cell that does not use an option stands in every family
    that sets it, so once a table keeps only some cells (Table 2 drops a way tried at one o_end) two
    families can come out the same."""
    sets = [frozenset(map(id, f)) for f in families]
    return [i for i, s in enumerate(sets) if not any(s < t or (s == t and j < i) for j, t in enumerate(sets) if j != i)]


def _joined_as_configured(family: Sequence[Cell], free: Sequence[str]) -> bool:
    """Whether the family's cells that stand in it without setting some of its options (an FP cell in
    an estimator comparison) were configured with the family's values of them anyway (the o schedule an
    FP run's config names): where such a cell stood before it could join any family."""
    rep = dict(_context(_representative(family), free))
    for cell in family:
        missing = set(rep) - {k for k, _ in _context(cell, free)}
        flat = cell.first.flat
        if any(k not in flat or rep[k] != _same_repr(flat[k]) for k in missing):
            return False
    return True


def _own_cells(family: Sequence[Cell], free: Sequence[str]) -> list[Cell]:
    """The cells that set every option of the family (not those standing in it as not using one)."""
    rep = _context(_representative(family), free)
    return [c for c in family if _context(c, free) == rep]


def _value(family: Sequence[Cell], key: str):
    """``key``'s value in a family: from a cell that uses it (None when none does)."""
    return next((c.get(key) for c in family if key not in c.first.unused_keys), None)


def _representative(family: Sequence[Cell]) -> Cell:
    """The cell that sets the most options (a binary cell rather than FP): the one whose shared
    settings (o schedule, o_end) a table's context line can name."""
    return max(family, key=lambda c: len(c.first.setting))


def _separating(families: Sequence[Sequence[Cell]], free: Sequence[str]) -> list[list[tuple[str, object]]]:
    """For each family, the ``(key, value)`` of the settings that tell it from the other families of the
    same table kind (an ``optim.lr`` swept beside ``o_end``): without them two tables read the same."""
    shared = [{k: v for c in family for k, v in _context(c, free)} for family in families]
    # keys every family sets first: a key one family lacks only because it has no cell that uses it (no
    # power run: no estimator.p) says nothing of it; such keys only where the others leave two alike
    keys = sorted({k for s in shared for k in s if all(k in t for t in shared) and len({t[k] for t in shared}) > 1})
    if len({tuple(s.get(k) for k in keys) for s in shared}) < len(shared):
        # then the others too, each named by the families that set it (not "p=(unset)" for the rest)
        keys = sorted({k for s in shared for k in s if len({t.get(k) for t in shared}) > 1})
    return [[(k, _value(family, k)) for k in keys if k in s] for family, s in zip(families, shared)]
