"""Evaluation: a model over a test loader (:func:`evaluate_model`, every rank's shard summed), and
a run directory or checkpoint on its test set or another one (:func:`evaluate`, ``reste eval``)."""

from __future__ import annotations

import os
import warnings
from contextlib import nullcontext
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..models.build import build_model
from . import distributed as D
from .checkpoint import CheckpointError, load_checkpoint, load_model_weights
from .config import ConfigError, config_from_dict, data_info
from .rundir import locate_checkpoint

__all__ = ["topk_correct", "evaluate_model", "evaluate", "check_class_folders"]


def check_class_folders(loader, num_classes: int, model_source, *, strict: bool = True) -> None:
    """A class-folder test set (ImageNet) must have as many classes as the model has outputs (an
    ImageNet-100 model on a 1000-folder tree would score labels it cannot predict); ConfigError.
    Not ``strict`` (a model built for the data set's own count, as every reste before
    ``data.num_classes`` built it): a warning, since its labels are this tree's folder indices."""
    classes = getattr(loader, "classes", None)
    if classes is None or len(classes) == num_classes:
        return
    folder = getattr(loader, "folder", None) or "the data folder"
    if strict:
        raise ConfigError(
            f"{model_source} holds a model for {num_classes} classes, but {folder} has {len(classes)} class "
            "folders; give the data root of the tree it was trained on (--root)"
        )
    warnings.warn(
        f"{model_source} holds a model for {num_classes} classes and {folder} has {len(classes)} class folders: "
        "its labels are taken as this tree's folder order (sorted names)",
        UserWarning,
        stacklevel=3,
    )


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Number of samples whose label is the top-1 / among the top-5 predictions (as tensors, no sync)."""
    k = min(5, num_classes)
    top = logits.topk(k, dim=1).indices
    hits = top.eq(labels.view(-1, 1))
    return hits[:, 0].sum(), hits.any(dim=1).sum()


def _accuracy(correct: float, count: float) -> float:
    return 100.0 * correct / count if count else float("nan")


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loader,
    device,
    *,
    num_classes: int,
    amp: str = "none",
    channels_last: bool = False,
    ctx: D.DistContext | None = None,
) -> dict:
    """Loss, top-1 and top-5 (percent) of ``model`` over ``loader``.

    In a distributed run every rank evaluates its shard of the test set and the sums are
    all-reduced, so every rank gets the metrics of the whole test set.
    """
    ctx = ctx or D.DistContext(device=torch.device(device))
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, count
    bf16 = amp == "bf16"
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16) if bf16 else nullcontext()
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        c1, c5 = topk_correct(logits, labels, num_classes)
        count = torch.tensor(float(labels.numel()), dtype=torch.float64, device=device)
        totals += torch.stack([loss.double(), c1.double(), c5.double(), count])
    D.all_reduce_sum(totals, ctx)
    model.train(was_training)
    loss_sum, c1, c5, count = totals.tolist()
    return {
        "loss": loss_sum / count if count else float("nan"),
        "top1": _accuracy(c1, count),
        "top5": _accuracy(c5, count) if num_classes > 5 else None,
        "count": int(count),
    }


def evaluate(
    source: str | os.PathLike[str],
    *,
    data: str | None = None,
    root: str | None = None,
    batch_size: int | None = None,
    subset: int | str | None = "run",
    device: str = "auto",
    which: str = "best",
    amp: str | None = None,
) -> dict:
    """Evaluate a run directory or checkpoint on its test set (or another data set's).

    Args:
        source: a run directory (uses ``checkpoints/<which>.pt``) or a ``.pt`` file.
        data, root: evaluate on this data set / data folder instead of the run's.
        batch_size: evaluation batch (default: the run's ``data.test_batch_size``).
        subset: ``"run"``: the test images the run reported on (its ``data.subset`` and
            ``data.test_subset``; another data set is used whole); None: the whole test set;
            N: the first ``N // 5`` test images (as ``data.subset`` does).
        device: ``auto``, ``cpu``, ``cuda`` ...
        which: ``best`` or ``last`` when ``source`` is a run directory (best, as ``reste export``).
        amp: ``bf16`` or ``none`` (default: the run's ``train.amp``).

    Returns ``{"top1", "top5", "loss", "count", "checkpoint", "epoch", "data", "subset", "test_subset"}``.
    """
    from reste import data as rdata

    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise ConfigError(f"batch_size must be a whole number >= 1 or None (the run's), got {batch_size!r}")
    if subset not in ("run", None) and (not isinstance(subset, int) or isinstance(subset, bool) or subset < 1):
        raise ConfigError(
            f"subset must be 'run', None (the whole test set) or a number of training images >= 1 (the first "
            f"N // 5 test images), got {subset!r}"
        )
    dev = D.resolve_device(device, key="device")
    path = locate_checkpoint(source, which)
    state = load_checkpoint(path, required=("model", "config"))
    try:
        cfg = config_from_dict(state["config"])
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {path} has an invalid config: {err}") from None
    trained_on = data_info(cfg)
    name = data or cfg.data.name
    try:
        meta = rdata.info(name)
    except ValueError as err:
        raise ConfigError(f"--data: {err}") from None
    if rdata.canonical_name(name) == rdata.canonical_name(cfg.data.name):
        meta = trained_on  # its class count (data.num_classes: an ImageNet-100 tree's 100)
    if (meta.num_classes, meta.in_channels) != (trained_on.num_classes, trained_on.in_channels):
        raise ConfigError(
            f"the model was trained on {cfg.data.name} ({trained_on.num_classes} classes, "
            f"{trained_on.in_channels} channels) "
            f"and cannot be evaluated on {name} ({meta.num_classes} classes, {meta.in_channels} channels)"
        )
    model = build_model(cfg, trained_on).to(dev)
    load_model_weights(model, state["model"], path)
    batch = batch_size or cfg.data.test_batch_size or cfg.data.batch_size
    test_subset = None
    if subset == "run":  # the same create_loaders call as training: the same test images
        if rdata.canonical_name(name) == rdata.canonical_name(cfg.data.name):
            subset, test_subset = cfg.data.subset, cfg.data.test_subset
        else:
            subset = None
    _, test_loader = rdata.create_loaders(
        name,
        root=root if root is not None else (cfg.data.root if data is None else None),
        batch_size=batch,
        test_batch_size=batch,
        augment=False,
        seed=cfg.seed,
        device=dev,
        subset=cast("int | None", subset),  # not "run"
        test_subset=test_subset,
        test_only=True,
    )
    check_class_folders(test_loader, meta.num_classes, path, strict=cfg.data.num_classes is not None)
    result = evaluate_model(model, test_loader, dev, num_classes=meta.num_classes, amp=amp or cfg.train.amp)
    result.update(
        {
            "checkpoint": str(path),
            "epoch": int(state.get("epoch", 0)),
            "data": rdata.canonical_name(name),
            "subset": subset,
            "test_subset": test_subset,
        }
    )
    return result
