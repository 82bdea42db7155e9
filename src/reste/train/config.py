"""The training configuration: schema, defaults, loading, overrides and validation.

A configuration is a tree of dataclasses (:class:`Config` and its sections). It is
built in three layers, each overriding the one before::

    defaults (this file)  <-  YAML file  <-  overrides (``optim.lr=0.05`` or a dict)

and validated *before* any work starts: unknown keys (with the closest valid key
suggested), wrong types (with the expected type), out-of-range values, unknown
model / data set / estimator names and conflicting options all raise
:class:`ConfigError`, whose message names the key and says how to fix it.

YAML is read with ``yaml.safe_load`` (refusing a key given twice in one mapping) and
override values are parsed the same way, so a configuration is data, never code. The
defaults are the project's main job: a binary (1W/1A) ResNet-20 trained with ReSTE
(``o_end = 3``) on Fashion-MNIST.

Longer than 500 lines on purpose: the schema is one table of options (key, type, default,
help) that the YAML reader, the overrides, the validation, ``reste train --help`` and
docs/training.md's option table are all generated from or checked against, so each of them
reads the same dataclasses in this one file.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

# defined below every layer so that reste.models can raise it too (see reste.errors)
from ..errors import ConfigError, did_you_mean
from ..errors import short_repr as _short

__all__ = [
    "Config",
    "ConfigError",
    "ModelConfig",
    "EstimatorConfig",
    "DataConfig",
    "OptimConfig",
    "LRScheduleConfig",
    "TrainConfig",
    "AnalysisConfig",
    "OutConfig",
    "load_config",
    "parse_overrides",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "option_table",
    "help_epilog",
    "validate",
    "data_info",
]


#: what a config file may make the program hold, checked before the values are built: a config
#: has ~60 settings, so these refuse only hostile or broken files (e.g. a "billion laughs" of
#: nested YAML aliases, whose few hundred bytes expand to billions of values)
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 10_000
MAX_CONFIG_DEPTH = 64
#: whole-number options must fit a 64-bit integer (torch and numpy take them as such)
_MAX_INT = 2**63 - 1
MAX_THREADS = 1024


def _opt(default, help: str, choices: tuple | None = None):
    """A schema field: its default, one line of help and (optionally) the allowed values."""
    meta: dict[str, object] = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)  # type: ignore[misc]  # a copy
    return field(default=default, metadata=meta)


#: ``data.crop_scale``'s default: torchvision's RandomResizedCrop area range
DEFAULT_CROP_SCALE = [0.08, 1.0]

#: ``train.compile``'s values (:func:`reste.train.setup.compile_mode` resolves them on a device)
COMPILE_MODES = ("auto", "true", "false", "reduce-overhead")
#: string options that also take a YAML boolean, kept as "true"/"false" (train.compile was a bool)
_BOOL_AS_STRING = ("train.compile",)


# ----------------------------------------------------------------------------- schema
@dataclass
class ModelConfig:
    """Which network is trained (see ``reste.models.names()``)."""

    name: str = _opt("resnet20_bireal", "architecture, one of reste.models.names()")
    precision: str = _opt(
        "1w1a", "1w1a (binary weights and activations), 1w32a (binary weights) or fp", ("1w1a", "1w32a", "fp")
    )
    estimator: str = _opt("reste", "gradient estimator of the binary layers, one of reste.estimators()")
    kwargs: dict = _opt({}, "extra keyword arguments for reste.models.create (architecture options)")
    init: str = _opt(
        "pytorch",
        "initial weights: pytorch (PyTorch's layer defaults, as built; 1.9 points better on the main job) or "
        "reference (what the paper's code does for this model; the paper configs' choice), see docs/models.md; "
        "model.init_from and resume replace them",
        ("pytorch", "reference"),
    )
    init_from: str | None = _opt(
        None,
        "start from a trained run's weights (RUN_DIR: best.pt, else last.pt; or a .pt file): matching tensors "
        "copied, estimators and optimizer fresh, the rest reported",
    )


@dataclass
class EstimatorConfig:
    """How the estimator's parameters evolve (ReSTE's power o)."""

    o_end: float = _opt(3.0, "ReSTE's final power o (>= 1; o = 1 is the clipped identity)")
    schedule: str = _opt(
        "cosine", "how o rises from 1 to o_end (fixed keeps o = o_end)", ("fixed", "linear", "cosine", "power")
    )
    per: str = _opt("step", "update o once per epoch (the reference) or every step", ("epoch", "step"))
    p: float = _opt(2.0, "exponent of the 'power' schedule, o = 1 + (o_end - 1) * r^p")
    params: dict = _opt({}, "extra estimator parameters, e.g. {t: 1.5, m: 0.1} for reste")


@dataclass
class DataConfig:
    """The data set and its loaders (see ``reste.data.names()``)."""

    name: str = _opt("fashion_mnist", "data set, one of reste.data.names()")
    root: str | None = _opt(
        None,
        "data folder, the only place looked at when set (default: $RESTE_DATA or ~/.cache/reste/data, then system "
        "folders)",
    )
    batch_size: int = _opt(128, "GLOBAL training batch (split evenly across distributed ranks)")
    test_batch_size: int | None = _opt(512, "evaluation batch per rank (null = batch_size)")
    augment: bool = _opt(
        False,
        "training augmentation of the data set's recipe (random crop, flips); off in the short main job, on in the "
        "paper configs",
    )
    crop_scale: list = _opt(
        DEFAULT_CROP_SCALE,
        "[lo, hi], 0 < lo <= hi: area range of imagenet's training RandomResizedCrop, as fractions of the image "
        "(torchvision's default; the paper's code and configs/imagenet/resnet*: [0.08, 1.25], whose too-large "
        "draws are rejected); other data sets have none and refuse another value",
    )
    subset: int | None = _opt(None, "use only the first N training images (and N // 5 test images)")
    test_subset: int | None = _opt(
        None, "evaluate on the first N test images (null = as data.subset says: N // 5 of them, or all without one)"
    )
    num_classes: int | None = _opt(
        None,
        "outputs of the model's head (null = the data set's; a class-folder data set such as imagenet: its number of "
        "class folders, recorded here when training starts)",
    )
    num_workers: int = _opt(0, "decoding workers (ImageNet only; in-memory sets ignore it)")
    download: bool | None = _opt(
        None,
        "download a missing data set: null = into the per-user folder when data.root is unset; true = into "
        "data.root too; false = never",
    )


@dataclass
class OptimConfig:
    """The optimizer."""

    name: str = _opt("adam", "optimizer", ("sgd", "adam", "adamw"))
    lr: float = _opt(0.002, "peak learning rate (no hidden scaling with batch size or ranks)")
    momentum: float = _opt(0.9, "SGD momentum")
    nesterov: bool = _opt(False, "SGD Nesterov momentum")
    weight_decay: float = _opt(0.0, "weight decay (L2 for sgd/adam, decoupled for adamw)")
    betas: list = _opt([0.9, 0.999], "Adam/AdamW betas [beta1, beta2]")
    decay_all: bool = _opt(
        True, "decay every parameter, as the reference; false exempts BatchNorm, biases and estimator parameters"
    )


@dataclass
class LRScheduleConfig:
    """The learning-rate schedule: linear warm-up, then the decay."""

    name: str = _opt(
        "cosine",
        "decay after warm-up: cosine to final_lr_ratio * lr, linear, or constant",
        ("cosine", "linear", "constant"),
    )
    warmup_epochs: float = _opt(0.0, "linear warm-up length in epochs (fractions allowed with per: step)")
    per: str = _opt(
        "step", "update the lr every epoch (the reference: constant within an epoch) or every step", ("epoch", "step")
    )
    final_lr_ratio: float = _opt(0.0, "lr at the end of the decay, as a fraction of optim.lr")


@dataclass
class TrainConfig:
    """The training loop."""

    epochs: int = _opt(4, "number of epochs")
    device: str = _opt("auto", "auto (cuda if available), cpu, cuda or cuda:N")
    threads: int = _opt(0, "CPU threads for torch (0 = torch's default)")
    compile: str = _opt(
        "auto",
        "torch.compile the model: auto (on CUDA; CPU stays eager), true, false, or reduce-overhead (CUDA graphs "
        "as well: static shapes, more memory); true/false from older configs are read as such",
        COMPILE_MODES,
    )
    channels_last: bool = _opt(False, "channels-last memory format for model and images")
    amp: str = _opt("none", "autocast precision: bf16 (recommended on CUDA) or none", ("none", "bf16"))
    label_smoothing: float = _opt(0.0, "cross-entropy label smoothing in [0, 1)")
    sync_bn: bool = _opt(False, "synchronise BatchNorm statistics across ranks (distributed only)")
    grad_clip: float = _opt(0.0, "clip the gradient norm to this value (0 = off)")
    nonfinite: str = _opt(
        "stop",
        "on a NaN/inf loss or gradient: stop (keeping the last good checkpoint) or skip the batch",
        ("stop", "skip"),
    )
    checkpoint_every: int = _opt(1, "write checkpoints/last.pt every N epochs (always at the end)")
    checkpoint_every_steps: int = _opt(
        0,
        "also write checkpoints/last.pt every N training steps, mid-epoch (0 = off); a killed run loses at most N "
        "steps",
    )
    teacher: str | None = _opt(
        None,
        "distil from a trained run (RUN_DIR or its checkpoint file): adds w * T^2 * KL(teacher || student) of the "
        "softened logits",
    )
    distill_weight: float = _opt(
        1.0, "w: loss = (1 - w) * cross-entropy + w * T^2 * KL; 1 is ReActNet's distributional loss alone"
    )
    distill_temperature: float = _opt(1.0, "T: softmax temperature of teacher and student logits in the KL term")
    dist_timeout_s: int = _opt(600, "distributed: seconds a rank waits for the others before failing")
    extended_from: list = _opt(
        [],
        "set by --resume train.epochs=N: the train.epochs the run had before (its lr and o schedules were "
        "stretched mid-run, so reports keep it apart from runs planned that long)",
    )


@dataclass
class AnalysisConfig:
    """The equilibrium indicators (estimating error, gradient instability)."""

    indicators: bool = _opt(True, "measure est_error, est_error_end, grad_instability, flip_ratio each epoch")
    every_steps: int = _opt(0, "also measure every N steps into indicators.jsonl (0 = per epoch only)")
    histograms_at: list = _opt(
        [], "epochs whose fitting-error / gradient histograms are saved (and the final epoch, with indicators on)"
    )


@dataclass
class OutConfig:
    """Where the run directory goes."""

    dir: str = _opt("runs", "parent folder of run directories")
    name: str | None = _opt(None, "run directory name (default <name>-<YYYYmmdd-HHMMSS>)")


@dataclass
class Config:
    """A whole training configuration."""

    name: str | None = _opt(None, "run name (default <data>-<model>-<precision>-<estimator>)")
    seed: int = _opt(0, "seed of Python, NumPy, torch and the data order")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": ModelConfig.__doc__})
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig, metadata={"help": EstimatorConfig.__doc__})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": DataConfig.__doc__})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": OptimConfig.__doc__})
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig, metadata={"help": LRScheduleConfig.__doc__})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": TrainConfig.__doc__})
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig, metadata={"help": AnalysisConfig.__doc__})
    out: OutConfig = field(default_factory=OutConfig, metadata={"help": OutConfig.__doc__})

    @property
    def run_name(self) -> str:
        """``name``, or one derived from the data set, model, precision and estimator."""
        if self.name:
            return self.name
        parts = [self.data.name, self.model.name, self.model.precision]
        if self.model.precision != "fp":
            parts.append(self.model.estimator)
        return "-".join(parts)

    def to_dict(self) -> dict:
        return config_to_dict(self)


# ----------------------------------------------------------------------------- schema walking
def _is_section(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp) -> tuple[Any, bool]:
    """(inner type, whether None is allowed)."""
    origin = typing.get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _type_name(tp) -> str:
    inner, optional = _unwrap_optional(tp)
    name = getattr(inner, "__name__", str(inner))
    return f"{name} or null" if optional else name


def _leaves(cls=Config, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """Every leaf option as (dotted key, dataclass field, type), in schema order."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if _is_section(tp):
            yield from _leaves(tp, key + ".")
        else:
            yield key, f, tp


