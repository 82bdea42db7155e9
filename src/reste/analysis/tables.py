"""The report's tables, each from the cells that allow it, and the paper's reported numbers shown beside them.

One builder per table: the results (every cell), Table 2 (fixed vs progressive ``o``), Table 3
(the progressive tuning ways), the estimator comparison or Table 1 (a binary ViT), and the
equilibrium table (indicators and accuracy against ``o_end``). Each returns Markdown sections;
a table the cells do not allow returns none.

Part of ``reste report`` (:mod:`reste.analysis.report` has the whole picture and re-exports these names).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .cells import (
    ESTIMATOR_NAMES,
    Cell,
    _differing_keys,
    _distinct,
    _families,
    _joined_as_configured,
    _own_cells,
    _representative,
    _separating,
    _stats,
    _value,
    paired,
)
from .markdown import _context_line, _num, _paper, _pm, _scale_line, _sci_pm, _separation, _table, _wa

__all__ = ["PAPER", "PAPER_SOURCE"]


# --------------------------------------------------------------------------- the paper's numbers
#: Numbers reported by the paper and its appendix (top-1 %, top-5 in brackets), from
#: docs' facts sheet. CIFAR-10 / ImageNet: never to be read as this project's measurements.
PAPER: dict[str, dict[Any, Any]] = {
    "main": {  # (dataset, model, precision) -> ReSTE
        ("cifar10", "resnet20", "1w1a"): "86.75",
        ("cifar10", "resnet20", "1w32a"): "91.32",
        ("cifar10", "resnet20_bireal", "1w1a"): "87.92",
        ("cifar10", "resnet18_cifar", "1w1a"): "92.63",
        ("cifar10", "vgg_small", "1w1a"): "92.55",
        ("imagenet", "resnet18", "1w1a"): "60.88 (82.59)",
        ("imagenet", "resnet18", "1w32a"): "67.40 (87.20)",
        ("imagenet", "resnet34", "1w1a"): "65.05 (85.78)",
        ("imagenet", "resnet34", "1w32a"): "70.74 (89.50)",
        ("imagenet", "vit_tiny", "1w32a"): "56.53 (79.86)",
    },
    # seed Table 2, CIFAR-10 ResNet-20 1W/1A
    "table2": {
        ("progressive", 1.0): 85.18,
        ("progressive", 2.0): 86.41,
        ("progressive", 3.0): 86.75,
        ("progressive", 4.0): 86.45,
        ("fixed", 1.0): 85.18,
        ("fixed", 2.0): 85.80,
        ("fixed", 3.0): 83.19,
        ("fixed", 4.0): 82.04,
    },
    # seed Table 3, CIFAR-10 ResNet-20 1W/1A, o_end = 3
    "table3": {"linear": 86.80, "cosine": 86.75, "power": 86.59},
    # estimator comparison, CIFAR-10 ResNet-20 1W/1A
    "estimators": {"ste": 84.44, "dsq": 84.11, "ede": 85.20, "fda": 85.80, "rbnn": 85.87, "reste": 86.75},
    # seed Table 1, ImageNet ViT-tiny
    "table1": {"FP": "64.50 (85.14)", "DoReFa": "53.05 (76.83)", "ReSTE": "56.53 (79.86)"},
}
PAPER_SOURCE = {
    "table2": "paper (reported, CIFAR-10 ResNet-20 1W/1A)",
    "table3": "paper (reported, CIFAR-10 ResNet-20 1W/1A)",
    "estimators": "paper (reported, CIFAR-10 ResNet-20 1W/1A)",
    "table1": "paper (reported, ImageNet ViT-tiny; top-1 (top-5))",
    "main": "paper (reported, ReSTE; top-1 (top-5))",
}
PROGRESSIVE_WAYS = ("linear", "cosine", "power")
#: row order of the estimator comparison (the paper's, baselines first)
ESTIMATOR_ORDER = ("ste", "clipped_ste", "approx_sign", "swish_sign", "dsq", "ede", "fda", "rbnn", "reste")
#: config keys that select the estimator of a cell
ESTIMATOR_KEYS = (
    "model.estimator",
    "model.kwargs.weight_estimator",
    "model.precision",
    "model.estimator_params",
    "model.kwargs.estimator_params",
    "estimator.params",
)


def _results_section(cells: Sequence[Cell]) -> str:
    # extra columns only for keys that vary between cells of the same data set and model (a ViT's
    # architecture options are not news next to a ResNet) and that the fixed columns do not show
    shown = (
        "data.name",
        "model.name",
        "model.precision",
        "model.estimator",
        "model.kwargs.weight_estimator",
        "estimator.schedule",
        "estimator.o_end",
        "train.epochs",
    )
    groups: dict[tuple, list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.get("data.name"), c.get("model.name")), []).append(c)
    varying = sorted({k for g in groups.values() for k in _differing_keys(g)} - set(shown))
    header = [
        "data",
        "model",
        "W/A",
        "estimator",
        "o schedule",
        "o_end",
        *varying,
        "epochs",
        "seeds",
        "final top-1 (%)",
        "best top-1 (%)",
        "final top-1 per seed",
        "final top-5 (%)",
        PAPER_SOURCE["main"],
    ]
    rows = []
    for c in cells:
        paper = (  # the paper's main results are ReSTE with o rising to 3 by the cosine way
            PAPER["main"].get((c.get("data.name"), c.get("model.name"), c.get("model.precision")))
            if c.label == "ReSTE" and c.schedule == "cosine" and c.o_end == 3.0
            else None
        )
        rows.append(
            [
                c.get("data.name", "?"),
                c.get("model.name", "?"),
                _wa(c.get("model.precision")),
                c.label,
                c.schedule if c.label == "ReSTE" else "—",
                _num(c.o_end) if c.label == "ReSTE" else "—",
                *["—" if k in c.first.unused_keys else _num(c.get(k)) for k in varying],
                _num(c.epochs),
                _seeds(c),
                _pm(c.summary_values("final_top1")),
                _pm(c.summary_values("best_top1")),
                " / ".join(f"{v:.2f}" for v in c.summary_values("final_top1")),
                _pm(c.summary_values("final_top5")),
                paper or "—",
            ]
        )
    return (
        "## Results\n\n" + _scale_line(cells) + "\n\nMean ± sample standard deviation over seeds "
        '(`seeds`: their ids). "final" is the last epoch, "best" the best epoch (what the reference '
        "reports).\n\n" + _table(header, rows)
    )


TABLE2_FREE = ("estimator.schedule", "estimator.o_end")


def _table2_sections(cells: Sequence[Cell]) -> list[str]:
    drawn = []
    for family in _families(cells, TABLE2_FREE):
        scheds = {c.schedule for c in family}
        # ways tried at a single o_end belong to Table 3, not here
        progressive = sorted(
            s
            for s in scheds
            if s is not None and s != "fixed" and len({c.o_end for c in family if c.schedule == s}) >= 2
        )
        family = [c for c in family if c.schedule == "fixed" or c.schedule in progressive]
        if "fixed" not in scheds or not progressive or len({c.o_end for c in family}) < 2:
            continue
        drawn.append((family, progressive))
    drawn = [drawn[i] for i in _distinct([f for f, _ in drawn])]
    out = []
    for (family, progressive), separating in zip(drawn, _separating([f for f, _ in drawn], TABLE2_FREE)):
        by = {(c.schedule, c.o_end): c for c in family}
        # the paper's Table 2 is ReSTE on ResNet-20 at 1W/1A: other settings get no paper column values
        paper = PAPER["table2"] if family[0].label == "ReSTE" and _reste_1w1a_resnet20(family[0]) else {}
        o_values = sorted({c.o_end for c in family}, key=_o_key)
        note = False
        header = ["o_end (progressive) / o (fixed)", "seeds"]

        def way_name(way: str) -> str:  # the power way with its exponent (runs at another p are another table)
            p = _value([c for c in family if c.schedule == way], "estimator.p") if way == "power" else None
            return f"{way}, p = {_num(p)}" if p is not None else way

        for way in progressive:
            header += [f"progressive ({way_name(way)}) final", f"progressive ({way_name(way)}) best"]
        header += ["fixed final", "fixed best", f"progressive ({way_name(progressive[0])}) minus fixed, same seeds"]
        header += [f"{PAPER_SOURCE['table2']}: progressive (cosine)", "paper: fixed"]
        if "cosine" not in progressive:  # the paper's progressive numbers are the cosine way's
            paper = {k: v for k, v in paper.items() if k[0] != "progressive"}
        rows = []
        for o in o_values:
            row = [_num(o), _row_seeds([(way, by.get((way, o))) for way in (*progressive, "fixed")])]
            for way in progressive:
                c = by.get((way, o))
                row += [
                    _pm(c.summary_values("final_top1")) if c else "—",
                    _pm(c.summary_values("best_top1")) if c else "—",
                ]
            fixed = by.get(("fixed", o))
            mark = ""
            if fixed is None and o == 1.0:
                # o = 1 throughout either way: a progressive run with o_end = 1 *is* the fixed o = 1 run
                fixed = next((by.get((w, 1.0)) for w in progressive if by.get((w, 1.0))), None)
                mark, note = (" *", True) if fixed else ("", note)
            row += [
                (_pm(fixed.summary_values("final_top1")) + mark) if fixed else "—",
                (_pm(fixed.summary_values("best_top1")) + mark) if fixed else "—",
            ]
            first = by.get((progressive[0], o))
            difference = paired(first, fixed) if first is not None and fixed is not None and not mark else None
            row.append(str(difference) if difference is not None else "—")
            row += [_paper(paper.get(("progressive", o))), _paper(paper.get(("fixed", o)))]
            rows.append(row)
        text = (
            _heading("## Table 2: fixed vs progressive o", separating)
            + _scale_line(family)
            + "\n\n"
            + _context_line(family[0], TABLE2_FREE, separating=separating)
            + ". Top-1 %, mean ± std over seeds; the difference is final top-1, paired by seed (t: paired t "
            "statistic; p < 0.05: two-sided).\n\n" + _table(header, rows)
        )
        if note:
            text += (
                "\n\n\\* the progressive run with o_end = 1: o = 1 for the whole run, the same training as fixed o = 1."
            )
        out.append(text)
    return out


def _table3_sections(cells: Sequence[Cell]) -> list[str]:
    free = ["estimator.schedule"]
    drawn = []
    for family in _families(cells, free):
        ways = [c for c in family if c.schedule in PROGRESSIVE_WAYS]
        if len(ways) >= 2:
            drawn.append(sorted(ways, key=lambda c: PROGRESSIVE_WAYS.index(c.schedule)))
    drawn = [drawn[i] for i in _distinct(drawn)]
    out = []
    for ways, separating in zip(drawn, _separating(drawn, free)):
        # the paper's Table 3 is ReSTE on ResNet-20 at 1W/1A with o_end = 3
        exact = ways[0].label == "ReSTE" and _reste_1w1a_resnet20(ways[0]) and ways[0].o_end == 3.0
        paper = PAPER["table3"] if exact else {}
        header = ["tuning way", "seeds", "final top-1 (%)", "best top-1 (%)", PAPER_SOURCE["table3"]]
        rows = [
            [
                f"power (p = {_num(c.get('estimator.p'))})" if c.schedule == "power" else str(c.schedule),
                _seeds(c),
                _pm(c.summary_values("final_top1")),
                _pm(c.summary_values("best_top1")),
                # the seed gives no formula for its power way: p = 2 (this project's default) stands for it
                _paper(paper.get(c.schedule) if c.schedule != "power" or c.get("estimator.p") == 2.0 else None),
            ]
            for c in ways
        ]
        out.append(
            _heading("## Table 3: tuning ways of the progressive strategy", separating)
            + _scale_line(ways)
            + "\n\n"
            + _context_line(ways[0], free, separating=separating)
            + ".\n\n"
            + _table(header, rows)
        )
    return out


def _estimator_sections(cells: Sequence[Cell]) -> list[str]:
    # two estimators of the family's own, or an FP row (which stands in every family) beside one where its
    # config puts it (the o schedule it names): an o_end sweep with one FP run is not a comparison per o_end
    drawn = [
        family
        for family in _families(cells, ESTIMATOR_KEYS)
        if len({c.label for c in _own_cells(family, ESTIMATOR_KEYS)}) >= 2
        or (len({c.label for c in family}) >= 2 and _joined_as_configured(family, ESTIMATOR_KEYS))
    ]
    drawn = [drawn[i] for i in _distinct(drawn)]

    def is_vit(family: Sequence[Cell]) -> bool:
        return str(family[0].get("model.name", "")).startswith("vit")

    # Table 1 (ViT) and the estimator comparison (CNNs) are two kinds: each is told from its own kind only
    separation = {}
    for kind in (True, False):
        group = [f for f in drawn if is_vit(f) == kind]
        separation.update({id(f): sep for f, sep in zip(group, _separating(group, ESTIMATOR_KEYS))})
    out = []
    for family in drawn:
        separating = separation[id(family)]
        vit = str(family[0].get("model.name", "")).startswith("vit")
        if vit:
            order = {"FP": 0, "DoReFa": 1, "ReSTE": 2}
            family = sorted(family, key=lambda c: order.get(c.label, 3))
            header = [
                "estimator",
                "W/A",
                "seeds",
                "final top-1 (%)",
                "best top-1 (%)",
                "final top-5 (%)",
                "top-5 at the best epoch (%)",
                PAPER_SOURCE["table1"],
            ]
            rows = [
                [
                    _row_name(c, family),
                    _wa(c.get("model.precision")),
                    _seeds(c),
                    _pm(c.summary_values("final_top1")),
                    _pm(c.summary_values("best_top1")),
                    _pm(c.summary_values("final_top5")),
                    _pm(c.summary_values("best_top5")),
                    _paper(_paper_table1(c)),
                ]
                for c in family
            ]
            title = "## Table 1: binary ViT"
            footer = ""
            note = ". Mean ± std over seeds.\n\n"
        else:
            family = sorted(
                family,
                key=lambda c: (
                    _precision_rank(c.get("model.precision")),
                    ESTIMATOR_ORDER.index(c.get("model.estimator"))
                    if c.get("model.estimator") in ESTIMATOR_ORDER
                    else len(ESTIMATOR_ORDER),
                    c.label,
                ),
            )
            # each row is paired with ReSTE at its own W/A: a precision gap is not an estimator gap
            reste: dict[Any, Cell] = {}
            # the plain ReSTE row of each W/A (no other weight estimator, default parameters) before variants
            for c in sorted(family, key=lambda c: not _plain(c)):
                if c.label == "ReSTE":
                    reste.setdefault(c.get("model.precision"), c)
            header = [
                "estimator",
                "W/A",
                "seeds",
                "final top-1 (%)",
                "best top-1 (%)",
                "ReSTE minus it, same seeds and W/A",
                "est. error e (mean over epochs, at o_end)",
                "grad. instability s (sum over epochs)",
                PAPER_SOURCE["estimators"],
            ]
            rows = [
                [
                    _row_name(c, family),
                    _wa(c.get("model.precision")),
                    _seeds(c),
                    _pm(c.summary_values("final_top1")),
                    _pm(c.summary_values("best_top1")),
                    _paired_text(reste.get(c.get("model.precision")), c),
                    _aggregate(c, "est_error_end"),
                    _aggregate(c, "grad_instability"),
                    _paper(_paper_estimator(c)),
                ]
                for c in family
            ]
            title = "## Estimator comparison, W/A " + _and(dict.fromkeys(_wa(c.get("model.precision")) for c in family))
            note = (
                ". Mean ± std over seeds; ReSTE minus each estimator is final top-1, paired by seed with ReSTE at the "
                "same W/A (rows of other W/A are not paired: a precision gap is not an estimator gap; t: paired t "
                "statistic; p < 0.05: two-sided). The paper's numbers are for its setting only: 1W/1A, ResNet-20, "
                "each estimator on weights and activations (ReSTE: cosine to o_end = 3).\n\n"
            )
            footer = _partial_note(family)
        out.append(
            _heading(title, separating)
            + _scale_line(family)
            + "\n\n"
            + _context_line(_representative(family), ESTIMATOR_KEYS, separating=separating)
            + note
            + _table(header, rows)
            + footer
        )
    return out


def _seeds(cell: Cell) -> str:
    """The seed ids of a cell, as the ``seeds`` column shows them."""
    return ",".join(map(str, cell.seeds))


def _row_seeds(cells: Sequence[tuple[str, Cell | None]]) -> str:
    """The seeds of a row holding several cells (Table 2): one list when they ran the same seeds, else
    each cell's, named, so a comparison over unequal seeds is visible."""
    present = [(name, c) for name, c in cells if c is not None]
    if len({tuple(sorted(map(str, c.seeds))) for _, c in present}) <= 1:
        return _seeds(present[0][1]) if present else "—"
    return "; ".join(f"{name} {_seeds(c)}" for name, c in present)


