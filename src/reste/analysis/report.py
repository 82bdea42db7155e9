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
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..train import rundir
from ..train.config import ConfigError
from .indicators import load_snapshot, reference_aggregates

__all__ = ["NotARunError", "RunRecord", "Cell", "load_run", "find_runs", "build_report", "PAPER"]


class NotARunError(ValueError):
    """A directory given to the report is neither a run nor a sweep."""


# --------------------------------------------------------------------------- the paper's numbers
#: Numbers reported by the paper and its appendix (top-1 %, top-5 in brackets), from
#: docs' facts sheet. CIFAR-10 / ImageNet: never to be read as this project's measurements.
PAPER = {
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
    "table2": {("progressive", 1.0): 85.18, ("progressive", 2.0): 86.41, ("progressive", 3.0): 86.75,
               ("progressive", 4.0): 86.45, ("fixed", 1.0): 85.18, ("fixed", 2.0): 85.80,
               ("fixed", 3.0): 83.19, ("fixed", 4.0): 82.04},
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
#: config keys that never distinguish cells
IGNORED_PREFIXES = ("seed", "name", "out.")
#: row order of the estimator comparison (the paper's, baselines first)
ESTIMATOR_ORDER = ("ste", "clipped_ste", "approx_sign", "swish_sign", "dsq", "ede", "fda", "rbnn", "reste")
#: config keys that select the estimator of a cell
ESTIMATOR_KEYS = ("model.estimator", "model.kwargs.weight_estimator", "model.precision", "model.estimator_params",
                  "model.kwargs.estimator_params", "estimator.params")


# --------------------------------------------------------------------------- reading runs
def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        elif isinstance(value, dict):
            continue  # an empty mapping sets nothing: same as the key being absent
        elif isinstance(value, list):
            flat[name] = tuple(value)
        else:
            flat[name] = value
    return flat


@functools.lru_cache(maxsize=1)
def _default_flat() -> dict:
    """The trainer's defaults, flattened: a run saved before an option existed ran with its default."""
    try:
        from ..train.config import Config, config_to_dict
    except ImportError:  # the report still works, comparing only what the runs saved
        return {}
    return _flatten(config_to_dict(Config()))


def _ignored(key: str) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in IGNORED_PREFIXES)


@dataclass
class RunRecord:
    """One run directory as the report sees it."""

    dir: Path
    config: dict
    summary: dict | None
    metrics: list[dict]

    @property
    def finished(self) -> bool:
        """Trained to the end: the trainer marks summary.json ``complete`` after the last epoch."""
        return rundir.summary_complete(self.summary)

    @property
    def flat(self) -> dict:
        """The config as dotted keys; options the run's config.yaml predates get the trainer's default."""
        if not self.config:
            return {}
        return {**_default_flat(), **_flatten(self.config)}

    @property
    def setting(self) -> tuple:
        """The resolved config without seed, name and output paths: equal settings form a cell."""
        return tuple(sorted((k, repr(v)) for k, v in self.flat.items() if not _ignored(k)))

    def get(self, key: str, default=None):
        """A config value by dotted key, falling back to the summary's copy of it."""
        flat = self.flat
        if key in flat:
            return flat[key]
        fallback = {"data.name": "dataset", "model.name": "model", "model.precision": "precision",
                    "model.estimator": "estimator", "estimator.o_end": "o_end", "seed": "seed"}
        if self.summary and key in fallback:
            return self.summary.get(fallback[key], default)
        return default

    @property
    def aggregates(self) -> dict:
        return reference_aggregates(self.metrics)


def _is_run(path: Path) -> bool:
    return rundir.has_results(path)


