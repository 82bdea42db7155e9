"""How a run fails, and what its errors say: a non-finite loss, gradient or weight
(:class:`NonFiniteLossError`), a diverging run, and a collective operation that failed because
another rank died or hung (:class:`DistributedFailure`). Each message names the last good checkpoint."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch

from ..errors import ReSTEError
from . import distributed as D
from .rundir import checkpoint_path
from .signals import resume_command

__all__ = ["NonFiniteLossError", "DistributedFailure"]


class NonFiniteLossError(ReSTEError, RuntimeError):
    """The loss or the gradient became NaN/inf and ``train.nonfinite`` is ``stop`` (exit code 1)."""


class DistributedFailure(ReSTEError, RuntimeError):
    """A collective operation failed in a distributed run: another rank died, hung past
    ``train.dist_timeout_s``, or the network failed. The message says how to resume (exit code 1)."""


# substrings of the errors gloo and NCCL raise when a peer is gone or too slow
_COLLECTIVE_FAILURE_MARKERS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "pair closure",
    "Timed out",
    "timed out",
    "NCCL",
    "gloo",
)

_ADVICE = "Lower optim.lr, add lr_schedule.warmup_epochs or train.grad_clip"


def _is_collective_failure(err: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    return isinstance(err, RuntimeError) and any(marker in str(err) for marker in _COLLECTIVE_FAILURE_MARKERS)


def _kept(run_dir: Path, none: str = "no checkpoint was written") -> str:
    last = checkpoint_path(run_dir, "last")
    return f"the last good checkpoint is {last}" if last.is_file() else none


def distributed_failure(err: BaseException, run_dir: Path, rank: int, timeout_s) -> DistributedFailure:
    """The error that replaces a failed collective: what probably happened and how to resume."""
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    last = checkpoint_path(run_dir, "last")
    kept = (
        f"the last good checkpoint is {last}; resume with `{resume_command(run_dir)}`"
        if last.is_file()
        else "no checkpoint was written yet"
    )
    return DistributedFailure(
        f"a collective operation failed on rank {rank} ({first[:300]}): another rank probably died, hung for "
        f"longer than train.dist_timeout_s={timeout_s} s, or lost its network (see the other ranks' "
        f"messages); {kept}"
    )


def nonfinite(loss: torch.Tensor, grad_norm: torch.Tensor, ctx: D.DistContext) -> tuple[bool, bool]:
    """Whether the loss / the gradient norm is NaN or inf on any rank (one sync per step)."""
    flags = torch.stack([~torch.isfinite(loss.detach().float()), ~torch.isfinite(grad_norm.float())]).to(torch.float32)
    # ranks must agree: a rank that skips the update while others step would diverge or hang
    bad_loss, bad_grad = D.all_reduce_max(flags, ctx).tolist()
    return bool(bad_loss), bool(bad_grad)


def nonfinite_step_error(
    run_dir: Path,
    epoch: int,
    step: int,
    loss: torch.Tensor,
    grad_norm: torch.Tensor,
    bad_loss: bool,
    *,
    lr: float,
    o: float | None,
    world_size: int,
) -> NonFiniteLossError:
    """The error of a step whose loss or gradient was not finite with ``train.nonfinite=stop``."""
    o_text = f"{o:.4g}" if o is not None else "n/a"
    loss_value, norm_value = float(loss.detach()), float(grad_norm)
    what = "loss" if bad_loss else "gradient"
    where = "" if world_size == 1 else " on at least one rank"
    return NonFiniteLossError(
        f"non-finite {what}{where} (loss {loss_value:.4g}, gradient norm {norm_value:.4g}) at epoch {epoch + 1}, "
        f"step {step + 1} "
        f"(lr {lr:.4g}, o {o_text}); training stopped, "
        f"{_kept(run_dir, 'no checkpoint was written yet')}. {_ADVICE}, or set train.nonfinite=skip"
    )


def nonfinite_weights_error(
    run_dir: Path, bad: list[str], which: str, epoch: int, step_in_epoch: int
) -> NonFiniteLossError:
    """The error of a checkpoint refused because the model's weights or statistics are not finite."""
    more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
    return NonFiniteLossError(
        f"the model's weights or statistics became non-finite (NaN/inf in {', '.join(bad[:3])}{more}) at epoch "
        f"{epoch + 1 if step_in_epoch else epoch}{f', step {step_in_epoch}' if step_in_epoch else ''}; "
        "training stopped "
        f"without writing checkpoints/{which}.pt, {_kept(run_dir)}. {_ADVICE}"
    )


def check_divergence(
    run_dir: Path, epoch: int, row: dict, *, steps_per_epoch: int, num_classes: int, lr: float, warn: bool
) -> None:
    """Fail a run that skipped most of an epoch; warn (``warn``: rank 0) about one whose loss ran far above chance."""
    skipped = row.get("skipped_batches", 0)
    if skipped * 2 > steps_per_epoch:
        raise NonFiniteLossError(
            f"epoch {epoch + 1} skipped {skipped} of {steps_per_epoch} batches for a non-finite loss or gradient "
            f"(train.nonfinite=skip): the run is diverging, not training; stopped before writing this epoch's "
            "checkpoint, "
            f"{_kept(run_dir)}. {_ADVICE}"
        )
    loss, chance = row.get("train_loss"), math.log(max(num_classes, 2))
    if isinstance(loss, float) and math.isfinite(loss) and loss > 100 * chance and warn:
        warnings.warn(
            f"epoch {epoch + 1}: train loss {loss:.3g} is {loss / chance:.3g} times that of guessing "
            f"(ln {num_classes} = {chance:.2f}): the run has diverged; lower optim.lr (now {lr:g})",
            stacklevel=2,
        )
