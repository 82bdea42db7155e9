"""Turn any float model into a binary one by swapping its layers.

``binarize`` walks the model, replaces every ``nn.Conv2d`` / ``nn.Linear`` that is
not kept in full precision by a :class:`BinaryConv2d` / :class:`BinaryLinear`
sharing the same weight and bias parameters, and leaves everything else (the
user's forward code, batch norms, attention arithmetic) untouched.
``nn.MultiheadAttention``, whose input projection is a raw parameter, is first
rebuilt as :class:`reste.nn.MultiheadAttention` (same function, projections
``in_proj`` / ``out_proj`` as linear submodules), whose projections are then
swapped under the same rules. Layers with weights that it cannot convert (a
``Conv1d``, a subclass of ``Linear`` it does not know) are named in a warning.

What stays real is :data:`DEFAULT_KEEP` (the first and the last layer) plus whatever
``keep`` adds; ``keep_defaults=False`` drops the defaults. Every ``keep`` entry must
mean something: a name that matches no conv/linear layer is an error listing the
closest names, so a typo never binarizes a layer that was meant to stay real.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import warnings
from collections.abc import Iterable, Sequence

from torch import nn

from ..estimators import Estimator
from .attention import MultiheadAttention
from .layers import BinaryConv2d, BinaryLayer, BinaryLinear, EstimatorSpec

__all__ = ["binarize", "KEEP_TOKENS", "DEFAULT_KEEP", "full_precision_layers", "rebuild_attention"]

logger = logging.getLogger(__name__)

#: special entries of ``keep``: the first and last conv/linear layer in module order,
#: and every 1x1 convolution (ResNet downsampling shortcuts)
KEEP_TOKENS = ("first", "last", "pointwise")

#: what ``binarize`` keeps real unless ``keep_defaults=False``; ``keep`` adds to it
DEFAULT_KEEP = ("first", "last")

_SWAPS: dict[type[nn.Module], type[BinaryConv2d] | type[BinaryLinear]] = {
    nn.Conv2d: BinaryConv2d,
    nn.Linear: BinaryLinear,
}


def every_name(model: nn.Module, replacements: dict | None = None):
    """``(name, module)`` for every name a module is reachable under, as the model will be once
    ``replacements`` ({name: module}) are in place: a module registered twice (``self.b = self.a``,
    ``nn.ModuleList([block] * 3)``) comes once per name, where ``named_modules()`` gives it once.
    A module inside itself is not followed into again (``named_modules(remove_duplicate=False)``
    would never end)."""
    replacements = replacements or {}

    def visit(module: nn.Module, prefix: str, ancestors: tuple):
        yield prefix, module
        for name, child in module._modules.items():  # named_children() would skip a second name of a module
            if child is None:
                continue
            full = f"{prefix}.{name}" if prefix else name
            child = replacements.get(full, child)
            if id(child) not in ancestors:
                yield from visit(child, full, (*ancestors, id(child)))

    yield from visit(model, "", (id(model),))


def _layers(
    model: nn.Module, replacements: dict | None = None
) -> tuple[list[tuple[str, nn.Module]], dict[int, list[str]]]:
    """The conv/linear layers of the model as it will be once ``replacements`` are in place, in module
    order under their first name, and {id(module): every name it is reachable under}
    (:func:`every_name`): a shared layer is swapped under all of them."""
    names_of: dict[int, list[str]] = {}
    layers: list[tuple[str, nn.Module]] = []
    for name, module in every_name(model, replacements):
        if id(module) not in names_of and isinstance(module, (nn.Conv2d, nn.Linear)):
            layers.append((name, module))
        names_of.setdefault(id(module), []).append(name)
    return layers, names_of


def _attention_rebuilds(model: nn.Module) -> dict:
    """{name: reste MultiheadAttention sharing the parameters} for every ``nn.MultiheadAttention``."""
    if type(model) is nn.MultiheadAttention:
        raise ValueError(
            "the model itself is an nn.MultiheadAttention; wrap it in a container, or binarize "
            "reste.nn.MultiheadAttention.from_torch(model)"
        )
    built: dict[int, MultiheadAttention] = {}  # one rebuild per module, under each of its names
    out = {}
    for n, m in every_name(model):
        if type(m) is nn.MultiheadAttention:  # a subclass may change forward: left alone, and named
            if id(m) not in built:
                built[id(m)] = MultiheadAttention.from_torch(m)
            out[n] = built[id(m)]
    return out


def rebuild_attention(model: nn.Module, inside: Iterable[str] | None = None) -> list[str]:
    """Replace ``nn.MultiheadAttention`` modules by :class:`reste.nn.MultiheadAttention` (same
    function, shared parameters), all of them or those containing a name of ``inside``; returns
    their names. ``binarize`` does this itself; loading an exported binary model into a float
    architecture needs it (``reste.deploy.load(path, model=float_model)``)."""
    rebuilds = _attention_rebuilds(model)
    names = list(rebuilds)
    if inside is not None:
        inside = list(inside)
        # a shared module is named once in ``inside`` (an export's layer list): rebuilt under all its names
        wanted = {id(rebuilds[n]) for n in names if any(i.startswith(n + ".") for i in inside)}
        names = [n for n in names if id(rebuilds[n]) in wanted]
    for name in names:
        _install(model, name, rebuilds[name])
    _no_fused_encoders(model)
    return names


def _unconvertible(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layers with weights that ``binarize`` has no binary twin for (they stay float)."""
    out: list[tuple[str, nn.Module]] = []
    attention: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(a + ".") for a in attention):
            continue  # inside an attention module: reported (or converted) as a whole
        if isinstance(m, nn.MultiheadAttention):
            attention.append(name)
            if type(m) is not nn.MultiheadAttention:
                out.append((name, m))
        elif (
            isinstance(m, (nn.Linear, nn.Conv2d, nn.modules.conv._ConvNd, nn.Bilinear))
            and type(m) not in _SWAPS
            and not isinstance(m, BinaryLayer)
        ):
            out.append((name, m))
    return out


