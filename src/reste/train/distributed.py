"""Multi-process training with PyTorch's own machinery (``torchrun`` + DistributedDataParallel).

Launch with ``torchrun --nproc_per_node=N -m reste train ...`` (or
``python -m torch.distributed.run``); multi-node works the same way with
torchrun's ``--nnodes``/``--rdzv-*`` options. Every process reads ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` from the environment torchrun sets, joins the
process group (NCCL on GPUs, gloo on CPU) with a timeout (``train.dist_timeout_s``)
so that if one rank dies the others fail after that long instead of hanging,
and uses GPU ``cuda:LOCAL_RANK``.

SyncBatchNorm: PyTorch's ``nn.SyncBatchNorm`` only runs on accelerators, so on CPU
(gloo) :class:`CPUSyncBatchNorm` does the same job with two differentiable
all-reduces (sum and count, then the centred sum of squares): the forward uses the
statistics of the global batch and the backward carries the gradient through them.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistContext",
    "setup",
    "cleanup",
    "all_reduce_sum",
    "all_reduce_max",
    "broadcast_object",
    "broadcast_state",
    "launched_as_rank_0",
    "convert_sync_batchnorm",
    "CPUSyncBatchNorm",
]


@dataclass
class DistContext:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the files and shows the progress bar."""
        return self.rank == 0


def launched_as_rank_0() -> bool:
    """Whether torchrun's ``RANK`` makes this process rank 0 of its job (unset: a single process).
    Readable before the process group exists: it decides who prints what is said once per job."""
    return os.environ.get("RANK", "0") in ("0", "")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer; launch with torchrun") from None


def resolve_device(setting: str, local_rank: int = 0, key: str = "train.device") -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` if CUDA is available, else ``cpu``. A setting that is not
    auto, cpu, cuda or cuda:N, or names a GPU this machine lacks, is a ConfigError (exit 2) naming
    ``key``: a config key (``train.device=cpu``) or a command-line option (``--device cpu``)."""
    from ..errors import short_repr
    from .config import ConfigError, is_device_setting

    def given(value: str) -> str:
        return f"{key} {value}" if key.startswith("--") else f"{key}={value}"

    if not is_device_setting(setting):
        raise ConfigError(f"{key} must be auto, cpu, cuda or cuda:N, got {short_repr(setting)}")
    asked = setting
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{given(asked)}: CUDA is not available here; use {given('cpu')} (or auto)")
        if setting == "cuda":
            setting = f"cuda:{local_rank}"
        count = torch.cuda.device_count()
        if int(setting[5:]) >= count:
            raise ConfigError(
                f"{given(asked)}: this machine has {count} GPU{'' if count == 1 else 's'} "
                f"(cuda:0 to cuda:{count - 1}); use one of them, or {given('cuda')}"
            )
    return torch.device(setting)


def setup(device_setting: str = "auto", timeout_s: int = 600) -> DistContext:
    """Join the process group if launched by torchrun (``WORLD_SIZE > 1``); else a single process."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = resolve_device(device_setting, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), device_id=device)
        else:
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def cleanup(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op for one process); returns it."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Element-wise max over ranks in place (no-op for one process); returns it."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_object(obj, ctx: DistContext):
    """Rank 0's ``obj`` on every rank (picklable objects; used for run-dir setup results)."""
    if not ctx.distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def broadcast_state(module: nn.Module, ctx: DistContext) -> None:
    """Rank 0's parameters and buffers copied into ``module`` on every rank (no-op for one process).

    After an epoch's last step each rank's BatchNorm running statistics are its own (DDP sends rank
    0's buffers only at the start of the next forward), but rank 0's are the ones saved: without
    this, an evaluation on every rank scores the other ranks' shards of the test set with a model
    that is never written. DDP keeps the parameters equal already; they are sent too, so what is
    evaluated is exactly what rank 0 saves. Training is unchanged: the next forward would have
    broadcast the same buffers."""
    if not ctx.distributed:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


# ----------------------------------------------------------------------------- SyncBatchNorm
class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward sums the incoming gradients over ranks too."""

    @staticmethod
    def forward(ctx, tensor):
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of all ranks, for devices ``nn.SyncBatchNorm`` refuses (CPU).

    Same parameters, buffers and ``state_dict`` keys as ``BatchNorm1d/2d``; outside
    distributed training (or in eval mode) it is a plain BatchNorm.
    """

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input):
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0] + list(range(2, input.dim()))
        shape = [1, -1] + [1] * (input.dim() - 2)
        local_count = torch.tensor([input.numel() // input.size(1)], dtype=input.dtype, device=input.device)
        # two passes (mean, then centred squares) for the same accuracy as single-process BN
        totals = _AllReduceSum.apply(torch.cat([input.sum(dims), local_count]))
        count = totals[-1].detach()
        mean = totals[:-1] / count
        centred = input - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / count
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (count / (count - 1).clamp(min=1))
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
        return out


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``model`` synchronised across ranks (``nn.SyncBatchNorm`` on GPUs)."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert_cpu(model)


def _convert_cpu(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, (CPUSyncBatchNorm, nn.SyncBatchNorm)
    ):
        like: torch.Tensor | None = next(iter(module.parameters()), None)
        if like is None:
            like = module.running_mean
        sync = CPUSyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            device=like.device if like is not None else None,
            dtype=like.dtype if like is not None else None,
        )
        sync.load_state_dict(module.state_dict())
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        new = _convert_cpu(child)
        if new is not child:
            setattr(module, name, new)
    return module
