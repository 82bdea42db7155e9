"""ImageNet-style class-folder data sets (``root/train/<wnid>/*.JPEG``,
``root/val/<wnid>/*.JPEG``).

These are too big for memory, so images are decoded per sample by a torch
``DataLoader`` (use ``num_workers`` > 0). Only Pillow is needed -- imported
lazily, so ``import reste.data`` works without it; install it with
``pip install 'reste[imagenet]'``. The transforms are the standard recipe,
implemented directly with Pillow so that no torchvision is required:

* train: RandomResizedCrop(224, scale=crop_scale, ratio=(3/4, 4/3)) with
  bilinear resampling, then a random horizontal flip; ``crop_scale`` is
  (0.08, 1) by default (torchvision's), (0.08, 1.25) in the paper's code
  (``data.crop_scale`` in a config): the same algorithm, whose 10 tries simply
  reject a window larger than the image, so a larger upper bound means more
  full-image-sized crops and more centred fallbacks;
* val: Resize(256) of the shorter side, then CenterCrop(224).

Workers return uint8 tensors; conversion to float and normalisation happen
batched on the target device (4x less host-to-device traffic).

Determinism: the sampler draws, from a generator seeded with
``(seed, epoch)``, both the permutation and one seed per sample; a worker
derives that sample's crop and flip from its seed alone. Results therefore do
not depend on ``num_workers`` or on which worker decodes what.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .arrays import find_imagenet_root  # noqa: F401 - part of this module's API
from .augment import Normalizer
from .catalog import how_to_get, info, test_image_count
from .errors import CorruptDataError, DatasetNotFoundError
from .loaders import epoch_seed, shard_range

__all__ = [
    "IMAGE_EXTENSIONS",
    "require_pillow",
    "find_imagenet_root",
    "scan_class_folders",
    "ImageFolderDataset",
    "EpochShardSampler",
    "ImageFolderLoader",
    "create_imagenet_loaders",
]

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".ppm", ".bmp", ".webp")
#: the default ``crop_scale``: RandomResizedCrop's area range, as fractions of the image's area
TRAIN_SCALE = (0.08, 1.0)
TRAIN_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def require_pillow():
    """Return the ``PIL.Image`` module or raise an ImportError saying how to get it."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError(
            "the imagenet loader needs Pillow to decode images; install the optional "
            "extra with: pip install 'reste[imagenet]'  (or: pip install pillow)"
        ) from exc
    return Image


def scan_class_folders(split_dir: Path, class_to_index: dict[str, int] | None = None):
    """Sorted ``[(path, label)]`` of a class-folder split and the class names.

    With ``class_to_index`` (the training classes) the validation split is
    labelled consistently with training; a class unknown to training is an error.
    """
    # hidden entries (.ipynb_checkpoints/, macOS's ._x.JPEG AppleDouble files) are not classes or
    # images: one more class folder would shift every label
    classes = sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir() and not _hidden(entry))
    if class_to_index is None:
        class_to_index = {name: index for index, name in enumerate(classes)}
    samples = []
    for name in classes:
        if name not in class_to_index:
            raise CorruptDataError(
                split_dir / name,
                "class folder not present in train/",
                "Every val/ class needs its train/ folder of the same name: add it, or move this one out of val/.",
            )
        label = class_to_index[name]
        for path in sorted((split_dir / name).iterdir()):
            if _is_image(path):
                samples.append((path, label))
    if not samples:
        flat = sum(1 for path in split_dir.iterdir() if _is_image(path))
        if flat:  # ILSVRC's val/ as distributed: ILSVRC2012_val_00000001.JPEG ... with no class folders
            raise DatasetNotFoundError(
                "imagenet",
                [
                    f"{split_dir} ({flat:,} images directly in it and no class folders: "
                    "a flat layout, which is not read)"
                ],
                [
                    f"Sort the images into class folders {split_dir}/<wnid>/*.JPEG named as in train/: for "
                    "ILSVRC-2012's val/, with the devkit's ground truth (ILSVRC2012_validation_ground_truth.txt, "
                    "mapped to wnids by the devkit's meta.mat) or the widely used valprep.sh script "
                    "(soumith/imagenetloader.torch), run inside val/.",
                    *how_to_get("imagenet", split_dir.parent),
                ],
            )
        raise DatasetNotFoundError(
            "imagenet", [f"{split_dir} (no images in class folders)"], how_to_get("imagenet", split_dir.parent)
        )
    return samples, classes


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not _hidden(path) and path.is_file()


