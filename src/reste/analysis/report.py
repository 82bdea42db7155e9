"""Tables and figures from finished runs: ``reste report RUN_OR_SWEEP_DIRS... --out DIR``.

Every run found (a run directory, or every run inside a sweep directory) is read from
its ``config.yaml``, ``summary.json`` and ``metrics.jsonl``. Runs whose resolved configs
are equal except for the seed form one *cell*, summarised as mean ± sample standard
deviation over its seeds, final and best test top-1 both shown.

The cells are then laid out like the seed document's tables wherever the runs allow:

- **results**: every cell, in the layout of the paper's results table;
- **Table 2**: fixed ``o`` against progressive ``o_end`` (cells differing only in
  ``estimator.schedule`` / ``estimator.o_end``, with ``fixed`` among the schedules);
- **Table 3**: the progressive tuning ways (linear / cosine / power);
- **estimator comparison**: cells differing only in the estimator;
- **Table 1**: FP / DoReFa / ReSTE for a ViT;
- **o_end sweep**: estimating error (mean over epochs, at ``o_end``), gradient
  instability (sum over epochs) and accuracy against ``o_end`` (Figure 1), with the
  distributions of Figure 2 from the runs' ``histograms/``;
- **Figure 3**: ``o`` against training progress for the tuning ways present.

Every table starts with the scale of its runs (data set, model, training and test images,
epochs); a ``Not drawn`` list says which tables and figures the runs do not allow, and why.

Numbers reported in the paper sit in their own column headed ``paper (reported, ...)``
naming the paper's data set and model; they are never mixed with measured ones.
Figures need matplotlib (``pip install reste[plot]``); without it only tables are written.

The parts live beside this file, by concern: :mod:`.runs` (reading run and sweep directories),
:mod:`.cells` (grouping runs into cells, statistics over seeds), :mod:`.tables` (the paper's
numbers and each table's builder), :mod:`.figures` (Figures 1-3) and :mod:`.markdown` (formatting).
This module assembles them (:func:`build_report`, the ``Not drawn`` list); every name they
define that was once defined here is importable from here too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ReSTEError, UsageError
from ..train import rundir

# the report's parts, by concern; every name moved from this module stays importable from it
from .cells import Cell, Duplicate, _differing_keys, _families, _image_counts, _stats, make_cells  # noqa: F401
from .figures import (
    _figure1,
    _figure2,
    _figure3,
    _figure3_caption,
    _figure3_ways,
    _last_snapshot,  # noqa: F401
    _progress_at,
    _pyplot,
    _schedule_of,
    o_points,
)
from .markdown import (
    _context_line,
    _count,
    _epochs,
    _num,
    _paper,
    _pm,
    _scale_line,
    _sci_pm,
    _separation,
    _table,  # noqa: F401
    _wa,
)
from .runs import (
    IGNORED_PREFIXES,
    Missing,
    NotARunError,
    RunRecord,
    _default_flat,
    _flatten,
    _ignored,
    _is_run,  # noqa: F401
    find_runs,  # noqa: F401
    load_run,
    scan,
)
from .tables import (
    ESTIMATOR_KEYS,
    ESTIMATOR_ORDER,
    PAPER,
    PAPER_SOURCE,
    PROGRESSIVE_WAYS,  # noqa: F401
    _estimator_sections,
    _o_end_families,
    _o_end_section,
    _o_end_separating,
    _results_section,
    _table2_sections,
    _table3_sections,
)

__all__ = ["NotARunError", "RunRecord", "Cell", "load_run", "find_runs", "build_report", "PAPER"]


# --------------------------------------------------------------------------- the report
@dataclass
class Report:
    """What :func:`build_report` produced."""

    markdown: str
    path: Path
    figures: list[Path] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)
    not_drawn: list[str] = field(default_factory=list)  # a line per table or figure left out, with the reason
    duplicates: list[str] = field(default_factory=list)  # a line per run counted once: same setting and seed
    left_out: list[str] = field(default_factory=list)  # a line per run not counted: unfinished, failed, no results


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _distinct(paths: Sequence[str | os.PathLike]) -> list[str | os.PathLike]:
    """``paths`` without repeats of one directory (however spelled), first spelling kept."""
    seen, out = set(), []
    for p in paths:
        key = Path(p).resolve()
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _values(cells: Sequence[Cell], key: str) -> str:
    values = {c.get(key) for c in cells}
    numbers = sorted(v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool))
    return ", ".join([_num(v) for v in numbers] + sorted(_num(v) for v in values if v not in numbers)) or "none"


def _not_drawn(cells: Sequence[Cell], sections: Sequence[str], figures: Sequence[str], plt, plots: bool) -> list[str]:
    """One line per table or figure the runs do not allow, saying what it needs and what was found."""
    text = "\n".join(sections)
    cnn = [c for c in cells if not str(c.get("model.name", "")).startswith("vit")]
    vit = [c for c in cells if str(c.get("model.name", "")).startswith("vit")]
    schedules = f"found estimator.schedule {_values(cells, 'estimator.schedule')}"
    lines = []
    if "## Table 2" not in text:
        lines.append(
            "Table 2 (fixed vs progressive o): needs runs that differ only in estimator.schedule and "
            "estimator.o_end, with `fixed` and a progressive way at 2 or more o_end values "
            f"({schedules}; estimator.o_end {_values(cells, 'estimator.o_end')})."
        )
    if "## Table 3" not in text:
        lines.append(
            f"Table 3 (tuning ways): needs 2 or more of {', '.join(PROGRESSIVE_WAYS)} at otherwise equal "
            f"settings ({schedules})."
        )
    if "## Estimator comparison" not in text:
        found = ", ".join(sorted({c.label for c in cnn})) or "no CNN run"
        lines.append(
            f"Estimator comparison: needs 2 or more estimators on a CNN at otherwise equal settings (found {found})."
        )
    if "## Table 1" not in text:
        found = ", ".join(sorted({c.label for c in vit})) or "no ViT run"
        lines.append(
            "Table 1 (binary ViT): needs vit_tiny runs with 2 or more of FP, DoReFa, ReSTE at otherwise equal "
            f"settings (found {found})."
        )
    if "## Equilibrium" not in text:
        lines.append(
            "Equilibrium table and Figures 1 and 2: need progressive ReSTE runs at 3 or more o_end values at "
            "otherwise equal settings (found estimator.o_end "
            f"{_values([c for c in cells if c.schedule != 'fixed'], 'estimator.o_end')})."
        )
    if plt is None:
        why = "--no-plots was given" if not plots else "they need matplotlib (`pip install reste[plot]`)"
        lines.append(f"Figures: not drawn, {why}.")
        return lines
    if "## Equilibrium" in text and not any(t.startswith("Figure 2") for t in figures):
        lines.append(
            "Figure 2 (distributions): needs the runs' histograms/*.npz snapshots (written at the final epoch "
            "and at analysis.histograms_at when analysis.indicators is on); the o_end runs have none."
        )
    if not any(t.startswith("Figure 3") for t in figures):
        lines.append(
            f"Figure 3 (tuning ways of o): needs ReSTE runs with 2 or more of {', '.join(PROGRESSIVE_WAYS)} "
            f"at otherwise equal settings ({schedules})."
        )
    return lines


def _check_out(out: Path) -> None:
    """Refuse an output directory that is, or lies under, an existing file (exit code 2, naming --out)."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is" if existing == out else f"lies under {existing}, which is"
        raise UsageError(
            f"--out {out} {where} an existing file, not a directory; give a directory for report.md and "
            "figures/ (it is created if missing)"
        )


