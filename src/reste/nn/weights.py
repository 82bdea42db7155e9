"""Start a binary model from float (or 1W/32A) weights: the first step of BNN training recipes.

A binary layer is an ``nn.Conv2d`` / ``nn.Linear`` with the same ``weight`` and ``bias``, plus
its estimators' state (ReSTE's power ``o``, DSQ's ``alpha``, ...), so the float model's
tensors have the same names and shapes in the binary one. :func:`load_float_weights` copies
every tensor whose name and shape match, leaves the estimators' state as built (fresh, the
estimator schedule sets it), and reports by name what it could not place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["WeightLoadReport", "load_float_weights", "ESTIMATOR_KEYS"]

#: state-dict name parts of estimator state: never copied, never reported missing
ESTIMATOR_KEYS = (".weight_estimator.", ".input_estimator.")


def _is_estimator_key(key: str) -> bool:
    return any(part in f".{key}" for part in ESTIMATOR_KEYS)


@dataclass
class WeightLoadReport:
    """What :func:`load_float_weights` did, by state-dict name."""

    copied: list = field(default_factory=list)
    #: in the model, not in the source (kept as initialised)
    missing: list = field(default_factory=list)
    #: in the source, not in the model (ignored)
    unexpected: list = field(default_factory=list)
    #: in both with different shapes: ``(name, source shape, model shape)`` (kept as initialised)
    mismatched: list = field(default_factory=list)
    #: estimator state of the source left out (the binary model's estimators start fresh)
    estimator_state_skipped: list = field(default_factory=list)
    #: the checkpoint the weights came from (set by ``model.init_from``'s loader), None if not from a file
    source: str | None = None

    @property
    def complete(self) -> bool:
        """True when every model tensor (estimator state aside) came from the source."""
        return not (self.missing or self.unexpected or self.mismatched)

    def lines(self, limit: int = 8) -> list[str]:
        def names(keys):
            shown = ", ".join(keys[:limit])
            return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")

        out = [
            f"copied {len(self.copied)} tensors"
            + (
                f"; estimator state left fresh ({len(self.estimator_state_skipped)} tensors of the source skipped)"
                if self.estimator_state_skipped
                else ""
            )
        ]
        if self.missing:
            out.append(f"missing in the source, kept as initialised: {names(self.missing)}")
        if self.unexpected:
            out.append(f"not in this model, ignored: {names(self.unexpected)}")
        if self.mismatched:
            out.append(
                "different shapes, kept as initialised: "
                + names([f"{k} (source {list(a)}, model {list(b)})" for k, a, b in self.mismatched])
            )
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def load_float_weights(model: nn.Module, state_dict: dict) -> WeightLoadReport:
    """Copy the tensors of ``state_dict`` (a float, 1W/32A or binary model's) into ``model``.

    Tensors whose name and shape match are copied (weights, biases, BatchNorm statistics);
    estimator state is neither copied nor reported missing; the rest is reported by name in
    the returned :class:`WeightLoadReport` (nothing is raised, so a partial start is possible:
    check ``report.complete``). ``nn.MultiheadAttention`` names (``in_proj_weight``) load into
    attention that ``binarize`` rebuilt (``in_proj.weight``).

    >>> fp = reste.models.create("resnet20", precision="fp")            # doctest: +SKIP
    >>> binary = reste.models.create("resnet20", precision="1w1a")      # doctest: +SKIP
    >>> print(load_float_weights(binary, fp.state_dict()))              # doctest: +SKIP
    copied 70 tensors
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    target = model.state_dict()
    report = WeightLoadReport()
    source = {}
    for key, value in state_dict.items():
        if _is_estimator_key(key):
            report.estimator_state_skipped.append(key)
        elif not isinstance(value, torch.Tensor):
            report.unexpected.append(key)
        elif key in target and tuple(target[key].shape) != tuple(value.shape):
            report.mismatched.append((key, tuple(value.shape), tuple(target[key].shape)))
        else:
            source[key] = value
    # load_state_dict, not a copy loop: modules' own renaming hooks apply (torch's attention names)
    result = model.load_state_dict(source, strict=False)
    report.unexpected += list(result.unexpected_keys)
    mismatched = {k for k, _, _ in report.mismatched}
    report.missing = [k for k in result.missing_keys if not _is_estimator_key(k) and k not in mismatched]
    unexpected = set(result.unexpected_keys)
    report.copied = [k for k in source if k not in unexpected]  # the source's names (attention's may differ)
    return report
