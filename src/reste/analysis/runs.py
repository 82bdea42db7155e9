"""The runs a report reads: a run directory's ``config.yaml``, ``summary.json`` and ``metrics.jsonl``
as a :class:`RunRecord`, and every run of a sweep directory (:func:`find_runs`).

Part of ``reste report`` (:mod:`reste.analysis.report` has the whole picture and re-exports these names).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ReSTEError
from ..train import rundir
from ..train.config import ConfigError
from .indicators import reference_aggregates

__all__ = ["NotARunError", "RunRecord", "Missing", "Found", "load_run", "find_runs", "scan", "NEUTRAL_KEYS", "neutral"]


class NotARunError(ReSTEError, ValueError):
    """A directory given to the report is neither a run nor a sweep (exit code 1: an unusable input).

    Also a :class:`ValueError`, as it always was."""


def _neutral_keys() -> tuple[str, ...]:
    from ..train.resume import RESUME_OVERRIDABLE

    # the options a resume may change are those that do not change what is computed, except
    # train.epochs (it extends the run)
    return tuple(k for k in RESUME_OVERRIDABLE if k != "train.epochs")


#: options that do not change the experiment (device, threads, compilation, checkpoint frequency,
#: collective timeout, where the data is read from, the test batch size; the first three change float
#: rounding, so a run's digits): runs that differ only in these are the same setting in a report, and
#: a sweep reuses a run whatever they were
NEUTRAL_KEYS = _neutral_keys()

#: config keys that never distinguish cells: the seed (a cell is over seeds), names and output paths,
#: and the options that do not change the experiment (a run checkpointed more often is the same run)
IGNORED_PREFIXES = ("seed", "name", "out.", *NEUTRAL_KEYS)


def neutral(key: str) -> bool:
    """Whether dotted config ``key`` does not change the experiment (:data:`NEUTRAL_KEYS`), or only
    names it or its output folder (``name``, ``out.*``)."""
    return key in ("name", *NEUTRAL_KEYS) or key.startswith("out.")


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


@functools.lru_cache(maxsize=64)
def _model_defaults(name) -> dict:
    """``model.kwargs.<option>: default`` of a registered model's architecture options
    (:func:`reste.models.registry.architecture_options`); empty for an unknown model."""
    from ..models.registry import architecture_options

    return {f"model.kwargs.{k}": v for k, v in architecture_options(name).items()}


def _same_repr(value) -> str:
    """``repr`` with whole numbers as floats: ``width: 1`` and ``width: 1.0`` are one setting."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return repr(value)


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

    # flat, unused_keys and setting are read many times per run while a report groups cells: computed once
    # (a RunRecord is never changed after load_run; callers only read them)
    @functools.cached_property
    def flat(self) -> dict:
        """The config as dotted keys; options the run's config.yaml predates get the trainer's default,
        and the model's own options left out of ``model.kwargs`` their default (``width: 1.0`` written
        out is the run that left it out)."""
        if not self.config:
            return {}
        flat = {**_default_flat(), **_flatten(self.config)}
        return {**_model_defaults(flat.get("model.name")), **flat}

    @functools.cached_property
    def unused_keys(self) -> frozenset[str]:
        """Options set in this run's config that cannot act in it: ``model.estimator`` and every
        ``estimator.*`` option of a full-precision model (it has no binary layer) and of a 1W/32A model
        with DoReFa weights (real inputs; DoReFa has no parameters), and ``estimator.p`` of an o schedule
        other than ``power`` (only that way has an exponent)."""
        flat = self.flat
        precision = flat.get("model.precision")
        # no estimator at all: no binary layer, or real inputs and DoReFa weights (no parameters, no progress)
        no_estimator = precision == "fp" or (
            precision == "1w32a" and flat.get("model.kwargs.weight_estimator") == "dorefa"
        )
        unused = {k for k in flat if k == "model.estimator" or k.startswith("estimator.")} if no_estimator else set()
        if flat.get("estimator.schedule") != "power":
            unused |= {k for k in ("estimator.p",) if k in flat}
        return frozenset(unused)

    @functools.cached_property
    def setting(self) -> tuple:
        """The resolved config without seed, name, output paths, the options that do not change
        the experiment (:data:`NEUTRAL_KEYS`) and those the run does not use (:attr:`unused_keys`): equal
        settings form a cell. So a sweep over estimators, o schedules and precisions gives one FP cell,
        and a linear run at p = 3 is the linear run at p = 2."""
        flat, unused = self.flat, self.unused_keys
        return tuple(sorted((k, _same_repr(v)) for k, v in flat.items() if not _ignored(k) and k not in unused))

    def get(self, key: str, default=None):
        """A config value by dotted key, falling back to the summary's copy of it."""
        flat = self.flat
        if key in flat:
            return flat[key]
        fallback = {
            "data.name": "dataset",
            "model.name": "model",
            "model.precision": "precision",
            "model.estimator": "estimator",
            "estimator.o_end": "o_end",
            "seed": "seed",
        }
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
        raise NotARunError(
            f"{path} does not exist or is not a directory; give a run directory written by "
            "`reste train` or a sweep directory"
        )
    pid = None if _is_run(path) else rundir.training_pid(path)
    if pid is not None:
        raise NotARunError(
            f"{path} is a run still training (process {pid} holds its lock) and has no results yet: its first "
            "epoch has not ended. Report it when it has"
        )
    if not _is_run(path) and rundir.checkpoint_path(path, "last").is_file():
        raise NotARunError(
            f"{path} is an unfinished run: it has checkpoints/last.pt but no results yet (no summary.json or "
            f"metrics.jsonl: it stopped before the end of its first epoch). Finish it with "
            f"`reste train --resume {path}`, then report it"
        )
    if not _is_run(path) and rundir.looks_like_run(path):
        raise NotARunError(
            f"{path} is a run that stopped before its first checkpoint (no results, nothing to resume); "
            "start it again with the command that made it (add --force to reuse the folder)"
        )
    if not _is_run(path):
        raise NotARunError(
            f"{path} is not a run directory: it has neither summary.json nor metrics.jsonl. "
            "Give a directory written by `reste train` (runs/<name>-<time>/) or by `reste sweep`"
        )
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
    try:
        metrics = rundir.read_metrics(path) if (path / rundir.METRICS).is_file() else []
    except (ValueError, OSError) as err:  # a line that is not JSON names the file and line; unreadable
        if isinstance(err, ValueError):
            raise NotARunError(str(err)) from None
        raise NotARunError(f"cannot read {path / rundir.METRICS}: {err.strerror or err}") from None
    if summary is not None and not isinstance(summary, dict):
        raise NotARunError(f"{path / rundir.SUMMARY} is not a JSON object; the run's files are damaged")
    bad = next((i for i, row in enumerate(metrics, 1) if not isinstance(row, dict)), None)
    if bad is not None:
        raise NotARunError(f"{path / rundir.METRICS}, row {bad}: not a JSON object; the file is damaged")
    return RunRecord(dir=path, config=config, summary=summary, metrics=metrics)


