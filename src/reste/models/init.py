"""Weight initialisation of the registered models: ``model.init`` / ``create(..., init=...)``.

Two choices:

- ``"pytorch"``: the model as built: PyTorch's default initialisation of every layer
  (``nn.Conv2d`` / ``nn.Linear``: Kaiming-uniform with ``a = sqrt(5)``, i.e. U(-b, b) with
  b = 1/sqrt(fan_in); BatchNorm weight 1, bias 0), plus whatever the architecture sets
  itself (the ViT's truncated normals). This is what reste always did, and nothing is
  drawn or changed: a model built with a given seed is bit-identical to before.
- ``"reference"``: what the paper's reference code (DravenALG/ReSTE, ``model/models_cifar``
  and ``model/models_imagenet``) does for that model, applied once to the float network
  right after it is built, before binarization (binary layers share the float layer's
  weight tensor, so the latent weights of the binary layers get it) and before any weight
  loading (``model.init_from``, a resumed checkpoint and an export's weights replace it).

What ``"reference"`` does, per model (the reference code's own calls, reproduced exactly):

=================  ==========================================================================
model              reference initialisation
=================  ==========================================================================
resnet20,          ``init.kaiming_normal_(weight, nonlinearity="relu")`` (fan-in, gain sqrt 2)
resnet20_bireal    on every Conv2d and Linear weight (binary or not; the Linear's bias keeps
                   PyTorch's default); BatchNorm2d weight 1, bias 0
vgg_small          every Conv2d weight ``normal_(0, sqrt(2 / (k*k*out_channels)))`` (Kaiming-
                   normal, fan-out, gain sqrt 2), conv bias 0; BatchNorm2d weight 1, bias 0;
                   Linear weight ``normal_(0, 0.01)``, bias 0
resnet18, resnet34 ``init.kaiming_normal_(weight)`` (fan-in, leaky_relu with a = 0: gain sqrt 2)
(ImageNet)         on every Conv2d weight (stem, binary 3x3, 1x1 shortcut); the Linear keeps
                   PyTorch's default; BatchNorm2d weight 1, bias 0
resnet18_cifar     nothing: the reference code has no initialisation code for it (PyTorch's
                   defaults), so ``reference`` is ``pytorch`` here
vit_tiny           the reference code has no ViT; ``reference`` keeps the model's own
                   initialisation (the usual ViT one: truncated normal std 0.02 on every Linear
                   weight, zero biases, position embedding and class token; PyTorch's default
                   on the patch-embedding conv), so it is ``pytorch`` here too
=================  ==========================================================================

BatchNorm weight 1 / bias 0 is also PyTorch's default, so those lines change nothing; they are
kept to mirror the reference. A model registered by a user has no reference initialisation:
``init="reference"`` is an error for it unless one is registered with
:func:`register_reference_init`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..errors import did_you_mean

__all__ = ["INITS", "DEFAULT_INIT", "register_reference_init", "has_reference_init", "apply_init", "check_init"]

#: the choices of ``model.init``
INITS = ("reference", "pytorch")
#: reste's default until measured (issue 18); the paper configs set ``reference``
DEFAULT_INIT = "pytorch"

_REFERENCE: dict[str, Callable[[nn.Module], None]] = {}


def register_reference_init(*names: str) -> Callable[[Callable[[nn.Module], None]], Callable[[nn.Module], None]]:
    """Decorator: ``fn(model)`` is what ``init="reference"`` does to the float models ``names``."""

    def wrap(fn: Callable[[nn.Module], None]) -> Callable[[nn.Module], None]:
        for name in names:
            _REFERENCE[name] = fn
        return fn

    return wrap


def has_reference_init(name: str) -> bool:
    return name in _REFERENCE


def check_init(init) -> str:
    """``init`` if it is one of :data:`INITS`, else a ValueError listing them (with the closest)."""
    if isinstance(init, str) and init in INITS:
        return init
    raise ValueError(
        f"unknown init {init!r}; use one of {', '.join(INITS)} (see docs/models.md).{did_you_mean(init, INITS)}"
    )


def apply_init(model: nn.Module, name: str, init: str) -> nn.Module:
    """Initialise the float model ``name`` (as :func:`reste.models.create` built it) in place."""
    if check_init(init) == "pytorch":
        return model
    try:
        fn = _REFERENCE[name]
    except KeyError:
        known = ", ".join(sorted(_REFERENCE))
        raise ValueError(
            f"model {name!r} has no reference initialisation (the paper's code does not have it; models with one: "
            f"{known}); use init='pytorch', or register one with the decorator "
            f"@reste.models.init.register_reference_init({name!r})"
        ) from None
    with torch.no_grad():
        fn(model)
    return model


def _batchnorm2d_one_zero(m: nn.BatchNorm2d) -> None:
    m.weight.fill_(1)
    m.bias.zero_()


# ----------------------------------------------------------------------------- the reference code's inits
@register_reference_init("resnet20", "resnet20_bireal")
def _cifar_resnet20(model: nn.Module) -> None:
    # model/models_cifar/resnet20.py and resnet20_bireal.py, ResNet.__init__:
    #     if isinstance(m, nn.BatchNorm2d): m.weight.data.fill_(1); m.bias.data.zero_()
    #     if isinstance(m, nn.Linear) or isinstance(m, nn.Conv2d): init.kaiming_normal_(m.weight, nonlinearity="relu")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            _batchnorm2d_one_zero(m)
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")


@register_reference_init("vgg_small")
def _vgg_small(model: nn.Module) -> None:
    # model/models_cifar/vgg_small.py, vgg_small_1w1a_._initialize_weights (BinarizeConv2d is an nn.Conv2d):
    #     Conv2d: n = k0 * k1 * out_channels; weight.normal_(0, sqrt(2 / n)); bias zero
    #     BatchNorm2d: weight 1, bias 0;  Linear: weight.normal_(0, 0.01); bias zero
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.normal_(0, math.sqrt(2.0 / n))
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            _batchnorm2d_one_zero(m)
        elif isinstance(m, nn.Linear):
            m.weight.normal_(0, 0.01)
            m.bias.zero_()


@register_reference_init("resnet18", "resnet34")
def _imagenet_resnet(model: nn.Module) -> None:
    # model/models_imagenet/resnet18.py and resnet34.py, ResNet.__init__:
    #     if isinstance(m, nn.Conv2d): init.kaiming_normal_(m.weight)
    #     elif isinstance(m, nn.BatchNorm2d): m.weight.data.fill_(1); m.bias.data.zero_()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            _batchnorm2d_one_zero(m)


@register_reference_init("resnet18_cifar", "vit_tiny")
def _as_built(model: nn.Module) -> None:
    # resnet18_cifar: model/models_cifar/resnet18.py has no initialisation code (PyTorch's defaults);
    # vit_tiny: the reference code has no ViT, the model keeps its own (ViT) initialisation
    return None
