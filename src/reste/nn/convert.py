"""Turn any float model into a binary one by swapping its layers.

``binarize`` walks the model, replaces every ``nn.Conv2d`` / ``nn.Linear`` that is
not kept in full precision by a :class:`BinaryConv2d` / :class:`BinaryLinear`
sharing the same weight and bias parameters, and leaves everything else (the
user's forward code, batch norms, attention arithmetic) untouched.

What stays real is :data:`DEFAULT_KEEP` (the first and the last layer) plus whatever
``keep`` adds; ``keep_defaults=False`` drops the defaults. Every ``keep`` entry must
mean something: a name that matches no conv/linear layer is an error listing the
closest names, so a typo never binarizes a layer that was meant to stay real.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
from typing import Iterable, Sequence

from torch import nn

from ..estimators import Estimator
from .layers import BinaryConv2d, BinaryLayer, BinaryLinear, EstimatorSpec

__all__ = ["binarize", "KEEP_TOKENS", "DEFAULT_KEEP", "full_precision_layers"]

logger = logging.getLogger(__name__)

#: special entries of ``keep``: the first and last conv/linear layer in module order,
#: and every 1x1 convolution (ResNet downsampling shortcuts)
KEEP_TOKENS = ("first", "last", "pointwise")

#: what ``binarize`` keeps real unless ``keep_defaults=False``; ``keep`` adds to it
DEFAULT_KEEP = ("first", "last")

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
        elif fnmatch.fnmatchcase(name, rule):
            return True
    return False


def _keep_rules(keep, keep_defaults: bool, cands: list[tuple[str, nn.Module]]) -> tuple:
    """``keep`` as a checked tuple of rules, the defaults first unless ``keep_defaults=False``."""
    if keep is None:
        raise TypeError("keep=None is ambiguous: omit keep to keep only the defaults "
                        f"{DEFAULT_KEEP}, or pass keep_defaults=False to binarize every layer")
    if isinstance(keep, (str, type)):
        keep = (keep,)
    keep = tuple(keep)
    names = [n for n, _ in cands]
    for rule in keep:
        if isinstance(rule, type) and issubclass(rule, nn.Module) or rule in KEEP_TOKENS:
            continue  # categories: they may legitimately match nothing (a ResNet without 1x1 convs)
        if not isinstance(rule, str):
            raise TypeError(f"keep entries must be module types, name patterns or one of {KEEP_TOKENS}; got {rule!r}")
        if not any(fnmatch.fnmatchcase(n, rule) for n in names):
            raise ValueError(_no_match_message(rule, names))
    return (DEFAULT_KEEP if keep_defaults else ()) + keep


def _no_match_message(rule: str, names: list[str]) -> str:
    close = difflib.get_close_matches(rule, [*KEEP_TOKENS, *names], n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    return (f"keep entry {rule!r} matches no Conv2d/Linear layer of the model.{hint} keep takes the tokens "
            f"{', '.join(KEEP_TOKENS)}, module types, or fnmatch patterns on the layer names: {shown or 'none'}")


def full_precision_layers(model: nn.Module, keep: Iterable = (), *, keep_defaults: bool = True) -> list[str]:
    """Names of the conv/linear layers that ``binarize(model, keep=keep, keep_defaults=...)`` leaves real."""
    cands = _candidates(model)
    rules = _keep_rules(keep, keep_defaults, cands)
    return [n for i, (n, m) in enumerate(cands) if _is_kept(n, m, i, len(cands), rules)]


def binarize(
    model: nn.Module,
    estimator: EstimatorSpec = "reste",
    activations: bool = True,
    keep: Iterable = (),
    *,
    keep_defaults: bool = True,
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
        keep: layers to leave in full precision *in addition to* :data:`DEFAULT_KEEP`
            (the first and last conv/linear layer): ``"first"``, ``"last"`` (in module
            order), ``"pointwise"`` (all 1x1 convs), fnmatch patterns on qualified
            module names (``"*.downsample.*"``), or module types. A name or pattern that
            matches no conv/linear layer raises ``ValueError`` naming the closest ones.
        keep_defaults: False drops :data:`DEFAULT_KEEP`, so ``keep`` alone decides
            (``keep_defaults=False`` with no ``keep`` binarizes every layer).
        weight_estimator: override for the weights only (``"dorefa"`` gives DoReFa-Net's
            weight binarizer); ``"same"`` uses ``estimator``.
        weight_scale, input_padding: see :class:`~reste.nn.BinaryConv2d`.
        estimator_params: keyword arguments for estimators given by name.

    The layers made binary and those kept real are logged (logger ``reste.nn.convert``,
    level INFO); afterwards ``reste.nn.binary_layers(model)`` or
    ``reste.models.describe(model)`` list them. Converting an already converted model
    changes nothing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"binarize expects an nn.Module, got {type(model).__name__}")
    wspec = estimator if weight_estimator == "same" else weight_estimator
    cands = _candidates(model)
    rules = _keep_rules(keep, keep_defaults, cands)
    swapped, kept = [], []
    for index, (name, module) in enumerate(cands):
        if isinstance(module, BinaryLayer) or type(module) not in _SWAPS:
            continue  # already binary, or a subclass we do not know how to rebuild
        if _is_kept(name, module, index, len(cands), rules):
            kept.append(name)
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
        swapped.append(name)
    logger.info("binarize: %d layer(s) made binary: %s; kept real: %s", len(swapped), ", ".join(swapped) or "none", ", ".join(kept) or "none")
    return model


def _fresh(spec):
    """Each layer gets its own estimator instance (own buffers, own DSQ alpha)."""
    import copy

    return copy.deepcopy(spec) if isinstance(spec, Estimator) else spec