def _all_keys() -> list[str]:
    keys = []
    for key, _, _ in _leaves():
        keys.append(key)
    sections = [f.name for f in dataclasses.fields(Config) if _is_section(_hints(Config)[f.name])]
    return keys + sections


def _default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[operator]  # every field without a default has a factory (_opt)


def _unknown_key_error(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # a misspelt last part: compare the last components only
        last = key.rsplit(".", 1)[-1]
        by_last = {k.rsplit(".", 1)[-1]: k for k in valid}
        close = [by_last[c] for c in difflib.get_close_matches(last, list(by_last), n=1, cutoff=0.6)]
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'.{hint} Run `reste train --help` for every option.")


# ----------------------------------------------------------------------------- values
def _coerce(key: str, value, tp):
    """Check ``value`` against the schema type ``tp``; return it normalised (int -> float, ...)."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(
            f"{key} must be of type {_type_name(tp)}, got null; set a value or remove the key to use the default"
        )

    # built only on error, and cut short: a valid value may be large, and never needs formatting
    def expected() -> str:
        return f"{key} must be of type {_type_name(tp)}, got {_short(value)} ({type(value).__name__})"

    if inner is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{expected()}; write true or false")
    if inner is int:
        number = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, float) and value.is_integer():
            number = int(value)
        if number is None:
            raise ConfigError(f"{expected()}; write a whole number, e.g. {key}=10")
        if abs(number) > _MAX_INT:  # e.g. seed=1e21: torch and numpy take 64-bit integers
            raise ConfigError(
                f"{key}={_short(value)} is out of range: whole-number options must lie within +-(2**63 - 1)"
            )
        return number
    if inner is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string: accept plain numeric literals
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{expected()}; write a number, e.g. {key}=0.1")
    if inner is str:
        if isinstance(value, bool) and key in _BOOL_AS_STRING:
            return "true" if value else "false"
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key in ("train.device",):
            return str(value)
        raise ConfigError(f"{expected()}; write a string")
    if inner is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{expected()}; write a list, e.g. {key}=[1, 2]")
    if inner is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{expected()}; write a mapping, e.g. {key}={{a: 1}}")
    raise TypeError(f"unsupported schema type {tp!r} for {key}")  # a bug in the schema, not the user's


def _set_section(obj, data: dict, prefix: str) -> None:
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "the configuration"
        raise ConfigError(f"{where} must be a mapping of keys to values, got {_short(data)}")
    hints = _hints(type(obj))
    names = {f.name: f for f in dataclasses.fields(obj)}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise _unknown_key_error(key, _all_keys())
        tp = hints[name]
        if _is_section(tp):
            if value is None:
                continue
            _set_section(getattr(obj, name), value, key + ".")
        elif isinstance(value, _Entries):  # model.kwargs.dim=24: one entry, the others kept
            setattr(obj, name, _coerce(key, {**getattr(obj, name), **value}, tp))
        else:
            setattr(obj, name, _coerce(key, value, tp))


def config_from_dict(data: dict | None, base: Config | None = None) -> Config:
    """A :class:`Config` from a (nested) dict, on top of ``base`` (default: the defaults).

    Type-checks every value; does not run the range checks of :func:`validate`.
    """
    cfg = Config() if base is None else config_from_dict(config_to_dict(base))
    if data:
        _set_section(cfg, data, "")
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """A plain nested dict (only str/int/float/bool/None/list/dict): YAML- and checkpoint-safe."""
    return dataclasses.asdict(cfg)


class _Dumper(yaml.SafeDumper):
    """Block style for sections, flow style for lists (``betas: [0.9, 0.999]``)."""


_Dumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


def config_to_yaml(cfg: Config) -> str:
    """The configuration as YAML, sections in schema order."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


# ----------------------------------------------------------------------------- overrides
class _Entries(dict):
    """Entries of a mapping option given one at a time (``model.kwargs.dim=24``): merged into the
    option's value, where ``model.kwargs={dim: 24}`` replaces it whole."""


def _mapping_option(key: str) -> str | None:
    """The mapping option (``model.kwargs``, ``estimator.params``) whose entry ``key`` names, if any."""
    for option, _, tp in _leaves():
        if (
            key.startswith(option + ".")
            and len(key) > len(option) + 1
            and (tp is dict or typing.get_origin(tp) is dict)
        ):
            return option
    return None


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict:
    """``["optim.lr=0.05", "train.epochs=2"]`` -> nested dict; values parsed with ``yaml.safe_load``.
    ``model.kwargs.dim=24`` sets one entry of a mapping option and keeps its others."""
    nested: dict = {}
    valid = _all_keys()
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=0.05)")
        key, raw = item.split("=", 1)
        key = key.strip()
        mapping = _mapping_option(key) if key not in valid else None
        if key not in valid and mapping is None:
            raise _unknown_key_error(key, valid)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"the value of {key} is longer than {MAX_CONFIG_BYTES >> 20} MiB; give a config file instead"
            )
        try:
            value = _load_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(
                f"cannot parse the value of {key}: {_short(raw)} ({_yaml_problem(err)}); quote it or fix the syntax"
            ) from None
        except ConfigError as err:
            raise ConfigError(f"the value of {key}: {err}") from None
        parts = key.split(".")
        if mapping is not None:
            parts, entry = mapping.split("."), key[len(mapping) + 1 :]
            current = _dig(nested, parts)
            if isinstance(current, dict):  # the option was given earlier in the same list: add to it
                current[entry] = value
                continue
            value = _Entries({entry: value})
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def _dig(nested: dict, parts: list[str]):
    for part in parts:
        if not isinstance(nested, dict) or part not in nested:
            return None
        nested = nested[part]
    return nested


