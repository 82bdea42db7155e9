"""The run folder: the one module that knows its layout, creates and locks it, and reads it back.

``reste train`` writes, and ``reste report``, ``reste sweep``, ``reste export`` and
``reste eval`` read::

    runs/<name>-<YYYYmmdd-HHMMSS>/
        .lock                the flock held while a process trains into the folder
        config.yaml          the resolved configuration
        metrics.jsonl/.csv   one row per epoch
        indicators.jsonl     every-N-step indicator values (analysis.every_steps > 0)
        checkpoints/last.pt  every train.checkpoint_every epochs (and train.checkpoint_every_steps steps),
                             at the end and on SIGINT/SIGTERM
        checkpoints/best.pt  whenever test top-1 improves
        summary.json         final and best accuracy, time, what was trained (``complete`` after the last epoch)
        histograms/          fitting-error and gradient histograms (analysis.histograms_at + final epoch)
        tb/                  TensorBoard events (when tensorboard is installed)

It imports nothing above ``reste.train`` (analysis and deploy import it).
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import secrets
import shutil
import sys
from datetime import datetime
from pathlib import Path
from typing import IO

import numpy as np
import torch

from ..errors import ReSTEError
from . import distributed as D
from .checkpoint import CheckpointError
from .config import Config, ConfigError, config_to_yaml, read_yaml

__all__ = [
    "CONFIG",
    "SUMMARY",
    "METRICS",
    "METRICS_CSV",
    "INDICATORS",
    "CHECKPOINTS",
    "HISTOGRAMS",
    "LOCK",
    "checkpoint_path",
    "locate_checkpoint",
    "read_config",
    "read_summary",
    "read_metrics",
    "has_results",
    "looks_like_run",
    "is_complete",
    "abandoned_setup",
    "RunDirLock",
    "RunWriter",
    "claim_run_dir",
    "discard_replaced",
    "restore_replaced",
    "new_run_dir",
    "open_run_dir",
]

CONFIG = "config.yaml"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
INDICATORS = "indicators.jsonl"
CHECKPOINTS = "checkpoints"
HISTOGRAMS = "histograms"
LOCK = ".lock"


# ----------------------------------------------------------------------------- paths and reading
def checkpoint_path(run_dir, which: str) -> Path:
    """``RUN_DIR/checkpoints/<which>.pt`` (``which``: ``last`` or ``best``), whether or not it exists."""
    return Path(run_dir) / CHECKPOINTS / f"{which}.pt"


def locate_checkpoint(source, which: str, option: str = "--which") -> Path:
    """The checkpoint a source names: a run directory's ``checkpoints/<which>.pt`` (CheckpointError
    if it has none, suggesting ``option`` with the other checkpoint when the run has that one), or
    ``source`` itself (a file)."""
    path = Path(source)
    if path.is_dir():
        candidate = checkpoint_path(path, which)
        if not candidate.is_file():
            other = "last" if which == "best" else "best"
            if checkpoint_path(path, other).is_file():
                why = " (it was stopped before its first epoch ended)" if which == "best" else ""
                raise CheckpointError(
                    f"{path} has no checkpoints/{which}.pt, only checkpoints/{other}.pt{why}; "
                    f"use that one with {option} {other}"
                )
            raise CheckpointError(
                f"{path} has no checkpoints/{which}.pt; is it a run directory written by `reste train`?"
            )
        return candidate
    return path


def read_config(run_dir, *, allow_empty: bool = False) -> dict:
    """The run's ``config.yaml`` as a nested dict, read as every config is (duplicate keys,
    size and nesting refused: ConfigError)."""
    return read_yaml(Path(run_dir) / CONFIG, allow_empty=allow_empty)


def read_summary(run_dir) -> dict | None:
    """The run's ``summary.json`` (None if it has none; ValueError naming it if it is not valid JSON)."""
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the run's files are damaged") from None


