"""Ship a trained binary model: cost summary, 1-bit export, fast exact CPU inference.

>>> import reste
>>> print(reste.deploy.summary(model, (3, 32, 32)))          # doctest: +SKIP
>>> reste.deploy.export(model, "model.safetensors", architecture={...})  # doctest: +SKIP
>>> net = reste.deploy.load("model.safetensors")             # doctest: +SKIP
>>> fast = reste.deploy.capture(net)                         # doctest: +SKIP
>>> tensors = reste.deploy.read_tensors("model.safetensors") # doctest: +SKIP
>>> reste.deploy.export_onnx(model, "model.onnx", (3, 32, 32))  # doctest: +SKIP

Command line: ``reste summary``, ``reste export``, ``reste bench-infer``. See docs/deploy.md.
"""

from .export import (
    ExportError,
    architecture_from_config,
    export,
    export_run,
    load,
    load_run_model,
    read_graph,
    read_tensors,
    to_deploy,
)
from .onnx import export_onnx, to_onnx_module
from .packed import (
    PackedBinaryConv2d,
    PackedBinaryLinear,
    kernel_info,
    pack_signs,
    packed_layer,
    set_output_pool,
    unpack_signs,
)
from .replay import CapturedModel, CaptureError, capture
from .summary import LayerSummary, ModelSummary, summary

__all__ = [
    "CaptureError",
    "CapturedModel",
    "ExportError",
    "LayerSummary",
    "ModelSummary",
    "PackedBinaryConv2d",
    "PackedBinaryLinear",
    "architecture_from_config",
    "capture",
    "export",
    "export_onnx",
    "export_run",
    "kernel_info",
    "load",
    "load_run_model",
    "pack_signs",
    "packed_layer",
    "read_graph",
    "read_tensors",
    "set_output_pool",
    "summary",
    "to_deploy",
    "to_onnx_module",
    "unpack_signs",
]
