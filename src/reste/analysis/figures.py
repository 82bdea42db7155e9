"""The report's figures (matplotlib, drawn to files): Figure 1 (indicators and accuracy against
``o_end``), Figure 2 (distributions of the fitting error and the gradients, from the runs'
``histograms/``) and Figure 3 (``o`` against training progress for the tuning ways present).

Part of ``reste report`` (:mod:`reste.analysis.report` has the whole picture and re-exports these names).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..train import rundir
from .cells import Cell, _families, _stats
from .indicators import load_snapshot
from .markdown import _context_line
from .runs import RunRecord
from .tables import PROGRESSIVE_WAYS

__all__ = ["o_points"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _figure1(plt, family: list[Cell], path: Path, separating: Sequence[tuple[str, object]] = ()) -> Path:
    x = [c.o_end for c in family]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    panels = [
        (
            "estimating error e\n(mean over epochs, at o_end)",
            [c.aggregate_values("est_error_end_mean") for c in family],
        ),
        ("gradient instability s\n(sum over epochs)", [c.aggregate_values("grad_instability_sum") for c in family]),
    ]
    for ax, (title, values) in zip(axes, panels):
        means = [_mean_or_nan(v) for v in values]
        stds = [(_stats(v)[1] or 0.0) if v else 0.0 for v in values]
        ax.errorbar(x, means, yerr=stds, marker="o", capsize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("o_end")
        finite = [m for m in means if m == m]
        if finite and min(finite) > 0 and max(finite) / min(finite) > 100:
            ax.set_yscale("log")  # s spans orders of magnitude across o_end
    ax = axes[2]
    for key, label in (("final_top1", "final"), ("best_top1", "best")):
        values = [c.summary_values(key) for c in family]
        ax.errorbar(
            x,
            [_stats(v)[0] for v in values],
            yerr=[_stats(v)[1] or 0.0 for v in values],
            marker="o",
            capsize=3,
            label=label,
        )
    ax.set_title("test top-1 (%)", fontsize=10)
    ax.set_xlabel("o_end")
    ax.legend()
    fig.suptitle(
        textwrap.fill(
            _context_line(family[0], ["estimator.o_end"], scale=True, separating=separating)
            + f"; mean ± std over {min(len(c.runs) for c in family)}+ seeds",
            140,
        ),
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _last_snapshot(run: RunRecord) -> Path | None:
    snaps = sorted((run.dir / rundir.HISTOGRAMS).glob("*.npz")) if (run.dir / rundir.HISTOGRAMS).is_dir() else []
    return snaps[-1] if snaps else None


def _mean_or_nan(values) -> float:
    mean = _stats(values)[0] if values else None
    return float("nan") if mean is None else mean


def _figure2(plt, family: list[Cell], path: Path, separating: Sequence[tuple[str, object]] = ()) -> Path | None:
    curves = []
    for cell in family:
        pooled = None  # counts summed over layers and seeds; snapshots pool only when their bins agree
        for run in cell.runs:
            snap_path = _last_snapshot(run)
            if snap_path is None:
                continue
            snap = load_snapshot(snap_path)
            keys = (
                "fit_end_counts",
                "fit_end_under",
                "fit_end_over",
                "grad_log10_counts",
                "grad_zero",
                "grad_under",
                "grad_over",
            )
            sums = {k: snap[k].sum(axis=0) for k in keys}
            snap_edges = (snap["fit_edges"], snap["grad_log10_edges"])
            if pooled is None:
                pooled, pooled_edges = sums, snap_edges
            elif all(np.array_equal(a, b) for a, b in zip(snap_edges, pooled_edges)):
                pooled = {k: pooled[k] + sums[k] for k in keys}
        if pooled is not None:
            curves.append((cell.o_end, pooled, *pooled_edges))
    if not curves:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    for o_end, c, fe, ge in curves:
        fit_total = c["fit_end_counts"].sum() + c["fit_end_under"] + c["fit_end_over"]
        grad_total = c["grad_log10_counts"].sum() + c["grad_zero"] + c["grad_under"] + c["grad_over"]
        # densities relative to every weight, so mass outside the range stays visible as a shortfall
        for ax, counts, edges, total, outside in (
            (left, c["fit_end_counts"], fe, fit_total, c["fit_end_under"] + c["fit_end_over"]),
            (right, c["grad_log10_counts"], ge, grad_total, c["grad_over"]),
        ):
            centres = (edges[:-1] + edges[1:]) / 2
            density = counts / max(total, 1) / np.diff(edges)
            share = 100.0 * outside / max(total, 1)
            note = (
                f" ({share:.1f}% above 10^{edges[-1]:g})"
                if ax is right and share >= 0.05
                else (f" ({share:.1f}% outside)" if ax is left and share >= 0.05 else "")
            )
            ax.plot(centres, density, label=f"o_end = {o_end:g}{note}")
    left.set_title("fitting error f_o_end(w) - sign(w), binary layers", fontsize=10)
    left.set_xlabel("fitting error")
    left.set_ylabel("density")
    right.set_title("weight gradients, binary layers", fontsize=10)
    right.set_xlabel("log10 |dL/dw|")
    right.set_ylabel("density")
    left.legend(fontsize=8)
    fig.suptitle(
        textwrap.fill(
            "last snapshot of each run, all seeds pooled; "
            + _context_line(family[0], ["estimator.o_end"], scale=True, separating=separating),
            120,
        ),
        fontsize=9,
    )
    right.legend(fontsize=8)
    nonzero = np.nonzero(sum(c["grad_log10_counts"] for _, c, _, _ in curves))[0]
    if nonzero.size:  # zoom on the decades that hold gradients
        edges = curves[0][3]
        right.set_xlim(edges[max(nonzero[0] - 1, 0)], edges[min(nonzero[-1] + 2, len(edges) - 1)])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _figure3_ways(cells: Sequence[Cell]) -> dict[str, Cell]:
    """The largest set of progressive ReSTE ways compared at otherwise equal settings."""
    ways: dict[str, Cell] = {}
    for family in _families(cells, ["estimator.schedule"]):
        found = {c.schedule: c for c in family if c.schedule in PROGRESSIVE_WAYS and c.label == "ReSTE"}
        if len(found) > len(ways):
            ways = found
    return ways


def _schedule_of(cell: Cell):
    from ..schedules import o_schedule

    p = cell.get("estimator.p", 2.0)
    return o_schedule(str(cell.schedule), o_end=float(cell.o_end or 1.0), p=float(p) if p is not None else 2.0)


def o_points(cell: Cell) -> list[tuple[float, float]]:
    """``(progress r, o)`` for every epoch of the cell's first run: the ``o`` its metrics log (the
    o of the epoch's last step) at the progress the schedule was evaluated at for that step.

    Per epoch that is ``r = (epoch - 1) / epochs``; per step ``(epoch * steps - 1) / (epochs * steps)``
    (``steps_per_epoch`` from summary.json; older runs: where the schedule takes that ``o``).
    So the last point is the ``o`` the run reached, below ``o_end``, which the schedule only
    reaches at ``r = 1``, after the last step. A run extended with ``--resume train.epochs=N``
    (``train.extended_from``) computed its early epochs' ``o`` over fewer epochs: its points are
    placed where the schedule takes their ``o``, the progress they were computed for.
    """
    run = cell.first
    rows = [m for m in run.metrics if m.get("o") is not None]
    epochs = cell.epochs or len(run.metrics)
    steps = (run.summary or {}).get("steps_per_epoch")
    sched = _schedule_of(cell)
    points = []
    extended = bool(cell.get("train.extended_from"))
    for m in rows:
        if extended:
            r = _progress_at(sched, float(m["o"]), m["epoch"] / epochs)
        elif cell.get("estimator.per") == "epoch":
            r = (m["epoch"] - 1) / epochs
        elif steps:
            r = (m["epoch"] * steps - 1) / (epochs * steps)
        else:
            r = _progress_at(sched, float(m["o"]), m["epoch"] / epochs)
        points.append((r, float(m["o"])))
    return points


def _progress_at(sched, o: float, default: float) -> float:
    """Where a rising schedule takes the value ``o`` (bisection); ``default`` for a flat one."""
    lo, hi = 0.0, 1.0
    if sched(hi) <= sched(lo):
        return default
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sched(mid) < o else (lo, mid)
    return (lo + hi) / 2


def _figure3(plt, ways: dict[str, Cell], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    r = np.linspace(0, 1, 201)
    for way in PROGRESSIVE_WAYS:
        if way not in ways:
            continue
        cell = ways[way]
        sched = _schedule_of(cell)
        label = f"{way}" + (f" (p = {sched.p:g})" if way == "power" else "")
        points = o_points(cell)
        if points:
            label += f": reached o = {points[-1][1]:.2f} (o_end {cell.o_end:g})"
        line = ax.plot(r, [sched(v) for v in r], label=label)[0]
        if points:
            ax.plot([x for x, _ in points], [o for _, o in points], "o", color=line.get_color(), ms=4)
            ax.plot(*points[-1], "*", color=line.get_color(), ms=11)
    ax.set_xlabel("training progress r")
    ax.set_ylabel("o")
    ax.set_title(
        "o schedules (lines); o at each epoch's last step (dots);\n"
        "the o reached (stars): o_end comes at r = 1, after the last step",
        fontsize=8,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _figure3_caption(ways: dict[str, Cell]) -> str:
    parts = []
    for way in PROGRESSIVE_WAYS:
        if way in ways and o_points(ways[way]):
            parts.append(f"{way} {o_points(ways[way])[-1][1]:.2f} (o_end {ways[way].o_end:g})")
    text = (
        "Lines: the schedules o(r). Dots: the o of each epoch's last step, at the progress it was computed for "
        "(for a run extended with --resume train.epochs=N, where the schedule takes that o)."
    )
    if parts:
        text += (
            " The o the runs reached at their last step: "
            + ", ".join(parts)
            + "; a schedule reaches o_end only at r = 1, after the last step."
        )
    return text
