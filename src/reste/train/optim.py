"""The optimizer and the learning-rate schedule of a run, from ``cfg.optim`` and ``cfg.lr_schedule``."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import Config

__all__ = ["lr_factor", "build_optimizer", "build_lr_scheduler", "realign_step_schedule"]


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
    opt = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if opt.decay_all or opt.weight_decay == 0:
        groups = [{"params": params, "weight_decay": opt.weight_decay}]
    else:
        # 0-d and 1-d tensors are BatchNorm scales/shifts, biases and estimator parameters
        decay = [p for p in params if p.dim() > 1]
        no_decay = [p for p in params if p.dim() <= 1]
        groups = [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if opt.name == "sgd":
        return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov)
    betas = tuple(opt.betas)
    if opt.name == "adam":
        return torch.optim.Adam(groups, lr=opt.lr, betas=betas)
    return torch.optim.AdamW(groups, lr=opt.lr, betas=betas)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int):
    """A ``LambdaLR`` stepping :func:`lr_factor` per epoch or per step (``lr_schedule.per``)."""
    s = cfg.lr_schedule
    epochs = cfg.train.epochs
    if s.per == "step":
        total = epochs * steps_per_epoch
        warmup = int(round(s.warmup_epochs * steps_per_epoch))
    else:
        total, warmup = epochs, int(s.warmup_epochs)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda unit: lr_factor(unit, total, warmup, s.name, s.final_lr_ratio)
    )


def realign_step_schedule(
    sched, optimizer: torch.optim.Optimizer, cfg: Config, epoch: int, steps_per_epoch: int
) -> None:
    """At an epoch boundary with a different number of steps per epoch (another number of
    ranks or data size): put a per-step lr schedule at ``epoch``'s first step."""
    if cfg.lr_schedule.per != "step":
        return  # per-epoch schedules count epochs, which did not change
    unit = epoch * steps_per_epoch
    sched.last_epoch = unit
    sched._last_lr = [base * fn(unit) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, sched._last_lr):
        group["lr"] = lr