def load_run(path: str | os.PathLike) -> RunRecord:
    """Read a run directory; raises :class:`NotARunError` naming it when it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise NotARunError(f"{path} does not exist or is not a directory; give a run directory written by `reste train` or a sweep directory")
    if not _is_run(path):
        raise NotARunError(f"{path} is not a run directory: it has neither summary.json nor metrics.jsonl. "
                           "Give a directory written by `reste train` (runs/<name>-<time>/) or by `reste sweep`")
    try:
        summary = rundir.read_summary(path)
    except ValueError as err:
        raise NotARunError(str(err)) from None
    config = {}
    if (path / rundir.CONFIG).is_file():
        try:  # read as every config is: a key given twice is refused, not silently the last
            config = rundir.read_config(path, allow_empty=True)
        except ConfigError as err:
            raise NotARunError(f"{err}; the run's files are damaged") from None
    metrics = rundir.read_metrics(path) if (path / rundir.METRICS).is_file() else []
    return RunRecord(dir=path, config=config, summary=summary, metrics=metrics)


def find_runs(path: str | os.PathLike) -> list[RunRecord]:
    """The runs in ``path``: itself when it is a run, else the runs of a sweep directory."""
    path = Path(path)
    if path.is_dir() and _is_run(path):
        return [load_run(path)]
    if path.is_dir():
        listed = []
        if (path / "sweep.json").is_file():
            try:
                listed = [path / Path(r["dir"]).name for r in json.loads((path / "sweep.json").read_text()).get("runs", [])]
            except (json.JSONDecodeError, KeyError, TypeError):
                listed = []
        # the sweep's listing first, then any other run directories placed there
        candidates = listed + sorted(p for p in path.iterdir() if p.is_dir() and p not in listed)
        runs = [load_run(p) for p in candidates if p.is_dir() and _is_run(p)]
        if runs or (path / "sweep.json").is_file():
            return runs
    return [load_run(path)]  # raises the clear error


# --------------------------------------------------------------------------- cells
def _stats(values: Sequence[float]) -> tuple[float | None, float | None]:
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else None
    return mean, std


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
    ``data.subset`` the way the loaders apply it (first N training, N // 5 test images), else
    the data set's full sizes."""
    summary = run.summary or {}
    if summary.get("train_images") is not None and summary.get("test_images") is not None:
        return int(summary["train_images"]), int(summary["test_images"])
    subset = run.get("data.subset")
    if subset is not None:
        return int(subset), max(1, int(subset) // 5)
    try:
        from ..data import info

        meta = info(str(run.get("data.name")))
    except (ImportError, ValueError):
        return None, None
    return meta.train_size, meta.test_size


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


# --------------------------------------------------------------------------- markdown helpers
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
    return f"{x:g}" if isinstance(x, (int, float)) else str(x)


def _epochs(n) -> str:
    return f"{_num(n)} epoch" + ("" if n == 1 else "s")


def _count(x) -> str:
    return "?" if x is None else f"{x:,}"


def _scale_line(cells: Sequence[Cell]) -> str:
    """What the numbers below were measured on: data set, model, images and epochs of the runs."""
    scales = list(dict.fromkeys(c.scale for c in cells))
    parts = [f"data set {data}, model {model}, {_count(train)} training images, {_count(test)} test images, {_epochs(epochs)}"
             for data, model, train, test, epochs in scales]
    return ("Scale: " if len(parts) == 1 else "Scale (differs between the runs below): ") + "; ".join(parts) + "."


def _paper(x) -> str:
    """A reported number as the paper prints it (two decimals)."""
    if x is None:
        return "—"
    return f"{x:.2f}" if isinstance(x, float) else str(x)


def _context_line(cell: Cell, free: Sequence[str], scale: bool = False) -> str:
    """The settings shared by a table's cells (with ``scale``: data, images and epochs too, for figure titles)."""
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
    return ", ".join(parts)


# --------------------------------------------------------------------------- sections
@dataclass
class Report:
    """What :func:`build_report` produced."""

    markdown: str
    path: Path
    figures: list[Path] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)
    not_drawn: list[str] = field(default_factory=list)  # a line per table or figure left out, with the reason


def _results_section(cells: Sequence[Cell]) -> str:
    # extra columns only for keys that vary between cells of the same data set and model (a ViT's
    # architecture options are not news next to a ResNet) and that the fixed columns do not show
    shown = ("data.name", "model.name", "model.precision", "model.estimator", "model.kwargs.weight_estimator",
             "estimator.schedule", "estimator.o_end", "train.epochs")
    groups: dict[tuple, list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.get("data.name"), c.get("model.name")), []).append(c)
    varying = sorted({k for g in groups.values() for k in _differing_keys(g)} - set(shown))
    header = ["data", "model", "W/A", "estimator", "o schedule", "o_end", *varying, "epochs", "seeds",
              "final top-1 (%)", "best top-1 (%)", "final top-1 per seed", "final top-5 (%)", PAPER_SOURCE["main"]]
    rows = []
    for c in cells:
        paper = PAPER["main"].get((c.get("data.name"), c.get("model.name"), c.get("model.precision"))) if c.label == "ReSTE" else None
        rows.append([
            c.get("data.name", "?"), c.get("model.name", "?"), _wa(c.get("model.precision")), c.label,
            c.schedule if c.label == "ReSTE" else "—", _num(c.o_end) if c.label == "ReSTE" else "—",
            *[_num(c.get(k)) for k in varying], _num(c.epochs), ",".join(map(str, c.seeds)),
            _pm(c.summary_values("final_top1")), _pm(c.summary_values("best_top1")),
            " / ".join(f"{v:.2f}" for v in c.summary_values("final_top1")),
            _pm(c.summary_values("final_top5")), paper or "—",
        ])
    return "## Results\n\n" + _scale_line(cells) + "\n\nMean ± sample standard deviation over seeds (`seeds`: their ids). " \
           "\"final\" is the last epoch, \"best\" the best epoch (what the reference reports).\n\n" + _table(header, rows)