def _make_dir(folder: Path, out: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # no permission, a read-only or full disk, a file created meanwhile
        raise ReSTEError(f"cannot create {folder} for --out {out}: {err.strerror or err}") from None


# --------------------------------------------------------------------------- entry point
def build_report(
    paths: Sequence[str | os.PathLike], out: str | os.PathLike, command: str | None = None, plots: bool = True
) -> Report:
    """Write ``out/report.md`` (and ``out/figures/*.png``) from run and sweep directories.

    Raises :class:`NotARunError` naming the first path that is neither a run nor a sweep,
    or when no finished run is found.
    """
    if not paths:
        raise NotARunError("no run or sweep directory given")
    _check_out(Path(out))  # before reading anything
    paths = _distinct(paths)  # a directory given twice is read, and named, once
    runs: list[RunRecord] = []
    left_out: list[Missing] = []  # unfinished, failed or interrupted runs: named, never silently dropped
    sweeps: list[Path] = []
    for p in paths:
        found = scan(p)
        for run in found.runs:
            if run.finished and not run.config:  # its setting is unknown: it would pool with every other such run
                found.missing.append(
                    Missing(
                        run.dir,
                        f"{rundir.CONFIG} is missing or empty, so its settings are unknown; its "
                        f"checkpoints/last.pt holds them (key 'config'): write them back to {rundir.CONFIG}",
                    )
                )
            else:
                runs.append(run)
        # a sweep given itself and through its parent folder: each left-out run named once
        seen = {m.dir.resolve() for m in left_out}
        left_out.extend(m for m in found.missing if m.dir.resolve() not in seen)
        sweeps.extend(found.sweeps)
    duplicates: list[Duplicate] = []
    cells = make_cells(runs, duplicates)
    if not cells:
        raise NotARunError(
            f"no finished run (summary.json marked complete) in {', '.join(map(str, paths))}"
            + (f" ({'; '.join(str(m).replace('`', '') for m in left_out)})" if left_out else "")
            + "; finish or resume the runs first (`reste train --resume RUN_DIR` or rerun the sweep)"
        )
    out = Path(out)
    fig_dir = out / "figures"
    sections: list[str] = []
    figures: list[tuple[str, Path, str]] = []  # title, file, caption
    plt = _pyplot() if plots else None
    if plt is not None:
        _make_dir(fig_dir, out)

    sections.append(_results_section(cells))
    sections += _table2_sections(cells)
    sections += _table3_sections(cells)
    sections += _estimator_sections(cells)
    o_end_families = _o_end_families(cells)
    for i, (family, separating) in enumerate(zip(o_end_families, _o_end_separating(o_end_families))):
        sections.append(_o_end_section(family, separating))
        if plt is not None:
            suffix = "" if i == 0 else f"_{i + 1}"
            # several o_end sweeps (one per optim.lr, say): each figure's title names its own
            told = f" — {_separation(separating)}" if separating else ""
            figures.append(
                (
                    "Figure 1: indicators and accuracy against o_end" + told,
                    _figure1(plt, family, fig_dir / f"figure1_o_end{suffix}.png", separating),
                    "",
                )
            )
            fig2 = _figure2(plt, family, fig_dir / f"figure2_distributions{suffix}.png", separating)
            if fig2 is not None:
                figures.append(
                    ("Figure 2: distributions of the fitting error and the gradients per o_end" + told, fig2, "")
                )
    ways = _figure3_ways(cells)
    if plt is not None and len(ways) >= 2:
        figures.append(
            (
                "Figure 3: tuning ways of o",
                _figure3(plt, ways, fig_dir / "figure3_o_schedules.png"),
                _figure3_caption(ways),
            )
        )

    head = ["# reste report", ""]
    if command:
        head += [f"Made by `{command}`.", ""]
    counted = sum(len(c.runs) for c in cells)
    head.append(
        f"{_plural(counted, 'finished run')} in {_plural(len(cells), 'setting')}, from: "
        + ", ".join(f"`{p}`" for p in paths)
        + (f" (the sweeps {', '.join(f'`{s}`' for s in sweeps)})" if sweeps else "")
        + "."
    )
    if duplicates:
        head.append(
            "Counted once (a copy of a run, same setting and seed, is not a second seed): "
            + "; ".join(str(d) for d in duplicates)
            + "."
        )
    if left_out:
        head.append("Left out, unfinished or failed (not counted): " + "; ".join(str(m) for m in left_out) + ".")
    head.append("")
    missing = _not_drawn(cells, sections, [t for t, _, _ in figures], plt, plots)
    if missing:
        head += ["Not drawn:", ""] + [f"- {line}" for line in missing] + [""]
    fig_text = "\n\n".join(
        f"### {title}\n\n![{title}](figures/{p.name})" + (f"\n\n{caption}" if caption else "")
        for title, p, caption in figures
    )
    body = "\n\n".join(sections) + ("\n\n## Figures\n\n" + _scale_line(cells) + "\n\n" + fig_text if fig_text else "")
    text = "\n".join(head) + "\n" + body + "\n"
    _make_dir(out, out)
    path = out / "report.md"
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as err:
        raise ReSTEError(f"cannot write {path}: {err.strerror or err}") from None
    return Report(
        markdown=text,
        path=path,
        figures=[p for _, p, _ in figures],
        sections=sections,
        not_drawn=missing,
        duplicates=[str(d) for d in duplicates],
        left_out=[str(m) for m in left_out],
    )
