"""Markdown formatting for the report: tables, numbers, ``mean ± std`` over seeds, and the lines that
say what a table's numbers were measured on (scale and shared settings).

Part of ``reste report`` (:mod:`reste.analysis.report` has the whole picture and re-exports these names).
"""

from __future__ import annotations

from collections.abc import Sequence

from .._platform import describe_machine
from .cells import Cell, _stats


def _pm(values: Sequence[float], mean_format: str = ".2f", std_format: str = ".2f") -> str:
    """``mean ± std`` over seeds (just the mean for one seed, a dash for none)."""
    mean, std = _stats(values)
    if mean is None:
        return "—"
    if std is None:
        return f"{mean:{mean_format}}"
    return f"{mean:{mean_format}} ± {std:{std_format}}"


def _sci_pm(values: Sequence[float]) -> str:
    return _pm(values, ".4g", ".2g")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _wa(precision) -> str:
    return {"1w1a": "1/1", "1w32a": "1/32", "fp": "32/32"}.get(precision, str(precision))


def _num(x) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):  # before int: True would print as 1
        return "yes" if x else "no"
    if isinstance(x, (list, tuple)):  # as config.yaml writes it: [3], not the tuple a cell keeps
        return "[" + ", ".join(_num(v) for v in x) + "]"
    return f"{x:g}" if isinstance(x, (int, float)) else str(x)


def _epochs(n) -> str:
    return f"{_num(n)} epoch" + ("" if n == 1 else "s")


def _count(x) -> str:
    return "?" if x is None else f"{x:,}"


def _scale_line(cells: Sequence[Cell]) -> str:
    """What the numbers below were measured on: data set, model, images and epochs of the runs."""
    scales = list(dict.fromkeys(c.scale for c in cells))
    parts = [
        f"data set {data}, model {model}, {_count(train)} training images, {_count(test)} test images, "
        f"{_epochs(epochs)}"
        for data, model, train, test, epochs in scales
    ]
    return (
        ("Scale: " if len(parts) == 1 else "Scale (differs between the runs below): ")
        + "; ".join(parts)
        + ". "
        + _machine_text(cells)
    )


def _machine_text(cells: Sequence[Cell]) -> str:
    """``Machine: ...`` of the runs (from their summary.json), with run counts when they differ."""
    machines: dict[str | None, int] = {}
    for cell in cells:
        for run in cell.runs:
            text = describe_machine((run.summary or {}).get("machine"))
            machines[text] = machines.get(text, 0) + 1
    if list(machines) == [None]:
        return "Machine: not recorded (runs of a reste before 2026-12-02)."
    if len(machines) == 1:
        return f"Machine: {next(iter(machines))}."
    return (
        "Machines (differ between the runs below): "
        + "; ".join(f"{text or 'not recorded'} ({n} run{'' if n == 1 else 's'})" for text, n in machines.items())
        + "."
    )


def _paper(x) -> str:
    """A reported number as the paper prints it (two decimals)."""
    if x is None:
        return "—"
    return f"{x:.2f}" if isinstance(x, float) else str(x)


def _separation(separating: Sequence[tuple[str, object]]) -> str:
    """``key=value, ...`` of the settings that tell a table from the others of its kind (empty when alone)."""
    return ", ".join(f"{k}={'(unset)' if v is None else _num(v)}" for k, v in separating)


def _context_line(
    cell: Cell, free: Sequence[str], scale: bool = False, separating: Sequence[tuple[str, object]] = ()
) -> str:
    """The settings shared by a table's cells (with ``scale``: data, images and epochs too, for figure titles),
    then ``separating``: the settings, as ``key=value``, that tell this table from others of its kind."""
    shown = ("data.name", "model.name", "model.precision", "model.estimator", "estimator.schedule", "estimator.o_end")
    parts = [f"data {cell.get('data.name', '?')}", f"model {cell.get('model.name', '?')}"]
    if "model.precision" not in free:
        parts.append(f"W/A {_wa(cell.get('model.precision'))}")
    if "model.estimator" not in free and cell.label not in ("FP",):
        parts.append(f"estimator {cell.label}")
    if "estimator.schedule" not in free:
        parts.append(f"o schedule {cell.schedule}")
    if "estimator.o_end" not in free:
        parts.append(f"o_end {_num(cell.o_end)}")
    if scale:
        _, _, train, test, epochs = cell.scale
        parts += [f"{_count(train)} training / {_count(test)} test images", _epochs(epochs)]
    parts += [_separation([(k, v)]) for k, v in separating if k not in shown]
    return ", ".join(parts)
