"""The pieces a :class:`reste.train.Trainer` builds before its first step, one function each:
the data loaders, the model (and its warm start), the teacher, the estimator schedule, the model
the steps call (DDP, compiled) and the indicator tracker. The trainer calls them in a fixed order:
building draws random numbers, and a resumed run must draw the same ones."""

from __future__ import annotations

import random
import warnings
from typing import cast

import numpy as np
import torch
from torch import nn

from ..models.build import _create_model
from ..schedules import EstimatorScheduler, o_schedule
from . import distributed as D
from .config import Config, ConfigError, data_info

__all__ = [
    "seed_everything",
    "create_loaders",
    "class_count_of_data",
    "create_model",
    "create_teacher",
    "create_estimator_scheduler",
    "compile_mode",
    "estimator_kernels",
    "wrap_model",
    "create_tracker",
]


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def create_loaders(cfg: Config, meta, ctx: D.DistContext):
    """This rank's training and test loaders (``meta``: the data set's ``reste.data.info``); a batch
    larger than the training set is a ConfigError."""
    from .. import data as rdata

    d = cfg.data
    if d.subset is None and meta.train_size < d.batch_size:
        raise ConfigError(
            f"data.batch_size ({d.batch_size}) is larger than the {d.name} training set "
            f"({meta.train_size} images); lower data.batch_size"
        )
    train_loader, test_loader = rdata.create_loaders(
        d.name,
        root=d.root,
        batch_size=d.batch_size // ctx.world_size,
        test_batch_size=d.test_batch_size,
        augment=d.augment,
        download=d.download,
        seed=cfg.seed,
        device=ctx.device,
        num_workers=d.num_workers,
        subset=d.subset,
        test_subset=d.test_subset,
        crop_scale=None if meta.in_memory else tuple(d.crop_scale),  # in-memory sets have no RandomResizedCrop
        rank=ctx.rank,
        world_size=ctx.world_size,
        drop_last=True,
        shard_test=True,
    )
    dataset_size = getattr(train_loader, "dataset_size", None)
    if dataset_size is not None and dataset_size < d.batch_size:
        raise ConfigError(
            f"data.batch_size ({d.batch_size}) is larger than the training set ({dataset_size} images); "
            "lower data.batch_size or raise data.subset"
        )
    return train_loader, test_loader


def class_count_of_data(cfg: Config, meta, train_loader, *, tell: bool, warn: bool = True, resumed: bool = False):
    """``meta`` with the class count the model is built for. A class-folder data set (ImageNet) has
    as many classes as its training folder has class folders: with ``data.num_classes`` unset, a
    tree of 100 gets a 100-way head, and ``cfg.data.num_classes`` records it (config.yaml, the
    checkpoints and the export then rebuild that head); a ``data.num_classes`` that differs from
    the folder count is a ConfigError. A ``resumed`` run without the key was started by a reste
    that built the data set's head whatever the folders: it keeps that head, with a warning
    (``warn``: this process gives it; ``tell``: it prints the new head's message)."""
    classes = getattr(train_loader, "classes", None)
    if classes is None:
        return meta
    if len(classes) == meta.num_classes:
        if cfg.data.num_classes is None and not resumed:
            # recorded for a full tree too: only a run without the key is one of an older reste
            cfg.data.num_classes = len(classes)
        return meta
    folder = getattr(train_loader, "folder", None) or f"the {meta.name} training folder"
    if resumed and cfg.data.num_classes is None:
        if warn:
            warnings.warn(
                f"{folder} has {len(classes)} class folders, but this run was started by an older reste, which "
                f"built {meta.name}'s {meta.num_classes}-way head; it keeps that head (a new run gets a "
                f"{len(classes)}-way one)",
                UserWarning,
                stacklevel=2,
            )
        return meta
    if cfg.data.num_classes is not None:
        raise ConfigError(
            f"data.num_classes={cfg.data.num_classes}, but {folder} has {len(classes)} class folders; leave "
            f"data.num_classes out (the run then has {len(classes)} classes) or point data.root at the tree it was "
            "trained on"
        )
    cfg.data.num_classes = len(classes)
    if tell:
        print(
            f"data: {folder} has {len(classes)} class folders (not {meta.name}'s {meta.num_classes}): the model gets "
            f"a {len(classes)}-way head (data.num_classes={len(classes)})",
            flush=True,
        )
    return data_info(cfg)


