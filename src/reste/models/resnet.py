"""ResNets for CIFAR (ResNet-20, ResNet-20 Bi-Real, ResNet-18) and ImageNet (ResNet-18/34).

All are float networks in the binary-friendly layout of the ReSTE paper:

- every 3x3 conv is followed by ReLU then BatchNorm (conv -> ReLU -> BN), and has
  no bias; ``create`` binarizes all of them;
- the stem conv, the 1x1 shortcut convs, every BatchNorm and the classifier stay
  real (``full_precision``);
- the head is global average pool -> BatchNorm1d -> Linear.

Shortcuts: "one per block" adds the block input after the second conv; "Bi-Real"
adds a shortcut around each conv, so the real-valued signal bypasses every sign.
The ImageNet ResNets' downsampling shortcut is chosen with ``downsample`` (see
:data:`IMAGENET_DOWNSAMPLE`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .registry import register_model

__all__ = [
    "IMAGENET_DOWNSAMPLE",
    "ResNet",
    "ResidualBlock",
    "ZeroPadShortcut",
    "resnet20",
    "resnet20_bireal",
    "resnet18_cifar",
    "resnet18",
    "resnet34",
]

ShortcutFactory = Callable[[int, int, int], nn.Module]


def scaled_width(channels: int, width: float) -> int:
    """``channels * width`` rounded, at least 1 (``width`` shrinks a network for quick runs)."""
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    return max(1, round(channels * width))


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: keep every ``stride``-th pixel, pad the new channels with zeros.

    Parameter-free, so the only real-valued path a binary ResNet-20 has around its
    binary convs costs nothing and is never binarized.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"a zero-padding shortcut cannot reduce channels ({in_channels} -> {out_channels})")
        self.stride = stride
        extra = out_channels - in_channels
        # zeros split before and after the kept channels, like the classic option A
        self.pad_front = extra // 2
        self.pad_back = extra - extra // 2

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad_channels=({self.pad_front}, {self.pad_back})"


def conv_shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """CIFAR ResNet-18 shortcut, and the ImageNet ResNets' with ``downsample="stride"``: strided 1x1
    conv + BN (both stay real)."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
            bn=nn.BatchNorm2d(out_channels),
        )
    )


def pool_conv_shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """ImageNet shortcut (``downsample="avgpool"``, the default): average pool, then 1x1 conv + BN (all real).

    Pooling before a stride-1 1x1 conv (as in Bi-Real Net) lets every input pixel
    reach the shortcut; a strided 1x1 conv would drop three pixels in four from the
    only real-valued path of the block. Same parameter count either way.
    ``ceil_mode`` keeps the shortcut's size equal to the strided 3x3 conv's on odd inputs.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if stride > 1:
        layers["pool"] = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
    layers["conv"] = nn.Conv2d(in_channels, out_channels, 1, bias=False)
    layers["bn"] = nn.BatchNorm2d(out_channels)
    return nn.Sequential(layers)


class ResidualBlock(nn.Module):
    """Two 3x3 convs, each conv -> ReLU -> BN.

    ``shortcut_each_conv=False``: ``out = unit2(unit1(x)) + shortcut(x)``;
    ``True`` (Bi-Real): ``h = unit1(x) + shortcut(x); out = unit2(h) + h``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, make_shortcut: ShortcutFactory, shortcut_each_conv: bool
    ):
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.relu1 = nn.ReLU(inplace=True)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.bn2 = nn.BatchNorm2d(out_channels)
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = make_shortcut(in_channels, out_channels, stride) if needs_projection else nn.Identity()
        self.shortcut_each_conv = shortcut_each_conv

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.relu1(self.conv1(x)))
        if self.shortcut_each_conv:
            out = out + self.shortcut(x)
            return self.bn2(self.relu2(self.conv2(out))) + out
        return self.bn2(self.relu2(self.conv2(out))) + self.shortcut(x)


class ResNet(nn.Module):
    """stem -> stages of :class:`ResidualBlock` -> avgpool -> BatchNorm1d -> Linear."""

    #: layers ``create`` keeps real: stem conv, 1x1 shortcut convs (the only 1x1 convs; a token, because
    #: option-A ResNet-20s have none and a name pattern must match), classifier (all BN are never binarized)
    full_precision = ("stem.conv", "pointwise", "head.fc")

    def __init__(
        self,
        stem: nn.Sequential,
        stem_channels: int,
        stage_channels: Sequence[int],
        blocks_per_stage: Sequence[int],
        make_shortcut: ShortcutFactory,
        shortcut_each_conv: bool,
        num_classes: int,
    ):
        super().__init__()
        self.stem = stem
        stages = []
        in_channels = stem_channels
        for index, (channels, blocks) in enumerate(zip(stage_channels, blocks_per_stage)):
            first_stride = 1 if index == 0 else 2
            stage = []
            for block in range(blocks):
                stride = first_stride if block == 0 else 1
                stage.append(ResidualBlock(in_channels, channels, stride, make_shortcut, shortcut_each_conv))
                in_channels = channels
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(
            OrderedDict(
                pool=nn.AdaptiveAvgPool2d(1),
                flatten=nn.Flatten(),
                bn=nn.BatchNorm1d(in_channels),
                fc=nn.Linear(in_channels, num_classes),
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)))