def _table2_sections(cells: Sequence[Cell]) -> list[str]:
    out = []
    for family in _families(cells, ["estimator.schedule", "estimator.o_end"]):
        scheds = {c.schedule for c in family}
        # ways tried at a single o_end belong to Table 3, not here
        progressive = sorted(s for s in scheds if s != "fixed" and len({c.o_end for c in family if c.schedule == s}) >= 2)
        family = [c for c in family if c.schedule == "fixed" or c.schedule in progressive]
        if "fixed" not in scheds or not progressive or len({c.o_end for c in family}) < 2:
            continue
        by = {(c.schedule, c.o_end): c for c in family}
        o_values = sorted({c.o_end for c in family})
        note = False
        header = ["o_end (progressive) / o (fixed)"]
        for way in progressive:
            header += [f"progressive ({way}) final", f"progressive ({way}) best"]
        header += ["fixed final", "fixed best", f"{PAPER_SOURCE['table2']}: progressive", "paper: fixed"]
        rows = []
        for o in o_values:
            row = [_num(o)]
            for way in progressive:
                c = by.get((way, o))
                row += [_pm(c.summary_values("final_top1")) if c else "—", _pm(c.summary_values("best_top1")) if c else "—"]
            fixed = by.get(("fixed", o))
            mark = ""
            if fixed is None and o == 1.0:
                # o = 1 throughout either way: a progressive run with o_end = 1 *is* the fixed o = 1 run
                fixed = next((by.get((w, 1.0)) for w in progressive if by.get((w, 1.0))), None)
                mark, note = (" *", True) if fixed else ("", note)
            row += [(_pm(fixed.summary_values("final_top1")) + mark) if fixed else "—",
                    (_pm(fixed.summary_values("best_top1")) + mark) if fixed else "—"]
            row += [_paper(PAPER["table2"].get(("progressive", o))), _paper(PAPER["table2"].get(("fixed", o)))]
            rows.append(row)
        text = "## Table 2: fixed vs progressive o\n\n" + _scale_line(family) + "\n\n" + \
               _context_line(family[0], ["estimator.schedule", "estimator.o_end"]) + ". Top-1 %, mean ± std over seeds.\n\n" + _table(header, rows)
        if note:
            text += "\n\n\\* the progressive run with o_end = 1: o = 1 for the whole run, the same training as fixed o = 1."
        out.append(text)
    return out


def _table3_sections(cells: Sequence[Cell]) -> list[str]:
    out = []
    for family in _families(cells, ["estimator.schedule"]):
        ways = [c for c in family if c.schedule in PROGRESSIVE_WAYS]
        if len(ways) < 2:
            continue
        ways.sort(key=lambda c: PROGRESSIVE_WAYS.index(c.schedule))
        header = ["tuning way", "final top-1 (%)", "best top-1 (%)", PAPER_SOURCE["table3"]]
        rows = [[c.schedule, _pm(c.summary_values("final_top1")), _pm(c.summary_values("best_top1")),
                 _paper(PAPER["table3"].get(c.schedule))] for c in ways]
        out.append("## Table 3: tuning ways of the progressive strategy\n\n" + _scale_line(ways) + "\n\n" +
                   _context_line(ways[0], ["estimator.schedule"]) + ".\n\n" + _table(header, rows))
    return out


