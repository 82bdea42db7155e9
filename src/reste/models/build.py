"""Models from a training configuration: what ``reste train`` builds, export rebuilds and a
teacher or ``reste eval`` loads, in one place.

``cfg`` is a :class:`reste.train.Config` (or anything with its ``model``, ``estimator`` and
``data`` sections), ``meta`` the data set's :func:`reste.data.info`. A bad ``model.kwargs``
is a :class:`reste.train.ConfigError`.

Layering: ``models`` sits below ``train`` and imports nothing of it (not even inside a function:
``reste.train`` imports this module). The config is duck-typed; ``ConfigError`` comes from
:mod:`reste.errors`, where ``reste.train.config`` takes it from too.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError, short_repr
from .registry import check_size, create

__all__ = ["model_arguments", "check_model", "build_model"]

#: what building a model from a wrong model.kwargs raises (width: .inf an OverflowError, a huge
#: width an allocator RuntimeError): all are a configuration error
_BUILD_ERRORS = (TypeError, ValueError, OverflowError, RuntimeError, MemoryError, ZeroDivisionError)


def model_arguments(cfg, meta) -> dict:
    """The ``reste.models.create`` arguments of a config: classes, channels and image size
    from the data set ``meta`` (``reste.data.info``), estimator parameters from ``estimator.params``.
    Export stores this dict, so a deployed model is rebuilt exactly as training built it."""
    kwargs = dict(cfg.model.kwargs)
    if cfg.estimator.params:
        kwargs["estimator_params"] = dict(cfg.estimator.params)
    args = {
        "name": cfg.model.name,
        "num_classes": meta.num_classes,
        "in_channels": meta.in_channels,
        "precision": cfg.model.precision,
        "estimator": cfg.model.estimator,
        "image_size": meta.image_size,
        "init": cfg.model.init,
    }
    for key in [k for k in kwargs if k in args]:  # set by the data set or by a model.* key
        given = {"num_classes", "in_channels", "image_size"}
        source = f"the data set ({meta.name}: {args[key]})" if key in given else f"model.{key}"
        if key not in given or kwargs[key] != args[key]:
            raise ConfigError(f"model.kwargs.{key}={short_repr(kwargs[key])}: {key} is set from {source}; leave it out")
        del kwargs[key]  # the same value: harmless
    return {**args, "kwargs": kwargs}


def _model_label(cfg) -> str:
    return (
        f"model {cfg.model.name!r} from model.kwargs={short_repr(cfg.model.kwargs)} "
        f"estimator.params={short_repr(cfg.estimator.params)}"
    )


def _yaml_hint(cfg) -> str:
    """``{width:0.25}`` is YAML for the key ``"width:0.25"`` with no value: say so."""
    glued = [k for k, v in dict(cfg.model.kwargs).items() if v is None and isinstance(k, str) and ":" in k]
    if not glued:
        return ""
    key, _, value = glued[0].partition(":")
    return f" (YAML needs a space after the colon: model.kwargs={{{key}: {value}}}, or model.kwargs.{key}={value})"


def check_model(cfg, meta) -> None:
    """Build the model on the meta device (shapes only, no memory) and check that training it
    fits this process's memory; ConfigError otherwise, so ``model.kwargs={width: 300}`` is
    refused before anything is allocated (or any data read)."""
    args = model_arguments(cfg, meta)
    kwargs = args.pop("kwargs")
    try:
        with torch.device("meta"):
            problem = check_size(create(args.pop("name"), **args, **kwargs))
    except _BUILD_ERRORS as err:
        raise ConfigError(f"cannot build {_model_label(cfg)}: {str(err)[:200]}{_yaml_hint(cfg)}") from None
    if problem:
        raise ConfigError(f"{_model_label(cfg)}: {problem}; lower the width or size in model.kwargs")


def build_model(cfg, meta) -> nn.Module:
    """``reste.models.create`` from the config, after :func:`check_model`; a bad ``model.kwargs``
    is a :class:`ConfigError`."""
    check_model(cfg, meta)
    return _create_model(cfg, meta)


def _create_model(cfg, meta) -> nn.Module:
    """:func:`build_model` for a config :func:`check_model` has already passed."""
    args = model_arguments(cfg, meta)
    kwargs = args.pop("kwargs")
    try:
        return create(args.pop("name"), **args, **kwargs)
    except _BUILD_ERRORS as err:
        raise ConfigError(f"cannot build {_model_label(cfg)}: {str(err)[:200]}") from None
