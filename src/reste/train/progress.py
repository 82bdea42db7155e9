"""What training shows on the terminal: the progress bar, a line per epoch under it, and the final summary."""

from __future__ import annotations

import math
import sys
import time
import warnings

import torch

from .evaluation import _accuracy

__all__ = ["ProgressBar", "epoch_line", "first_step_line", "print_summary"]


def epoch_line(row: dict, epochs: int) -> str:
    """One terminal line per epoch: train and test loss and top-1, and the equilibrium indicators
    (the epoch's mean o; e and s as sampled at its last step, see docs/analysis.md)."""

    def num(key, fmt, label):
        value = row.get(key)
        return f"{label} {value:{fmt}}" if isinstance(value, (int, float)) and math.isfinite(value) else ""

    indicators = (
        num("o_mean", ".3f", "mean o"),
        num("est_error", ".4g", "e"),
        num("est_error_end", ".4g", "e@o_end"),
        num("grad_instability", ".3g", "s"),
    )
    parts = [
        f"epoch {row['epoch']:>{len(str(epochs))}}/{epochs}",
        f"train loss {row['train_loss']:.4f} top-1 {row['train_top1']:5.2f}%",
        f"test loss {row['test_loss']:.4f} top-1 {row['test_top1']:5.2f}%",
        "  ".join(filter(None, indicators)),
        num("epoch_time", ".1f", "time") + (" s" if row.get("epoch_time") is not None else ""),
        num("teacher_ms_per_step", ".1f", "teacher")
        + (" ms/step" if row.get("teacher_ms_per_step") is not None else ""),
    ]
    return " | ".join(p for p in parts if p)


def first_step_line(seconds: float, mode: str) -> str:
    """The line shown after a compiled run's first step, whose time is mostly ``torch.compile``'s."""
    graphs = " and CUDA graph capture" if mode == "reduce-overhead" else ""
    return (
        f"first step {seconds:.1f} s (torch.compile, mode {mode}: compilation{graphs} included; "
        "the next steps reuse it)"
    )


class ProgressBar:
    """The tqdm bar over all the run's steps (disabled unless ``show``), with the epoch's running
    loss, accuracy, o, lr and images/s. While it is shown, warnings are written above it on their
    own line (as :meth:`write` does), not onto the bar's line."""

    def __init__(self, total: int, initial: int, show: bool, steps_per_epoch: int, world_size: int):
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=not show, leave=True)
        self.steps_per_epoch, self.world_size = steps_per_epoch, world_size
        self._showwarning = None
        if show and not _recording_warnings():
            self._showwarning = warnings.showwarning
            warnings.showwarning = self._show_warning

    def _show_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        text = warnings.formatwarning(message, category, filename, lineno, line)
        try:
            self._tqdm.write(text.rstrip("\n"), file=file or sys.stderr)
        except OSError:  # as warnings.showwarning: a closed or broken stderr loses the warning, not the run
            pass

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """A new epoch: its label, and no numbers until its first refresh (the previous epoch's
        loss, accuracy and o would otherwise stay on show for its first steps)."""
        self.bar.set_description(f"epoch {epoch + 1}/{epochs}", refresh=False)
        self.bar.set_postfix_str("", refresh=False)

    def refreshes_at(self, step: int) -> bool:
        """Whether the numbers are refreshed after ``step`` steps of the epoch: every 10 steps and at
        its last step. The same on every rank (the bar's numbers are all-reduced at these steps)."""
        return step % 10 == 0 or step == self.steps_per_epoch

    def update(self, sums: torch.Tensor, epoch_start: float, step: int, o: float | None, lr: float) -> None:
        """One step done (``step``: steps done in the epoch); ``sums`` are the epoch's running sums
        over all ranks (read at :meth:`refreshes_at` steps only), ``o`` and ``lr`` the values that step used."""
        self.bar.update(1)
        # reading the sums synchronises with the GPU: refresh the numbers every few steps only
        if self.bar.disable or not self.refreshes_at(step):
            return
        loss_sum, c1, _, count, _ = sums.tolist()
        seconds = time.perf_counter() - epoch_start
        postfix = {"loss": f"{loss_sum / max(count, 1):.3f}", "acc": f"{_accuracy(c1, count):.1f}"}
        if o is not None:
            postfix["o"] = f"{o:.2f}"
        postfix["lr"] = f"{lr:.2e}"
        postfix["img/s"] = f"{count / max(seconds, 1e-9):.0f}"  # count: every rank's images
        self.bar.set_postfix(postfix, refresh=False)

    def write(self, line: str) -> None:
        """Print ``line`` above the bar, which stays at the bottom."""
        self._tqdm.write(line)

    def close(self) -> None:
        self.bar.close()
        if self._showwarning is not None:
            warnings.showwarning = self._showwarning
            self._showwarning = None


def _recording_warnings() -> bool:
    """Whether ``warnings.catch_warnings(record=True)`` (pytest.warns, recwarn) is collecting warnings:
    a ``showwarning`` hook would take them from it, so the bar then leaves warnings alone."""
    impl = getattr(warnings, "_showwarnmsg_impl", None)  # private; replaced by the recorder's list.append
    return impl is not None and getattr(impl, "__name__", "") != "_showwarnmsg_impl"


def print_summary(s: dict) -> None:
    """The final summary: accuracy, time, the data folder read and the run directory."""

    def pct(v):
        return "n/a" if v is None else f"{v:.2f}%"

    minutes, seconds = divmod(s["seconds"], 60)
    epochs = f"{s['epochs']} epoch{'' if s['epochs'] == 1 else 's'}"
    print(
        f"\n{s['model']} {s['precision']}{'' if s['estimator'] is None else ' ' + s['estimator']} on {s['dataset']}: "
        f"{epochs} in {int(minutes)} min "
        f"{seconds:.0f} s\n"
        f"  final test top-1 {pct(s['final_top1'])}  (top-5 {pct(s['final_top5'])})\n"
        f"  best  test top-1 {pct(s['best_top1'])}  at epoch {s['best_epoch']}\n"
        f"  data read from: {s['data_source']}\n"
        f"  run directory: {s['run_dir']}",
        flush=True,
    )
