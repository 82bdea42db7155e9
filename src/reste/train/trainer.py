"""The training loop: ``reste.train.train(config)`` and ``reste.train.evaluate(run)``.

One :class:`Trainer` runs one configuration end to end: seeds, data, model, optimizer,
learning-rate and estimator schedules, the epochs (with evaluation, metrics,
indicators and checkpoints), and the run directory::

    runs/<name>-<YYYYmmdd-HHMMSS>/
        config.yaml          the resolved configuration
        metrics.jsonl/.csv   one row per epoch
        indicators.jsonl     every-N-step indicator values (analysis.every_steps > 0)
        checkpoints/last.pt  every train.checkpoint_every epochs (and train.checkpoint_every_steps steps), at the end and on SIGINT/SIGTERM
        checkpoints/best.pt  whenever test top-1 improves
        summary.json         final and best accuracy, time, what was trained
        histograms/          fitting-error and gradient histograms (analysis.histograms_at + final epoch)
        tb/                  TensorBoard events (when tensorboard is installed)

Resuming (``resume=RUN_DIR``) continues from ``checkpoints/last.pt``, at an epoch
boundary or mid-epoch (an interrupted run saves the index of the next batch; the data
loaders are a function of (seed, epoch) and restart at that batch). Model, optimizer,
both schedulers and every RNG state are restored, so on CPU a resumed run ends with
bit-identical weights to an uninterrupted one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import secrets
import shutil
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as D
from .checkpoint import (REQUIRED_KEYS, CheckpointError, load_checkpoint, load_model_weights, nonfinite_entries, rng_state,
                         save_checkpoint, set_rng_state)
from .config import Config, ConfigError, config_from_dict, config_to_dict, config_to_yaml, load_config, read_yaml, validate, warn_conflicts

__all__ = [
    "Trainer",
    "train",
    "evaluate",
    "evaluate_model",
    "TrainingInterrupted",
    "NonFiniteLossError",
    "DistributedFailure",
    "FaultInjection",
    "RunDirLock",
    "RESUME_OVERRIDABLE",
]

#: options that may change when resuming (they do not change what is computed,
#: except train.epochs, which extends the run and stretches the lr and o schedules)
RESUME_OVERRIDABLE = (
    "train.epochs",
    "train.device",
    "train.threads",
    "train.compile",
    "train.checkpoint_every",
    "train.checkpoint_every_steps",
    "train.dist_timeout_s",
    "data.root",
    "data.num_workers",
    "data.download",
    "data.test_batch_size",
)


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped training after a checkpoint was written; ``exit_code`` is 128 + signal."""

    def __init__(self, signum: int, run_dir: Path, resume_command: str):
        self.signum = signum
        self.exit_code = 128 + int(signum)
        self.run_dir = run_dir
        self.resume_command = resume_command
        name = signal.Signals(signum).name
        super().__init__(f"training stopped by {name}; checkpoint written to {run_dir / 'checkpoints' / 'last.pt'}. Resume with:\n  {resume_command}")


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient became NaN/inf and ``train.nonfinite`` is ``stop``."""


class DistributedFailure(RuntimeError):
    """A collective operation failed in a distributed run: another rank died, hung past
    ``train.dist_timeout_s``, or the network failed. The message says how to resume."""


# substrings of the errors gloo and NCCL raise when a peer is gone or too slow
_COLLECTIVE_FAILURE_MARKERS = ("Connection closed by peer", "Connection reset by peer", "pair closure", "Timed out", "timed out",
                               "NCCL", "gloo")


def _is_collective_failure(err: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    return isinstance(err, RuntimeError) and any(marker in str(err) for marker in _COLLECTIVE_FAILURE_MARKERS)


# ----------------------------------------------------------------------------- small helpers
def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(unit: int, total: int, warmup: int, way: str, final_ratio: float) -> float:
    """The lr multiplier at ``unit`` (an epoch or a step index, 0-based) of ``total``.

    Linear warm-up over the first ``warmup`` units (``(unit + 1) / warmup``), then
    ``cosine`` (``final + (1 - final) * (1 + cos(pi * r)) / 2``), ``linear`` or
    ``constant`` with ``r`` going from 0 at the end of warm-up to 1 at ``total``.
    Per epoch this is the reference's schedule: the last epoch's lr is not yet zero.
    """
    if unit < warmup:
        return (unit + 1) / warmup
    r = min(max((unit - warmup) / max(total - warmup, 1), 0.0), 1.0)
    if way == "cosine":
        return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * r))
    if way == "linear":
        return final_ratio + (1.0 - final_ratio) * (1.0 - r)
    return 1.0


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """SGD / Adam / AdamW over the model's parameters, from ``cfg.optim``."""
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if o.decay_all or o.weight_decay == 0:
        groups = [{"params": params, "weight_decay": o.weight_decay}]
    else:
        # 0-d and 1-d tensors are BatchNorm scales/shifts, biases and estimator parameters
        decay = [p for p in params if p.dim() > 1]
        no_decay = [p for p in params if p.dim() <= 1]
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
    betas = tuple(o.betas)
    if o.name == "adam":
        return torch.optim.Adam(groups, lr=o.lr, betas=betas)
    return torch.optim.AdamW(groups, lr=o.lr, betas=betas)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Number of samples whose label is the top-1 / among the top-5 predictions (as tensors, no sync)."""
    k = min(5, num_classes)
    top = logits.topk(k, dim=1).indices
    hits = top.eq(labels.view(-1, 1))
    return hits[:, 0].sum(), hits.any(dim=1).sum()


def _accuracy(correct: float, count: float) -> float:
    return 100.0 * correct / count if count else float("nan")


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


def _resume_command(run_dir: Path) -> str:
    launcher = "torchrun --nproc_per_node=N -m reste" if "WORLD_SIZE" in os.environ and os.environ.get("WORLD_SIZE") != "1" else "reste"
    return f"{launcher} train --resume {run_dir}"


def epoch_line(row: dict, epochs: int) -> str:
    """One terminal line per epoch: train and test loss and top-1, and the equilibrium indicators
    (the epoch's mean o; e and s as sampled at its last step, see docs/analysis.md)."""

    def num(key, fmt, label):
        value = row.get(key)
        return f"{label} {value:{fmt}}" if isinstance(value, (int, float)) and math.isfinite(value) else ""

    parts = [f"epoch {row['epoch']:>{len(str(epochs))}}/{epochs}",
             f"train loss {row['train_loss']:.4f} top-1 {row['train_top1']:5.2f}%",
             f"test loss {row['test_loss']:.4f} top-1 {row['test_top1']:5.2f}%",
             "  ".join(filter(None, (num("o_mean", ".3f", "mean o"), num("est_error", ".4g", "e"), num("est_error_end", ".4g", "e@o_end"),
                                     num("grad_instability", ".3g", "s")))),
             num("epoch_time", ".1f", "time") + (" s" if row.get("epoch_time") is not None else ""),
             num("teacher_ms_per_step", ".1f", "teacher") + (" ms/step" if row.get("teacher_ms_per_step") is not None else "")]
    return " | ".join(p for p in parts if p)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_model(model: nn.Module, loader, device, *, num_classes: int, amp: str = "none", channels_last: bool = False, ctx: D.DistContext | None = None) -> dict:
    """Loss, top-1 and top-5 (percent) of ``model`` over ``loader``.

    In a distributed run every rank evaluates its shard of the test set and the sums are
    all-reduced, so every rank gets the metrics of the whole test set.
    """
    ctx = ctx or D.DistContext(device=torch.device(device))
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, count
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16) if amp == "bf16" else nullcontext()
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        c1, c5 = topk_correct(logits, labels, num_classes)
        totals += torch.stack([loss.double(), c1.double(), c5.double(), torch.tensor(float(labels.numel()), dtype=torch.float64, device=device)])
    D.all_reduce_sum(totals, ctx)
    model.train(was_training)
    loss_sum, c1, c5, count = totals.tolist()
    return {
        "loss": loss_sum / count if count else float("nan"),
        "top1": _accuracy(c1, count),
        "top5": _accuracy(c5, count) if num_classes > 5 else None,
        "count": int(count),
    }