def _is_kept(name: str | Sequence[str], module: nn.Module, index: int, count: int, keep: Sequence) -> bool:
    """Whether a rule of ``keep`` keeps the layer real; ``name`` may be all of its names (a shared layer)."""
    names = [name] if isinstance(name, str) else list(name)
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
        elif any(fnmatch.fnmatchcase(n, rule) for n in names):
            return True
    return False


def _keep_rules(keep, keep_defaults: bool, cands: list[tuple[str, nn.Module]], extra_names=()) -> tuple:
    """``keep`` as a checked tuple of rules, the defaults first unless ``keep_defaults=False``.

    ``extra_names`` (attention modules, unconvertible layers) may be named too."""
    if keep is None:
        raise TypeError(
            "keep=None is ambiguous: omit keep to keep only the defaults "
            f"{DEFAULT_KEEP}, or pass keep_defaults=False to binarize every layer"
        )
    if isinstance(keep, (str, type)):
        keep = (keep,)
    elif not isinstance(keep, Iterable):
        keep = (keep,)  # a lone bad value gets the per-entry message below
    keep = tuple(keep)
    names = list(dict.fromkeys([n for n, _ in cands] + list(extra_names)))  # each name once
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
    return (
        f"keep entry {rule!r} matches no Conv2d/Linear layer (or attention module) of the model.{hint} keep takes "
        "the tokens "
        f"{', '.join(KEEP_TOKENS)}, module types, or fnmatch patterns on the layer names: {shown or 'none'}"
    )


def full_precision_layers(model: nn.Module, keep: Iterable = (), *, keep_defaults: bool = True) -> list[str]:
    """Names of the conv/linear layers that ``binarize(model, keep=keep, keep_defaults=...)`` leaves real."""
    cands, rules, kept_attention, aliases = _plan(model, keep, keep_defaults, _attention_rebuilds(model))
    return [
        n
        for i, (n, m) in enumerate(cands)
        if _is_kept(aliases[id(m)], m, i, len(cands), rules) or any(n.startswith(a + ".") for a in kept_attention)
    ]


