"""Data sets and loaders for training binary networks.

Public API::

    names()                       -> ["fashion_mnist", "mnist", "cifar10", "cifar100", "imagenet"]
    info(name)                    -> DatasetInfo(num_classes, in_channels, image_size, mean, std, ...)
    create_loaders(name, ...)     -> (train_loader, test_loader)
    download(name, root)          -> folder the files were put in
    load_arrays(name, root)       -> uint8 numpy arrays of an in-memory data set
    DatasetNotFoundError, CorruptDataError

In-memory data sets (MNIST-likes, CIFAR) are served by
:class:`~reste.data.loaders.InMemoryLoader`: uint8 tensors on the target
device, batched augmentation, deterministic from ``(seed, epoch)``.
ImageNet uses a torch ``DataLoader`` over class folders (needs Pillow, the
``reste[imagenet]`` extra). Importing this package needs neither Pillow nor
torchvision, nor torch (the loaders import it on first use, so ``reste datasets``
starts fast). See ``docs/data.md``.
"""

from __future__ import annotations

from .arrays import DatasetArrays, load_arrays, locate
from .catalog import DatasetInfo, canonical_name, default_root, info, names, test_image_count
from .download import download, download_file
from .errors import CorruptDataError, DatasetNotFoundError


def __getattr__(name: str):
    if name == "InMemoryLoader":  # imports torch
        from .loaders import InMemoryLoader

        return InMemoryLoader
    raise AttributeError(f"module 'reste.data' has no attribute {name!r}")


__all__ = [
    "names",
    "info",
    "create_loaders",
    "test_image_count",
    "download",
    "download_file",
    "load_arrays",
    "locate",
    "default_root",
    "DatasetInfo",
    "DatasetArrays",
    "InMemoryLoader",
    "DatasetNotFoundError",
    "CorruptDataError",
]


def create_loaders(
    name: str,
    root=None,
    batch_size: int = 128,
    test_batch_size: int | None = None,
    augment: bool = True,
    download: bool | None = None,
    seed: int = 0,
    device="cpu",
    num_workers: int = 0,
    subset: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = True,
    *,
    shard_test: bool = False,
    mirror: str | None = None,
    test_only: bool = False,
    test_subset: int | None = None,
    crop_scale: tuple[float, float] | None = None,
):
    """Return ``(train_loader, test_loader)`` for data set ``name``.

    Args:
        name: one of :func:`names`.
        root: data folder, the only place looked at when given; by default the
            per-user folder (``$RESTE_DATA``, else ``~/.cache/reste/data``), then
            system folders. See :mod:`reste.data.arrays` for every place searched.
        batch_size: training batch size *per rank*.
        test_batch_size: evaluation batch size (default ``batch_size``).
        augment: apply the recipe's training augmentation (see :func:`info`:
            random crop after ``crop_padding`` zero pixels, flips if
            ``horizontal_flip``; RandomResizedCrop + flip for ImageNet).
        download: ``None`` (default): fetch a missing data set into the per-user
            folder when no ``root`` is given, never into an explicit ``root``;
            ``True``: fetch it into ``root/<name>`` too; ``False``: never fetch.
        seed: seeds the shuffle and augmentation (with the epoch, see
            ``loader.set_epoch``).
        device: where batches are produced (in-memory sets live there).
        num_workers: decode workers for ImageNet; ignored by in-memory sets.
        subset: keep only the first ``subset`` training and the first
            ``max(1, subset // 5)`` test images (ImageNet: evenly spaced ones,
            so that classes stay mixed).
        test_subset: keep only the first ``test_subset`` test images instead (ImageNet:
            evenly spaced ones); None: as ``subset`` says (all of them without a subset).
        rank, world_size: training data is sharded into equal disjoint slices
            of the epoch's permutation (leftover ``< world_size`` samples are
            skipped that epoch). The test set is *not* sharded: every rank
            sees all of it, unless ``shard_test=True`` (disjoint slices
            covering it, sizes differing by at most one).
        drop_last: drop an incomplete last training batch (never the only one).
        mirror: base URL replacing the official one for ``download``.
        test_only: read only the test split (evaluation): the training files need not be
            present and ``train_loader`` is None (ImageNet reads both folders as before).
        crop_scale: ImageNet's training RandomResizedCrop area range ``(lo, hi)``, default
            ``(0.08, 1.0)``; the paper's code uses ``(0.08, 1.25)``. The other data sets have no
            RandomResizedCrop and refuse it (ValueError).
    """
    name = canonical_name(name)
    meta = info(name)
    if subset is not None and int(subset) < 1:
        raise ValueError(f"subset must be a positive number of images, got {subset}")
    if test_subset is not None and int(test_subset) < 1:
        raise ValueError(f"test_subset must be a positive number of images, got {test_subset}")
    if name == "imagenet":
        from .imagenet import create_imagenet_loaders  # lazily: optional extra

        if download:
            raise ValueError("ImageNet cannot be downloaded automatically; see reste.data.download('imagenet')")
        scale = {} if crop_scale is None else {"crop_scale": crop_scale}
        return create_imagenet_loaders(
            root,
            batch_size=batch_size,
            test_batch_size=test_batch_size,
            augment=augment,
            seed=seed,
            device=device,
            num_workers=num_workers,
            subset=subset,
            rank=rank,
            world_size=world_size,
            drop_last=drop_last,
            shard_test=shard_test,
            test_subset=test_subset,
            **scale,
        )
    if crop_scale is not None:
        raise ValueError(
            f"crop_scale={crop_scale!r}: {name} has no RandomResizedCrop (its augmentation is a padded random crop "
            "and flips); only imagenet takes crop_scale"
        )

    import torch

    from .loaders import InMemoryLoader

    arrays = load_arrays(name, root, download=download, mirror=mirror, test_only=test_only)
    train_x, train_y = arrays.train_images, arrays.train_labels
    test_x, test_y = arrays.test_images, arrays.test_labels
    if subset is not None:
        train_x, train_y = train_x[:subset], train_y[:subset]
    test_count = test_image_count(subset, test_subset)
    if test_count is not None:
        test_x, test_y = test_x[:test_count], test_y[:test_count]

    common = dict(mean=meta.mean, std=meta.std, seed=seed, device=device)
    train = (
        None
        if test_only
        else InMemoryLoader(
            torch.from_numpy(train_x),
            torch.from_numpy(train_y),
            batch_size=batch_size,
            shuffle=True,
            crop_padding=meta.crop_padding if augment else 0,
            horizontal_flip=meta.horizontal_flip if augment else False,
            drop_last=drop_last,
            rank=rank,
            world_size=world_size,
            equal_shards=True,
            **common,
        )
    )
    test = InMemoryLoader(
        torch.from_numpy(test_x),
        torch.from_numpy(test_y),
        batch_size=test_batch_size or batch_size,
        shuffle=False,
        drop_last=False,
        rank=rank if shard_test else 0,
        world_size=world_size if shard_test else 1,
        equal_shards=False,
        **common,
    )
    test.source = arrays.source
    if train is not None:
        train.source = arrays.source
    return train, test