def _locate_checkpoint(source, which: str) -> Path:
    path = Path(source)
    if path.is_dir():
        candidate = path / "checkpoints" / f"{which}.pt"
        if not candidate.is_file():
            raise CheckpointError(f"{path} has no checkpoints/{which}.pt; is it a run directory written by `reste train`?")
        return candidate
    return path


def evaluate(source, *, data: str | None = None, root: str | None = None, batch_size: int | None = None, subset: int | str | None = "run",
             device: str = "auto", which: str = "best", amp: str | None = None) -> dict:
    """Evaluate a run directory or checkpoint on its test set (or another data set's).

    Args:
        source: a run directory (uses ``checkpoints/<which>.pt``) or a ``.pt`` file.
        data, root: evaluate on this data set / data folder instead of the run's.
        batch_size: evaluation batch (default: the run's ``data.test_batch_size``).
        subset: ``"run"``: the test images the run reported on (its ``data.subset``; another
            data set is used whole); None: the whole test set; N: the first ``N // 5`` test
            images (as ``data.subset`` does).
        device: ``auto``, ``cpu``, ``cuda`` ...
        which: ``best`` or ``last`` when ``source`` is a run directory (best, as ``reste export``).
        amp: ``bf16`` or ``none`` (default: the run's ``train.amp``).

    Returns ``{"top1", "top5", "loss", "count", "checkpoint", "epoch", "data", "subset"}``.
    """
    from reste import data as rdata

    path = _locate_checkpoint(source, which)
    state = load_checkpoint(path, required=("model", "config"))
    try:
        cfg = config_from_dict(state["config"])
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {path} has an invalid config: {err}") from None
    trained_on = rdata.info(cfg.data.name)
    name = data or cfg.data.name
    try:
        meta = rdata.info(name)
    except ValueError as err:
        raise ConfigError(f"--data: {err}") from None
    if (meta.num_classes, meta.in_channels) != (trained_on.num_classes, trained_on.in_channels):
        raise ConfigError(
            f"the model was trained on {cfg.data.name} ({trained_on.num_classes} classes, {trained_on.in_channels} channels) "
            f"and cannot be evaluated on {name} ({meta.num_classes} classes, {meta.in_channels} channels)"
        )
    dev = D.resolve_device(device)
    model = build_model(cfg, trained_on).to(dev)
    load_model_weights(model, state["model"], path)
    batch = batch_size or cfg.data.test_batch_size or cfg.data.batch_size
    if subset == "run":  # the same create_loaders call as training: the same test images
        subset = cfg.data.subset if rdata.canonical_name(name) == rdata.canonical_name(cfg.data.name) else None
    _, test_loader = rdata.create_loaders(
        name, root=root if root is not None else (cfg.data.root if data is None else None), batch_size=batch, test_batch_size=batch,
        augment=False, seed=cfg.seed, device=dev, subset=subset, test_only=True,
    )
    result = evaluate_model(model, test_loader, dev, num_classes=meta.num_classes, amp=amp or cfg.train.amp)
    result.update({"checkpoint": str(path), "epoch": int(state.get("epoch", 0)), "data": rdata.canonical_name(name), "subset": subset})
    return result


def model_arguments(cfg: Config, meta) -> dict:
    """The ``reste.models.create`` arguments of a config: classes, channels and image size
    from the data set ``meta`` (``reste.data.info``), estimator parameters from ``estimator.params``.
    Export stores this dict, so a deployed model is rebuilt exactly as training built it."""
    kwargs = dict(cfg.model.kwargs)
    if cfg.estimator.params:
        kwargs["estimator_params"] = dict(cfg.estimator.params)
    return {
        "name": cfg.model.name, "num_classes": meta.num_classes, "in_channels": meta.in_channels,
        "precision": cfg.model.precision, "estimator": cfg.model.estimator, "image_size": meta.image_size, "kwargs": kwargs,
    }


#: what building a model from a wrong model.kwargs raises (width: .inf an OverflowError, a huge
#: width an allocator RuntimeError): all are a configuration error
_BUILD_ERRORS = (TypeError, ValueError, OverflowError, RuntimeError, MemoryError, ZeroDivisionError)


def _model_label(cfg: Config) -> str:
    from .config import _short

    return f"model {cfg.model.name!r} from model.kwargs={_short(cfg.model.kwargs)} estimator.params={_short(cfg.estimator.params)}"


def check_model(cfg: Config, meta) -> None:
    """Build the model on the meta device (shapes only, no memory) and check that training it
    fits this process's memory; ConfigError otherwise, so ``model.kwargs={width: 300}`` is
    refused before anything is allocated (or any data read)."""
    from reste import models
    from reste.models import check_size

    args = model_arguments(cfg, meta)
    kwargs = args.pop("kwargs")
    try:
        with torch.device("meta"):
            problem = check_size(models.create(args.pop("name"), **args, **kwargs))
    except _BUILD_ERRORS as err:
        raise ConfigError(f"cannot build {_model_label(cfg)}: {str(err)[:200]}") from None
    if problem:
        raise ConfigError(f"{_model_label(cfg)}: {problem}; lower the width or size in model.kwargs")


def build_model(cfg: Config, meta) -> nn.Module:
    """``reste.models.create`` from the config, after :func:`check_model`; a bad ``model.kwargs``
    is a :class:`ConfigError`."""
    check_model(cfg, meta)
    return _create_model(cfg, meta)


