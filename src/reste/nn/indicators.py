"""The equilibrium indicators of ReSTE, measured on a model while it trains.

For every layer with binary weights (:func:`reste.nn.binary_layers`):

- **estimating error** ``e = || f_o(w) - sign(w) ||_2`` of the latent weights ``w``, with the
  rectified power function ``f_o(z) = sign(z) |z|^(1/o)``. It says how far the function
  whose derivative ReSTE uses is from the sign actually applied in the forward pass;
  it falls as ``o`` grows. Reported twice:

  * ``est_error`` at the layer's *current* ``o`` (its ReSTE weight estimator's ``o``
    buffer). Layers binarized by another estimator (STE, EDE, DoReFa, ...) have no
    ``o``: for them the current value is ``None``;
  * ``est_error_end`` at ``o_end``, for every estimator. This is what the reference
    implementation computes (it evaluates ``f_{o_end}`` whatever the current ``o``).

- **gradient instability** ``s = Var(|dL/dw|)``, the unbiased variance of the magnitude
  of the weight gradient (``None`` while a layer has no gradient);
- **flip ratio**: the share of binary weights whose sign changed since the previous
  :meth:`IndicatorTracker.measure` (``None`` at the first measurement); with
  ``measure(epoch_end=True)`` also ``epoch_flip_ratio``, since the previous epoch-end
  measurement, which the metrics row records: it does not depend on how often the steps
  in between were sampled (``analysis.every_steps``).

Model-level values sum ``e`` and ``s`` over the layers (as the reference does); the model
flip ratio is flipped weights over all binary weights. ``sign`` here is this project's
binary sign (``sign(0) = +1``), the one the forward pass uses.

The trainer samples them (``analysis.indicators``); :mod:`reste.analysis.indicators` reads them
back and summarises a run the way the reference does (and re-exports these names).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..estimators import ReSTE, binary_sign
from .layers import BinaryLayer, binary_layers

__all__ = [
    "IndicatorTracker",
    "fitting_error",
    "estimating_error",
    "gradient_instability",
    "FIT_RANGE",
    "GRAD_LOG10_RANGE",
    "HIST_BINS",
]

#: histogram bins of every snapshot
HIST_BINS = 100
#: range of the fitting-error histogram: |f_o(w) - sign(w)| <= 1 whenever |w| <= 2^o
FIT_RANGE = (-1.0, 1.0)
#: range of the log10 |gradient| histogram; fixed so that runs can be compared bin by bin.
#: ReSTE's gradient reaches m^(1/o)/m (6.3 at o = 5) near zero, so weight gradients above 1 occur.
GRAD_LOG10_RANGE = (-12.0, 4.0)

# torch.compile and DistributedDataParallel wrap the model; their prefixes say nothing
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def fitting_error(w: Tensor, o: float | Tensor) -> Tensor:
    """``f_o(w) - sign(w)`` elementwise, with ``f_o(z) = sign(z) |z|^(1/o)`` and ``sign(0) = +1``."""
    return binary_sign(w) * (w.abs().pow(1.0 / o) - 1.0)


def estimating_error(w: Tensor, o: float | Tensor) -> Tensor:
    """``|| f_o(w) - sign(w) ||_2`` as a 0-dim tensor on ``w``'s device (no host sync)."""
    # |sign(w)| = 1, so the norm only needs the magnitudes
    return torch.linalg.vector_norm(w.abs().pow(1.0 / o) - 1.0)


def gradient_instability(grad: Tensor) -> Tensor:
    """Unbiased variance of ``|grad|`` as a 0-dim tensor (NaN for fewer than 2 elements)."""
    if grad.numel() < 2:
        return torch.full((), float("nan"), device=grad.device)
    return torch.var(grad.detach().abs().float(), unbiased=True)


def _clean_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        while name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def _current_o(layer: BinaryLayer) -> Tensor | None:
    """The ``o`` buffer of the layer's weight estimator when it is a ReSTE, else None."""
    est = getattr(layer, "weight_estimator", None)
    return est.o if isinstance(est, ReSTE) else None


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else x


