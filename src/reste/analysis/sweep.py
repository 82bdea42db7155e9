"""Grids of training runs: ``reste sweep CONFIG key=v1,v2 ... [--seeds 0,1] [--jobs N]``.

A sweep is the cartesian product of the listed values. Every run is an ordinary
``python -m reste train CONFIG key=value ...`` subprocess writing its own run directory
under one sweep directory, named after its values (``estimator.o_end=3,seed=0``).
A key given a single value is a fixed override shared by every run and is left out of
the names.

Restarting the same command continues the sweep: finished runs (``summary.json``
marked complete) are skipped; runs with a checkpoint but no summary are resumed through
``reste train --resume``; runs without a checkpoint start again from scratch.
A run on disk is reused (skipped or resumed) only if its saved ``config.yaml`` is the config
this command gives it, up to the options that do not change the experiment
(:data:`reste.analysis.runs.NEUTRAL_KEYS`, names, output paths); otherwise the sweep
stops before anything runs (:class:`SweepMismatchError`, exit code 2), naming the run and the
keys that differ, and leaves ``sweep.json`` as it was.
``sweep.json`` in the sweep directory lists every run and its status and is rewritten
after each change, so it can be watched while the sweep runs.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from ..errors import ReSTEError, UsageError
from ..train import rundir

__all__ = [
    "Sweep",
    "SweepRun",
    "SweepError",
    "SweepConfigError",
    "SweepMismatchError",
    "is_complete",
    "parse_grid",
    "split_values",
    "run_name",
    "launch_subprocess",
]

#: statuses a run can have in sweep.json
STATUSES = ("pending", "running", "done", "failed", "interrupted")


class SweepError(UsageError, ValueError):
    """A sweep specification that cannot be run (bad grid syntax, conflicting options): exit code 2,
    reported as ``error: reste sweep: <message>`` (one ``error:`` line, as every command's)."""

    def cli_message(self, rank: str = "0") -> str | None:
        return f"error: reste sweep: {self}"


class SweepConfigError(SweepError):
    """The configuration of one run of the grid is invalid; nothing was started (exit code 2).

    ``message`` is exactly what ``reste train`` would print for that run, ``run`` its name; the command
    line reports it as ``reste train`` would (``error: <message>``).
    """

    def cli_message(self, rank: str = "0") -> str | None:
        return ReSTEError.cli_message(self, rank)

    def __init__(self, run: str, message: str):
        self.run = run
        self.message = message
        super().__init__(f"{message}\n  (run {run!r} of the grid; no run was started)")


class SweepMismatchError(SweepError):
    """Runs already in the sweep directory were made with other options than this command gives
    them (exit code 2; nothing was started, ``sweep.json`` is unchanged).

    ``runs`` maps each such run's name to its differing keys, ``{key: (old, new)}``.
    """

    def __init__(self, message: str, runs: dict[str, dict[str, tuple]]):
        self.runs = runs
        super().__init__(message)


#: a key the saved config or the new one does not have (a model.kwargs entry, say)
_UNSET = "(unset)"


def split_values(text: str) -> list[str]:
    """Split ``v1,v2,...`` at the commas that are not inside brackets or braces.

    ``"1,2,3"`` -> ``["1", "2", "3"]``; ``"[1,2],[3]"`` -> ``["[1,2]", "[3]"]``.
    """
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth < 0:
                raise SweepError(f"unbalanced brackets in {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise SweepError(f"unbalanced brackets in {text!r}")
    parts.append("".join(current))
    parts = [p.strip() for p in parts]
    if any(p == "" for p in parts):
        raise SweepError(f"empty value in {text!r}; write key=v1,v2 without empty items")
    return parts


def parse_grid(specs: Sequence[str]) -> dict[str, list[tuple[str, object]]]:
    """``["estimator.o_end=1,2", "seed=0"]`` -> ``{key: [(text, value), ...]}``.

    Values are read with ``yaml.safe_load`` (``3`` is an int, ``cosine`` a string,
    ``null`` None, ``[1,2]`` a list); the text is kept for the run names.
    """
    grid: dict[str, list[tuple[str, object]]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise SweepError(f"grid item {spec!r} is not key=v1,v2,...; example: estimator.o_end=1,2,3")
        if key in grid:
            raise SweepError(f"key {key!r} is given twice; list all its values once: {key}=v1,v2")
        texts = split_values(values)
        if len(set(texts)) != len(texts):
            raise SweepError(f"key {key!r} lists a value twice: {values}")
        try:
            grid[key] = [(t, yaml.safe_load(t)) for t in texts]
        except yaml.YAMLError as err:
            raise SweepError(f"value of {key!r} is not valid YAML: {err}") from None
    return grid


#: whether a run finished: its summary.json exists and does not say ``complete: false``
is_complete = rundir.is_complete


def run_name(items: Sequence[tuple[str, str]]) -> str:
    """A run directory name from ``(key, value text)`` pairs: ``estimator.o_end=3,seed=0``."""
    name = ",".join(f"{k}={t}" for k, t in items) or "run"
    # keep it one path component on every filesystem
    return "".join(c if c not in '/\\:*?"<>|' and c.isprintable() else "_" for c in name)


@dataclass
class SweepRun:
    """One run of a sweep, as listed in sweep.json."""

    name: str
    dir: str
    overrides: dict
    status: str = "pending"
    action: str | None = None  # what this invocation did: skip, start, resume, restart
    returncode: int | None = None
    seconds: float | None = None
    log: str | None = None
    final_top1: float | None = None
    best_top1: float | None = None

    @property
    def path(self) -> Path:
        return Path(self.dir)


def launch_subprocess(argv: list[str], log_path: Path, env: dict) -> subprocess.Popen:
    """Start one training run; stdout and stderr go to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        # the child keeps its own copy of the file descriptor
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)


class _Stop(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@dataclass
class Sweep:
    """A grid of training runs under one directory.

    Args:
        config: the base YAML config (None: the trainer's built-in defaults).
        grid: ``key=v1,v2,...`` strings (see :func:`parse_grid`).
        out: the sweep directory.
        seeds: shorthand for a ``seed=...`` grid item (placed last in the names).
        jobs: how many runs at a time.
        launch: starts a run (``argv, log_path, env -> Popen``); replaceable in tests.
    """

    config: str | None
    grid: Sequence[str]
    out: str | os.PathLike
    seeds: Sequence[int] | None = None
    jobs: int = 1
    launch: Callable[[list[str], Path, dict], subprocess.Popen] = launch_subprocess
    poll_s: float = 0.5
    runs: list[SweepRun] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if self.jobs < 1:
            raise SweepError(f"--jobs must be >= 1, got {self.jobs}")
        if self.config is not None:  # a path, or a bundled config's name (cifar10/resnet20_1w1a)
            from ..train.config import ConfigError, find_config

            try:
                found = find_config(self.config)
            except ConfigError as err:
                raise SweepError(str(err)) from None
            if not found.is_file():
                raise SweepError(f"config file {self.config} does not exist")
            self.config = str(found.resolve())
        self.out = self.folder = Path(self.out)  # folder: the same, typed as a Path
        self.parsed = parse_grid(self.grid)
        if self.seeds is not None:
            if "seed" in self.parsed:
                raise SweepError("give the seeds either as --seeds or as seed=..., not both")
            seeds = [int(s) for s in self.seeds]
            if len(set(seeds)) != len(seeds):
                raise SweepError(f"--seeds lists a seed twice: {seeds}")
            self.parsed["seed"] = [(str(s), s) for s in seeds]
        # single-valued keys are shared overrides, not part of the grid
        self.fixed = {k: v[0][1] for k, v in self.parsed.items() if len(v) == 1}
        self.varying = {k: v for k, v in self.parsed.items() if len(v) > 1}
        self.runs = self._plan()
        self._resume_items: dict[str, list[str]] = {}  # a resumed run's new neutral options (check())
        self.check()

    # ------------------------------------------------------------------ planning
    def _plan(self) -> list[SweepRun]:
        keys = list(self.varying)
        runs = []
        for combo in itertools.product(*(self.varying[k] for k in keys)):
            name = run_name([(k, text) for k, (text, _) in zip(keys, combo)])
            overrides = dict(self.fixed)
            overrides.update({k: value for k, (_, value) in zip(keys, combo)})
            runs.append(SweepRun(name=name, dir=str(self.folder / name), overrides=overrides))
        for run in runs:
            self._refresh(run)
        return runs

    @staticmethod
    def _refresh(run: SweepRun) -> None:
        """Set ``status`` and the result from what is on disk."""
        if is_complete(run.path):
            run.status = "done"
            data = rundir.read_summary(run.path) or {}  # complete: it has one
            run.final_top1, run.best_top1 = data.get("final_top1"), data.get("best_top1")

    def check(self) -> None:
        """Validate, before anything runs, the config of every run of this sweep, and check that
        the runs it would reuse were made with it.

        Each config is built from the same ``key=value`` items its ``reste train`` command gets,
        through the same loader, and its model on the meta device (``model.kwargs``), so the first
        invalid run raises :class:`SweepConfigError` with ``reste train``'s own message. A run
        that would be reused (finished: skipped; with a checkpoint: resumed, which trains on the
        config saved in its folder) must have been made with that config, up to the options that
        do not change the experiment (:func:`.runs.neutral`): otherwise :class:`SweepMismatchError` names
        the runs and the keys that differ (old -> new). A resumed run gets the new values of those
        neutral options (``train.threads``, ...) as ``--resume`` overrides.
        """
        import warnings

        from ..models.build import check_model
        from ..train.config import ConfigError, data_info, load_config

        mismatched: dict[str, dict[str, tuple]] = {}
        for run in self.runs:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # harmless conflicts: each run's log reports them
                    cfg = load_config(self.config, self._train_items(run))
                    check_model(cfg, data_info(cfg))  # a bad model.kwargs, as reste train would
            except ConfigError as err:
                raise SweepConfigError(run.name, str(err)) from None
            if run.status == "done" or rundir.checkpoint_path(run.path, "last").is_file():
                differ, neutral_changes = self._compare(run, cfg)
                if differ:
                    mismatched[run.name] = differ
                self._resume_items[run.name] = [f"{k}={_override_text(new)}" for k, new in neutral_changes.items()]
        if mismatched:
            raise SweepMismatchError(self._mismatch_message(mismatched), mismatched)

    def _compare(self, run: SweepRun, cfg) -> tuple[dict[str, tuple], dict[str, object]]:
        """``run``'s saved config against ``cfg`` (what this sweep gives it): the keys that differ
        and can change results, ``{key: (old, new)}``, and the neutral ones that differ, ``{key: new}``."""
        from ..train.config import ConfigError, config_to_dict, load_config
        from .runs import NEUTRAL_KEYS, _flatten, neutral

        what = "finished" if run.status == "done" else "has a checkpoint"
        if not (run.path / rundir.CONFIG).is_file():
            raise ReSTEError(
                f"sweep run {run.name!r} ({run.path}) {what} but no {rundir.CONFIG}, so whether it was made with "
                "this command's options cannot be checked; move it away or give the sweep another --out"
            )
        try:
            saved = load_config(rundir.read_config(run.path), check=False)
        except ConfigError as err:
            raise ReSTEError(
                f"sweep run {run.name!r} ({run.path}) {what} but its {rundir.CONFIG} cannot be read ({err}); "
                "move it away or give the sweep another --out"
            ) from None
        old, new = _flatten(config_to_dict(saved)), _flatten(config_to_dict(cfg))
        differ, neutral_changes = {}, {}
        for key in sorted(set(old) | set(new)):
            a, b = old.get(key, _UNSET), new.get(key, _UNSET)
            if a == b and isinstance(a, bool) == isinstance(b, bool):  # 1 == 1.0 (same model); True is not 1
                continue
            if key == "data.num_classes" and b is None:  # unset: the run recorded its tree's class count
                continue
            if not neutral(key):
                differ[key] = (a, b)
            elif key in NEUTRAL_KEYS and b is not _UNSET:  # not a name or an output path: passed on to --resume
                neutral_changes[key] = list(b) if isinstance(b, tuple) else b
        return differ, neutral_changes

    def _mismatch_message(self, mismatched: dict[str, dict[str, tuple]]) -> str:
        def show(value) -> str:
            return value if value is _UNSET else _override_text(list(value) if isinstance(value, tuple) else value)

        name, keys = next(iter(mismatched.items()))
        changes = ", ".join(f"{k}: {show(a)} -> {show(b)}" for k, (a, b) in keys.items())
        others = len(mismatched) - 1
        also = f" (and {others} more of its runs: {', '.join(list(mismatched)[1:4])}{', ...' if others > 3 else ''})"
        return (
            f"{self.folder} holds runs made with other options than this command gives them, so their results "
            f"would be reused under the new options: run {name!r}{also if others else ''} differs in {changes}. "
            f"Nothing was started and sweep.json is unchanged. Give this sweep another --out, or run it with the "
            f"options those runs were made with (each run's {rundir.CONFIG})."
        )

    def _train_items(self, run: SweepRun) -> list[str]:
        items = [f"{k}={_override_text(v)}" for k, v in run.overrides.items()]
        return items + [f"out.dir={self.out}", f"out.name={run.name}"]

    def command(self, run: SweepRun) -> tuple[list[str], str]:
        """The ``reste train`` command line for ``run`` and the action it takes."""
        base = [sys.executable, "-m", "reste", "train"]
        if rundir.checkpoint_path(run.path, "last").is_file():  # check() found it made with this sweep's config
            return base + ["--resume", str(run.path)] + self._resume_items.get(run.name, []), "resume"
        argv = base + ([str(self.config)] if self.config is not None else [])
        argv += self._train_items(run)
        if run.path.exists():  # a run that died before its first checkpoint: start over
            return argv + ["--force"], "restart"
        return argv, "start"

    # ------------------------------------------------------------------ running
    def run(self, progress: Callable[[str], None] | None = print) -> int:
        """Run every unfinished run, ``jobs`` at a time. Returns 0 (all done), 1 (some failed), 130/143 (stopped)."""
        say = progress or (lambda msg: None)
        self.folder.mkdir(parents=True, exist_ok=True)
        todo = [r for r in self.runs if r.status != "done"]
        for run in self.runs:
            run.action = "skip" if run.status == "done" else None
        say(
            f"sweep {self.out}: {len(self.runs)} runs, {len(self.runs) - len(todo)} already finished, {len(todo)} "
            "to run"
        )
        self.write()
        env = dict(os.environ)
        if self.jobs > 1 and "OMP_NUM_THREADS" not in env:  # runs side by side share the cores
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.jobs))
        active: list[tuple[SweepRun, subprocess.Popen, float]] = []
        previous = signal.getsignal(signal.SIGTERM)
        in_main = _in_main_thread()
        if in_main:
            signal.signal(signal.SIGTERM, _raise_stop)
        try:
            while todo or active:
                while todo and len(active) < self.jobs:
                    run = todo.pop(0)
                    argv, run.action = self.command(run)
                    log = self.folder / "logs" / f"{run.name}.log"
                    say(f"[{run.action}] {run.name}")
                    proc = self.launch(argv, log, env)
                    run.log, run.status, run.returncode = str(log), "running", None
                    active.append((run, proc, time.monotonic()))
                    self.write()
                still = []
                for run, proc, start in active:
                    rc = proc.poll()
                    if rc is None:
                        still.append((run, proc, start))
                        continue
                    self._finish(run, rc, time.monotonic() - start)
                    say(
                        f"[{run.status}] {run.name}"
                        + (
                            f" (exit {rc}, see {run.log})"
                            if run.status != "done"
                            else f" final top-1 {_fmt(run.final_top1)}, best {_fmt(run.best_top1)}"
                        )
                    )
                    self.write()
                active = still
                if active:
                    time.sleep(self.poll_s)
        except (KeyboardInterrupt, _Stop) as stop:
            signum = stop.signum if isinstance(stop, _Stop) else signal.SIGINT
            say(f"stopping: asking {len(active)} running run(s) to checkpoint and exit")
            for run, proc, start in active:
                _stop_child(proc, signum)
                self._finish(run, proc.returncode, time.monotonic() - start, interrupted=True)
            self.write()
            say(f"sweep stopped; run the same command again to continue ({self.folder / 'sweep.json'})")
            return 128 + int(signum)
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous)
        failed = [r for r in self.runs if r.status == "failed"]
        say(f"sweep finished: {sum(r.status == 'done' for r in self.runs)} done, {len(failed)} failed")
        return 1 if failed else 0

    def _finish(self, run: SweepRun, rc: int | None, seconds: float, interrupted: bool = False) -> None:
        run.returncode, run.seconds = rc, round(seconds, 2)
        self._refresh(run)
        if run.status != "done":
            run.status = "interrupted" if interrupted else "failed"

    # ------------------------------------------------------------------ sweep.json
    def write(self) -> Path:
        """Write ``sweep.json`` atomically; runs of earlier invocations with other grids are kept."""
        path = self.folder / "sweep.json"
        mine = {r.name for r in self.runs}
        others = []
        if path.is_file():
            try:
                others = [r for r in json.loads(path.read_text()).get("runs", []) if r.get("name") not in mine]
            except (OSError, json.JSONDecodeError):
                others = []
        doc = {
            "config": str(Path(self.config).resolve()) if self.config is not None else None,
            "grid": {k: [t for t, _ in v] for k, v in self.varying.items()},
            "fixed": self.fixed,
            "jobs": self.jobs,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "runs": others + [asdict(r) for r in self.runs],
        }
        tmp = path.with_name("sweep.json.tmp")
        tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        os.replace(tmp, path)
        return path


def _override_text(value) -> str:
    """A value as the trainer's ``key=value`` parser (yaml.safe_load) reads it back."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[:-4].strip() if text.endswith("\n...") else text.removesuffix("...").strip()


def _fmt(x) -> str:
    return "?" if x is None else f"{x:.2f}"


def _raise_stop(signum, frame):
    raise _Stop(signum)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _stop_child(proc: subprocess.Popen, signum: int, grace_s: float = 120.0) -> None:
    """Forward the signal (the trainer then checkpoints and exits); kill it if it hangs."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signum)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except ProcessLookupError:
        pass