def _create_model(cfg: Config, meta) -> nn.Module:
    """:func:`build_model` for a config :func:`check_model` has already passed."""
    from reste import models

    args = model_arguments(cfg, meta)
    kwargs = args.pop("kwargs")
    try:
        return models.create(args.pop("name"), **args, **kwargs)
    except _BUILD_ERRORS as err:
        raise ConfigError(f"cannot build {_model_label(cfg)}: {str(err)[:200]}") from None


# ----------------------------------------------------------------------------- the run directory
class RunWriter:
    """Writes the run directory's files (rank 0 only)."""

    def __init__(self, run_dir: Path, cfg: Config, enabled: bool):
        self.run_dir = run_dir
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "histograms").mkdir(exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the optional `tensorboard` package
        except ImportError:
            SummaryWriter = None
        if SummaryWriter is not None:
            self.tb = SummaryWriter(log_dir=str(run_dir / "tb"))

    def write_config(self, cfg: Config) -> None:
        if self.enabled:
            _write_text(self.run_dir / "config.yaml", config_to_yaml(cfg))

    def write_metrics(self, rows: list[dict]) -> None:
        """Rewrite metrics.jsonl and metrics.csv from all rows so far (keys may appear later, e.g. indicators)."""
        if not self.enabled:
            return
        _write_text(self.run_dir / "metrics.jsonl",
                    "".join(json.dumps({k: _clean(v) for k, v in row.items()}, default=_json_default) + "\n" for row in rows))
        keys: list[str] = []
        for row in rows:
            keys += [k for k in row if k not in keys]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=keys, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if _clean(v) is None else v) for k, v in row.items()})
        _write_text(self.run_dir / "metrics.csv", text.getvalue())

    def log_scalars(self, row: dict) -> None:
        if self.tb is None:
            return
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.tb.add_scalar(key, value, row["epoch"])
        self.tb.flush()

    def append_indicators(self, row: dict) -> None:
        if self.enabled:
            path = self.run_dir / "indicators.jsonl"
            try:
                with open(path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(row, default=_json_default) + "\n")
            except OSError as err:  # a cut line is skipped on resume (truncate_indicators)
                raise OSError(err.errno, err.strerror or str(err), str(path)) from None

    def truncate_indicators(self, global_step: int) -> None:
        """On resume: drop indicator rows measured after the checkpoint (they will be measured again)."""
        path = self.run_dir / "indicators.jsonl"
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
            _write_json(self.run_dir / "summary.json", summary)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _looks_like_run(path: Path) -> bool:
    # .lock: reste created it, even if set-up was killed before anything else was written
    return (path / "config.yaml").is_file() or (path / "checkpoints").is_dir() or (path / ".lock").is_file()


#: what a run folder holds before its first epoch ends: a set-up killed there left nothing of value
_SETUP_FILES = {".lock", "config.yaml", ".config.yaml.tmp"}


def abandoned_setup(path: Path) -> bool:
    """Whether ``path`` is a run folder whose set-up was stopped (SIGKILL, power loss) before its
    first checkpoint and metrics: only the lock, the config, empty folders and TensorBoard's first
    event file. Such a folder is reused by the same command (it held no results)."""
    if not (path / ".lock").is_file():
        return False
    for item in path.rglob("*"):
        rel = item.relative_to(path)
        if item.is_dir() or str(rel) in _SETUP_FILES or rel.parts[0] == "tb" or (item.name.startswith(".") and item.name.endswith(".tmp")):
            continue
        return False
    return True


def _claim(path: Path, taken_message: str) -> "RunDirLock":
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
    lock.path = path / ".lock"
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


def claim_run_dir(cfg: Config, force: bool) -> tuple[Path, "RunDirLock"]:
    """Create a fresh run directory and lock it; an existing one is replaced only with ``force``,
    or when it is a set-up that was stopped before its first checkpoint (:func:`abandoned_setup`)."""
    parent = Path(cfg.out.dir)
    if cfg.out.name:
        path = parent / cfg.out.name
        exists = f"run directory {path} already exists; pass --resume {path} to continue it, --force to overwrite it, or choose another out.name"
        if path.exists():
            if abandoned_setup(path):
                _discard(path)  # refuses if a live run holds it (a set-up in progress looks the same)
                print(f"note: reusing {path}: its set-up was stopped before the first checkpoint, so it held no results",
                      file=sys.stderr, flush=True)
            elif not force:
                raise ConfigError(exists)
            elif not path.is_dir() or (not _looks_like_run(path) and any(path.iterdir())):
                raise ConfigError(f"refusing to --force overwrite {path}: it is not empty and does not look like a run directory")
            else:
                _discard(path)
        lock = _claim(path, f"run directory {path} was just created by another run started at the same time; "
                            "wait for it, or choose another out.name")
        return path, lock
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
    return path, lock


def new_run_dir(cfg: Config, force: bool) -> Path:
    """Create and return a fresh run directory (see :func:`claim_run_dir`; the lock is released)."""
    path, lock = claim_run_dir(cfg, force)
    lock.release()
    return path


# ----------------------------------------------------------------------------- run-directory lock
class RunDirLock:
    """An exclusive ``flock`` on ``RUN_DIR/.lock`` held while a process trains into the folder.

    Two processes writing one run (a resume started twice, a job re-queued while the old
    one still runs) would interleave their checkpoints and metrics. The kernel drops the
    lock when its holder dies, SIGKILL included, so a crashed run never blocks a resume.
    Without ``fcntl`` (Windows) this does nothing.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._fh = None

    def acquire(self) -> None:
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
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the descriptor releases the flock
            self._fh = None


def _remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete ``.<name>.<pid>.<token>.tmp`` files that a killed writer left behind.

    Only called under the run-directory lock, so no live process of this run is writing them.
    """
    removed = []
    if folder.is_dir():
        for path in folder.glob(".*.tmp"):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# ----------------------------------------------------------------------------- fault injection (testing hook)
FAULT_KINDS = ("kill", "raise", "hang", "nan_loss", "nan_grad")