def _and(items) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _estimator_params(cell: Cell) -> dict:
    """The estimator parameters a cell's config sets (``estimator.params`` and the model's ``estimator_params``)."""
    params = {}
    for key, value in cell.first.flat.items():
        for prefix in ("estimator.params.", "model.estimator_params.", "model.kwargs.estimator_params."):
            if key.startswith(prefix) and key not in cell.first.unused_keys:
                params[key[len(prefix) :]] = value
    return params


def _plain(cell: Cell) -> bool:
    """Whether a row is its estimator as the paper ran it: on weights and activations (no other
    ``model.kwargs.weight_estimator``), at its default parameters."""
    return not (_estimator_params(cell) or cell.get("model.kwargs.weight_estimator"))


def _row_name(cell: Cell, family: Sequence[Cell]) -> str:
    """A row's estimator name; where another row of the same name and W/A differs from it, with what tells
    them apart: another weight estimator (``ReSTE (weights STE)``), the input estimator under DoReFa
    weights (``DoReFa (inputs STE)``), the estimator parameters (``DSQ (alpha=0.5)``, ``DSQ (defaults)``)."""
    twins = [c for c in family if c.label == cell.label and c.get("model.precision") == cell.get("model.precision")]
    if len(twins) < 2:
        return cell.label
    parts = []
    if len({t.get("model.kwargs.weight_estimator") for t in twins}) > 1:
        weights = cell.get("model.kwargs.weight_estimator") or cell.get("model.estimator")
        parts.append(f"weights {ESTIMATOR_NAMES.get(weights, weights)}")
    if len({t.get("model.estimator") for t in twins}) > 1:
        estimator = cell.get("model.estimator")
        parts.append(f"inputs {ESTIMATOR_NAMES.get(estimator, estimator)}")
    if len({tuple(sorted(map(str, _estimator_params(t).items()))) for t in twins}) > 1:
        params = _estimator_params(cell)
        parts.append(", ".join(f"{k}={_num(v)}" for k, v in sorted(params.items())) or "defaults")
    return f"{cell.label} ({'; '.join(parts)})" if parts else cell.label


