"""Model zoo: the networks of the ReSTE paper, built by name in any precision.

>>> import reste
>>> model = reste.models.create("resnet20", num_classes=10, in_channels=1, precision="1w1a")
>>> print(reste.models.describe(model))  # doctest: +SKIP

``reste.models.names()`` lists the models; ``@reste.models.register_model(name)``
adds one (see docs/models.md).
"""

from .registry import (
    DEFAULT_FULL_PRECISION,
    PRECISIONS,
    LayerInfo,
    ModelDescription,
    check_size,
    create,
    describe,
    names,
    register_model,
)

# importing the architecture modules registers their models
from .resnet import ResidualBlock, ResNet, ZeroPadShortcut  # noqa: E402
from .vgg import VGGSmall  # noqa: E402
from .vit import VisionTransformer  # noqa: E402

__all__ = [
    "DEFAULT_FULL_PRECISION",
    "PRECISIONS",
    "LayerInfo",
    "ModelDescription",
    "ResNet",
    "ResidualBlock",
    "VGGSmall",
    "VisionTransformer",
    "ZeroPadShortcut",
    "check_size",
    "create",
    "describe",
    "names",
    "register_model",
]

# building from a training config (imports nothing of reste.train at import time)
from .build import build_model, check_model, model_arguments  # noqa: E402

__all__ += ["build_model", "check_model", "model_arguments"]
