"""How ReSTE's power ``o`` (and the other estimators' parameters) change during training.

``reste.o_schedule(way, o_end=3.0, **params)`` returns a callable ``progress -> o``
with ``progress`` in [0, 1]:

- ``fixed``:  ``o = o_end`` for the whole run (``o`` is accepted as an alias of ``o_end``);
- ``linear``: ``o = 1 + (o_end - 1) * r``;
- ``cosine``: ``o = 1 + (o_end - 1) * (1 - cos(pi * r / 2))`` (the reference's only way,
  used for all the paper's results);
- ``power``:  ``o = 1 + (o_end - 1) * r^p``, ``p = 2`` by default. The seed calls it
  "exp" in its text and "Power" in its Table 3 without a formula; this one is this
  project's choice.

:class:`EstimatorScheduler` applies a schedule to every estimator of a model, per
epoch (the reference: ``r = epoch / epochs``) or per step
(``r = step / total_steps``), and is checkpointable (``state_dict``).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import nn

from .errors import did_you_mean
from .estimators import Estimator

__all__ = [
    "OSchedule",
    "o_schedule",
    "o_schedule_ways",
    "EstimatorScheduler",
    "set_params",
    "set_progress",
    "iter_estimators",
]

_WAYS: dict[str, Callable[[float, float, float], float]] = {
    "fixed": lambda r, o_end, p: o_end,
    "linear": lambda r, o_end, p: 1.0 + (o_end - 1.0) * r,
    "cosine": lambda r, o_end, p: 1.0 + (o_end - 1.0) * (1.0 - math.cos(math.pi * r / 2.0)),
    "power": lambda r, o_end, p: 1.0 + (o_end - 1.0) * r**p,
}


def o_schedule_ways() -> list[str]:
    """The names accepted by :func:`o_schedule`."""
    return list(_WAYS)


@dataclass(frozen=True)
class OSchedule:
    """A schedule ``progress -> o``; call it with ``progress`` in [0, 1] (clamped)."""

    way: str = "cosine"
    o_end: float = 3.0
    p: float = 2.0

    def __post_init__(self):
        if self.way not in _WAYS:
            raise ValueError(
                f"unknown o schedule way {self.way!r}; choose one of {', '.join(_WAYS)}.{did_you_mean(self.way, _WAYS)}"
            )
        if not (math.isfinite(self.o_end) and self.o_end >= 1.0):
            raise ValueError(f"o_end must be a finite number >= 1 (o = 1 is the clipped identity), got {self.o_end}")
        if not self.p > 0:
            raise ValueError(f"power exponent p must be > 0, got {self.p}")

    def __call__(self, progress: float) -> float:
        r = min(max(float(progress), 0.0), 1.0)
        return _WAYS[self.way](r, float(self.o_end), float(self.p))


def o_schedule(way: str = "cosine", o_end: float | None = None, **params: float) -> OSchedule:
    """Build an o schedule. ``way`` is one of ``fixed``, ``linear``, ``cosine``, ``power``;
    ``o_end`` defaults to 3 (``o=`` is the same argument, which reads better for ``fixed``).

    >>> s = o_schedule("cosine", o_end=3)
    >>> round(s(500 / 1000), 3)
    1.586
    """
    if "o" in params:  # fixed o reads more naturally as o=...
        o = params.pop("o")
        if o_end is not None and float(o_end) != float(o):
            raise TypeError(f"o_schedule({way!r}) got o={o} and o_end={o_end}: they are one setting, give one")
        o_end = o
    p = params.pop("p", 2.0)
    if params:
        raise TypeError(f"o_schedule({way!r}) got unexpected parameters: {', '.join(params)}")
    return OSchedule(way=way, o_end=3.0 if o_end is None else float(o_end), p=float(p))


def iter_estimators(model: nn.Module) -> Iterator[Estimator]:
    """Every :class:`~reste.estimators.Estimator` inside ``model``."""
    for module in model.modules():
        if isinstance(module, Estimator):
            yield module


def set_params(model: nn.Module, **values: float) -> int:
    """Set scheduled parameters (``o=...``, ``t=...``) on every estimator that has them.

    Returns how many estimators were changed. Raises if no estimator in the model
    has one of the named parameters (a typo should not pass silently).
    """
    changed = 0
    used = set()
    for est in iter_estimators(model):
        hit = False
        for key, value in values.items():
            if key in est.scheduled:
                est.set_param(key, value)
                used.add(key)
                hit = True
        changed += hit
    unused = set(values) - used
    if unused:
        raise ValueError(f"no estimator in the model has parameter(s) {sorted(unused)}")
    return changed


def set_progress(model: nn.Module, progress: float) -> None:
    """Tell every estimator the training progress (EDE, RBNN, FDA derive their parameters from it)."""
    for est in iter_estimators(model):
        est.set_progress(progress)


class EstimatorScheduler:
    """Drives the estimators of ``model`` through training.

    Call :meth:`step_epoch` at the start of every epoch, and :meth:`step_iter`
    before every optimisation step. With ``per="step"`` (the default, as ``reste
    train``'s ``estimator.per``) progress is ``global_step / (epochs * steps_per_epoch)``;
    with ``per="epoch"`` (the paper's reference code) it is ``epoch / epochs`` and only
    changes at epoch starts.
    The o schedule (if any) sets ``o`` on every ReSTE; every estimator also gets
    :meth:`~reste.estimators.Estimator.set_progress`.
    """

    def __init__(
        self,
        model: nn.Module,
        o_schedule: Callable[[float], float] | None,
        epochs: int,
        steps_per_epoch: int,
        per: str = "step",
    ) -> None:
        if o_schedule is not None and not callable(o_schedule):
            raise TypeError(
                f"o_schedule must be reste.o_schedule(...) (e.g. reste.o_schedule({o_schedule!r}, o_end=3)), a "
                f"callable progress -> o, or None; got {type(o_schedule).__name__} {o_schedule!r}"
                if isinstance(o_schedule, str)
                else f"o_schedule must be reste.o_schedule(...), a callable progress -> o, or None; got "
                f"{type(o_schedule).__name__}"
            )
        if per not in ("epoch", "step"):
            raise ValueError(f"per must be 'epoch' or 'step', got {per!r}")
        for arg, value in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{arg} must be a whole number >= 1, got {value!r}")
        self.model = model
        self.schedule = o_schedule
        self.epochs = int(epochs)
        self.steps_per_epoch = int(steps_per_epoch)
        self.per = per
        self.epoch = 0
        self.step = 0
        self.has_o = any("o" in e.scheduled for e in iter_estimators(model))
        self.progress = 0.0
        # the usage mistakes step_epoch warns about, once each: epochs counted from 1, no step_iter() calls
        self._epoch_started = self._warned_epoch = self._warned_iter = False
        self._apply(0.0)

    @property
    def o(self) -> float | None:
        """The current o (None when the model has no ReSTE or no schedule)."""
        if self.schedule is None or not self.has_o:
            return None
        return self.schedule(self.progress)

    def _apply(self, progress: float) -> None:
        self.progress = progress
        set_progress(self.model, progress)
        if self.schedule is not None and self.has_o:
            set_params(self.model, o=self.schedule(progress))

    def step_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch``, counted from 0 (the last is ``epochs - 1``)."""
        epoch = int(epoch)
        if (
            self.per == "step"
            and self._epoch_started
            and self.step == self.epoch * self.steps_per_epoch
            and epoch > self.epoch
            and not self._warned_iter
        ):
            self._warned_iter = True
            warnings.warn(
                f"no step_iter() call during epoch {self.epoch}: with per='step' o moves at every step_iter(), "
                "so it changed only at epoch starts; call scheduler.step_iter() before each optimisation step, "
                "or build the scheduler with per='epoch'",
                stacklevel=2,
            )
        self._epoch_started = True
        self.epoch = epoch
        self.step = self.epoch * self.steps_per_epoch
        self._apply(self.epoch / self.epochs)

    def step_iter(self) -> None:
        """Before each optimisation step."""
        if self.epoch >= self.epochs and not self._warned_epoch:
            self._warned_epoch = True
            warnings.warn(
                f"a training step in epoch {self.epoch} of a schedule of epochs={self.epochs}: step_epoch() counts "
                f"from 0, so the last epoch is {self.epochs - 1}; counting from 1 runs the schedule one epoch ahead "
                "(o at o_end for the whole last epoch)",
                stacklevel=2,
            )
        if self.per == "step":
            self._apply(self.step / (self.epochs * self.steps_per_epoch))
        self.step += 1

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "progress": self.progress, "per": self.per}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self._epoch_started = False  # a resume mid-epoch: its step_iter() calls were made before
        self._apply(float(state["progress"]))