@dataclass(frozen=True)
class Missing:
    """A run the report found but cannot count: it failed, was interrupted, or stopped before it had results."""

    dir: Path
    why: str

    def __str__(self) -> str:
        return f"`{self.dir}` ({self.why})"


@dataclass
class Found:
    """What a directory given to the report holds: its runs (finished or not), the runs that have no
    results (:class:`Missing`), and the sweep directories read inside a folder of sweeps."""

    runs: list[RunRecord]
    missing: list[Missing]
    sweeps: list[Path]


def _without_results(path: Path) -> str:
    """Why a run folder that ``reste train`` made has no results, and what to do."""
    pid = rundir.training_pid(path)
    if pid is not None:
        return f"still training (process {pid}): no results yet, its first epoch has not ended"
    if rundir.checkpoint_path(path, "last").is_file():
        return (
            "no summary.json or metrics.jsonl: it stopped before the end of its first epoch; "
            f"finish it with `reste train --resume {path}`"
        )
    return "no results and no checkpoint: it stopped or failed before its first checkpoint (nothing to resume)"


def _unfinished(run: RunRecord) -> str:
    """Why a run with results is not counted: how far it got, and how to finish it."""
    logged = len({row.get("epoch", ("row", i)) for i, row in enumerate(run.metrics)})
    planned = run.get("train.epochs", (run.summary or {}).get("epochs"))
    how_far = f"{logged} of {planned} epochs logged" if planned is not None else f"{logged} epochs logged"
    pid = rundir.training_pid(run.dir)
    if pid is not None:
        return f"still training (process {pid}): {how_far} so far"
    resume = (
        f"; finish it with `reste train --resume {run.dir}`"
        if rundir.checkpoint_path(run.dir, "last").is_file()
        else ""
    )
    return f"no complete summary.json: {how_far}{resume}"


def _sweep_status(entry: dict, path: Path) -> str:
    """``failed in sweep.json, exit 1, see LOG`` from a run's entry in sweep.json."""
    parts = [f"{entry.get('status') or 'no status'} in sweep.json"]
    if entry.get("returncode") not in (None, 0):
        parts.append(f"exit {entry['returncode']}")
    log = entry.get("log")
    if log:
        local = path / "logs" / Path(str(log)).name  # sweep.json's paths are relative to where the sweep ran
        parts.append(f"see {local if local.is_file() else log}")
    return ", ".join(parts)