def _estimator_sections(cells: Sequence[Cell]) -> list[str]:
    out = []
    for family in _families(cells, ESTIMATOR_KEYS):
        labels = {c.label for c in family}
        if len(labels) < 2:
            continue
        vit = str(family[0].get("model.name", "")).startswith("vit")
        if vit:
            order = {"FP": 0, "DoReFa": 1, "ReSTE": 2}
            family = sorted(family, key=lambda c: order.get(c.label, 3))
            header = ["estimator", "W/A", "final top-1 (%)", "best top-1 (%)", "final top-5 (%)", "top-5 at the best epoch (%)", PAPER_SOURCE["table1"]]
            rows = [[c.label, _wa(c.get("model.precision")), _pm(c.summary_values("final_top1")), _pm(c.summary_values("best_top1")),
                     _pm(c.summary_values("final_top5")), _pm(c.summary_values("best_top5")), PAPER["table1"].get(c.label, "—")]
                    for c in family]
            title = "## Table 1: binary ViT"
        else:
            family = sorted(family, key=lambda c: (ESTIMATOR_ORDER.index(c.get("model.estimator"))
                                                   if c.get("model.estimator") in ESTIMATOR_ORDER else len(ESTIMATOR_ORDER), c.label))
            header = ["estimator", "final top-1 (%)", "best top-1 (%)", "est. error e (mean over epochs, at o_end)",
                      "grad. instability s (sum over epochs)", PAPER_SOURCE["estimators"]]
            rows = [[c.label, _pm(c.summary_values("final_top1")), _pm(c.summary_values("best_top1")),
                     _sci_pm(c.aggregate_values("est_error_end_mean")), _sci_pm(c.aggregate_values("grad_instability_sum")),
                     _paper(PAPER["estimators"].get(c.get("model.estimator")))] for c in family]
            title = "## Estimator comparison"
        out.append(title + "\n\n" + _scale_line(family) + "\n\n" + _context_line(family[0], ESTIMATOR_KEYS) +
                   ". Mean ± std over seeds.\n\n" + _table(header, rows))
    return out


def _o_end_families(cells: Sequence[Cell]) -> list[list[Cell]]:
    fams = []
    for family in _families(cells, ["estimator.o_end"]):
        family = [c for c in family if c.schedule != "fixed" and c.label == "ReSTE"]
        if len({c.o_end for c in family}) >= 3:
            fams.append(sorted(family, key=lambda c: c.o_end))
    return fams


def _o_end_section(family: list[Cell]) -> str:
    header = ["o_end", "seeds", "est. error e (mean over epochs, at o_end)", "est. error at current o (mean over epochs)",
              "grad. instability s (sum over epochs)", "final top-1 (%)", "best top-1 (%)"]
    rows = [[_num(c.o_end), ",".join(map(str, c.seeds)), _sci_pm(c.aggregate_values("est_error_end_mean")), _sci_pm(c.aggregate_values("est_error_mean")),
             _sci_pm(c.aggregate_values("grad_instability_sum")), _pm(c.summary_values("final_top1")), _pm(c.summary_values("best_top1"))]
            for c in family]
    return ("## Equilibrium: indicators and accuracy against o_end (seed Figure 1)\n\n" + _scale_line(family) + "\n\n" +
            _context_line(family[0], ["estimator.o_end"]) +
            ". e and s sampled at the last step of each epoch, aggregated as the reference does.\n\n" + _table(header, rows))


