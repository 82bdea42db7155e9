"""Light-weight loaders for data sets that fit in memory (MNIST-likes, CIFAR).

The whole split is held as one uint8 tensor on the target device; a batch is
an index gather followed by the batched augmentation of
:mod:`reste.data.augment` and normalisation, so there are no worker
processes, no per-image Python and no host-to-device copies per batch.

Determinism: everything random in an epoch (the shuffle permutation, every
crop offset and flip) is drawn up front from one CPU ``torch.Generator``
seeded from ``(seed, epoch)``. Same seed and epoch -> identical batches on
any device and for any number of ranks; ``set_epoch(epoch)`` reshuffles;
``set_epoch(epoch, start_batch=k)`` resumes an interrupted epoch exactly at
batch ``k`` without replaying the first ``k`` batches.
"""

from __future__ import annotations

import hashlib
import math

import torch

from .augment import Normalizer, draw_crop_offsets, draw_flip_mask, horizontal_flip, random_crop

__all__ = ["InMemoryLoader", "epoch_seed", "shard_range"]


def epoch_seed(seed: int, epoch: int, stream: str = "train") -> int:
    """A 63-bit seed derived from ``(seed, epoch)``; stable across processes
    and Python versions (unlike ``hash()``), and well mixed so that seed s,
    epoch e+1 and seed s+1, epoch e do not share a stream."""
    digest = hashlib.blake2b(f"reste.data/{stream}/{seed}/{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def shard_range(num_items: int, rank: int, world_size: int, equal: bool) -> tuple[int, int]:
    """[start, stop) of rank ``rank``'s contiguous slice of ``num_items``.

    ``equal=True`` (training): every rank gets ``num_items // world_size``
    items, so all ranks run the same number of steps (a rank with one extra
    batch would deadlock collective ops); the at most ``world_size - 1``
    leftover items of the epoch's permutation are skipped (different ones
    each epoch). ``equal=False`` (evaluation): the slices cover every item,
    their sizes differing by at most one.
    """
    if equal:
        per_rank = num_items // world_size
        return rank * per_rank, (rank + 1) * per_rank
    base, extra = divmod(num_items, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class InMemoryLoader:
    """Iterable of ``(images float32 NCHW normalised, labels int64)`` batches.

    Args:
        images: uint8 tensor ``(N, C, H, W)`` (any device; moved to ``device``).
        labels: integer tensor ``(N,)``.
        batch_size: batch size *per rank*.
        mean, std: per-channel normalisation statistics in [0, 1] units.
        shuffle: reshuffle every epoch (training) or keep file order (test).
        crop_padding: random-crop augmentation after zero padding by this
            many pixels (0 = off).
        horizontal_flip: random left-right flips with probability 1/2.
        seed: base seed; each epoch uses ``epoch_seed(seed, epoch)``.
        device: where data is stored and batches are produced.
        drop_last: drop the last incomplete batch -- except when it is the
            only batch, so tiny ``subset`` smoke runs still get data.
        rank, world_size: shard the data (see :func:`shard_range`).
        equal_shards: shard as for training (equal sizes, tail skipped) or as
            for evaluation (cover everything).

    Call ``set_epoch(epoch)`` before each epoch, as with
    ``DistributedSampler``: without it every epoch repeats epoch 0's order.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        mean,
        std,
        shuffle: bool = False,
        crop_padding: int = 0,
        horizontal_flip: bool = False,
        seed: int = 0,
        device="cpu",
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        equal_shards: bool = True,
    ):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"device={device!r} but CUDA is not available to this PyTorch ({torch.__version__}); use device='cpu', "
                "or install a CUDA build of torch on a machine with a GPU"
            )
        self.images = images.to(self.device).contiguous()
        self.labels = labels.to(device=self.device, dtype=torch.int64)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.crop_padding = int(crop_padding)
        self.horizontal_flip = bool(horizontal_flip)
        self.seed = int(seed)
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        self.equal_shards = equal_shards
        self.normalize = Normalizer(mean, std, self.device)
        self.epoch = 0
        self.start_batch = 0
        self.source: str | None = None  # where the data was read from (set by create_loaders)

        start, stop = shard_range(len(self.images), rank, world_size, equal_shards)
        self._shard = (start, stop)
        shard_size = stop - start
        if drop_last and shard_size >= self.batch_size:
            self._num_batches = shard_size // self.batch_size
        else:
            self._num_batches = math.ceil(shard_size / self.batch_size)
        #: samples this rank yields in one full epoch
        self.num_samples = min(shard_size, self._num_batches * self.batch_size)

    # -- public API ------------------------------------------------------------
    @property
    def dataset_size(self) -> int:
        """Number of images in the underlying split (all ranks together)."""
        return len(self.images)

    @property
    def augment(self) -> bool:
        return self.crop_padding > 0 or self.horizontal_flip

    def __len__(self) -> int:
        """Batches per full epoch on this rank (independent of ``start_batch``)."""
        return self._num_batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select epoch ``epoch``'s shuffle and augmentation; iteration then
        starts at batch ``start_batch`` (for exact mid-epoch resume)."""
        if not 0 <= start_batch <= self._num_batches:
            raise ValueError(f"start_batch must be in [0, {self._num_batches}], got {start_batch}")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def __iter__(self):
        order, offsets, flips = self._epoch_plan()
        for batch in range(self.start_batch, self._num_batches):
            lo = batch * self.batch_size
            hi = lo + self.batch_size
            index = order[lo:hi]
            images = self.images[index]
            if offsets is not None:
                images = random_crop(images, self.crop_padding, offsets[lo:hi])
            if flips is not None:
                images = horizontal_flip(images, flips[lo:hi])
            yield self.normalize(images), self.labels[index]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dataset_size={self.dataset_size}, num_samples={self.num_samples}, "
            f"batch_size={self.batch_size}, batches={len(self)}, shuffle={self.shuffle}, "
            f"crop_padding={self.crop_padding}, horizontal_flip={self.horizontal_flip}, "
            f"rank={self.rank}/{self.world_size}, device={self.device})"
        )

    # -- internals -------------------------------------------------------------
    def _epoch_plan(self):
        """This rank's sample order and augmentation parameters for the epoch.

        Drawn for the *whole* permutation before sharding, so a sample's
        augmentation does not depend on the number of ranks.
        """
        total = len(self.images)
        generator = None
        if self.shuffle or self.augment:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(total, generator=generator) if self.shuffle else torch.arange(total)
        offsets = draw_crop_offsets(total, self.crop_padding, generator) if self.crop_padding else None
        flips = draw_flip_mask(total, generator) if self.horizontal_flip else None
        start, stop = self._shard

        def to_shard(tensor):
            return None if tensor is None else tensor[start:stop].to(self.device)

        return to_shard(order), to_shard(offsets), to_shard(flips)