def _cifar_stem(in_channels: int, out_channels: int) -> nn.Sequential:
    # 3x3 stride 1, no max pool: 32x32 (or 28x28) inputs keep their resolution
    return nn.Sequential(
        OrderedDict(
            conv=conv3x3(in_channels, out_channels),
            relu=nn.ReLU(inplace=True),
            bn=nn.BatchNorm2d(out_channels),
        )
    )


def _imagenet_stem(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, 7, stride=2, padding=3, bias=False),
            relu=nn.ReLU(inplace=True),
            bn=nn.BatchNorm2d(out_channels),
            pool=nn.MaxPool2d(3, stride=2, padding=1),
        )
    )


def _resnet20(num_classes: int, in_channels: int, width: float, shortcut_each_conv: bool) -> ResNet:
    widths = [scaled_width(c, width) for c in (16, 32, 64)]
    return ResNet(
        _cifar_stem(in_channels, widths[0]),
        widths[0],
        widths,
        (3, 3, 3),
        ZeroPadShortcut,
        shortcut_each_conv,
        num_classes,
    )


@register_model("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> ResNet:
    """CIFAR ResNet-20: 16/32/64 channels, 3 blocks per stage, option-A shortcut once per block."""
    return _resnet20(num_classes, in_channels, width, shortcut_each_conv=False)


@register_model("resnet20_bireal")
def resnet20_bireal(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> ResNet:
    """CIFAR ResNet-20 with a (Bi-Real) shortcut around each conv; same parameters as ``resnet20``."""
    return _resnet20(num_classes, in_channels, width, shortcut_each_conv=True)


@register_model("resnet18_cifar")
def resnet18_cifar(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> ResNet:
    """CIFAR ResNet-18: 3x3 stem, 64/128/256/512 channels, 2 blocks per stage, 1x1 conv + BN shortcuts."""
    widths = [scaled_width(c, width) for c in (64, 128, 256, 512)]
    return ResNet(
        _cifar_stem(in_channels, widths[0]), widths[0], widths, (2, 2, 2, 2), conv_shortcut, False, num_classes
    )


#: ``downsample`` of the ImageNet ResNets -> their downsampling shortcut. ``"avgpool"`` (the default,
#: what reste always built: runs and exports made before the option existed rebuild the same network)
#: pools, then a stride-1 1x1 conv + BN; ``"stride"`` is the paper's code, a strided 1x1 conv + BN
#: (``_make_layer`` of model/models_imagenet/resnet18.py and resnet34.py in DravenALG/ReSTE). Both have
#: the same parameters under the same names (``shortcut.conv``, ``shortcut.bn``), so a state dict loads
#: into either: only the recorded option tells them apart.
IMAGENET_DOWNSAMPLE: dict[str, ShortcutFactory] = {"avgpool": pool_conv_shortcut, "stride": conv_shortcut}


def imagenet_shortcut(downsample: str) -> ShortcutFactory:
    """The shortcut factory ``downsample`` names; ValueError naming the allowed values otherwise."""
    if isinstance(downsample, str) and downsample in IMAGENET_DOWNSAMPLE:
        return IMAGENET_DOWNSAMPLE[downsample]
    allowed = ", ".join(repr(name) for name in IMAGENET_DOWNSAMPLE)
    raise ValueError(
        f"downsample must be one of {allowed}, got {downsample!r}: 'avgpool' (the default) is average pool -> "
        "1x1 conv + BN, 'stride' the paper's code's strided 1x1 conv + BN"
    )


def _imagenet_resnet(
    num_classes: int, in_channels: int, width: float, blocks: Sequence[int], downsample: str
) -> ResNet:
    make_shortcut = imagenet_shortcut(downsample)
    widths = [scaled_width(c, width) for c in (64, 128, 256, 512)]
    return ResNet(_imagenet_stem(in_channels, widths[0]), widths[0], widths, blocks, make_shortcut, True, num_classes)


@register_model("resnet18")
def resnet18(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, downsample: str = "avgpool") -> ResNet:
    """ImageNet ResNet-18, Bi-Real style: 7x7/2 stem + max pool, shortcut around each 3x3 conv.

    ``downsample``: ``"avgpool"`` (default) or ``"stride"`` (the paper's code), see :data:`IMAGENET_DOWNSAMPLE`.
    """
    return _imagenet_resnet(num_classes, in_channels, width, (2, 2, 2, 2), downsample)


@register_model("resnet34")
def resnet34(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, downsample: str = "avgpool") -> ResNet:
    """ImageNet ResNet-34, Bi-Real style: 7x7/2 stem + max pool, shortcut around each 3x3 conv.

    ``downsample``: ``"avgpool"`` (default) or ``"stride"`` (the paper's code), see :data:`IMAGENET_DOWNSAMPLE`.
    """
    return _imagenet_resnet(num_classes, in_channels, width, (3, 4, 6, 3), downsample)