def _scan_one(path: Path) -> tuple[list[RunRecord], list[Missing]]:
    """The runs of a sweep directory or a folder of runs, and the runs listed or found there without results."""
    entries: list[dict] = []
    if (path / "sweep.json").is_file():
        try:
            data = json.loads((path / "sweep.json").read_text())
            entries = [r for r in data.get("runs", []) if isinstance(r, dict) and r.get("dir")]
        except (json.JSONDecodeError, AttributeError, OSError):
            entries = []
    by_dir = {path / Path(str(r["dir"])).name: r for r in entries}
    # the sweep's listing first, then any other run directories placed there
    listed = list(by_dir)
    candidates = listed + sorted(p for p in path.iterdir() if p.is_dir() and p not in by_dir)
    runs, missing = [], []
    for p in candidates:
        entry = by_dir.get(p)
        if p.is_dir() and _is_run(p):
            run = load_run(p)
            runs.append(run)
            if not run.finished:
                status = f"{_sweep_status(entry, path)}; " if entry and entry.get("status") != "done" else ""
                missing.append(Missing(p, status + _unfinished(run)))
        elif p.is_dir() and rundir.looks_like_run(p):
            status = f"{_sweep_status(entry, path)}; " if entry else ""
            missing.append(Missing(p, status + _without_results(p)))
        elif entry is not None and entry.get("status") != "done":
            missing.append(Missing(p, _sweep_status(entry, path) + "; no run folder"))
        elif entry is not None:
            missing.append(Missing(p, "done in sweep.json, but the run folder is gone"))
    return runs, missing


def _holds_runs(path: Path) -> bool:
    """Whether ``path`` holds runs or is a sweep or a folder of sweeps (what the report could read)."""
    try:
        return (path / "sweep.json").is_file() or any(
            p.is_dir() and (_is_run(p) or rundir.looks_like_run(p) or (p / "sweep.json").is_file())
            for p in path.iterdir()
        )
    except OSError:
        return False


def scan(path: str | os.PathLike) -> Found:
    """What ``path`` holds: itself when it is a run; else the runs of a sweep directory or a folder of
    runs; else, one level down, the runs of each sweep directory in a folder of sweeps. Raises
    :class:`NotARunError` naming ``path`` when it holds none of these."""
    path = Path(path)
    if path.is_dir() and _is_run(path):
        run = load_run(path)
        return Found([run], [] if run.finished else [Missing(path, _unfinished(run))], [])
    if not path.is_dir() or (rundir.looks_like_run(path) and not (path / "sweep.json").is_file()):
        return Found([load_run(path)], [], [])  # load_run raises what is wrong and what to do
    runs, missing = _scan_one(path)
    if (path / "sweep.json").is_file():
        return Found(runs, missing, [])
    # the sweeps in a folder (`reste report runs/`: with the defaults, runs/ holds reste train's run
    # folders beside reste sweep's sweep folders): read each, whether or not runs lie beside them
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not _is_run(p) and not rundir.looks_like_run(p))
    sweeps = [p for p in subdirs if (p / "sweep.json").is_file()]
    for sweep in sweeps:
        more_runs, more_missing = _scan_one(sweep)
        runs += more_runs
        missing += more_missing
    holding = [p for p in subdirs if p not in sweeps and _holds_runs(p)]
    if runs or missing or sweeps:
        # a plain folder of runs one level down is not read (only sweeps are): named, so none is missed silently
        missing += [
            Missing(
                p, f"a folder of runs, not read (inside {path.name}/ only sweep folders are): add it to the command"
            )
            for p in holding
        ]
        return Found(runs, missing, sweeps)
    if holding:
        names = ", ".join(p.name for p in holding[:5]) + (f" and {len(holding) - 5} more" if len(holding) > 5 else "")
        raise NotARunError(
            f"{path} is neither a run nor a sweep directory, and holds no run or sweep directory itself; its "
            f"folders {names} hold runs or sweeps: give them (e.g. `reste report {path / '*'} --out DIR`)"
        )
    return Found([load_run(path)], [], [])  # load_run raises: neither a run nor a sweep


def find_runs(path: str | os.PathLike) -> list[RunRecord]:
    """The runs in ``path``: itself when it is a run, else the runs of a sweep directory, a folder of
    runs, or the sweep directories of a folder of sweeps (:func:`scan`, which also names the runs
    without results)."""
    return scan(path).runs
