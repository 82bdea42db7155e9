"""VGG-small for CIFAR: 128-128(pool)-256-256(pool)-512-512(pool) -> Linear."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from .registry import register_model
from .resnet import scaled_width

__all__ = ["VGGSmall"]

#: (output channels, max pool after the unit) of the six conv units
_UNITS = ((128, False), (128, True), (256, False), (256, True), (512, False), (512, True))


@register_model("vgg_small")
class VGGSmall(nn.Module):
    """Six 3x3 conv units (conv -> ReLU -> BN, max pool after the BN of every second
    unit), then one Linear on the flattened ``512 x (image_size/8)^2`` features.

    The classifier's input size depends on the image size, so the network is built
    for one ``image_size`` (32 for CIFAR, 28 for (Fashion-)MNIST) and says so if it
    is fed another.
    """

    #: the first conv and the classifier stay real
    full_precision = ("features.conv0", "fc")

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width: float = 1.0):
        super().__init__()
        if image_size < 8:
            raise ValueError(f"vgg_small halves the image three times and needs image_size >= 8, got {image_size}")
        self.image_size = image_size
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels, size = in_channels, image_size
        for index, (out_channels, pool) in enumerate(_UNITS):
            out_channels = scaled_width(out_channels, width)
            layers[f"conv{index}"] = nn.Conv2d(channels, out_channels, 3, padding=1, bias=False)
            layers[f"relu{index}"] = nn.ReLU(inplace=True)
            layers[f"bn{index}"] = nn.BatchNorm2d(out_channels)
            if pool:
                layers[f"pool{index}"] = nn.MaxPool2d(2)
                size //= 2
            channels = out_channels
        self.features = nn.Sequential(layers)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels * size * size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"vgg_small was built for {self.image_size}x{self.image_size} inputs but got "
                f"{x.shape[-2]}x{x.shape[-1]}; create it with image_size={x.shape[-1]}"
            )
        return self.fc(self.flatten(self.features(x)))