def _precision_rank(precision) -> int:
    """Row order of W/A in the estimator comparison: 1/1 (the paper's table), 1/32, FP, others."""
    order = ("1w1a", "1w32a", "fp")
    return order.index(precision) if precision in order else len(order)


def _reste_1w1a_resnet20(cell: Cell) -> bool:
    """Whether ``cell`` is the setting of seed Tables 2 and 3 and the estimator comparison: ResNet-20, 1W/1A,
    the estimator on weights and activations (not FP, not DoReFa weights)."""
    return cell.get("model.name") == "resnet20" and cell.get("model.precision") == "1w1a" and cell.label != "DoReFa"


def _paper_estimator(cell: Cell) -> float | None:
    """The paper's estimator-comparison number for exactly this row's setting, else None.

    The paper reports each estimator at 1W/1A on ResNet-20 (ReSTE cosine to o_end = 3); an FP row (whose
    ``model.estimator`` is still set), a 1W/32A row or DoReFa weights are other settings."""
    if not _reste_1w1a_resnet20(cell) or not _plain(cell):
        return None
    estimator = cell.get("model.estimator")
    if estimator == "reste" and (cell.schedule != "cosine" or cell.o_end != 3.0):
        return None
    return PAPER["estimators"].get(estimator)


def _paper_table1(cell: Cell) -> str | None:
    """Seed Table 1's number for this ViT row: FP at full precision, DoReFa and ReSTE at 1W/32A only."""
    precision = {"FP": "fp", "DoReFa": "1w32a", "ReSTE": "1w32a"}.get(cell.label)
    return PAPER["table1"].get(cell.label) if precision == cell.get("model.precision") else None