def check_crop_scale(scale) -> tuple[float, float]:
    """``scale`` as ``(lo, hi)`` floats; ValueError unless two finite numbers with 0 < lo <= hi."""
    try:
        lo, hi = (float(v) for v in scale if not isinstance(v, bool))
    except (TypeError, ValueError):
        lo = hi = math.nan
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
        raise ValueError(
            f"crop_scale must be two numbers [lo, hi] with 0 < lo <= hi (fractions of the image's area), got "
            f"{scale!r}; e.g. (0.08, 1.0), torchvision's default, or (0.08, 1.25), the paper's code"
        )
    return lo, hi


def _random_resized_crop_box(width: int, height: int, rng: random.Random, scale=TRAIN_SCALE):
    """(left, top, right, bottom) of a RandomResizedCrop window (torchvision's
    algorithm: 10 tries at a random area in ``scale`` (fractions of the image's)
    and log-uniform aspect ratio, a try whose window does not fit the image
    rejected, then a centred crop with the ratio clamped)."""
    area = width * height
    log_ratio = (math.log(TRAIN_RATIO[0]), math.log(TRAIN_RATIO[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = rng.randint(0, height - crop_h)
            left = rng.randint(0, width - crop_w)
            return left, top, left + crop_w, top + crop_h
    in_ratio = width / height
    if in_ratio < TRAIN_RATIO[0]:
        crop_w, crop_h = width, int(round(width / TRAIN_RATIO[0]))
    elif in_ratio > TRAIN_RATIO[1]:
        crop_h, crop_w = height, int(round(height * TRAIN_RATIO[1]))
    else:
        crop_w, crop_h = width, height
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return left, top, left + crop_w, top + crop_h


class ImageFolderDataset(Dataset):
    """Decodes one image and applies the train or val transform.

    Items are requested as ``(index, sample_seed)`` (see
    :class:`EpochShardSampler`) and returned as ``(uint8 tensor 3 x S x S, label)``.
    """

    def __init__(self, samples, *, train: bool, image_size: int = 224, resize_size: int = 256, crop_scale=TRAIN_SCALE):
        self.samples = list(samples)
        self.train = train
        self.image_size = image_size
        self.resize_size = resize_size
        self.crop_scale = check_crop_scale(crop_scale)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        # The sampler passes (index, seed); a plain index gets seed 0.
        index, sample_seed = key if isinstance(key, tuple) else (key, 0)
        path, label = self.samples[index]
        Image = require_pillow()
        # Pillow >= 9.1 has enums; the bare constants are the older spelling.
        _BILINEAR = getattr(Image, "Resampling", Image).BILINEAR
        _FLIP_LEFT_RIGHT = getattr(Image, "Transpose", Image).FLIP_LEFT_RIGHT
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (OSError, SyntaxError, ValueError) as exc:  # PIL's decode errors
            raise CorruptDataError(
                path,
                f"cannot decode image ({exc})",
                "Replace it with a good copy from your ImageNet archive, or delete it (ImageNet cannot be downloaded).",
            ) from exc
        size = self.image_size
        if self.train:
            rng = random.Random(sample_seed)
            box = _random_resized_crop_box(image.width, image.height, rng, self.crop_scale)
            image = image.resize((size, size), _BILINEAR, box=box)
            if rng.random() < 0.5:
                image = image.transpose(_FLIP_LEFT_RIGHT)
        else:
            # Resize(256): shorter side to 256, aspect kept (torchvision's rounding).
            short = self.resize_size
            if image.width <= image.height:
                new_w, new_h = short, int(short * image.height / image.width)
            else:
                new_w, new_h = int(short * image.width / image.height), short
            image = image.resize((new_w, new_h), _BILINEAR)
            left = int(round((new_w - size) / 2.0))
            top = int(round((new_h - size) / 2.0))
            image = image.crop((left, top, left + size, top + size))
        array = np.asarray(image, dtype=np.uint8)  # H x W x 3
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous(), label


class EpochShardSampler(Sampler):
    """Yields this rank's ``(index, sample_seed)`` pairs for the current epoch.

    Like ``DistributedSampler`` (same permutation on every rank, contiguous
    disjoint slices, ``set_epoch``), plus a per-sample augmentation seed and
    ``start`` to resume mid-epoch.
    """

    def __init__(self, size: int, *, shuffle: bool, seed: int, rank: int, world_size: int, equal_shards: bool):
        self.size = size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.start = 0
        self._shard = shard_range(size, rank, world_size, equal_shards)

    def __len__(self) -> int:
        return self._shard[1] - self._shard[0]

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def __iter__(self):
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, "imagenet"))
        order = torch.randperm(self.size, generator=generator) if self.shuffle else torch.arange(self.size)
        seeds = torch.randint(0, 2**62, (self.size,), generator=generator)
        start, stop = self._shard
        start += self.start
        return iter(zip(order[start:stop].tolist(), seeds[start:stop].tolist()))


class ImageFolderLoader:
    """Batches of ``(float32 NCHW normalised, int64 labels)`` on ``device``,
    with the same ``__len__`` / ``set_epoch`` / ``dataset_size`` /
    ``num_samples`` interface as :class:`~reste.data.loaders.InMemoryLoader`."""

    def __init__(
        self,
        dataset: ImageFolderDataset,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        device,
        num_workers: int,
        drop_last: bool,
        rank: int,
        world_size: int,
        equal_shards: bool,
        mean,
        std,
        classes,
        folder=None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.dataset = dataset
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.folder = folder  # the training folder the classes were read from (for messages)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.sampler = EpochShardSampler(
            len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, equal_shards=equal_shards
        )
        shard_size = len(self.sampler)
        # As for InMemoryLoader: never drop the only (partial) batch.
        self._drop_last = drop_last and shard_size >= batch_size
        self._num_batches = shard_size // batch_size if self._drop_last else math.ceil(shard_size / batch_size)
        self.num_samples = min(shard_size, self._num_batches * batch_size)
        self.num_workers = num_workers
        self.normalize = Normalizer(mean, std, self.device)
        self.epoch = 0
        self.start_batch = 0
        self._loader = None

    @property
    def dataset_size(self) -> int:
        return len(self.dataset)

    def __len__(self) -> int:
        return self._num_batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)
        self.sampler.set_epoch(epoch, start_batch * self.batch_size)

    def __iter__(self):
        if self._loader is None:
            # Built once and kept: with persistent workers the decode processes
            # survive between epochs. The sampler runs in this process, so
            # set_epoch still takes effect.
            self._loader = DataLoader(
                self.dataset,
                batch_size=self.batch_size,
                sampler=self.sampler,
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
                pin_memory=self.device.type == "cuda",
                drop_last=self._drop_last,
            )
        for images, labels in self._loader:
            images = images.to(self.device, non_blocking=True)
            yield self.normalize(images), labels.to(self.device, non_blocking=True)