def apply_overrides(cfg: Config, overrides: dict | list | tuple | None) -> Config:
    """A new config: ``cfg`` with ``overrides`` (a nested dict or ``key=value`` strings) applied."""
    if not overrides:
        return config_from_dict(config_to_dict(cfg))
    if isinstance(overrides, (list, tuple)):
        overrides = parse_overrides(overrides)
    return config_from_dict(overrides, base=cfg)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a mapping holding the same key twice (PyYAML would keep
    the last one silently, so the first setting, often the one meant, would be ignored)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    first_line: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first on line {first_line[key] + 1}); keep one",
                    key_node.start_mark,
                )
        except TypeError:  # an unhashable key: PyYAML's own constructor reports it
            break
        first_line[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _expanded_values(node, seen: dict, open_nodes: set, depth: int = 0) -> int:
    """How many values ``node`` becomes once its aliases are expanded; ConfigError past the budget.

    Aliases make a small file a graph whose expansion can be exponential; counting each
    node once (``seen``) keeps this linear in the file, and Python ints cannot overflow.
    """
    if depth > MAX_CONFIG_DEPTH:
        raise ConfigError(f"values nested more than {MAX_CONFIG_DEPTH} levels deep (a config needs 3); flatten it")
    key = id(node)
    if key in seen:
        return seen[key]
    if key in open_nodes:
        raise ConfigError(
            f"a YAML alias at line {node.start_mark.line + 1} refers to a value that contains it (endless); "
            "write the value out"
        )
    open_nodes.add(key)
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = []
    total = 1
    for child in children:
        total += _expanded_values(child, seen, open_nodes, depth + 1)
        if total > MAX_CONFIG_VALUES:
            raise ConfigError(
                f"the YAML expands to more than {MAX_CONFIG_VALUES:,} values (aliases '*name' repeat "
                f"whole values; the one at line {node.start_mark.line + 1} multiplies them); write the values out"
            )
    open_nodes.discard(key)
    seen[key] = total
    return total


def _load_yaml(text: str):
    """Plain data from YAML text, refusing duplicate keys, deep nesting and alias bombs before
    any value is built (ConfigError, or yaml.YAMLError for a syntax error)."""
    loader = _UniqueKeyLoader(text)  # a SafeLoader: plain data only, never Python objects
    try:
        try:
            node = loader.get_single_node()  # the node graph: each aliased value once
        except RecursionError:  # PyYAML's composer recurses once per nesting level
            raise ConfigError(
                f"values nested more than {MAX_CONFIG_DEPTH} levels deep (a config needs 3); flatten it"
            ) from None
        if node is None:
            return None
        _expanded_values(node, {}, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: what PyYAML objected to and where (its own message spans several lines)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    if "python/" in problem:  # safe_load never builds Python objects: configs are plain data
        problem += " (tags that build Python objects are not allowed in configs)"
    return f"{where}{problem}"


def read_yaml(path, *, allow_empty: bool = False) -> dict:
    """The mapping stored in the YAML file ``path`` (``yaml.safe_load``), read within the bounds
    above; an empty file is refused unless ``allow_empty``."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(
            f"config file {path} is a directory; give the path of a YAML file (see configs/), "
            "or --resume for a run directory"
        )
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; give the path of a YAML file (see configs/)")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)  # never more than the bound, whatever the file's size
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read ({err.strerror or err}); check its permissions") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"config file {path} is larger than {MAX_CONFIG_BYTES >> 20} MiB; a config is a few KB of YAML, is it "
            "the right file?"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}); save it as UTF-8"
        ) from None
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(err)}") from None
    except ConfigError as err:
        raise ConfigError(f"config file {path}: {err}") from None
    if data is None:
        if allow_empty:
            return {}
        raise ConfigError(
            f"config file {path} is empty (no settings); add settings (see configs/), "
            "or leave the file out to train the defaults"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping (section: {{key: value}}), got {type(data).__name__}"
        )
    return data


def bundled_configs() -> Path | None:
    """The folder of the paper's configs: ``reste/configs`` in an installed wheel (setup.py copies
    ``configs/`` there), or ``configs/`` of the clone an editable install runs from."""
    package = Path(__file__).resolve().parents[1]
    for folder in (package / "configs", package.parents[1] / "configs"):
        if folder.is_dir():
            return folder
    return None


def find_config(path) -> Path:
    """``path`` when it exists, else the bundled config it names (``configs/cifar10/resnet20_1w1a.yaml``,
    ``cifar10/resnet20_1w1a.yaml`` or ``cifar10/resnet20_1w1a``), so the paper's configs work from any
    folder and from an installed reste; ConfigError naming close bundled names otherwise."""
    given = Path(path)
    if given.exists() or given.is_absolute():
        return given
    if given.suffix not in (".yaml", ".yml") and given.with_name(given.name + ".yaml").is_file():
        return given.with_name(given.name + ".yaml")  # a file of the user's, named without .yaml: it wins
    folder = bundled_configs()
    if folder is None:
        return given
    parts = given.parts[1:] if given.parts[:1] == ("configs",) else given.parts
    name = Path(*parts) if parts else given
    for candidate in (folder / name, folder / name.with_name(name.name + ".yaml")):
        if candidate.is_file():
            return candidate
    known = sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml"))
    hint = did_you_mean(name.with_suffix("").as_posix(), known)
    raise ConfigError(
        f"config file {given} does not exist, here or among reste's configs ({folder}); give the path of a YAML "
        f"file, or a bundled name such as cifar10/resnet20_1w1a.{hint}"
    )


def read_config_file(path, _chain: tuple = ()) -> dict:
    """A config file's mapping with its ``base:`` chain resolved.

    A config may start from another one: ``base: ../resnet20_1w1a.yaml`` (relative to the
    file) loads that file first and lays this one's keys over it, section by section. So an
    experiment that differs from another in one setting says only that setting.
    """
    path = (find_config(path) if not _chain else Path(path)).resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise ConfigError(f"config files include each other in a loop: {cycle}; remove one 'base:'")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config file {path}: 'base' must be the path of another YAML file, got {_short(base)}")
    base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
    if not base_path.is_file():
        raise ConfigError(
            f"config file {path}: its base {base_path} does not exist; fix the 'base:' path (relative to the file)"
        )
    return _deep_merge(read_config_file(base_path, (*_chain, path)), data)


def _deep_merge(base: dict, top: dict, replace: tuple[str, ...] = ()) -> dict:
    """``top`` over ``base``, nested dicts merged key by key, except under the keys in ``replace``,
    whose dicts ``top`` replaces whole (a resumed run's ``model.kwargs`` is the new one, not a mix)."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key not in replace:
            merged[key] = _deep_merge(merged[key], value, replace)
        else:
            merged[key] = value
    return merged


def load_config(source=None, overrides=None, *, check: bool = True) -> Config:
    """defaults <- ``source`` <- ``overrides``, validated.

    Args:
        source: None (the defaults), a YAML path, a nested dict, or a :class:`Config`.
        overrides: ``["optim.lr=0.05", ...]`` or a nested dict.
        check: run :func:`validate` (names, ranges, combinations).
    """
    if source is None:
        cfg = Config()
    elif isinstance(source, Config):
        cfg = config_from_dict(config_to_dict(source))
    elif isinstance(source, dict):
        cfg = config_from_dict(source)
    elif isinstance(source, (str, Path)):
        try:
            cfg = config_from_dict(read_config_file(source))
        except ConfigError as err:
            if str(err).startswith("config file"):
                raise
            raise ConfigError(f"{source}: {err}") from None
    else:
        raise ConfigError(f"a config must be a YAML path, a dict or a Config, got {type(source).__name__}")
    cfg = apply_overrides(cfg, overrides)
    if check:
        validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- validation
def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _name_in(key: str, value: str, known: list[str]) -> None:
    if value in known:
        return
    raise ConfigError(
        f"{key}: unknown value {_short(value)}; choose one of {', '.join(known)}.{did_you_mean(value, known)}"
    )


def data_info(cfg: Config):
    """``reste.data.info`` of ``cfg.data.name`` with the run's class count: ``data.num_classes`` when set
    (an ImageNet tree of 100 class folders trains a 100-way head), else the data set's."""
    from reste import data

    meta = data.info(cfg.data.name)
    if cfg.data.num_classes is None or cfg.data.num_classes == meta.num_classes:
        return meta
    return dataclasses.replace(meta, num_classes=cfg.data.num_classes)


def is_device_setting(setting) -> bool:
    """Whether ``setting`` is one a device option takes: auto, cpu, cuda or cuda:N."""
    return isinstance(setting, str) and (
        setting in ("auto", "cpu", "cuda") or (setting.startswith("cuda:") and setting[5:].isdigit())
    )


def validate(cfg: Config) -> Config:
    """Check names, ranges and combinations; raise :class:`ConfigError` on the first problem.

    Conflicts that are harmless are reported with :func:`warnings.warn` instead.
    The check that needs the data set's size (batch larger than the training set) runs
    in the trainer once the data set is known, still before training.
    """
    # choices declared in the schema
    for key, f, _ in _leaves():
        choices = f.metadata.get("choices")
        if choices:
            _name_in(key, _get(cfg, key), list(choices))

    from reste.estimators import estimators as estimator_names

    _name_in("model.estimator", cfg.model.estimator, estimator_names())
    try:
        from reste import models
    except ImportError:  # pragma: no cover - the models package is part of the library
        models = None  # type: ignore[assignment]
    if models is not None and hasattr(models, "names"):
        _name_in("model.name", cfg.model.name, models.names())
    from reste import data

    _name_in("data.name", data.canonical_name(cfg.data.name), data.names())
    _check(0 <= cfg.seed <= _MAX_INT, f"seed must be a whole number in [0, 2**63 - 1], got {cfg.seed}")

    e = cfg.estimator
    _check(
        math.isfinite(e.o_end) and e.o_end >= 1.0,
        f"estimator.o_end must be {'>= 1' if math.isfinite(e.o_end) else 'a finite number >= 1'} (o = 1 is the "
        f"clipped identity), got {e.o_end}; e.g. estimator.o_end=3",
    )
    _check(math.isfinite(e.p) and e.p > 0, f"estimator.p must be a finite number > 0, got {e.p}")

    d = cfg.data
    _check(
        d.root is None or d.root.strip() != "",
        "data.root is empty (an unset shell variable?); give a folder, or leave data.root out for the default places",
    )
    _check(d.batch_size >= 1, f"data.batch_size must be >= 1, got {d.batch_size}")
    _check(
        d.test_batch_size is None or d.test_batch_size >= 1,
        f"data.test_batch_size must be >= 1 or null, got {d.test_batch_size}",
    )
    _check(
        d.subset is None or d.subset >= 1,
        f"data.subset must be a positive number of images or null (all), got {d.subset}",
    )
    _check(
        d.test_subset is None or d.test_subset >= 1,
        f"data.test_subset must be a positive number of images or null, got {d.test_subset}",
    )
    if d.test_subset is not None:
        test_size = data.info(cfg.data.name).test_size
        _check(
            test_size is None or d.test_subset <= test_size,
            f"data.test_subset={d.test_subset} is larger than the {data.canonical_name(d.name)} test set "
            f"({test_size:,} images); use data.test_subset=null for all of it",
        )
    if d.num_classes is not None:
        _check(d.num_classes >= 2, f"data.num_classes must be >= 2 or null (the data set's), got {d.num_classes}")
        fixed = data.info(d.name)
        _check(
            not fixed.in_memory or d.num_classes == fixed.num_classes,
            f"data.num_classes={d.num_classes}: {fixed.name} has {fixed.num_classes} classes; leave data.num_classes "
            "out (only a class-folder data set such as imagenet takes another count)",
        )
    _check(
        len(d.crop_scale) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in d.crop_scale)
        and 0 < d.crop_scale[0] <= d.crop_scale[1],
        f"data.crop_scale must be two numbers [lo, hi] with 0 < lo <= hi (fractions of the image's area), got "
        f"{_short(d.crop_scale)}; e.g. data.crop_scale=[0.08,1.25]",
    )
    d.crop_scale = [float(v) for v in d.crop_scale]
    _check(
        d.crop_scale == DEFAULT_CROP_SCALE or not data.info(d.name).in_memory,
        f"data.crop_scale={_short(d.crop_scale)}: {data.canonical_name(d.name)} has no RandomResizedCrop (its "
        "augmentation is a padded random crop and flips); leave data.crop_scale out (only a class-folder data set "
        "such as imagenet uses it)",
    )
    _check(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    _check(d.num_workers <= MAX_THREADS, f"data.num_workers must be <= {MAX_THREADS} (processes), got {d.num_workers}")
    if d.subset is not None:
        train_size = data.info(cfg.data.name).train_size
        _check(
            train_size is None or d.subset <= train_size,
            f"data.subset={d.subset} is larger than the {data.canonical_name(d.name)} training set ({train_size:,} "
            "images); "
            "use data.subset=null for all of it",
        )
        _check(
            d.subset >= d.batch_size,
            f"data.batch_size ({d.batch_size}) is larger than the training set (data.subset={d.subset}); lower "
            "data.batch_size or raise data.subset",
        )

    o = cfg.optim
    _check(
        math.isfinite(o.lr) and o.lr > 0,
        f"optim.lr must be {'> 0' if math.isfinite(o.lr) else 'a finite number > 0'}, got {o.lr}; "
        "e.g. optim.lr=0.1 for sgd, 0.002 for adam",
    )
    _check(0 <= o.momentum < 1, f"optim.momentum must be in [0, 1), got {o.momentum}")
    _check(
        math.isfinite(o.weight_decay) and o.weight_decay >= 0,
        f"optim.weight_decay must be a finite number >= 0, got {o.weight_decay}",
    )
    _check(
        not o.nesterov or (o.name == "sgd" and o.momentum > 0),
        "optim.nesterov needs optim.name=sgd and optim.momentum > 0",
    )
    _check(
        len(o.betas) == 2
        and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in o.betas),
        f"optim.betas must be two numbers in [0, 1), got {_short(o.betas)}; e.g. optim.betas=[0.9,0.999]",
    )
    o.betas = [float(b) for b in o.betas]

    s = cfg.lr_schedule
    t = cfg.train
    _check(s.warmup_epochs >= 0, f"lr_schedule.warmup_epochs must be >= 0, got {s.warmup_epochs}")
    _check(
        s.warmup_epochs < t.epochs or s.warmup_epochs == 0,
        f"lr_schedule.warmup_epochs ({s.warmup_epochs}) must be shorter than train.epochs ({t.epochs})",
    )
    _check(
        s.per == "step" or float(s.warmup_epochs).is_integer(),
        f"lr_schedule.warmup_epochs={s.warmup_epochs} is fractional: use a whole number or lr_schedule.per=step",
    )
    _check(0 <= s.final_lr_ratio <= 1, f"lr_schedule.final_lr_ratio must be in [0, 1], got {s.final_lr_ratio}")

    _check(t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}")
    _check(
        0 <= t.threads <= MAX_THREADS,
        f"train.threads must be in 0..{MAX_THREADS} (0 = torch's default), got {t.threads}; "
        f"this machine has {os.cpu_count()} CPUs",
    )
    _check(0 <= t.label_smoothing < 1, f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}")
    _check(
        0 <= t.distill_weight <= 1,
        f"train.distill_weight must be in [0, 1] (the KL term's share of the loss), got {t.distill_weight}",
    )
    _check(
        math.isfinite(t.distill_temperature) and t.distill_temperature > 0,
        f"train.distill_temperature must be a finite number > 0 (1 = plain softmax), got {t.distill_temperature}",
    )
    _check(
        math.isfinite(t.grad_clip) and t.grad_clip >= 0,
        f"train.grad_clip must be a finite number >= 0 (0 = off), got {t.grad_clip}",
    )
    _check(t.checkpoint_every >= 1, f"train.checkpoint_every must be >= 1, got {t.checkpoint_every}")
    _check(
        t.checkpoint_every_steps >= 0,
        f"train.checkpoint_every_steps must be >= 0 (0 = only at epoch ends), got {t.checkpoint_every_steps}",
    )
    _check(
        1 <= t.dist_timeout_s <= 7 * 86400,
        f"train.dist_timeout_s must be 1 second to 7 days (604800), got {t.dist_timeout_s}",
    )
    _check(is_device_setting(t.device), f"train.device must be auto, cpu, cuda or cuda:N, got {_short(t.device)}")

    for epochs in t.extended_from:
        _check(
            isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1,
            f"train.extended_from entries must be epoch counts >= 1 (--resume train.epochs=N writes them), got "
            f"{_short(epochs)}",
        )

    a = cfg.analysis
    _check(a.every_steps >= 0, f"analysis.every_steps must be >= 0 (0 = per epoch only), got {a.every_steps}")
    for epoch in a.histograms_at:
        _check(
            isinstance(epoch, int) and not isinstance(epoch, bool) and 1 <= epoch <= t.epochs,
            f"analysis.histograms_at entries must be epochs in 1..{t.epochs} (train.epochs), got {_short(epoch)}",
        )

    _check(bool(cfg.out.dir), "out.dir must not be empty; use '.' for the current folder")
    if cfg.out.name is not None:
        _check(
            bool(cfg.out.name) and "/" not in cfg.out.name and cfg.out.name not in (".", ".."),
            f"out.name must be a plain folder name, got {_short(cfg.out.name)}",
        )
    if cfg.name is not None:
        _check(
            bool(cfg.name) and "/" not in cfg.name,
            f"name must be a non-empty string without '/', got {_short(cfg.name)}",
        )
    return cfg


def _get(cfg: Config, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


# ----------------------------------------------------------------------------- documentation
def option_table() -> list[tuple[str, str, Any, str]]:
    """Every option as (dotted key, type name, default, help), in schema order."""
    rows = []
    for key, f, tp in _leaves():
        help_text = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        if choices:
            help_text = f"{help_text} [{' | '.join(choices)}]"
        rows.append((key, _type_name(tp), _default_of(f), help_text))
    return rows


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return (
        yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        if isinstance(value, (list, dict))
        else str(value)
    )


def help_epilog() -> str:
    """One line per option: ``optim.lr  (float, default 0.002)  help``."""
    rows = option_table()
    width = max(len(key) for key, *_ in rows) + 2
    lines = ["configuration options (set in the YAML file or as key=value overrides):"]
    for key, tp, default, help_text in rows:
        lines.append(f"  {key:<{width}}({tp}, default {_show(default)})  {help_text}")
    return "\n".join(lines)


def markdown_table() -> str:
    """The option reference as a Markdown table (used for docs/training.md)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, help_text in option_table():
        lines.append(f"| `{key}` | {tp} | `{_show(default)}` | {help_text.replace('|', '/')} |")
    return "\n".join(lines)


def warn_conflicts(cfg: Config, world_size: int) -> None:
    """Warn about harmless combinations that do nothing (they are ignored, not errors)."""
    if cfg.train.sync_bn and world_size == 1:
        warnings.warn("train.sync_bn=true has no effect in a single-process run (ignored)", stacklevel=2)
    if cfg.train.teacher is None and (cfg.train.distill_weight != 1.0 or cfg.train.distill_temperature != 1.0):
        warnings.warn(
            "train.distill_weight / train.distill_temperature have no effect without train.teacher=RUN_DIR (ignored)",
            stacklevel=2,
        )
    if cfg.data.crop_scale != DEFAULT_CROP_SCALE and not cfg.data.augment:
        warnings.warn("data.crop_scale has no effect with data.augment=false (no training crop; ignored)", stacklevel=2)
    if cfg.model.precision == "fp" and cfg.estimator.params:
        warnings.warn("estimator.params is ignored for model.precision=fp (no binary layers)", stacklevel=2)
    a = cfg.analysis
    if not a.indicators and (a.every_steps or a.histograms_at):
        given = [
            k for k, v in (("analysis.every_steps", a.every_steps), ("analysis.histograms_at", a.histograms_at)) if v
        ]
        warnings.warn(
            f"{' and '.join(given)} have no effect with analysis.indicators=false: nothing is measured, no "
            "indicators.jsonl or histograms are written (ignored)",
            stacklevel=2,
        )
    e, m = cfg.estimator, cfg.model
    weights = m.kwargs.get("weight_estimator")
    # a ReSTE is built (the only estimator with an o): for the inputs at 1W/1A, for the weights unless
    # model.kwargs.weight_estimator names another; an estimator without o refuses the parameter itself
    builds_reste = m.precision != "fp" and (
        (m.estimator == "reste" and (m.precision == "1w1a" or weights in (None, "reste"))) or weights == "reste"
    )
    for key, params in (
        ("estimator.params", e.params),
        ("model.kwargs.estimator_params", m.kwargs.get("estimator_params")),
    ):
        if builds_reste and isinstance(params, dict) and "o" in params:
            # a warning, not an error: runs made before it still resume (resume cannot change the key)
            warnings.warn(
                f"{key}.o={_short(params['o'])} has no effect: the o schedule ({e.schedule}, o_end {e.o_end:g}) "
                f"sets o at every step; for a constant o use estimator.schedule=fixed "
                f"estimator.o_end={_short(params['o'])} (and drop {key}.o)",
                stacklevel=2,
            )