def create_model(cfg: Config, meta, ctx: D.DistContext, *, warm_start: bool, tell: bool) -> tuple[nn.Module, object]:
    """The model (checked by ``check_model`` before), on the device: ``(model, init_report)``; with
    ``warm_start`` (not for a resume, which restores its own checkpoint) from ``model.init_from``."""
    t = cfg.train
    model = _create_model(cfg, meta)
    report = None
    if cfg.model.init_from is not None and warm_start:
        from .warmstart import init_from

        report = init_from(
            model, cfg.model.init_from, model_config={"name": cfg.model.name, "kwargs": cfg.model.kwargs}
        )
        if tell:
            print(f"model.init_from: {report.source}: " + "; ".join(report.lines()), flush=True)
    if t.sync_bn and ctx.distributed:
        model = D.convert_sync_batchnorm(model, ctx.device)
    model = model.to(ctx.device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # not in torch's stubs
    return model, report


def create_teacher(cfg: Config, meta, ctx: D.DistContext, *, tell: bool):
    """The frozen teacher of ``train.teacher`` (None without one)."""
    t = cfg.train
    if t.teacher is None:
        return None
    from .distill import Teacher

    teacher = Teacher.from_source(t.teacher, cfg, meta, ctx.device, t.channels_last)
    if tell:
        print(
            f"train.teacher: {teacher.source}; loss = {1 - teacher.weight:g} * CE + "
            f"{teacher.weight:g} * T^2 * KL, T = {teacher.temperature:g}",
            flush=True,
        )
    return teacher


def create_estimator_scheduler(model: nn.Module, cfg: Config, steps_per_epoch: int):
    """The :class:`reste.EstimatorScheduler` of ``cfg.estimator``."""
    e = cfg.estimator
    schedule = o_schedule(e.schedule, o_end=e.o_end, p=e.p)
    return EstimatorScheduler(model, schedule, cfg.train.epochs, steps_per_epoch, per=e.per)


def estimator_kernels(device: torch.device, compile_mode: str | None) -> str:
    """The code path of the estimators' elementwise chains in this run, in words: ``c (...)``,
    ``triton (...)``, ``torch.compile (traced formulas)`` or ``torch (PyTorch formulas (why))``."""
    if compile_mode is not None:
        return "torch.compile (the formulas, traced and fused)"
    from ..ops import kernel_info

    info = kernel_info(device)
    return f"{info['path']} ({info['why']})"


def compile_mode(setting: str | bool, device: torch.device) -> str | None:
    """The ``torch.compile`` mode ``train.compile`` asks for on ``device``: None (eager), ``"default"``
    or ``"reduce-overhead"`` (CUDA graphs too).

    ``auto`` compiles on CUDA only. On the CPU, compiled steps measured faster on the development
    VM (docs/benchmarks.md: binary ResNet-20 1.36x, VGG-small 1.21x the eager steps, 2 threads), but
    the first compilation takes minutes there, no whole run was timed with it, and inductor's CPU
    code needs a C++ compiler: ``auto`` keeps the CPU eager, ``true`` compiles. ``reduce-overhead``
    needs CUDA (a ConfigError on another device). ``True``/``False`` are read as ``true``/``false``.
    """
    value = {True: "true", False: "false"}.get(setting, setting) if isinstance(setting, bool) else str(setting)
    if value == "false" or (value == "auto" and device.type != "cuda"):
        return None
    if value == "reduce-overhead":
        if device.type != "cuda":
            raise ConfigError(
                f"train.compile=reduce-overhead captures CUDA graphs, which need a CUDA device (training runs on "
                f"{device}); use train.compile=true to compile without them"
            )
        return "reduce-overhead"
    if value in ("auto", "true"):
        return "default"
    raise ConfigError(f"train.compile: unknown value {value!r}; choose one of auto, true, false, reduce-overhead")


def wrap_model(model: nn.Module, ctx: D.DistContext, compile: str | bool) -> nn.Module:
    """What a training step calls: ``model`` in DistributedDataParallel (several ranks), compiled as
    ``compile`` (``train.compile``, resolved on the device by :func:`compile_mode`) asks."""
    forward_model: nn.Module = model
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        device = ctx.device
        forward_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    mode = compile_mode(compile, ctx.device)
    if mode is not None:
        # an OptimizedModule, typed as a callable
        forward_model = cast(nn.Module, torch.compile(forward_model, mode=mode))
    return forward_model


def create_tracker(model: nn.Module, cfg: Config, ctx: D.DistContext, saved: dict | None):
    """The indicator tracker (rank 0, ``analysis.indicators``; None for a model without binary
    layers), with the state a resumed checkpoint ``saved`` holds."""
    if not (cfg.analysis.indicators and ctx.is_main):
        return None
    from ..nn.indicators import IndicatorTracker

    tracker = IndicatorTracker(model, cfg.estimator.o_end)
    if not len(tracker):
        return None  # a float model has nothing to measure
    indicators = saved.get("indicators") if saved is not None else None
    if indicators is not None and hasattr(tracker, "load_state_dict"):
        tracker.load_state_dict(indicators)  # e.g. the signs flip_ratio compares against
    return tracker