class FaultInjection:
    """A testing hook that makes one rank fail on purpose, to test how runs survive it.

    Set by environment variables (read once, when training starts; nothing happens when
    ``RESTE_FAULT_STEP`` is unset)::

        RESTE_FAULT_STEP=7      1-based global training step at which the fault happens
        RESTE_FAULT_RANK=1      which rank (default 0; a single process is rank 0)
        RESTE_FAULT=kill        kill (SIGKILL itself), raise (RuntimeError), hang (stop
                                responding, ignoring signals), nan_loss (the loss becomes
                                NaN) or nan_grad (a gradient becomes NaN, the loss stays finite)

    Only meant for tests and drills (see docs/reliability.md).
    """

    def __init__(self, kind: str, step: int, rank: int):
        self.kind, self.step, self.rank = kind, step, rank

    @classmethod
    def from_env(cls, rank: int) -> "FaultInjection | None":
        step = os.environ.get("RESTE_FAULT_STEP")
        if not step:
            return None
        kind = os.environ.get("RESTE_FAULT", "kill")
        if kind not in FAULT_KINDS or not step.isdigit():
            raise ConfigError(f"RESTE_FAULT={kind!r} RESTE_FAULT_STEP={step!r}: the fault kind must be one of {', '.join(FAULT_KINDS)} "
                              "and the step a positive whole number (this is a testing hook; unset RESTE_FAULT_STEP to train normally)")
        fault_rank = int(os.environ.get("RESTE_FAULT_RANK", "0"))
        return cls(kind, int(step), fault_rank) if fault_rank == rank else None

    def before_step(self, global_step: int) -> None:
        """Called before each step with its 1-based global index."""
        if global_step != self.step:
            return
        print(f"RESTE_FAULT: injecting {self.kind!r} at step {global_step}", file=sys.stderr, flush=True)
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "raise":
            raise RuntimeError(f"RESTE_FAULT: injected failure at step {global_step}")
        if self.kind == "hang":
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)  # a hung process in C code does not answer signals either
            while True:
                time.sleep(3600)

    def on_loss(self, global_step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if self.kind == "nan_loss" and global_step == self.step else loss

    def on_grads(self, global_step: int, model: nn.Module) -> None:
        if self.kind == "nan_grad" and global_step == self.step:
            param = next(p for p in model.parameters() if p.grad is not None)
            param.grad.view(-1)[0] = float("nan")


# ----------------------------------------------------------------------------- signals
class _StopRequest:
    """SIGINT/SIGTERM handlers that ask the loop to stop after the current step.

    A second SIGINT while stopping raises KeyboardInterrupt at once (the user insists).
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: finishing the current step and writing a checkpoint "
              "(press Ctrl-C again to abort without one)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers only work there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    """Trains one configuration; see the module docstring.

    Args:
        cfg: a validated :class:`Config` (see :func:`reste.train.load_config`).
        resume: a run directory to continue from its ``checkpoints/last.pt``.
        force: overwrite an existing run directory named by ``out.name``.
        progress: show the tqdm progress bar, a line per epoch under it (test top-1 and loss,
            o, e, s) and the final summary (rank 0 only).
        summary: print the final summary and the run directory (default: as ``progress``);
            ``reste train --quiet`` is ``progress=False, summary=True``.
    """

    def __init__(self, cfg: Config, *, resume: str | os.PathLike | None = None, force: bool = False, progress: bool = True,
                 summary: bool | None = None):
        self._created_run_dir: Path | None = None
        self.cfg = cfg
        self.resume_dir = Path(resume) if resume is not None else None
        self.force = force
        self.progress = progress
        self.print_summary = progress if summary is None else summary

    # -- setup -----------------------------------------------------------------
    def _setup(self):
        cfg = self.cfg
        t = cfg.train
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        self.ctx = ctx = D.setup(t.device, t.dist_timeout_s)
        self.device = ctx.device
        warn_conflicts(cfg, ctx.world_size)
        if cfg.data.batch_size % ctx.world_size:
            raise ConfigError(
                f"data.batch_size={cfg.data.batch_size} (the global batch) is not divisible by the {ctx.world_size} ranks; "
                f"use a multiple of {ctx.world_size}"
            )
        from reste import data as rdata

        self.meta = rdata.info(cfg.data.name)
        check_model(cfg, self.meta)  # a model too big to build: before any folder or data
        # claim the run directory first: a name clash is reported before any data is loaded
        self.run_dir = self._prepare_run_dir()
        self.fault = FaultInjection.from_env(ctx.rank)
        seed_everything(cfg.seed)

        self.num_classes = self.meta.num_classes
        d = cfg.data
        if d.subset is None and self.meta.train_size < d.batch_size:
            raise ConfigError(f"data.batch_size ({d.batch_size}) is larger than the {d.name} training set ({self.meta.train_size} images); lower data.batch_size")
        self.train_loader, self.test_loader = rdata.create_loaders(
            d.name, root=d.root, batch_size=d.batch_size // ctx.world_size, test_batch_size=d.test_batch_size,
            augment=d.augment, download=d.download, seed=cfg.seed, device=self.device, num_workers=d.num_workers,
            subset=d.subset, rank=ctx.rank, world_size=ctx.world_size, drop_last=True, shard_test=True,
        )
        dataset_size = getattr(self.train_loader, "dataset_size", None)
        if dataset_size is not None and dataset_size < d.batch_size:
            raise ConfigError(f"data.batch_size ({d.batch_size}) is larger than the training set ({dataset_size} images); lower data.batch_size or raise data.subset")
        self.steps_per_epoch = len(self.train_loader)

        model = _create_model(cfg, self.meta)  # checked above
        self.init_report = None
        if cfg.model.init_from is not None and self.resume_dir is None:  # a resume restores its own checkpoint
            from .warmstart import init_from

            self.init_report = init_from(model, cfg.model.init_from)
            if ctx.is_main and self.print_summary:
                print(f"model.init_from: {self.init_report.source}: " + "; ".join(self.init_report.lines()), flush=True)
        if t.sync_bn and ctx.distributed:
            model = D.convert_sync_batchnorm(model, self.device)
        model = model.to(self.device)
        if t.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model  # the plain module: its state_dict is what checkpoints hold
        self.teacher = None
        if t.teacher is not None:
            from .distill import Teacher

            self.teacher = Teacher.from_source(t.teacher, cfg, self.meta, self.device, t.channels_last)
            if ctx.is_main and self.print_summary:
                print(f"train.teacher: {self.teacher.source}; loss = {1 - self.teacher.weight:g} * CE + "
                      f"{self.teacher.weight:g} * T^2 * KL, T = {self.teacher.temperature:g}", flush=True)
        self.optimizer = build_optimizer(model, cfg)
        self.lr_scheduler = self._build_lr_scheduler()
        import reste

        schedule = reste.o_schedule(cfg.estimator.schedule, o_end=cfg.estimator.o_end, p=cfg.estimator.p)
        self.est_scheduler = reste.EstimatorScheduler(model, schedule, t.epochs, self.steps_per_epoch, per=cfg.estimator.per)

        self.start_epoch, self.start_batch = 0, 0
        self.history: list[dict] = []
        self.elapsed_before = 0.0
        self.partial: dict | None = None
        self.skipped_total = 0
        resume_state = self._load_resume_state() if self.resume_dir is not None else None

        forward_model: nn.Module = model
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            forward_model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if t.compile:
            forward_model = torch.compile(forward_model)
        self.forward_model = forward_model

        self.tracker = None
        if cfg.analysis.indicators and ctx.is_main:
            from reste.analysis.indicators import IndicatorTracker

            tracker = IndicatorTracker(model, cfg.estimator.o_end)
            self.tracker = tracker if len(tracker) else None  # a float model has nothing to measure
            saved = resume_state.get("indicators") if resume_state is not None else None
            if self.tracker is not None and saved is not None and hasattr(self.tracker, "load_state_dict"):
                self.tracker.load_state_dict(saved)  # e.g. the signs flip_ratio compares against

        self.writer = RunWriter(self.run_dir, cfg, enabled=ctx.is_main)
        self.writer.write_config(cfg)
        if resume_state is not None:
            self.writer.write_metrics(self.history)  # drop rows newer than the checkpoint
            self.writer.truncate_indicators(self.start_epoch * self.steps_per_epoch + self.start_batch)
            set_rng_state(resume_state["rng"])  # last: building the model above drew random numbers

    def _build_lr_scheduler(self):
        s = self.cfg.lr_schedule
        epochs = self.cfg.train.epochs
        if s.per == "step":
            total = epochs * self.steps_per_epoch
            warmup = int(round(s.warmup_epochs * self.steps_per_epoch))
        else:
            total, warmup = epochs, int(s.warmup_epochs)
        return torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda unit: lr_factor(unit, total, warmup, s.name, s.final_lr_ratio)
        )

    def _load_resume_state(self) -> dict:
        path = self.resume_dir / "checkpoints" / "last.pt"
        state = load_checkpoint(path, map_location=self.device, required=REQUIRED_KEYS)
        load_model_weights(self.model, state["model"], path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint {path}: optimizer or lr-scheduler state does not fit this configuration ({err})") from None
        self.est_scheduler.load_state_dict(state["estimator_scheduler"])
        self.start_epoch = int(state["epoch"])
        self.start_batch = int(state.get("step_in_epoch", 0))
        self.history = list(state["metrics"])
        self.elapsed_before = float(state.get("elapsed", 0.0))
        self.partial = state.get("partial")
        self.skipped_total = int(state.get("skipped_total", 0))
        saved_world = int(state.get("world_size", 1))
        saved_steps = int(state.get("steps_per_epoch", self.steps_per_epoch))
        if saved_steps != self.steps_per_epoch:
            if self.start_batch:
                raise CheckpointError(
                    f"checkpoint {path} stopped at batch {self.start_batch} of an epoch of {saved_steps} steps ({saved_world} ranks), "
                    f"but an epoch now has {self.steps_per_epoch} steps ({self.ctx.world_size} ranks); resume with {saved_world} "
                    "ranks to finish that epoch, then with any number"
                )
            self._realign_step_schedules()
        if self.start_batch and saved_world != self.ctx.world_size:
            # each rank takes a contiguous slice of the epoch's permutation, so the rest of this
            # epoch's batches are a different (same-sized) selection of images; later epochs are not affected
            warnings.warn(
                f"{path} was written mid-epoch (batch {self.start_batch}) by {saved_world} ranks and is resumed by "
                f"{self.ctx.world_size}: the rest of epoch {self.start_epoch + 1} draws its batches from a different split of "
                "that epoch's shuffled images, so some are seen twice and others not at all in that epoch",
                stacklevel=2,
            )
        return state

    def _realign_step_schedules(self) -> None:
        """At an epoch boundary with a different number of steps per epoch (another number of
        ranks or data size): put a per-step lr schedule at this epoch's first step."""
        if self.cfg.lr_schedule.per != "step":
            return  # per-epoch schedules count epochs, which did not change
        sched = self.lr_scheduler
        unit = self.start_epoch * self.steps_per_epoch
        sched.last_epoch = unit
        sched._last_lr = [base * fn(unit) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, sched._last_lr):
            group["lr"] = lr

    def _prepare_run_dir(self) -> Path:
        """Rank 0 picks (or checks) the folder; every rank learns the result, errors included."""
        result: tuple[str, str] = ("ok", "")
        if self.ctx.is_main:
            try:
                if self.resume_dir is not None:
                    path = self.resume_dir
                    self._lock = RunDirLock(path)
                    self._lock.acquire()
                    _remove_stale_temp_files(path / "checkpoints")  # left by a writer that was killed mid-write
                else:
                    path, self._lock = claim_run_dir(self.cfg, self.force)
                    self._created_run_dir = path
                result = ("ok", str(path))
            except ConfigError as err:
                result = ("error", str(err))
        result = D.broadcast_object(result, self.ctx)
        if result[0] == "error":
            raise ConfigError(result[1])
        return Path(result[1])

    # -- the loop --------------------------------------------------------------
    def fit(self) -> dict:
        """Train (or continue training) to ``train.epochs``; returns the summary dict."""
        try:
            try:
                self._setup()
            except BaseException:
                self._remove_empty_run_dir()
                raise
            with _StopRequest() as stop:
                self._stop = stop
                try:
                    return self._run()
                except RuntimeError as err:
                    if self.ctx.distributed and _is_collective_failure(err):
                        raise self._distributed_failure(err) from err
                    raise
        finally:
            if getattr(self, "writer", None) is not None:
                self.writer.close()
            if getattr(self, "_lock", None) is not None:
                self._lock.release()
            if getattr(self, "ctx", None) is not None:
                D.cleanup(self.ctx)

    def _distributed_failure(self, err: BaseException) -> DistributedFailure:
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        last = self.run_dir / "checkpoints" / "last.pt"
        kept = (f"the last good checkpoint is {last}; resume with `{_resume_command(self.run_dir)}`" if last.is_file()
                else "no checkpoint was written yet")
        return DistributedFailure(
            f"a collective operation failed on rank {self.ctx.rank} ({first[:300]}): another rank probably died, hung for "
            f"longer than train.dist_timeout_s={self.cfg.train.dist_timeout_s} s, or lost its network (see the other ranks' "
            f"messages); {kept}"
        )

    def _remove_empty_run_dir(self) -> None:
        """Setup failed (e.g. data not found): do not leave the empty folder it claimed."""
        path = self._created_run_dir
        if path is not None and path.is_dir():
            leftovers = [p for p in path.rglob("*") if p.is_file() and p.name != ".lock"]
            if not leftovers:
                if getattr(self, "_lock", None) is not None:
                    self._lock.release()
                shutil.rmtree(path)

    def _run(self) -> dict:
        cfg, ctx = self.cfg, self.ctx
        epochs = cfg.train.epochs
        total_steps = epochs * self.steps_per_epoch
        done_steps = self.start_epoch * self.steps_per_epoch + self.start_batch
        show = self.progress and ctx.is_main
        tell = self.print_summary and ctx.is_main
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=done_steps, unit="step", dynamic_ncols=True, disable=not show, leave=True)
        self.session_start = time.perf_counter()
        if self.start_epoch >= epochs:
            self.bar.close()
            if tell:
                print(f"{self.run_dir} is already complete ({epochs} epochs); raise train.epochs to continue it")
            return self._summary(complete=True)
        try:
            for epoch in range(self.start_epoch, epochs):
                row, epoch_start = self._train_epoch(epoch)
                self._check_divergence(epoch, row)
                # the plain module, not the DDP wrapper: ranks may hold different numbers of test
                # batches, and DDP's per-forward buffer broadcast would then wait forever
                test = evaluate_model(self.model, self.test_loader, self.device, num_classes=self.num_classes,
                                      amp=cfg.train.amp, channels_last=cfg.train.channels_last, ctx=ctx)
                row.update({"test_loss": test["loss"], "test_top1": test["top1"], "test_top5": test["top5"]})
                row["epoch_time"] = time.perf_counter() - epoch_start
                self._end_epoch(epoch, row)
                if show:
                    tqdm.write(epoch_line(row, epochs))  # above the bar, which stays at the bottom
                if epoch + 1 < epochs:
                    self._check_stop(epoch + 1, 0)
        finally:
            self.bar.close()
        summary = self._summary(complete=True)
        if tell:
            self._print_summary(summary)
        return summary

    def _train_epoch(self, epoch: int) -> dict:
        cfg, ctx = self.cfg, self.ctx
        t = cfg.train
        model, forward_model, optimizer = self.model, self.forward_model, self.optimizer
        start_batch = self.start_batch if epoch == self.start_epoch else 0
        if start_batch == 0:
            self.est_scheduler.step_epoch(epoch)
        if start_batch:
            self.train_loader.set_epoch(epoch, start_batch=start_batch)
        else:
            self.train_loader.set_epoch(epoch)
        # running sums of the epoch (restored from a mid-epoch checkpoint): loss, top-1, top-5, count, skipped
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)
        seconds_before = 0.0
        if start_batch and self.partial:
            if ctx.is_main:  # the saved sums are over all ranks already: count them once
                sums += torch.tensor(self.partial["sums"], dtype=torch.float64, device=self.device)
            seconds_before = float(self.partial["seconds"])
        model.train()
        autocast = torch.autocast(device_type=self.device.type, dtype=torch.bfloat16) if t.amp == "bf16" else nullcontext()
        every = cfg.analysis.every_steps
        indicator_row: dict = {}
        epoch_start = time.perf_counter() - seconds_before
        self.bar.set_description(f"epoch {epoch + 1}/{t.epochs}")
        step = start_batch
        lr = optimizer.param_groups[0]["lr"]
        params = [p for p in model.parameters() if p.requires_grad]
        fault = self.fault
        every_steps_ckpt = t.checkpoint_every_steps
        for images, labels in self.train_loader:
            last_step = step == self.steps_per_epoch - 1
            global_step = epoch * self.steps_per_epoch + step
            if fault is not None:
                fault.before_step(global_step + 1)
            self.est_scheduler.step_iter()
            if t.nonfinite == "skip":  # a skipped batch must not leave its BatchNorm statistics behind
                buffers = [b for b in model.buffers()]
                saved_buffers = [b.detach().clone() for b in buffers]
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if t.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast:
                logits = forward_model(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=t.label_smoothing)
            if self.teacher is not None:
                loss = self.teacher.loss(images, logits, loss, autocast)
            if fault is not None:
                loss = fault.on_loss(global_step + 1, loss)
            # backward even on a NaN loss: every rank must join DDP's gradient all-reduce
            loss.backward()
            if fault is not None:
                fault.on_grads(global_step + 1, model)
            # the gradient is checked too: a NaN latent weight of a binary layer gives a finite
            # forward (sign(NaN) = +1) but a NaN gradient
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            bad_loss, bad_grad = self._nonfinite(loss, grad_norm)
            if bad_loss or bad_grad:
                if t.nonfinite == "stop":
                    self._raise_nonfinite(epoch, step, loss, grad_norm, bad_loss)
                if ctx.is_main:
                    sums[4] += 1  # skip: no update; the schedules still advance
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for buffer, saved in zip(buffers, saved_buffers):
                        buffer.copy_(saved)
            else:
                measure = self.tracker is not None and (last_step or (every > 0 and (global_step + 1) % every == 0))
                if measure:
                    values = self.tracker.measure()
                    if every > 0 and (global_step + 1) % every == 0:
                        self.writer.append_indicators({"epoch": epoch + 1, "step": step + 1, "global_step": global_step + 1,
                                                       "o": self.est_scheduler.o, **values})
                    if last_step:
                        indicator_row = {k: v for k, v in values.items() if k != "layers"}
                        if (epoch + 1) in cfg.analysis.histograms_at or epoch + 1 == t.epochs:
                            self.tracker.snapshot(self.run_dir / "histograms" / f"epoch{epoch + 1:04d}.npz")
                if t.grad_clip > 0:
                    torch.nn.utils.clip_grads_with_norm_(params, t.grad_clip, grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    c1, c5 = topk_correct(logits.detach(), labels, self.num_classes)
                    n = labels.numel()
                    sums[:4] += torch.stack([loss.detach().double() * n, c1.double(), c5.double(), torch.tensor(float(n), dtype=torch.float64, device=self.device)])
            lr = optimizer.param_groups[0]["lr"]  # the lr this step used
            if cfg.lr_schedule.per == "step":
                self.lr_scheduler.step()
            step += 1
            self._update_bar(sums, epoch_start, step)
            self._check_stop(epoch, step, sums=sums, seconds=time.perf_counter() - epoch_start)
            if every_steps_ckpt and (global_step + 1) % every_steps_ckpt == 0 and step < self.steps_per_epoch:
                # mid-epoch checkpoint (the epoch's last step is followed by the epoch-end one)
                partial = {"sums": self._global_sums(sums), "seconds": time.perf_counter() - epoch_start}
                self._save("last", epoch=epoch, step_in_epoch=step, partial=partial)
        if cfg.lr_schedule.per == "epoch":
            self.lr_scheduler.step()
        train_seconds = time.perf_counter() - epoch_start
        totals = D.all_reduce_sum(sums.clone(), ctx).tolist()
        loss_sum, c1, c5, count, skipped = totals
        skipped = int(round(skipped))  # counted on rank 0 only: every rank skips the same batches
        self.skipped_total += skipped
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / count if count else float("nan"),
            "train_top1": _accuracy(c1, count),
            "train_top5": _accuracy(c5, count) if self.num_classes > 5 else None,
            "lr": lr,
            "o": self.est_scheduler.o,
            "o_mean": self._epoch_mean_o(epoch),
            "images_per_s": count / train_seconds if train_seconds > 0 else float("nan"),
            "train_time": train_seconds,
            "skipped_batches": skipped,
        }
        if self.teacher is not None:
            row.update(self.teacher.pop_epoch_stats())
        if self.cfg.analysis.indicators and self.ctx.is_main and self.tracker is not None:
            for key in ("est_error", "est_error_end", "grad_instability", "flip_ratio"):
                row[key] = indicator_row.get(key)
        return row, epoch_start

    def _check_divergence(self, epoch: int, row: dict) -> None:
        """Fail a run that skipped most of an epoch; warn about one whose loss ran far above chance."""
        skipped = row.get("skipped_batches", 0)
        if skipped * 2 > self.steps_per_epoch:
            last = self.run_dir / "checkpoints" / "last.pt"
            kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written"
            raise NonFiniteLossError(
                f"epoch {epoch + 1} skipped {skipped} of {self.steps_per_epoch} batches for a non-finite loss or gradient "
                f"(train.nonfinite=skip): the run is diverging, not training; stopped before writing this epoch's checkpoint, "
                f"{kept}. Lower optim.lr, add lr_schedule.warmup_epochs or train.grad_clip")
        loss, chance = row.get("train_loss"), math.log(max(self.num_classes, 2))
        if isinstance(loss, float) and math.isfinite(loss) and loss > 100 * chance and self.ctx.is_main:
            warnings.warn(f"epoch {epoch + 1}: train loss {loss:.3g} is {loss / chance:.3g} times that of guessing (ln {self.num_classes} = "
                          f"{chance:.2f}): the run has diverged; lower optim.lr (now {self.cfg.optim.lr:g})", stacklevel=2)

    def _epoch_mean_o(self, epoch: int) -> float | None:
        """The mean of o over the epoch's steps, from the schedule (so a resumed epoch gets the
        same value); ``o`` in the row is the last step's."""
        sched = self.est_scheduler
        if sched.o is None:
            return None
        if sched.per == "epoch":
            return sched.schedule(epoch / sched.epochs)
        total = sched.epochs * sched.steps_per_epoch
        first = epoch * sched.steps_per_epoch
        return sum(sched.schedule((first + k) / total) for k in range(sched.steps_per_epoch)) / sched.steps_per_epoch

    def _nonfinite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[bool, bool]:
        """Whether the loss / the gradient norm is NaN or inf on any rank (one sync per step)."""
        flags = torch.stack([~torch.isfinite(loss.detach().float()), ~torch.isfinite(grad_norm.float())]).to(torch.float32)
        # ranks must agree: a rank that skips the update while others step would diverge or hang
        bad_loss, bad_grad = D.all_reduce_max(flags, self.ctx).tolist()
        return bool(bad_loss), bool(bad_grad)

    def _raise_nonfinite(self, epoch: int, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, bad_loss: bool) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        o = self.est_scheduler.o
        o_text = f"{o:.4g}" if o is not None else "n/a"
        last = self.run_dir / "checkpoints" / "last.pt"
        kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"
        loss_value, norm_value = float(loss.detach()), float(grad_norm)
        what = "loss" if bad_loss else "gradient"
        where = "" if self.ctx.world_size == 1 else " on at least one rank"
        raise NonFiniteLossError(
            f"non-finite {what}{where} (loss {loss_value:.4g}, gradient norm {norm_value:.4g}) at epoch {epoch + 1}, step {step + 1} "
            f"(lr {lr:.4g}, o {o_text}); training stopped, "
            f"{kept}. Lower optim.lr, add lr_schedule.warmup_epochs or train.grad_clip, or set train.nonfinite=skip"
        )

    def _global_sums(self, sums: torch.Tensor) -> list[float]:
        """The epoch's running sums over all ranks (a collective: every rank calls it at the same step)."""
        return D.all_reduce_sum(sums.clone(), self.ctx).tolist()

    def _update_bar(self, sums: torch.Tensor, epoch_start: float, step: int) -> None:
        self.bar.update(1)
        # reading the sums synchronises with the GPU: refresh the numbers every few steps only
        if self.bar.disable or (step % 10 and step != self.steps_per_epoch):
            return
        loss_sum, c1, _, count, _ = sums.tolist()
        seconds = time.perf_counter() - epoch_start
        o = self.est_scheduler.o
        postfix = {"loss": f"{loss_sum / max(count, 1):.3f}", "acc": f"{_accuracy(c1, count):.1f}"}
        if o is not None:
            postfix["o"] = f"{o:.2f}"
        postfix["lr"] = f"{self.optimizer.param_groups[0]['lr']:.2e}"
        postfix["img/s"] = f"{count * self.ctx.world_size / max(seconds, 1e-9):.0f}"
        self.bar.set_postfix(postfix, refresh=False)

    def _check_stop(self, epoch: int, step: int, sums: torch.Tensor | None = None, seconds: float = 0.0) -> None:
        """After a step (or an epoch): if SIGINT/SIGTERM arrived on any rank, checkpoint and stop."""
        signum = int(self._stop.signum or 0)
        if self.ctx.distributed:  # every rank must stop at the same step, or collectives would hang
            flag = torch.tensor([float(signum)], device=self.device)
            signum = int(D.all_reduce_max(flag, self.ctx).item())
        if not signum:
            return
        if step == self.steps_per_epoch:
            return  # the epoch is complete: stop right after its evaluation and checkpoint
        partial = None if step == 0 else {"sums": self._global_sums(sums), "seconds": seconds}
        self._save("last", epoch=epoch, step_in_epoch=step, partial=partial)
        self.bar.close()
        raise TrainingInterrupted(signum, self.run_dir, _resume_command(self.run_dir))

    def _end_epoch(self, epoch: int, row: dict) -> None:
        self.history.append(row)
        best = max(self.history, key=lambda r: (r["test_top1"], -r["epoch"]))
        if self.ctx.is_main:
            self.writer.write_metrics(self.history)
            self.writer.log_scalars(row)
        final = epoch + 1 == self.cfg.train.epochs
        if best is row:
            self._save("best", epoch=epoch + 1)
        if final or (epoch + 1) % self.cfg.train.checkpoint_every == 0:
            self._save("last", epoch=epoch + 1)
        if self.ctx.is_main:
            self.writer.write_summary(self._summary(complete=final))

    def _save(self, which: str, *, epoch: int, step_in_epoch: int = 0, partial: dict | None = None) -> None:
        """Write checkpoints/<which>.pt (rank 0); ``epoch`` counts finished epochs."""
        if not self.ctx.is_main:
            return
        model_state = self.model.state_dict()
        bad = nonfinite_entries(model_state)
        if bad:  # never write (nor call good) a checkpoint of a diverged model
            last = self.run_dir / "checkpoints" / "last.pt"
            kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written"
            more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
            raise NonFiniteLossError(
                f"the model's weights or statistics became non-finite (NaN/inf in {', '.join(bad[:3])}{more}) at epoch {epoch + 1 if step_in_epoch else epoch}"
                f"{f', step {step_in_epoch}' if step_in_epoch else ''}; training stopped without writing checkpoints/{which}.pt, "
                f"{kept}. Lower optim.lr, add lr_schedule.warmup_epochs or train.grad_clip")
        state = {
            "model": model_state,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "estimator_scheduler": self.est_scheduler.state_dict(),
            "epoch": int(epoch),
            "step_in_epoch": int(step_in_epoch),
            "partial": partial,
            "rng": rng_state(),
            "config": config_to_dict(self.cfg),
            "metrics": [{k: _clean(v) for k, v in row.items()} for row in self.history],
            "elapsed": self.elapsed_before + time.perf_counter() - self.session_start,
            "skipped_total": self.skipped_total,
            "indicators": self.tracker.state_dict() if self.tracker is not None and hasattr(self.tracker, "state_dict") else None,
            "world_size": self.ctx.world_size,
            "steps_per_epoch": self.steps_per_epoch,
            "torch_version": str(torch.__version__),  # TorchVersion is a str subclass weights_only refuses
        }
        save_checkpoint(state, self.run_dir / "checkpoints" / f"{which}.pt")

    def _summary(self, complete: bool) -> dict:
        cfg = self.cfg
        rows = self.history
        final = rows[-1] if rows else {}
        best = max(rows, key=lambda r: (r["test_top1"], -r["epoch"])) if rows else {}
        seconds = self.elapsed_before + time.perf_counter() - self.session_start
        return {
            "final_top1": final.get("test_top1"),
            "best_top1": best.get("test_top1"),
            "best_epoch": best.get("epoch"),
            "final_top5": final.get("test_top5"),
            "best_top5": best.get("test_top5"),
            "final_test_loss": final.get("test_loss"),
            "epochs": len(rows),
            "planned_epochs": cfg.train.epochs,
            # the scale of the run, for reports: images actually used (all ranks), steps per epoch
            "train_images": getattr(self.train_loader, "dataset_size", None),
            "test_images": getattr(self.test_loader, "dataset_size", None),
            "steps_per_epoch": self.steps_per_epoch,
            "complete": complete and len(rows) == cfg.train.epochs,
            "seconds": seconds,
            "skipped_batches": self.skipped_total,
            "model": cfg.model.name,
            "dataset": cfg.data.name,
            "data_source": getattr(self.train_loader, "source", None),  # the folder actually read
            "precision": cfg.model.precision,
            "estimator": cfg.model.estimator,
            "o_end": cfg.estimator.o_end,
            "o_schedule": cfg.estimator.schedule,
            "seed": cfg.seed,
            "world_size": self.ctx.world_size,
            "run_dir": str(self.run_dir),
            "init_from": cfg.model.init_from,
            "teacher": cfg.train.teacher,
            # the teacher's forward time over the epochs run, per step (rank 0's)
            "teacher_ms_per_step": (sum(r["teacher_ms_per_step"] for r in rows) / len(rows)
                                    if rows and all(r.get("teacher_ms_per_step") is not None for r in rows) else None),
        }

    def _print_summary(self, s: dict) -> None:
        def pct(v):
            return "n/a" if v is None else f"{v:.2f}%"

        minutes, seconds = divmod(s["seconds"], 60)
        print(
            f"\n{s['model']} {s['precision']} {s['estimator']} on {s['dataset']}: {s['epochs']} epoch{'' if s['epochs'] == 1 else 's'} in {int(minutes)} min {seconds:.0f} s\n"
            f"  final test top-1 {pct(s['final_top1'])}  (top-5 {pct(s['final_top5'])})\n"
            f"  best  test top-1 {pct(s['best_top1'])}  at epoch {s['best_epoch']}\n"
            f"  data read from: {s['data_source']}\n"
            f"  run directory: {s['run_dir']}",
            flush=True,
        )