def read_metrics(run_dir) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` (one dict per epoch), in file order."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {run_dir} is not a run directory written by `reste train`")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON ({err}); the file is damaged") from None
    return rows


def has_results(path) -> bool:
    """Whether ``path`` holds a run's results (summary.json or metrics.jsonl): what a report reads."""
    path = Path(path)
    return (path / SUMMARY).is_file() or (path / METRICS).is_file()


def looks_like_run(path) -> bool:
    """Whether ``path`` was made by ``reste train`` (a config, checkpoints, or the lock: reste created it,
    even if set-up was killed before anything else was written)."""
    path = Path(path)
    return (path / CONFIG).is_file() or (path / CHECKPOINTS).is_dir() or (path / LOCK).is_file()


_looks_like_run = looks_like_run  # the trainer's older name


def is_complete(run_dir) -> bool:
    """Whether a run finished: its summary.json exists and does not say ``complete: false``.

    The trainer rewrites summary.json after every epoch, marking it complete after the last.
    """
    try:
        data = json.loads((Path(run_dir) / SUMMARY).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and summary_complete(data)


def summary_complete(summary: dict | None) -> bool:
    """Whether a read summary marks its run complete (an old summary without the key counts as complete)."""
    return summary is not None and summary.get("complete", True) is not False


#: what a run folder holds before its first epoch ends: a set-up killed there left nothing of value
_SETUP_FILES = {LOCK, CONFIG, f".{CONFIG}.tmp"}


def abandoned_setup(path: Path) -> bool:
    """Whether ``path`` is a run folder whose set-up was stopped (SIGKILL, power loss) before its
    first checkpoint and metrics: only the lock, the config, empty folders, TensorBoard's first
    event file and the step indicators of its unfinished first epoch (``analysis.every_steps``: rows
    no checkpoint holds, dropped by any restart). Such a folder is reused by the same command (it
    held no results)."""
    if not (path / LOCK).is_file():
        return False
    for item in path.rglob("*"):
        rel = item.relative_to(path)
        if (
            item.is_dir()
            or str(rel) in _SETUP_FILES
            or str(rel) == INDICATORS
            or rel.parts[0] == "tb"
            or (item.name.startswith(".") and item.name.endswith(".tmp"))
        ):
            continue
        return False
    return True


# ----------------------------------------------------------------------------- writing
def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _clean(value):
    """NaN/inf -> None, so JSON stays valid (``null``) and CSV shows an empty cell."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (a temp file beside it, then ``os.replace``); on a
    failed write (a full disk) the temp file is removed and the OSError names ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror or str(err), str(path)) from None


def _write_json(path: Path, data) -> None:
    _write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


class RunWriter:
    """Writes the run directory's files (rank 0 only)."""

    def __init__(self, run_dir: Path, cfg: Config, enabled: bool, purge_step: int | None = None):
        """``purge_step``: on a resume, the first epoch not in the checkpoint; TensorBoard then drops the
        points a run killed after logging them (but before checkpointing them) left at that epoch and later."""
        self.run_dir = run_dir
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        (run_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        (run_dir / HISTOGRAMS).mkdir(exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the optional `tensorboard` package
        except ImportError:
            return
        self.tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=purge_step)

    def write_config(self, cfg: Config) -> None:
        if self.enabled:
            _write_text(self.run_dir / CONFIG, config_to_yaml(cfg))

    def write_metrics(self, rows: list[dict]) -> None:
        """Rewrite metrics.jsonl and metrics.csv from all rows so far (keys may appear later, e.g. indicators)."""
        if not self.enabled:
            return
        lines = (json.dumps({k: _clean(v) for k, v in row.items()}, default=_json_default) + "\n" for row in rows)
        _write_text(self.run_dir / METRICS, "".join(lines))
        keys: list[str] = []
        for row in rows:
            keys += [k for k in row if k not in keys]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=keys, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if _clean(v) is None else v) for k, v in row.items()})
        _write_text(self.run_dir / METRICS_CSV, text.getvalue())

    def log_scalars(self, row: dict) -> None:
        if self.tb is None:
            return
        for key, value in row.items():
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if key != "epoch" and number and math.isfinite(value):
                self.tb.add_scalar(key, value, row["epoch"])
        self.tb.flush()

    def append_indicators(self, row: dict) -> None:
        if self.enabled:
            path = self.run_dir / INDICATORS
            try:
                with open(path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(row, default=_json_default) + "\n")
            except OSError as err:  # a cut line is skipped on resume (truncate_indicators)
                raise OSError(err.errno, err.strerror or str(err), str(path)) from None

    def truncate_indicators(self, global_step: int) -> None:
        """On resume: drop indicator rows measured after the checkpoint (they will be measured again)."""
        path = self.run_dir / INDICATORS
        if not self.enabled or not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["global_step"] <= global_step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                pass  # a line cut short by a killed process
        _write_text(path, "".join(kept))

    def write_summary(self, summary: dict) -> None:
        if self.enabled:
            _write_json(self.run_dir / SUMMARY, summary)

    def finish_summary(self, summary: dict) -> bool:
        """For a run found finished on resume (its writer disabled: nothing else is written): write
        ``summary`` only if summary.json is missing, unreadable or not marked complete, which a
        process killed between its last checkpoint and its summary leaves. Returns whether it wrote."""
        if is_complete(self.run_dir):
            return False
        _write_json(self.run_dir / SUMMARY, summary)
        return True

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


# ----------------------------------------------------------------------------- creating and locking
class RunDirLock:
    """An exclusive ``flock`` on ``RUN_DIR/.lock`` held while a process trains into the folder.

    Two processes writing one run (a resume started twice, a job re-queued while the old
    one still runs) would interleave their checkpoints and metrics. The kernel drops the
    lock when its holder dies, SIGKILL included, so a crashed run never blocks a resume.
    Without ``fcntl`` (Windows) this does nothing.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self._fh: IO[str] | None = None

    def acquire(self, record_pid: bool = True) -> None:
        """Take the lock (ConfigError naming the holder's pid if another process has it) and write
        this process's pid into the file (``record_pid``; a probe that only checks leaves it as it was)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return
        fh = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise ConfigError(
                f"run directory {self.path.parent} is in use by another process (pid {holder}); "
                "wait for it to finish or stop it, or start a new run"
            ) from None
        if record_pid:
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()}\n")
            fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the descriptor releases the flock
            self._fh = None


def training_pid(run_dir) -> str | None:
    """The pid a process training into ``run_dir`` right now wrote in its lock (``"unknown"`` when it
    wrote none), or None when no process holds the lock. Only reads: a report may look at a run in a
    folder it cannot write. The probe takes a shared lock for an instant and drops it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock to look at
        return None
    try:
        fh = open(Path(run_dir) / LOCK, encoding="utf-8")
    except OSError:  # no lock file: nothing has trained here, or not since it was removed
        return None
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return fh.read().strip() or "unknown"
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return None


def _claim(path: Path, taken_message: str) -> RunDirLock:
    """Create the folder ``path`` with its lock already held, atomically: it is built under a
    temporary name and renamed into place, so two runs started at once never share it and
    neither sees the other's half-made folder. ConfigError(``taken_message``) if ``path`` exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.claim-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    lock = RunDirLock(staging)
    lock.acquire()  # a new folder: nobody else can hold it
    try:
        os.rename(staging, path)  # fails if path exists (unless it is an empty folder, which it replaces)
    except OSError:
        lock.release()
        shutil.rmtree(staging, ignore_errors=True)
        raise ConfigError(taken_message) from None
    lock.path = path / LOCK
    return lock


def _discard(path: Path) -> None:
    """Remove a run folder after checking that no process uses it; renamed away first, so the
    name is free at once and a concurrent run never sees it half-deleted."""
    probe = RunDirLock(path)
    probe.acquire()  # refuses to delete a run that another process is training right now
    trash = path.parent / f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:  # another --force run moved it first
        return
    finally:
        probe.release()
    shutil.rmtree(trash, ignore_errors=True)


def _set_aside(path: Path) -> Path:
    """Move the run folder ``path`` out of the way for ``--force`` (after checking that no process
    uses it) and return where it went: ``.<name>.replaced-<pid>-<token>`` beside it. The new run's
    set-up then either succeeds (:func:`discard_replaced` deletes it) or fails
    (:func:`restore_replaced` puts it back as it was)."""
    probe = RunDirLock(path)
    had_lock_file = probe.path.is_file()
    probe.acquire(record_pid=False)  # refuses to replace a run that another process is training right now
    aside = path.parent / f".{path.name}.replaced-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.rename(path, aside)
    finally:
        probe.release()
    if not had_lock_file:  # the probe created it: leave the folder exactly as it was
        (aside / LOCK).unlink(missing_ok=True)
    return aside


def discard_replaced(aside: Path | None) -> None:
    """The new run's set-up succeeded: delete the run folder ``--force`` replaced."""
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def restore_replaced(path: Path, aside: Path | None, lock: RunDirLock | None) -> None:
    """The new run's set-up failed (or was interrupted): remove the folder it claimed at ``path``
    (nothing was trained into it) and put the replaced run folder ``aside`` back, unchanged.

    ``lock`` is this process's lock on ``path``; without one (the claim itself failed: another run
    started under the same name meanwhile), whatever is at ``path`` is that run's and stays."""
    if aside is None or not aside.is_dir():  # nothing replaced, or already put back
        return
    if lock is not None:
        lock.release()
        if path.is_dir():
            trash = path.parent / f".{path.name}.failed-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
    problem = "another run has taken the name" if path.exists() else None
    if problem is None:
        try:
            os.rename(aside, path)
            return
        except OSError as err:
            problem = err.strerror
    print(
        f"warning: could not put the replaced run back at {path} ({problem}); it is kept at {aside}",
        file=sys.stderr,
        flush=True,
    )


def _process_gone(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):  # alive under another user, or not a pid at all
        return False
    return False


def _recover_replaced(path: Path) -> None:
    """Put back a run that a ``--force`` start set aside and could not restore because it was killed
    (SIGKILL, power loss) during its set-up: ``.NAME.replaced-PID-TOKEN`` whose process is gone.
    It goes back when the name holds nothing of value (absent, or a set-up stopped before its first
    checkpoint); otherwise a note says where it is."""
    for aside in sorted(path.parent.glob(f".{glob.escape(path.name)}.replaced-*-*")):
        if not aside.is_dir() or not _process_gone(aside.name.rsplit("-", 2)[-2]):
            continue  # a --force start still setting up holds its own
        if path.exists() and abandoned_setup(path):
            _discard(path)  # refuses if a live run holds it
        if path.exists():
            print(f"note: {aside} holds a run that an interrupted --force start set aside", file=sys.stderr)
            continue
        os.rename(aside, path)
        print(f"note: put back {path}, which a --force start killed during its set-up had set aside", file=sys.stderr)


def claim_run_dir(cfg: Config, force: bool) -> tuple[Path, RunDirLock, Path | None]:
    """Create a fresh run directory and lock it; an existing one is replaced only with ``force``,
    or when it is a set-up that was stopped before its first checkpoint (:func:`abandoned_setup`).

    Returns ``(path, lock, replaced)``: ``replaced`` is where the run folder that ``force``
    replaces was moved (None if none): the caller deletes it once its set-up succeeded
    (:func:`discard_replaced`), or puts it back if set-up failed (:func:`restore_replaced`), so a
    failed ``--force`` start loses nothing."""
    parent = Path(cfg.out.dir)
    replaced: Path | None = None
    if cfg.out.name:
        path = parent / cfg.out.name
        exists = (
            f"run directory {path} already exists; pass --resume {path} to continue it, --force to overwrite it, "
            "or choose another out.name"
        )
        _recover_replaced(path)
        if path.exists():
            if abandoned_setup(path):
                _discard(path)  # refuses if a live run holds it (a set-up in progress looks the same)
                print(
                    f"note: reusing {path}: its set-up was stopped before the first checkpoint, so it held no results",
                    file=sys.stderr,
                    flush=True,
                )
            elif not force:
                raise ConfigError(exists)
            elif not path.is_dir() or (not looks_like_run(path) and any(path.iterdir())):
                raise ConfigError(
                    f"refusing to --force overwrite {path}: it is not empty and does not look like a run directory"
                )
            else:
                replaced = _set_aside(path)
        try:
            lock = _claim(
                path,
                f"run directory {path} was just created by another run started at the same time; "
                "wait for it, or choose another out.name",
            )
        except BaseException:
            restore_replaced(path, replaced, None)
            raise
        return path, lock, replaced
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = parent / f"{cfg.run_name}-{stamp}"
    suffix = 2
    while True:
        try:
            path.mkdir(parents=True)  # claims the name atomically: runs started in the same second never share it
            break
        except FileExistsError:
            path = parent / f"{cfg.run_name}-{stamp}-{suffix}"
            suffix += 1
    lock = RunDirLock(path)
    lock.acquire()
    return path, lock, None


def new_run_dir(cfg: Config, force: bool) -> Path:
    """Create and return a fresh run directory (see :func:`claim_run_dir`; the lock is released,
    a run folder ``force`` replaced is deleted)."""
    path, lock, replaced = claim_run_dir(cfg, force)
    lock.release()
    discard_replaced(replaced)
    return path


def open_run_dir(
    cfg: Config, ctx: D.DistContext, *, resume_dir: Path | None, force: bool
) -> tuple[Path, RunDirLock | None, bool, Path | None]:
    """The run folder of a training process: ``(path, lock, created, replaced)``.

    Rank 0 locks ``resume_dir`` (and removes the temp files a killed writer left there), or claims
    a new folder (:func:`claim_run_dir`; ``created``, and ``replaced``: where the run folder that
    ``force`` replaces waits until set-up is done); every rank learns the path, or rank 0's error
    (a ConfigError, an OSError such as an ``out.dir`` that is a file, any other), so all fail alike
    with one line each. Other ranks hold no lock.
    """
    result: tuple = ("ok", "")
    lock, created, replaced = None, False, None
    failure: Exception | None = None
    if ctx.is_main:
        try:
            if resume_dir is not None:
                path = resume_dir
                lock = RunDirLock(path)
                lock.acquire()
                remove_stale_temp_files(path / CHECKPOINTS)  # left by a writer that was killed mid-write
            else:
                path, lock, replaced = claim_run_dir(cfg, force)
                created = True
            result = ("ok", str(path))
        except BaseException as err:
            if lock is not None:
                lock.release()
            if not isinstance(err, Exception):
                raise  # Ctrl-C or SIGTERM: torchrun stops the other ranks too
            failure, result = err, _error_for_other_ranks(err)
    try:
        result = D.broadcast_object(result, ctx)
    except BaseException:
        if created:
            restore_replaced(Path(result[1]), replaced, lock)
        raise
    if failure is not None:
        raise failure
    if result[0] != "ok":
        raise _error_from_rank_0(result)
    return Path(result[1]), lock, created, replaced


def _error_for_other_ranks(err: Exception) -> tuple:
    """Rank 0's failure to open the run folder, as a picklable tuple for the other ranks."""
    if isinstance(err, OSError):  # raised again as an OSError: the command line words it as on rank 0
        return ("os", err.errno, err.strerror, err.filename, str(err))
    if isinstance(err, ReSTEError):  # ConfigError (exit 2), CheckpointError ...: the same message and code
        return ("reste", type(err) is ConfigError, err.exit_code, str(err))
    return ("other", f"{type(err).__name__}: {err}")


def _error_from_rank_0(result: tuple) -> Exception:
    """What a rank other than 0 raises for rank 0's failure (see :func:`_error_for_other_ranks`)."""
    kind = result[0]
    if kind == "os":
        errno, strerror, filename, text = result[1:]
        return OSError(errno, strerror, filename) if strerror else OSError(text)
    if kind == "reste":
        is_config, exit_code, text = result[1:]
        if is_config:
            return ConfigError(text)
        error = ReSTEError(text)
        error.exit_code = exit_code
        return error
    return ReSTEError(f"rank 0 failed to open the run directory ({result[1]}); its message says what to fix")


def remove_if_empty(path: Path | None, lock: RunDirLock | None) -> None:
    """Remove a run folder that set-up claimed and then failed in (e.g. data not found), if it holds
    no file but the lock (whose lock is released first)."""
    if path is not None and path.is_dir():
        leftovers = [p for p in path.rglob("*") if p.is_file() and p.name != LOCK]
        if not leftovers:
            if lock is not None:
                lock.release()
            shutil.rmtree(path)


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete ``.<name>.<pid>.<token>.tmp`` files that a killed writer left behind.

    Only called under the run-directory lock, so no live process of this run is writing them.
    """
    removed = []
    if folder.is_dir():
        for path in folder.glob(".*.tmp"):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


_remove_stale_temp_files = remove_stale_temp_files  # the trainer's older name