class IndicatorTracker:
    """Measures the equilibrium indicators of a model's binary layers.

    Call :meth:`measure` right after ``loss.backward()`` (before ``optimizer.zero_grad()``,
    which would erase the gradients) on the steps you want to sample::

        tracker = IndicatorTracker(model, o_end=3.0)
        ...
        loss.backward()
        if last_step_of_epoch:
            row.update(tracker.measure())      # est_error, est_error_end, grad_instability, flip_ratio
        optimizer.step()

    Everything is computed on the model's device; the per-layer scalars are stacked and
    copied to the host once per call.

    A model without binary weights (``precision="fp"``) is allowed: every value is None.
    """

    def __init__(self, model: nn.Module, o_end: float):
        if not float(o_end) >= 1.0:
            raise ValueError(f"o_end must be >= 1 (f_o is defined for o >= 1), got {o_end}")
        self.model = model
        self.o_end = float(o_end)
        self.layers: list[tuple[str, BinaryLayer]] = []
        weights: set[int] = set()
        for name, layer in binary_layers(model):
            if id(layer.weight) not in weights:  # a weight tied between layers is measured once, under its first name
                weights.add(id(layer.weight))
                self.layers.append((_clean_name(name), layer))
        self._previous_signs: list[Tensor] | None = None
        self._epoch_signs: list[Tensor] | None = None  # those of the last measure(epoch_end=True)

    def __len__(self) -> int:
        return len(self.layers)

    def state_dict(self) -> dict:
        """The signs flip_ratio compares against (bool tensors on the CPU, weights_only-safe),
        so that a resumed run measures the same flips as an uninterrupted one."""

        def cpu(signs):
            return None if signs is None else [s.cpu() for s in signs]

        return {"previous_signs": cpu(self._previous_signs), "epoch_signs": cpu(self._epoch_signs)}

    def load_state_dict(self, state: dict) -> None:
        def here(signs):
            return None if signs is None else [s.to(layer.weight.device) for s, (_, layer) in zip(signs, self.layers)]

        self._previous_signs = here(state.get("previous_signs"))
        # a checkpoint from before epoch_signs: its last measurement was the epoch's end unless
        # analysis.every_steps sampled steps after it
        self._epoch_signs = here(state.get("epoch_signs", state.get("previous_signs")))

    def measure(self, epoch_end: bool = False) -> dict:
        """The indicators now, summed over layers, with per-layer values under ``"layers"``.

        Returns ``{"est_error", "est_error_end", "grad_instability", "flip_ratio", "layers"}``, and
        with ``epoch_end`` also ``"epoch_flip_ratio"`` (flips since the previous ``epoch_end`` call);
        ``layers`` maps each binary layer's name to ``{"o", "est_error", "est_error_end",
        "grad_instability", "flip_ratio", "flips", "numel"}``. Missing values are None.
        """
        if not self.layers:
            return {
                "est_error": None,
                "est_error_end": None,
                "grad_instability": None,
                "flip_ratio": None,
                **({"epoch_flip_ratio": None} if epoch_end else {}),
                "layers": {},
            }
        nan = float("nan")
        rows = []
        signs = []
        with torch.no_grad():
            for _, layer in self.layers:
                w = layer.weight.detach()
                a = w.float().abs()
                o = _current_o(layer)
                dev = a.device
                e_end = torch.linalg.vector_norm(a.pow(1.0 / self.o_end) - 1.0)
                if o is not None:
                    o_f = o.to(device=dev, dtype=torch.float32)
                    e_cur = torch.linalg.vector_norm(a.pow(1.0 / o_f) - 1.0)
                else:
                    o_f = e_cur = torch.full((), nan, device=dev)
                grad = layer.weight.grad
                s = gradient_instability(grad) if grad is not None else torch.full((), nan, device=dev)
                positive = w >= 0  # binary sign: 0 counts as +1
                signs.append(positive)
                if self._previous_signs is not None:
                    flips = (positive != self._previous_signs[len(signs) - 1]).sum().float()
                else:
                    flips = torch.full((), nan, device=dev)
                if epoch_end and self._epoch_signs is not None:
                    epoch_flips = (positive != self._epoch_signs[len(signs) - 1]).sum().float()
                else:
                    epoch_flips = torch.full((), nan, device=dev)
                rows.append(torch.stack([o_f, e_cur, e_end, s.to(dev), flips, epoch_flips]))
            values = torch.stack([r.to(rows[0].device) for r in rows]).cpu().tolist()  # the only host sync
        self._previous_signs = signs
        if epoch_end:
            self._epoch_signs = signs

        layers = {}
        for (name, layer), (o, e_cur, e_end, s, flips, _) in zip(self.layers, values):
            numel = layer.weight.numel()
            layers[name] = {
                "o": _none_if_nan(o),
                "est_error": _none_if_nan(e_cur),
                "est_error_end": e_end,
                "grad_instability": _none_if_nan(s),
                "flip_ratio": None if math.isnan(flips) else flips / numel,
                "flips": None if math.isnan(flips) else int(flips),
                "numel": numel,
            }
        per_layer = list(layers.values())

        def total(key):
            vals = [row[key] for row in per_layer]
            return None if any(v is None for v in vals) else float(sum(vals))

        flip_counts = [row["flips"] for row in per_layer]
        numel = sum(row["numel"] for row in per_layer)
        result: dict = {
            "est_error": total("est_error"),
            "est_error_end": total("est_error_end"),
            "grad_instability": total("grad_instability"),
            "flip_ratio": None if flip_counts[0] is None else sum(flip_counts) / numel,
            "layers": layers,
        }
        if epoch_end:
            since_epoch = [row[5] for row in values]
            result["epoch_flip_ratio"] = None if math.isnan(since_epoch[0]) else sum(since_epoch) / numel
        return result

    def snapshot(self, path: str | os.PathLike) -> Path:
        """Write histograms of the fitting error and of the weight gradients, per layer, to ``path`` (.npz).

        The file holds plain arrays (``np.load(path)`` needs no ``allow_pickle``); row ``i``
        of every per-layer array belongs to ``layer_names[i]``:

        - ``fit_edges`` (101,) over :data:`FIT_RANGE`; ``fit_end_counts`` (L, 100): histogram
          of ``f_{o_end}(w) - sign(w)``; ``fit_counts``: the same at the current ``o`` (equal to
          ``fit_end_counts`` for layers without one, whose ``o`` is NaN); ``fit_under`` /
          ``fit_over`` / ``fit_end_under`` / ``fit_end_over`` (L,): values outside the range;
        - ``grad_log10_edges`` (101,) over :data:`GRAD_LOG10_RANGE`; ``grad_log10_counts`` (L, 100):
          histogram of ``log10 |dL/dw|``; ``grad_zero`` (L,): exact zeros; ``grad_under`` /
          ``grad_over``: non-zero values outside the range;
        - ``grad_edges`` (L, 101), ``grad_counts`` (L, 100): signed gradient over ``[-max|g|, max|g|]``
          of each layer (a per-layer range: good for shape, not for comparing scales);
        - ``o`` (L,), ``o_end`` (), ``numel`` (L,), ``has_grad`` (L,) bool.

        A layer without a gradient (e.g. after ``zero_grad(set_to_none=True)``) gets zero counts
        and ``has_grad = False``.
        """
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"snapshot path must end in .npz, got {path}")
        if not self.layers:
            raise ValueError("the model has no binary-weight layers; there is nothing to snapshot")
        bins = HIST_BINS
        out: dict[str, list] = {
            k: []
            for k in (
                "fit_counts",
                "fit_under",
                "fit_over",
                "fit_end_counts",
                "fit_end_under",
                "fit_end_over",
                "grad_log10_counts",
                "grad_zero",
                "grad_under",
                "grad_over",
                "grad_edges",
                "grad_counts",
                "o",
                "numel",
                "has_grad",
            )
        }
        lo, hi = FIT_RANGE
        glo, ghi = GRAD_LOG10_RANGE
        with torch.no_grad():
            for _, layer in self.layers:
                w = layer.weight.detach().float()
                o = _current_o(layer)
                fit_end = fitting_error(w, self.o_end)
                fit = fitting_error(w, o.to(w.device, torch.float32)) if o is not None else fit_end
                for key, x in (("fit", fit), ("fit_end", fit_end)):
                    out[f"{key}_counts"].append(torch.histc(x, bins, lo, hi))
                    out[f"{key}_under"].append((x < lo).sum())
                    out[f"{key}_over"].append((x > hi).sum())
                out["o"].append(float(o) if o is not None else float("nan"))
                out["numel"].append(w.numel())
                grad = layer.weight.grad
                out["has_grad"].append(grad is not None)
                if grad is None:
                    zeros = torch.zeros(bins)
                    out["grad_log10_counts"].append(zeros)
                    out["grad_counts"].append(zeros)
                    out["grad_edges"].append(torch.linspace(-1.0, 1.0, bins + 1))
                    for key in ("grad_zero", "grad_under", "grad_over"):
                        out[key].append(0)
                    continue
                g = grad.detach().float()
                mag = g.abs()
                nonzero = mag[mag > 0]
                logs = nonzero.log10()
                out["grad_zero"].append(mag.numel() - nonzero.numel())
                out["grad_log10_counts"].append(torch.histc(logs, bins, glo, ghi))
                out["grad_under"].append((logs < glo).sum())
                out["grad_over"].append((logs > ghi).sum())
                bound = float(mag.max()) or 1.0  # all-zero gradient: any range will do
                out["grad_counts"].append(torch.histc(g, bins, -bound, bound))
                out["grad_edges"].append(torch.linspace(-bound, bound, bins + 1))

        def as_array(values, dtype):
            return np.asarray([v.cpu().numpy() if isinstance(v, Tensor) else v for v in values], dtype=dtype)

        arrays = {
            "layer_names": np.asarray([name for name, _ in self.layers], dtype=str),
            "fit_edges": np.linspace(lo, hi, bins + 1),
            "grad_log10_edges": np.linspace(glo, ghi, bins + 1),
            "o_end": np.asarray(self.o_end),
        }
        for key, values in out.items():
            dtype: type
            if key in ("o", "grad_edges"):
                dtype = np.float64
            elif key == "has_grad":
                dtype = bool
            else:
                dtype = np.int64
            arrays[key] = as_array(values, dtype)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)  # type: ignore[arg-type]  # numpy stubs read **kwds as allow_pickle
        os.replace(tmp, path)  # a reader never sees half a file
        return path
