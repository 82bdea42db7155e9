"""Turn any float model into a binary one by swapping its layers.

``binarize`` walks the model, replaces every ``nn.Conv2d`` / ``nn.Linear`` that is
not kept in full precision by a :class:`BinaryConv2d` / :class:`BinaryLinear`
sharing the same weight and bias parameters, and leaves everything else (the
user's forward code, batch norms, attention arithmetic) untouched.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable, Sequence

from torch import nn

from ..estimators import Estimator
from .layers import BinaryConv2d, BinaryLayer, BinaryLinear, EstimatorSpec

__all__ = ["binarize", "KEEP_TOKENS", "full_precision_layers"]

#: special entries of ``keep``: the first and last conv/linear layer in module order,
#: and every 1x1 convolution (ResNet downsampling shortcuts)
KEEP_TOKENS = ("first", "last", "pointwise")

_SWAPS = {nn.Conv2d: BinaryConv2d, nn.Linear: BinaryLinear}


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _is_kept(name: str, module: nn.Module, index: int, count: int, keep: Sequence) -> bool:
    for rule in keep:
        if isinstance(rule, type):
            if isinstance(module, rule):
                return True
        elif rule == "first":
            if index == 0:
                return True
        elif rule == "last":
            if index == count - 1:
                return True
        elif rule == "pointwise":
            if isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1):
                return True
        elif isinstance(rule, str):
            if fnmatch.fnmatchcase(name, rule):
                return True
        else:
            raise TypeError(f"keep entries must be module types, name patterns or one of {KEEP_TOKENS}; got {rule!r}")
    return False


def full_precision_layers(model: nn.Module, keep: Iterable = ("first", "last")) -> list[str]:
    """Names of the conv/linear layers that ``binarize(model, keep=keep)`` leaves real."""
    keep = tuple(keep)
    cands = _candidates(model)
    return [n for i, (n, m) in enumerate(cands) if _is_kept(n, m, i, len(cands), keep)]


def binarize(
    model: nn.Module,
    estimator: EstimatorSpec = "reste",
    activations: bool = True,
    keep: Iterable = ("first", "last"),
    *,
    weight_estimator: EstimatorSpec | str = "same",
    weight_scale: str = "layer_mean",
    input_padding: str = "zero",
    estimator_params: dict | None = None,
) -> nn.Module:
    """Binarize ``model`` in place and return it.

    Args:
        model: any float ``nn.Module``.
        estimator: estimator name (see ``reste.estimators()``) or instance, used for
            the weights and, with ``activations=True``, the inputs of every swapped layer.
        activations: binarize layer inputs too (1W/1A); False gives 1W/32A.
        keep: layers to leave in full precision: ``"first"``, ``"last"`` (in module
            order), ``"pointwise"`` (all 1x1 convs), fnmatch patterns on qualified
            module names (``"*.downsample.*"``), or module types.
        weight_estimator: override for the weights only (``"dorefa"`` gives DoReFa-Net's
            weight binarizer); ``"same"`` uses ``estimator``.
        weight_scale, input_padding: see :class:`~reste.nn.BinaryConv2d`.
        estimator_params: keyword arguments for estimators given by name.

    Converting an already converted model changes nothing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"binarize expects an nn.Module, got {type(model).__name__}")
    if isinstance(keep, str):
        keep = (keep,)
    keep = tuple(keep)
    wspec = estimator if weight_estimator == "same" else weight_estimator
    cands = _candidates(model)
    for index, (name, module) in enumerate(cands):
        if isinstance(module, BinaryLayer) or type(module) not in _SWAPS:
            continue  # already binary, or a subclass we do not know how to rebuild
        if _is_kept(name, module, index, len(cands), keep):
            continue
        new = _SWAPS[type(module)].from_float(
            module,
            weight_estimator=_fresh(wspec),
            input_estimator=_fresh(estimator) if activations else None,
            weight_scale=weight_scale,
            input_padding=input_padding,
            estimator_params=estimator_params,
        )
        if name == "":
            raise ValueError("the model itself is a single Conv2d/Linear; wrap it in a container or build a BinaryConv2d directly")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return model


def _fresh(spec):
    """Each layer gets its own estimator instance (own buffers, own DSQ alpha)."""
    import copy

    return copy.deepcopy(spec) if isinstance(spec, Estimator) else spec