def _plan(model: nn.Module, keep, keep_defaults: bool, rebuilds: dict):
    """Candidates in module order (attention rebuilt), checked keep rules, the attention modules a
    rule keeps whole (by type, e.g. ``nn.MultiheadAttention``, or by name), and every layer's names."""
    cands, aliases = _layers(model, rebuilds)
    extra = [a for _, m in cands for a in aliases[id(m)]] + list(rebuilds) + [n for n, _ in _unconvertible(model)]
    rules = _keep_rules(keep, keep_defaults, cands, extra)
    kept_ids = {id(m) for n, m in rebuilds.items() if _is_kept(n, model.get_submodule(n), -1, len(cands), rules)}
    kept_attention = [n for n, m in rebuilds.items() if id(m) in kept_ids]  # a shared module: all its names
    return cands, rules, kept_attention, aliases


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
    changes nothing (a warning says so): the layers kept real stay real, and the estimators
    stay as they are.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"binarize expects an nn.Module, got {type(model).__name__}")
    done = [n for n, m in model.named_modules() if isinstance(m, BinaryLayer)]
    if done:
        # converting again would re-apply the default keep list and binarize layers kept real on purpose
        warnings.warn(
            f"binarize: the model is already binarized ({len(done)} binary layer(s), e.g. {done[0] or '(model)'}); "
            "it is left unchanged. To convert it with other options, start again from the float model; to change "
            "estimator parameters, use reste.set_params",
            UserWarning,
            stacklevel=2,
        )
        return model
    wspec = estimator if weight_estimator == "same" else weight_estimator
    rebuilds = _attention_rebuilds(model)
    cands, rules, kept_attention, aliases = _plan(model, keep, keep_defaults, rebuilds)
    for name in kept_attention:
        del rebuilds[name]
    # the options that concern every layer (estimator names and parameters, weight_scale, input_padding)
    # are checked once, so their errors name the option, not the first layer they would reach
    BinaryLinear(
        1,
        1,
        weight_estimator=_fresh(wspec),
        input_estimator=_fresh(estimator) if activations else None,
        weight_scale=weight_scale,
        input_padding=input_padding,
        estimator_params=estimator_params,
    )
    # every replacement is built before any is installed: an error leaves the model as it was
    installs: list[tuple[str, nn.Module]] = list(rebuilds.items())
    swapped, kept = [], list(kept_attention)
    for index, (name, module) in enumerate(cands):
        if any(name.startswith(a + ".") for a in kept_attention):
            continue
        if isinstance(module, BinaryLayer) or type(module) not in _SWAPS:
            continue  # already binary, or a subclass we do not know how to rebuild
        if _is_kept(aliases[id(module)], module, index, len(cands), rules):
            kept.append(name)
            continue
        if name == "":
            raise ValueError(
                "the model itself is a single Conv2d/Linear; wrap it in a container or build a BinaryConv2d directly"
            )
        try:
            new = _SWAPS[type(module)].from_float(
                module,
                weight_estimator=_fresh(wspec),
                input_estimator=_fresh(estimator) if activations else None,
                weight_scale=weight_scale,
                input_padding=input_padding,
                estimator_params=estimator_params,
            )
        except (ValueError, TypeError) as err:  # this layer's geometry: name it; nothing was changed yet
            if type(err) not in (ValueError, TypeError):
                raise  # a subclass may take other constructor arguments: as it is
            raise type(err)(
                f"binarize: layer {name!r} ({module}): {str(err).rstrip('.')}. The model is unchanged; keep the "
                f"layer real with keep=[{name!r}], or change it"
            ) from err
        installs += [(n, new) for n in aliases[id(module)]]
        swapped.append(name)
    for name, replacement in installs:  # outer modules first, so an attention's projections land in the new one
        _install(model, name, replacement)
    _no_fused_encoders(model)
    logger.info(
        "binarize: %d layer(s) made binary: %s; kept real: %s",
        len(swapped),
        ", ".join(swapped) or "none",
        ", ".join(kept) or "none",
    )
    if not swapped:
        reason = (
            f"none of its {len(cands)} Conv2d/Linear layer(s) was converted (kept real: {', '.join(kept) or 'none'}; "
            f"the defaults {DEFAULT_KEEP} keep the first and last layer, keep_defaults=False binarizes them too)"
            if cands
            else "it has no nn.Conv2d or nn.Linear module (a forward that calls F.conv2d / F.linear on its own "
            "parameters is not seen; build it from nn.Conv2d / nn.Linear, or use reste.nn.BinaryConv2d directly)"
        )
        warnings.warn(f"binarize made no layer binary: {reason}", UserWarning, stacklevel=2)
    left = [
        (n, m)
        for n, m in _unconvertible(model)
        if not any(
            fnmatch.fnmatchcase(n, r) or isinstance(r, type) and isinstance(m, r)
            for r in rules
            if not isinstance(r, str) or r not in KEEP_TOKENS
        )
    ]
    if left:
        shown = ", ".join(f"{n} ({type(m).__name__})" for n, m in left[:8]) + (
            f", ... ({len(left)} in all)" if len(left) > 8 else ""
        )
        warnings.warn(
            f"binarize cannot convert {len(left)} layer(s), which stay real: {shown}. Only nn.Conv2d, nn.Linear and "
            "nn.MultiheadAttention (exact types) are binarized; rebuild these from those, or name them in keep= "
            "to say they stay real on purpose",
            UserWarning,
            stacklevel=2,
        )
    return model


def _install(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def _no_fused_encoders(model: nn.Module, also: tuple[type, ...] = ()) -> None:
    """Keep PyTorch's fused eval-mode transformer kernels off the binarized parts.

    ``nn.TransformerEncoderLayer`` in eval mode without autograd calls one fused kernel on its
    raw weights (``linear1.weight``, the attention's ``in_proj_weight``): it would compute with
    the latent float weights past every binary layer. Its ``activation_relu_or_gelu`` flag is
    read only to choose that path, so clearing it keeps the module's own forward. The nested
    tensor path of ``nn.TransformerEncoder`` would feed our attention nested tensors: off too.
    ``also``: more layer types that count as binary (the deploy loader's packed layers, which
    have no ``weight`` for that kernel to read).
    """

    def touched(m):
        return any(isinstance(a, (MultiheadAttention, BinaryLayer, *also)) for a in m.modules())

    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and touched(m):
            m.use_nested_tensor = False
        if isinstance(m, nn.TransformerEncoderLayer) and touched(m):
            m.activation_relu_or_gelu = False


def _fresh(spec):
    """Each layer gets its own estimator instance (own buffers, own DSQ alpha)."""
    import copy

    return copy.deepcopy(spec) if isinstance(spec, Estimator) else spec
