"""Binary layers and the conversion of float models (``reste.binarize``)."""

from .convert import DEFAULT_KEEP, KEEP_TOKENS, binarize, full_precision_layers
from .layers import BinaryConv2d, BinaryLayer, BinaryLinear, INPUT_PADDINGS, WEIGHT_SCALES, binary_layers

__all__ = [
    "BinaryConv2d",
    "BinaryLinear",
    "BinaryLayer",
    "binarize",
    "binary_layers",
    "full_precision_layers",
    "KEEP_TOKENS",
    "DEFAULT_KEEP",
    "WEIGHT_SCALES",
    "INPUT_PADDINGS",
]
