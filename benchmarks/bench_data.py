"""Throughput of the in-memory loaders (images per second).

Run from the repository root::

    PYTHONPATH=src python benchmarks/bench_data.py                 # fashion_mnist, batch 128, CPU
    PYTHONPATH=src python benchmarks/bench_data.py --device cuda --batch-size 512

Measures full epochs of the training loader (shuffle + random crop + flip +
normalisation, the tensors a training step receives) and, for comparison,
the same without augmentation and a CIFAR-10-shaped loader. Fashion-MNIST is
read from ``--root`` / ``$RESTE_DATA`` / Debian's dataset-fashion-mnist when
available; otherwise random images of the same shape are used (the loader's
cost does not depend on pixel values). Data loading from disk is timed
separately and excluded from the throughput.
"""

from __future__ import annotations

import argparse
import time

import torch

import reste.data as data
from reste.data.loaders import InMemoryLoader


def images_per_second(loader, epochs: int, device: torch.device) -> float:
    """Best-of-``epochs`` rate; each batch is touched so lazy work is counted."""
    best = 0.0
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        count = 0
        start = time.perf_counter()
        for images, _labels in loader:
            count += images.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, count / (time.perf_counter() - start))
    return best


def synthetic_loader(n, channels, size, name, batch_size, device, augment):
    meta = data.info(name)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8)
    labels = torch.randint(0, meta.num_classes, (n,))
    return InMemoryLoader(
        images,
        labels,
        batch_size=batch_size,
        mean=meta.mean,
        std=meta.std,
        shuffle=True,
        crop_padding=meta.crop_padding if augment else 0,
        horizontal_flip=meta.horizontal_flip and augment,
        seed=0,
        device=device,
        drop_last=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, batch {args.batch_size}")

    start = time.perf_counter()
    try:
        train, _ = data.create_loaders("fashion_mnist", root=args.root, batch_size=args.batch_size, device=device)
        plain, _ = data.create_loaders(
            "fashion_mnist", root=args.root, batch_size=args.batch_size, device=device, augment=False
        )
        origin = f"real files from {train.source}, read in {time.perf_counter() - start:.2f}s"
    except data.DatasetNotFoundError:
        train = synthetic_loader(60000, 1, 28, "fashion_mnist", args.batch_size, device, True)
        plain = synthetic_loader(60000, 1, 28, "fashion_mnist", args.batch_size, device, False)
        origin = "synthetic 60000 x 1 x 28 x 28"
    print(f"fashion_mnist: {origin}")
    rows = [
        ("fashion_mnist train, crop pad 2 + flip", train),
        ("fashion_mnist train, no augmentation", plain),
        (
            "cifar10-shaped train, crop pad 4 + flip",
            synthetic_loader(50000, 3, 32, "cifar10", args.batch_size, device, True),
        ),
    ]
    for label, loader in rows:
        rate = images_per_second(loader, args.epochs, device)
        print(f"{label:42s} {rate:12,.0f} images/s")


if __name__ == "__main__":
    main()
