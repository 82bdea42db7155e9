"""Binary layers and the conversion of float models (``reste.binarize``)."""

from .attention import MultiheadAttention
from .convert import DEFAULT_KEEP, KEEP_TOKENS, binarize, full_precision_layers, rebuild_attention
from .layers import INPUT_PADDINGS, WEIGHT_SCALES, BinaryConv2d, BinaryLayer, BinaryLinear, binary_layers
from .weights import WeightLoadReport, load_float_weights

__all__ = [
    "BinaryConv2d",
    "BinaryLinear",
    "BinaryLayer",
    "binarize",
    "MultiheadAttention",
    "rebuild_attention",
    "binary_layers",
    "full_precision_layers",
    "load_float_weights",
    "WeightLoadReport",
    "KEEP_TOKENS",
    "DEFAULT_KEEP",
    "WEIGHT_SCALES",
    "INPUT_PADDINGS",
]