def _o_key(o_end: float | None) -> tuple[bool, float]:
    """Sort key of ``o_end`` values: numbers in order, a missing one last."""
    return (o_end is None, 0.0 if o_end is None else o_end)


def _paired_text(reference: Cell | None, cell: Cell) -> str:
    """``reference - cell`` paired by seed, or a dash (no reference, the reference itself, < 2 shared seeds)."""
    if reference is None or cell is reference:
        return "—"
    difference = paired(reference, cell)
    return "—" if difference is None else str(difference)


#: the per-epoch indicators the tables aggregate, with what the aggregate is and its symbol
AGGREGATES = {
    "est_error_end": ("est_error_end_mean", "e"),
    "est_error": ("est_error_mean", "e"),
    "grad_instability": ("grad_instability_sum", "s"),
}


def _short_runs(cell: Cell, indicator: str) -> list[tuple[object, int, int]]:
    """``(seed, epochs with the indicator, epochs logged)`` of the cell's runs whose aggregate of
    ``indicator`` covers only some of their epochs (an epoch whose last step was skipped has none)."""
    out = []
    for run in cell.runs:
        agg = run.aggregates
        n, total = agg[f"{indicator}_epochs"], agg["logged_epochs"]
        if 0 < n < total:
            out.append((run.get("seed"), n, total))
    return out