# --------------------------------------------------------------------------- figures
def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _figure1(plt, family: list[Cell], path: Path) -> Path:
    x = [c.o_end for c in family]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    panels = [
        ("estimating error e\n(mean over epochs, at o_end)", [c.aggregate_values("est_error_end_mean") for c in family]),
        ("gradient instability s\n(sum over epochs)", [c.aggregate_values("grad_instability_sum") for c in family]),
    ]
    for ax, (title, values) in zip(axes, panels):
        means = [(_stats(v)[0] if v else np.nan) for v in values]
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
        ax.errorbar(x, [_stats(v)[0] for v in values], yerr=[_stats(v)[1] or 0.0 for v in values], marker="o", capsize=3, label=label)
    ax.set_title("test top-1 (%)", fontsize=10)
    ax.set_xlabel("o_end")
    ax.legend()
    fig.suptitle(textwrap.fill(_context_line(family[0], ["estimator.o_end"], scale=True) + f"; mean ± std over {min(len(c.runs) for c in family)}+ seeds", 140), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _last_snapshot(run: RunRecord) -> Path | None:
    snaps = sorted((run.dir / rundir.HISTOGRAMS).glob("*.npz")) if (run.dir / rundir.HISTOGRAMS).is_dir() else []
    return snaps[-1] if snaps else None


def _figure2(plt, family: list[Cell], path: Path) -> Path | None:
    curves = []
    for cell in family:
        pooled = None  # counts summed over layers and seeds; snapshots pool only when their bins agree
        for run in cell.runs:
            snap_path = _last_snapshot(run)
            if snap_path is None:
                continue
            snap = load_snapshot(snap_path)
            keys = ("fit_end_counts", "fit_end_under", "fit_end_over", "grad_log10_counts", "grad_zero", "grad_under", "grad_over")
            sums = {k: snap[k].sum(axis=0) for k in keys}
            edges = (snap["fit_edges"], snap["grad_log10_edges"])
            if pooled is None:
                pooled, pooled_edges = sums, edges
            elif all(np.array_equal(a, b) for a, b in zip(edges, pooled_edges)):
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
        for ax, counts, edges, total, outside in ((left, c["fit_end_counts"], fe, fit_total, c["fit_end_under"] + c["fit_end_over"]),
                                                  (right, c["grad_log10_counts"], ge, grad_total, c["grad_over"])):
            centres = (edges[:-1] + edges[1:]) / 2
            density = counts / max(total, 1) / np.diff(edges)
            share = 100.0 * outside / max(total, 1)
            note = f" ({share:.1f}% above 10^{edges[-1]:g})" if ax is right and share >= 0.05 else \
                (f" ({share:.1f}% outside)" if ax is left and share >= 0.05 else "")
            ax.plot(centres, density, label=f"o_end = {o_end:g}{note}")
    left.set_title("fitting error f_o_end(w) - sign(w), binary layers", fontsize=10)
    left.set_xlabel("fitting error")
    left.set_ylabel("density")
    right.set_title("weight gradients, binary layers", fontsize=10)
    right.set_xlabel("log10 |dL/dw|")
    right.set_ylabel("density")
    left.legend(fontsize=8)
    fig.suptitle(textwrap.fill("last snapshot of each run, all seeds pooled; " + _context_line(family[0], ["estimator.o_end"], scale=True), 120),
                 fontsize=9)
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
    return o_schedule(cell.schedule, o_end=cell.o_end, p=float(p) if p is not None else 2.0)


def o_points(cell: Cell) -> list[tuple[float, float]]:
    """``(progress r, o)`` for every epoch of the cell's first run: the ``o`` its metrics log (the
    o of the epoch's last step) at the progress the schedule was evaluated at for that step.

    Per epoch that is ``r = (epoch - 1) / epochs``; per step ``(epoch * steps - 1) / (epochs * steps)``
    (``steps_per_epoch`` from summary.json; older runs: where the schedule takes that ``o``).
    So the last point is the ``o`` the run reached, below ``o_end``, which the schedule only
    reaches at ``r = 1``, after the last step.
    """
    run = cell.first
    rows = [m for m in run.metrics if m.get("o") is not None]
    epochs = cell.epochs or len(run.metrics)
    steps = (run.summary or {}).get("steps_per_epoch")
    sched = _schedule_of(cell)
    points = []
    for m in rows:
        if cell.get("estimator.per") == "epoch":
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
    ax.set_title("o schedules (lines); o at each epoch's last step (dots);\nthe o reached (stars): o_end comes at r = 1, after the last step",
                 fontsize=8)
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
    text = "Lines: the schedules o(r). Dots: the o of each epoch's last step, at the progress it was computed for."
    if parts:
        text += " The o the runs reached at their last step: " + ", ".join(parts) + \
                "; a schedule reaches o_end only at r = 1, after the last step."
    return text


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
        lines.append("Table 2 (fixed vs progressive o): needs runs that differ only in estimator.schedule and estimator.o_end, "
                     f"with `fixed` and a progressive way at 2 or more o_end values ({schedules}; estimator.o_end {_values(cells, 'estimator.o_end')}).")
    if "## Table 3" not in text:
        lines.append(f"Table 3 (tuning ways): needs 2 or more of {', '.join(PROGRESSIVE_WAYS)} at otherwise equal settings ({schedules}).")
    if "## Estimator comparison" not in text:
        found = ", ".join(sorted({c.label for c in cnn})) or "no CNN run"
        lines.append(f"Estimator comparison: needs 2 or more estimators on a CNN at otherwise equal settings (found {found}).")
    if "## Table 1" not in text:
        found = ", ".join(sorted({c.label for c in vit})) or "no ViT run"
        lines.append(f"Table 1 (binary ViT): needs vit_tiny runs with 2 or more of FP, DoReFa, ReSTE at otherwise equal settings (found {found}).")
    if "## Equilibrium" not in text:
        lines.append("Equilibrium table and Figures 1 and 2: need progressive ReSTE runs at 3 or more o_end values at otherwise "
                     f"equal settings (found estimator.o_end {_values([c for c in cells if c.schedule != 'fixed'], 'estimator.o_end')}).")
    if plt is None:
        why = "--no-plots was given" if not plots else "they need matplotlib (`pip install reste[plot]`)"
        lines.append(f"Figures: not drawn, {why}.")
        return lines
    if "## Equilibrium" in text and not any(t.startswith("Figure 2") for t in figures):
        lines.append("Figure 2 (distributions): needs the runs' histograms/*.npz snapshots (written at the final epoch and at "
                     "analysis.histograms_at when analysis.indicators is on); the o_end runs have none.")
    if not any(t.startswith("Figure 3") for t in figures):
        lines.append(f"Figure 3 (tuning ways of o): needs ReSTE runs with 2 or more of {', '.join(PROGRESSIVE_WAYS)} at otherwise "
                     f"equal settings ({schedules}).")
    return lines


# --------------------------------------------------------------------------- entry point
def build_report(paths: Sequence[str | os.PathLike], out: str | os.PathLike, command: str | None = None,
                 plots: bool = True) -> Report:
    """Write ``out/report.md`` (and ``out/figures/*.png``) from run and sweep directories.

    Raises :class:`NotARunError` naming the first path that is neither a run nor a sweep,
    or when no finished run is found.
    """
    if not paths:
        raise NotARunError("no run or sweep directory given")
    runs: list[RunRecord] = []
    for p in paths:
        runs.extend(find_runs(p))
    unfinished = [r for r in runs if not r.finished]
    cells = make_cells(runs)
    if not cells:
        raise NotARunError(f"no finished run (summary.json marked complete) in {', '.join(map(str, paths))}; "
                           "finish or resume the runs first (`reste train --resume RUN_DIR` or rerun the sweep)")
    out = Path(out)
    fig_dir = out / "figures"
    sections: list[str] = []
    figures: list[tuple[str, Path, str]] = []  # title, file, caption
    plt = _pyplot() if plots else None
    if plt is not None:
        fig_dir.mkdir(parents=True, exist_ok=True)

    sections.append(_results_section(cells))
    sections += _table2_sections(cells)
    sections += _table3_sections(cells)
    sections += _estimator_sections(cells)
    for i, family in enumerate(_o_end_families(cells)):
        sections.append(_o_end_section(family))
        if plt is not None:
            suffix = "" if i == 0 else f"_{i + 1}"
            figures.append(("Figure 1: indicators and accuracy against o_end", _figure1(plt, family, fig_dir / f"figure1_o_end{suffix}.png"), ""))
            fig2 = _figure2(plt, family, fig_dir / f"figure2_distributions{suffix}.png")
            if fig2 is not None:
                figures.append(("Figure 2: distributions of the fitting error and the gradients per o_end", fig2, ""))
    ways = _figure3_ways(cells)
    if plt is not None and len(ways) >= 2:
        figures.append(("Figure 3: tuning ways of o", _figure3(plt, ways, fig_dir / "figure3_o_schedules.png"), _figure3_caption(ways)))

    head = ["# reste report", ""]
    if command:
        head += [f"Made by `{command}`.", ""]
    head.append(f"{len(runs) - len(unfinished)} finished runs in {len(cells)} settings, from: " + ", ".join(f"`{p}`" for p in paths) + ".")
    if unfinished:
        head.append("Left out, unfinished (no complete summary.json): " + ", ".join(f"`{r.dir}`" for r in unfinished) + ".")
    head.append("")
    missing = _not_drawn(cells, sections, [t for t, _, _ in figures], plt, plots)
    if missing:
        head += ["Not drawn:", ""] + [f"- {line}" for line in missing] + [""]
    fig_text = "\n\n".join(f"### {title}\n\n![{title}](figures/{p.name})" + (f"\n\n{caption}" if caption else "")
                            for title, p, caption in figures)
    body = "\n\n".join(sections) + ("\n\n## Figures\n\n" + _scale_line(cells) + "\n\n" + fig_text if fig_text else "")
    text = "\n".join(head) + "\n" + body + "\n"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.md"
    path.write_text(text, encoding="utf-8")
    return Report(markdown=text, path=path, figures=[p for _, p, _ in figures], sections=sections, not_drawn=missing)