# ----------------------------------------------------------------------------- public entry point
def resume_config(run_dir, overrides=None) -> Config:
    """The configuration of ``run_dir`` with the few overrides a resume allows (:data:`RESUME_OVERRIDABLE`)."""
    run_dir = Path(run_dir)
    restart = not (run_dir / "checkpoints" / "last.pt").is_file() and abandoned_setup(run_dir)
    if restart and not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"cannot resume {run_dir}: its set-up was stopped before it wrote anything; run the command "
                              "that started it again (it reuses the folder), or add --force to it")
    if not restart and not (run_dir / "checkpoints" / "last.pt").is_file():
        hint = ("it has no checkpoint yet; start it again with its command and --force" if _looks_like_run(run_dir)
                else "is it a run directory written by `reste train`?")
        raise CheckpointError(f"cannot resume {run_dir}: no checkpoints/last.pt there ({hint})")
    cfg = load_config(read_yaml(run_dir / "config.yaml"), check=False)
    if restart:  # nothing was trained: start the run over in the same folder
        cfg.out.dir, cfg.out.name = str(run_dir.parent), run_dir.name
    if overrides:
        from .config import parse_overrides

        nested = parse_overrides(overrides) if isinstance(overrides, (list, tuple)) else overrides
        for key in _dotted_keys(nested):
            if key not in RESUME_OVERRIDABLE:
                raise ConfigError(
                    f"cannot change {key} when resuming (it would make the run inconsistent); start a new run instead. "
                    f"Options that may change on resume: {', '.join(RESUME_OVERRIDABLE)}"
                )
        cfg = load_config(cfg, nested, check=False)
    return validate(cfg)