def _aggregate(cell: Cell, indicator: str) -> str:
    """``mean ± std`` over seeds of a run aggregate (e: mean over epochs, s: sum over epochs), with each
    run it covers fewer epochs of named: a sum over 1 of 2 epochs is not comparable with one over 2."""
    key, symbol = AGGREGATES[indicator]
    text = _sci_pm(cell.aggregate_values(key))
    short = _short_runs(cell, indicator)
    if short:
        text += " (" + "; ".join(f"seed {seed}: {symbol} over {n} of {total} epochs" for seed, n, total in short) + ")"
    return text


def _partial_note(family: Sequence[Cell]) -> str:
    """A note under a table with marked aggregates: why they cover fewer epochs and what that means."""
    if not any(_short_runs(c, indicator) for c in family for indicator in AGGREGATES):
        return ""
    return (
        '\n\n"over k of n epochs": that run has no indicators for the other epochs (the last step of an epoch, '
        "where they are measured, was skipped as non-finite: `train.nonfinite: skip`), so its mean of e or sum "
        "of s covers fewer epochs than the other runs' and is not comparable with them as it stands."
    )


def _heading(title: str, separating: Sequence[tuple[str, object]]) -> str:
    """A section heading, followed by the settings that tell it from the other sections of its kind."""
    return title + (f" — {_separation(separating)}" if separating else "") + "\n\n"


