"""Distillation from a trained teacher (``train.teacher``), as BNN papers train their best models.

The loss of a step, with student logits ``z_s``, teacher logits ``z_t``, temperature ``T``
(``train.distill_temperature``) and weight ``w`` (``train.distill_weight``)::

    p_t = softmax(z_t / T),  log q_s = log_softmax(z_s / T)
    KL  = sum_c p_t[c] * (log p_t[c] - log q_s[c])          (mean over the batch)
    loss = (1 - w) * cross_entropy(z_s, labels) + w * T^2 * KL

``w = 1, T = 1`` is ReActNet's distributional loss (the student learns the teacher's
distribution only; KL and ReActNet's cross-entropy with soft targets differ by the
teacher's entropy, a constant, so their gradients are equal). ``T^2`` keeps the gradient
scale of the soft term independent of ``T`` (Hinton et al.).

The teacher is any run of ``reste train`` (or a checkpoint with its config): rebuilt from
its config, loaded, put in eval mode with ``requires_grad`` off, and run under
``torch.no_grad()`` on each rank's own batch (it is never wrapped in DDP: it has no
gradients to reduce). Its forward time is measured per step and reported per epoch
(``teacher_ms_per_step`` in metrics and on the epoch line).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import CheckpointError, load_checkpoint, load_model_weights
from .warmstart import checkpoint_of, source_config

__all__ = ["distillation_loss", "Teacher"]


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, averaged over the batch."""
    t = float(temperature)
    log_q = F.log_softmax(student_logits.float() / t, dim=1)
    log_p = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * (t * t)


class Teacher:
    """The frozen teacher of a run and the loss it adds; ``seconds``/``steps`` count its cost."""

    def __init__(self, model: nn.Module, weight: float, temperature: float, source: str = ""):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.weight, self.temperature, self.source = float(weight), float(temperature), source
        self.seconds, self.steps = 0.0, 0

    @classmethod
    def from_source(cls, source, cfg, meta, device, channels_last: bool = False) -> Teacher:
        """The teacher of ``train.teacher=source`` for a run of ``cfg`` on the data set ``meta``."""
        from ..models.build import build_model
        from .config import config_from_dict, data_info

        path = checkpoint_of(source, "train.teacher")
        state = load_checkpoint(path, map_location="cpu", required=("model",))
        config = source_config(Path(path), state)
        if config is None:
            raise CheckpointError(
                f"train.teacher={str(source)!r}: {path} holds no config and no config.yaml is beside it; "
                "the teacher's architecture is unknown (give its run directory)"
            )
        tcfg = config_from_dict(config)
        from reste import data as rdata

        if rdata.canonical_name(tcfg.data.name) != rdata.canonical_name(cfg.data.name):
            raise CheckpointError(
                f"train.teacher={str(source)!r} was trained on {tcfg.data.name}, this run uses {cfg.data.name}; "
                "a teacher must see the same images, normalised the same way"
            )
        teacher_meta = data_info(tcfg)
        if teacher_meta.num_classes != meta.num_classes:
            raise CheckpointError(
                f"train.teacher={str(source)!r} has {teacher_meta.num_classes} outputs, this run's model "
                f"{meta.num_classes}; a teacher must be trained on the same classes"
            )
        model = build_model(tcfg, teacher_meta)
        load_model_weights(model, state["model"], path)
        model = model.to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # not in torch's stubs
        label = f"{path} ({tcfg.model.name} {tcfg.model.precision}, epoch {state.get('epoch', '?')})"
        return cls(model, cfg.train.distill_weight, cfg.train.distill_temperature, label)

    def loss(self, images: Tensor, student_logits: Tensor, ce_loss: Tensor, autocast=None) -> Tensor:
        """The step's loss: ``(1 - w) * ce_loss + w * T^2 * KL`` (see the module docstring)."""
        sync = images.device.type == "cuda"
        if sync:
            torch.cuda.synchronize(images.device)
        start = time.perf_counter()
        with torch.no_grad(), autocast or nullcontext():
            teacher_logits = self.model(images)
        if sync:
            torch.cuda.synchronize(images.device)
        self.seconds += time.perf_counter() - start
        self.steps += 1
        soft = distillation_loss(student_logits, teacher_logits, self.temperature)
        return soft if self.weight == 1.0 else (1.0 - self.weight) * ce_loss + self.weight * soft

    def pop_epoch_stats(self) -> dict:
        """``teacher_ms_per_step`` since the last call (this rank's), then reset."""
        ms = 1000.0 * self.seconds / self.steps if self.steps else None
        self.seconds, self.steps = 0.0, 0
        return {"teacher_ms_per_step": ms}