def _strided_subset(samples, count: int):
    """``count`` samples evenly spread over the sorted list, so that a small
    subset still spans the classes (the first N would be one class)."""
    if count >= len(samples):
        return samples
    positions = np.linspace(0, len(samples), num=count, endpoint=False).astype(np.int64)
    return [samples[p] for p in positions]


def create_imagenet_loaders(
    root=None,
    *,
    batch_size=128,
    test_batch_size=None,
    augment=True,
    seed=0,
    device="cpu",
    num_workers=0,
    subset=None,
    rank=0,
    world_size=1,
    drop_last=True,
    shard_test=False,
    test_subset=None,
    crop_scale=TRAIN_SCALE,
):
    """Train and val loaders for a class-folder ImageNet; see the module doc (``crop_scale``: the
    training RandomResizedCrop's area range, used with ``augment``)."""
    crop_scale = check_crop_scale(crop_scale)
    require_pillow()
    base = find_imagenet_root(root)
    train_samples, classes = scan_class_folders(base / "train")
    val_samples, _ = scan_class_folders(base / "val", {name: i for i, name in enumerate(classes)})
    if subset is not None:
        train_samples = _strided_subset(train_samples, subset)
    val_count = test_image_count(subset, test_subset)
    if val_count is not None:
        val_samples = _strided_subset(val_samples, val_count)
    meta = info("imagenet")
    # a tree of N != 1000 class folders (ImageNet-100) has N classes: len(loader.classes); the trainer
    # builds the model's head from it (data.num_classes)
    common = dict(
        seed=seed,
        device=device,
        num_workers=num_workers,
        mean=meta.mean,
        std=meta.std,
        classes=classes,
        folder=base / "train",
    )
    train = ImageFolderLoader(
        ImageFolderDataset(train_samples, train=augment, image_size=meta.image_size, crop_scale=crop_scale),
        batch_size=batch_size,
        shuffle=True,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
        equal_shards=True,
        **common,
    )
    test = ImageFolderLoader(
        ImageFolderDataset(val_samples, train=False, image_size=meta.image_size),
        batch_size=test_batch_size or batch_size,
        shuffle=False,
        drop_last=False,
        rank=rank if shard_test else 0,
        world_size=world_size if shard_test else 1,
        equal_shards=False,
        **common,
    )
    train.source = test.source = str(base)
    return train, test