def _o_end_families(cells: Sequence[Cell]) -> list[list[Cell]]:
    fams = []
    for family in _families(cells, ["estimator.o_end"]):
        family = [c for c in family if c.schedule != "fixed" and c.label == "ReSTE"]
        if len({c.o_end for c in family}) >= 3:
            fams.append(sorted(family, key=lambda c: _o_key(c.o_end)))
    return [fams[i] for i in _distinct(fams)]


def _o_end_separating(families: Sequence[Sequence[Cell]]) -> list[list[tuple[str, object]]]:
    """What tells each equilibrium table (and its figures) from the others."""
    return _separating(families, ["estimator.o_end"])


def _o_end_section(family: list[Cell], separating: Sequence[tuple[str, object]] = ()) -> str:
    # the cell with the best mean final top-1, and every other one against it on the same seeds:
    # whether the accuracy peak is more than noise
    def mean(c: Cell) -> float:
        value = _stats(c.summary_values("final_top1"))[0]
        return float("-inf") if value is None else value

    best = max(family, key=mean)
    # the label says which cell is the reference and why: the first of several equal means is not "the best"
    tied = [c for c in family if c is not best and abs(mean(c) - mean(best)) < 1e-9]
    if not tied:
        why = "best mean"
    elif len(tied) == len(family) - 1:
        why = "all o_end tie on mean final top-1"
    else:
        why = "best mean, tied with " + _and(f"o_end = {_num(c.o_end)}" for c in tied)
    header = [
        "o_end",
        "seeds",
        "est. error e (mean over epochs, at o_end)",
        "est. error at current o (mean over epochs)",
        "grad. instability s (sum over epochs)",
        "final top-1 (%)",
        "best top-1 (%)",
        f"o_end = {_num(best.o_end)} ({why}) minus it, same seeds",
    ]
    rows = [
        [
            _num(c.o_end),
            _seeds(c),
            _aggregate(c, "est_error_end"),
            _aggregate(c, "est_error"),
            _aggregate(c, "grad_instability"),
            _pm(c.summary_values("final_top1")),
            _pm(c.summary_values("best_top1")),
            _paired_text(best, c),
        ]
        for c in family
    ]
    return (
        _heading("## Equilibrium: indicators and accuracy against o_end (seed Figure 1)", separating)
        + _scale_line(family)
        + "\n\n"
        + _context_line(family[0], ["estimator.o_end"], separating=separating)
        + ". e and s sampled at the last step of each epoch, aggregated as the reference does; the last column"
        " pairs final top-1 by seed (t: paired t statistic; p < 0.05: two-sided).\n\n"
        + _table(header, rows)
        + _partial_note(family)
    )