def _dotted_keys(nested: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in nested.items():
        if isinstance(value, dict) and key not in ("kwargs", "params"):
            keys += _dotted_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def train(config=None, *, resume=None, force: bool = False, progress: bool = True, summary: bool | None = None, overrides=None,
          **sections) -> dict:
    """Train a model; returns the summary dict (also written to ``summary.json``).

    Args:
        config: None (the defaults: binary ResNet-20 + ReSTE on Fashion-MNIST), a YAML
            path, a nested dict or a :class:`Config`.
        resume: a run directory to continue (its config is used; see :data:`RESUME_OVERRIDABLE`).
        force: overwrite an existing run directory named by ``out.name``.
        progress: progress bar, a line per epoch and the final summary on the terminal.
        summary: the final summary and run directory only (default: as ``progress``).
        overrides: ``["optim.lr=0.05", ...]`` or a nested dict, applied on top of ``config``.
        **sections: more overrides by section, e.g. ``train={"epochs": 2}, optim={"lr": 0.05}, seed=1``.

    >>> summary = train(data={"subset": 2000}, train={"epochs": 1})   # doctest: +SKIP
    """
    extra = dict(sections)
    if overrides:
        from .config import parse_overrides

        nested = parse_overrides(overrides) if isinstance(overrides, (list, tuple)) else dict(overrides)
        extra = _merge(extra, nested)
    if resume is not None:
        if config is not None:
            raise ConfigError("pass either a config or resume=RUN_DIR (a resumed run uses the config saved in its run directory)")
        cfg = resume_config(resume, extra or None)
        if not (Path(resume) / "checkpoints" / "last.pt").is_file():  # resume_config checked it is a stopped set-up
            print(f"note: {resume} was stopped during set-up, before its first checkpoint: starting it over with its config.yaml",
                  file=sys.stderr, flush=True)
            resume = None
    else:
        cfg = load_config(config, extra or None)
    return Trainer(cfg, resume=resume, force=force, progress=progress, summary=summary).fit()


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("kwargs", "params"):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
