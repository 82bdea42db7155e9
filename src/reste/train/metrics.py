"""What a run measures: the training half of an epoch's metrics row, the epoch's mean o, and the
run's summary (``summary.json``, the final lines on the terminal, what :func:`reste.train.train` returns)."""

from __future__ import annotations

import os

from .config import Config
from .evaluation import _accuracy
from .state import TrainState

__all__ = ["train_row", "epoch_mean_o", "run_summary", "estimators_in_use"]


def train_row(
    epoch: int,
    totals: list[float],
    *,
    num_classes: int,
    lr: float,
    o: float | None,
    o_mean: float | None,
    train_seconds: float,
) -> dict:
    """The epoch's row from its sums over all ranks (loss, top-1, top-5, count, skipped batches)."""
    loss_sum, c1, c5, count, skipped = totals
    return {
        "epoch": epoch + 1,
        "train_loss": loss_sum / count if count else float("nan"),
        "train_top1": _accuracy(c1, count),
        "train_top5": _accuracy(c5, count) if num_classes > 5 else None,
        "lr": lr,
        "o": o,
        "o_mean": o_mean,
        "images_per_s": count / train_seconds if train_seconds > 0 else float("nan"),
        "train_time": train_seconds,
        "skipped_batches": int(round(skipped)),  # counted on rank 0 only: every rank skips the same batches
    }


def epoch_mean_o(sched, epoch: int) -> float | None:
    """The mean of o over the epoch's steps of the :class:`reste.EstimatorScheduler` ``sched``, from its
    schedule (so a resumed epoch gets the same value); ``o`` in the row is the last step's."""
    if sched.o is None:
        return None
    if sched.per == "epoch":
        return sched.schedule(epoch / sched.epochs)
    total = sched.epochs * sched.steps_per_epoch
    first = epoch * sched.steps_per_epoch
    return sum(sched.schedule((first + k) / total) for k in range(sched.steps_per_epoch)) / sched.steps_per_epoch


def _absolute(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(path)


def run_summary(
    cfg: Config,
    state: TrainState,
    *,
    complete: bool,
    train_loader,
    test_loader,
    steps_per_epoch: int,
    world_size: int,
    run_dir,
    kernels: str = "",
    machine: dict | None = None,
    estimators: str | None = None,
    has_o: bool = True,
) -> dict:
    """The summary of a run: final and best accuracy, time, scale and what was trained; ``complete``
    only when it has all ``train.epochs`` rows. ``machine`` (:func:`reste._platform.run_machine`) and
    ``estimators`` (:func:`estimators_in_use`) are the session's, computed once by the caller."""
    rows = state.history
    final = rows[-1] if rows else {}
    best = state.best_row() or {}
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
        "train_images": getattr(train_loader, "dataset_size", None),
        "test_images": getattr(test_loader, "dataset_size", None),
        "steps_per_epoch": steps_per_epoch,
        "complete": complete and len(rows) == cfg.train.epochs,
        "seconds": state.elapsed,
        "skipped_batches": state.skipped_total,
        "model": cfg.model.name,
        "dataset": cfg.data.name,
        "data_source": _absolute(getattr(train_loader, "source", None)),  # the folder actually read
        "estimator_kernels": kernels or None,  # the estimators' code path (reste.ops.kernel_info)
        # what the last session of training ran on (a resumed run may have run elsewhere before)
        "machine": machine,
        "precision": cfg.model.precision,
        "estimator": estimators,
        # the o schedule only where a ReSTE uses it (not for FP, DoReFa weights without ReSTE, ...)
        "o_end": cfg.estimator.o_end if has_o else None,
        "o_schedule": cfg.estimator.schedule if has_o else None,
        "seed": cfg.seed,
        "world_size": world_size,
        "run_dir": str(run_dir),
        "init_from": cfg.model.init_from,
        "teacher": cfg.train.teacher,
        # the teacher's forward time over the epochs run, per step (rank 0's)
        "teacher_ms_per_step": (
            sum(r["teacher_ms_per_step"] for r in rows) / len(rows)
            if rows and all(r.get("teacher_ms_per_step") is not None for r in rows)
            else None
        ),
    }


def estimators_in_use(model) -> str | None:
    """The estimators of the model's binary layers, weights' and inputs' (``reste``, ``dorefa``, or
    ``dorefa+ste`` when they differ); None for a model without binary layers."""
    from ..models import describe

    layers = describe(model).layers
    names = {l.weights for l in layers if l.weights != "real"} | {l.inputs for l in layers if l.inputs != "real"}
    return "+".join(sorted(names)) or None
