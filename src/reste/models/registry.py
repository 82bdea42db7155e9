"""The model registry: ``create`` a network by name in one of three precisions.

Every architecture is written once, as a plain float network. ``create`` builds
it and, for the binary precisions, converts it with :func:`reste.binarize`,
leaving in full precision the layers the architecture names in its
``full_precision`` attribute (fnmatch patterns on module names, or the tokens
``"first"``/``"last"``/``"pointwise"`` of ``binarize``'s ``keep``). So
``precision="fp"`` is exactly the same network with real weights and real
activations, a like-for-like baseline.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from ..estimators import Estimator

from ..errors import did_you_mean
from ..nn import BinaryLayer, binarize
from .init import DEFAULT_INIT, apply_init, check_init

__all__ = [
    "PRECISIONS",
    "DEFAULT_FULL_PRECISION",
    "register_model",
    "names",
    "create",
    "describe",
    "LayerInfo",
    "ModelDescription",
]

#: ``1w1a``: binary weights and binary layer inputs; ``1w32a``: binary weights, real
#: inputs; ``fp``: the float network
PRECISIONS = ("1w1a", "1w32a", "fp")

#: what stays real in a registered model that does not say otherwise
DEFAULT_FULL_PRECISION = ("first", "last")

ModelBuilder = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator: make a float-model builder available to :func:`create` by ``name``.

    The builder (a function or an ``nn.Module`` class) is called as
    ``builder(num_classes=..., in_channels=..., **architecture_kwargs)`` and returns
    a float model built from ``nn.Conv2d`` / ``nn.Linear``. The model's
    ``full_precision`` attribute (class or instance) lists the layers that must stay
    real when it is binarized; without one, the first and last layer stay real.

    >>> @register_model("tiny_mlp")
    ... def tiny_mlp(num_classes=10, in_channels=1, hidden=64):
    ...     return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 28 * 28, hidden),
    ...                          nn.ReLU(), nn.Linear(hidden, hidden), nn.Linear(hidden, num_classes))
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a model name must be a non-empty string, got {name!r}")

    def wrap(builder: ModelBuilder) -> ModelBuilder:
        if name in _REGISTRY:
            raise ValueError(
                f"model name {name!r} is already registered (by {_REGISTRY[name].__qualname__}); pick another name"
            )
        params = inspect.signature(builder).parameters
        missing = [arg for arg in ("num_classes", "in_channels") if arg not in params]
        if missing:
            raise TypeError(
                f"model builder {builder.__qualname__} must accept {missing}; create() always passes num_classes "
                "and in_channels"
            )
        _REGISTRY[name] = builder
        return builder

    return wrap


def names() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def _builder(name: str) -> ModelBuilder:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(names())}.{did_you_mean(name, _REGISTRY)}"
        ) from None


def _architecture_kwargs(builder: ModelBuilder) -> set[str]:
    params = inspect.signature(builder).parameters
    return {
        n
        for n, p in params.items()
        if n not in ("num_classes", "in_channels") and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def architecture_options(name, given: dict | None = None) -> dict:
    """The architecture options model ``name`` is built with from ``given`` (a config's
    ``model.kwargs``): those of ``given`` its builder takes, and every other option's default, but
    the ones the trainer sets from the data set (classes, channels, image size). ``given`` as it is
    for a name not registered here. (A report compares runs, and a warm start architectures, by it.)"""
    given = dict(given or {})
    builder = _REGISTRY.get(name) if isinstance(name, str) else None
    if builder is None:
        return given
    params = inspect.signature(builder).parameters
    options = {k: v for k, v in given.items() if k in params}
    for p in params.values():
        if p.default is not p.empty and p.name not in ("num_classes", "in_channels", "image_size"):
            options.setdefault(p.name, p.default)
    return options


def create(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    precision: str = "1w1a",
    estimator: str | Estimator | None = "reste",
    *,
    image_size: int | None = None,
    estimator_params: dict | None = None,
    weight_estimator: str | Estimator | None = "same",
    weight_scale: str = "layer_mean",
    input_padding: str = "zero",
    init: str = DEFAULT_INIT,
    **kwargs: Any,
) -> nn.Module:
    """Build the registered model ``name`` in the given precision.

    Args:
        name: one of :func:`names` (``resnet20``, ``resnet20_bireal``, ``resnet18_cifar``,
            ``vgg_small``, ``resnet18``, ``resnet34``, ``vit_tiny``, plus any registered model).
        num_classes, in_channels: classifier outputs and image channels (1 for (Fashion-)MNIST).
        precision: ``"1w1a"`` (binary weights and inputs), ``"1w32a"`` (binary weights,
            real inputs) or ``"fp"`` (the same network, all real).
        estimator: gradient estimator of the binary layers (name or instance, see
            ``reste.estimators()``).
        image_size: input height = width. Passed to models whose shape depends on it
            (``vgg_small``'s classifier, ``vit_tiny``'s patch grid); the ResNets pool
            globally, take any size and ignore it.
        estimator_params: keyword arguments for the estimators, e.g. ``{"o": 1.0}``.
        weight_estimator: ``"same"`` (use ``estimator``), another estimator, or
            ``"dorefa"`` (DoReFa-Net's weight binarizer, the ViT baseline).
        weight_scale, input_padding: see :class:`reste.nn.BinaryConv2d`.
        init: ``"pytorch"`` (the default: the model as built, PyTorch's layer defaults) or
            ``"reference"`` (what the paper's reference code does for this model, see
            :mod:`reste.models.init`), applied to the float network before binarization.
        **kwargs: architecture options of the model (e.g. ``width`` for the CNNs;
            ``patch_size``, ``dim``, ``depth``, ``heads``, ``mlp_dim`` for the ViT).

    The binarization options are ignored for ``precision="fp"``, so one configuration
    can switch precision without editing the rest.
    """
    builder = _builder(name)
    check_init(init)
    if precision not in PRECISIONS:
        raise ValueError(
            f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)} (W = weight bits, A = activation "
            "bits)"
        )
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    accepted = _architecture_kwargs(builder)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        options = ", ".join(sorted(accepted)) or "none"
        raise TypeError(f"model {name!r} does not take {', '.join(unknown)}; its architecture options are: {options}")
    if image_size is not None and "image_size" in accepted:
        kwargs["image_size"] = image_size
    model = builder(num_classes=num_classes, in_channels=in_channels, **kwargs)
    apply_init(model, name, init)  # once, on the float layers; binary layers share their weight tensors
    if precision == "fp":
        return model
    return binarize(
        model,
        estimator=estimator,
        activations=precision == "1w1a",
        keep=getattr(model, "full_precision", DEFAULT_FULL_PRECISION),
        keep_defaults=False,  # the architecture's list is complete
        weight_estimator=weight_estimator,
        weight_scale=weight_scale,
        input_padding=input_padding,
        estimator_params=estimator_params,
    )


@dataclass(frozen=True)
class LayerInfo:
    """One conv or linear layer of a model, as :func:`describe` sees it."""

    name: str
    kind: str  # e.g. "Conv2d 3x3/2" or "Linear"
    shape: tuple  # weight shape
    weights: str  # "real", or the weight estimator's name ("reste", "dorefa", ...)
    inputs: str  # "real", or the input estimator's name
    params: int  # parameters of the layer (weight and bias)

    @property
    def binary_weights(self) -> bool:
        return self.weights != "real"

    @property
    def binary_inputs(self) -> bool:
        return self.inputs != "real"


@dataclass(frozen=True)
class ModelDescription:
    """Which layers of a model are binary; ``print`` it for a table."""

    layers: tuple[LayerInfo, ...]
    total_params: int
    #: weights stored as one bit each once deployed (latent weights of binary layers)
    binary_params: int
    norm_layers: int

    @property
    def real_params(self) -> int:
        return self.total_params - self.binary_params

    def __str__(self) -> str:
        rows = [("layer", "kind", "weight shape", "weights", "inputs", "params")]
        rows += [
            (l.name, l.kind, "x".join(map(str, l.shape)), l.weights, l.inputs, f"{l.params:,}") for l in self.layers
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        n_binary = sum(l.binary_weights for l in self.layers)
        lines.append(
            f"{len(self.layers)} conv/linear layers ({n_binary} with binary weights, {len(self.layers) - n_binary} "
            "real), "
            f"{self.norm_layers} normalization layers (real); parameters: {self.total_params:,} total, "
            f"{self.binary_params:,} binary, {self.real_params:,} real"
        )
        return "\n".join(lines)


def _estimator_label(module: nn.Module, which: str) -> str:
    est = getattr(module, "weight_estimator" if which == "weights" else "input_estimator", None)
    return "real" if est is None else est.name


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        stride = module.stride[0] if module.stride[0] == module.stride[1] else module.stride
        return f"Conv2d {kh}x{kw}" + (f"/{stride}" if stride != 1 else "")
    return "Linear"


def describe(model: nn.Module) -> ModelDescription:
    """List every conv/linear layer of ``model`` with the precision of its weights and inputs.

    >>> print(describe(create("resnet20", precision="1w32a")))  # doctest: +SKIP
    """
    layers = []
    binary_weights: dict[int, int] = {}  # a weight tied between layers is one set of parameters
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        binary = isinstance(module, BinaryLayer)
        layers.append(
            LayerInfo(
                name=name,
                kind=_kind(module),
                shape=tuple(module.weight.shape),
                weights=_estimator_label(module, "weights") if binary else "real",
                inputs=_estimator_label(module, "inputs") if binary else "real",
                params=sum(p.numel() for p in module.parameters(recurse=False)),
            )
        )
        if layers[-1].binary_weights:
            binary_weights[id(module.weight)] = module.weight.numel()
    norms = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    return ModelDescription(
        layers=tuple(layers),
        total_params=sum(p.numel() for p in model.parameters()),
        binary_params=sum(binary_weights.values()),
        norm_layers=sum(isinstance(m, norms) for m in model.modules()),
    )


# ----------------------------------------------------------------------------- size bound
#: training holds about this many copies of the parameters (weights, gradients, two Adam moments)
TRAINING_COPIES = 4


def memory_limit() -> int:
    """Bytes this process may use: physical memory, or a lower address-space limit (``ulimit -v``)."""
    import os

    limit = 1 << 62
    try:
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        pass
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            limit = min(limit, soft)
    except (ImportError, ValueError, OSError):  # pragma: no cover - Windows
        pass
    return limit


def check_size(model: nn.Module, copies: int = TRAINING_COPIES) -> str | None:
    """None, or why ``model`` (built on the meta device: shapes only) is too big to train here:
    ``copies`` times its parameter and buffer bytes must fit :func:`memory_limit`."""
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    limit = memory_limit()
    if total * copies > limit:
        return (
            f"it has {total / 2**30:.3g} GiB of parameters and buffers, and training needs about {copies}x that; "
            f"this process may use {limit / 2**30:.3g} GiB"
        )
    return None
