"""Batched, device-side augmentation and normalisation (airbench style).

Instead of running a transform per image in Python, each operation acts on a
whole ``(B, C, H, W)`` batch with a few tensor ops, on whatever device the
batch lives on:

* random crop with zero padding: pad the batch once, view every possible
  crop window with ``unfold`` (no copy), then pick each image's window with
  one advanced-indexing gather;
* horizontal flip: ``torch.where`` between the batch and its mirror, with a
  per-image boolean mask;
* normalisation: one fused ``(x - 255*mean) / (255*std)`` on the uint8 batch.

The random parameters (crop offsets, flip mask) are *inputs*, drawn by the
caller from a seeded CPU ``torch.Generator``; this keeps augmentation
bit-identical across devices and lets a loader draw a whole epoch's
parameters up front (which makes mid-epoch resume exact and cheap).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "draw_crop_offsets",
    "draw_flip_mask",
    "random_crop",
    "horizontal_flip",
    "Normalizer",
]


def draw_crop_offsets(n: int, padding: int, generator: torch.Generator) -> torch.Tensor:
    """``(n, 2)`` int64 (top, left) offsets, uniform in ``[0, 2*padding]``,
    i.e. shifts of ``offset - padding`` pixels (the torchvision RandomCrop
    distribution)."""
    return torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)


def draw_flip_mask(n: int, generator: torch.Generator) -> torch.Tensor:
    """``(n,)`` bool, each True with probability 1/2."""
    return torch.randint(0, 2, (n,), generator=generator).bool()


def random_crop(images: torch.Tensor, padding: int, offsets: torch.Tensor) -> torch.Tensor:
    """Crop every image of ``images`` (B, C, H, W) after zero-padding it by
    ``padding`` pixels on each side; image ``b`` keeps the window whose top
    left corner is ``offsets[b]`` in the padded frame. Output has the input's
    shape and dtype. Works for uint8 (padding value 0 = black, as torchvision
    pads before ToTensor/Normalize) and float batches."""
    if padding == 0:
        return images
    batch, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    # windows[b, c, i, j] is the H x W crop starting at (i, j): a strided view.
    windows = padded.unfold(2, height, 1).unfold(3, width, 1)
    offsets = offsets.to(images.device)
    rows, cols = offsets[:, 0], offsets[:, 1]
    batch_index = torch.arange(batch, device=images.device)
    # Advanced indices separated by a slice go first: result is (B, C, H, W).
    return windows[batch_index, :, rows, cols]


def horizontal_flip(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the images (left-right) whose ``mask`` entry is True."""
    mask = mask.to(images.device).view(-1, 1, 1, 1)
    return torch.where(mask, images.flip(3), images)


class Normalizer:
    """uint8 (0..255) batch -> float32 ``(x/255 - mean) / std`` per channel.

    Folded into one subtract and one multiply with precomputed per-channel
    constants that live on the target device.
    """

    def __init__(self, mean, std, device="cpu"):
        mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.shift = (mean * 255.0).to(device)
        self.scale = (1.0 / (std * 255.0)).to(device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.to(torch.float32) - self.shift).mul_(self.scale)
