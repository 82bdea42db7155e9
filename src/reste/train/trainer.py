"""The training loop: ``reste.train.train(config)`` and ``reste.train.evaluate(run)``.

One :class:`Trainer` runs one configuration end to end: seeds, data, model, optimizer,
learning-rate and estimator schedules, then the epochs: each step trains, samples the
equilibrium indicators now and then and maybe writes a checkpoint; each epoch ends with an
evaluation, a metrics row and checkpoints. What it writes is the run folder
(:mod:`reste.train.rundir` has its layout).

Resuming (``resume=RUN_DIR``) continues from ``checkpoints/last.pt``, at an epoch
boundary or mid-epoch (an interrupted run saves the index of the next batch; the data
loaders are a function of (seed, epoch) and restart at that batch). Model, optimizer,
both schedulers, every RNG state and the :class:`~reste.train.state.TrainState` are restored,
so on CPU a resumed run ends with bit-identical weights to an uninterrupted one.

The pieces live beside this file: :mod:`.optim` (optimizer, lr schedule), :mod:`.evaluation`,
:mod:`.faults` (the fault-injection testing hook), :mod:`.signals` (SIGINT/SIGTERM),
:mod:`.failures` (non-finite values, failed collectives), :mod:`.resume`, :mod:`.state`,
:mod:`.setup` (what is built before the first step), :mod:`.metrics` (the epoch row, the summary),
:mod:`.progress` (the terminal) and :mod:`.rundir`; model building is :mod:`reste.models.build`.
Their public names are importable from here too, as before.

About 600 lines, over the 500 the project aims for: the one ``Trainer`` class (its loop, set-up,
saving and resuming read best together) is ~480 of them, and the imports that keep every moved name
importable from here take ~70 more in the formatter's one-name-per-line layout.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .._platform import run_machine
from ..models.build import _create_model, _model_label, build_model, check_model, model_arguments  # noqa: F401
from . import distributed as D
from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    nonfinite_entries,
    rng_state,
    save_checkpoint,  # noqa: F401
    set_rng_state,
)
from .config import Config, ConfigError, _deep_merge, config_to_dict, data_info, load_config, warn_conflicts
from .evaluation import _accuracy, evaluate, evaluate_model, topk_correct  # noqa: F401
from .failures import (
    DistributedFailure,
    NonFiniteLossError,
    _is_collective_failure,
    check_divergence,  # noqa: F401
    distributed_failure,
    nonfinite,
    nonfinite_step_error,
    nonfinite_weights_error,
)
from .faults import FAULT_KINDS, FaultInjection, NoFaults, fault_from_env  # noqa: F401
from .metrics import epoch_mean_o, estimators_in_use, run_summary, train_row
from .optim import build_lr_scheduler, build_optimizer, lr_factor  # noqa: F401
from .progress import ProgressBar, epoch_line, first_step_line, print_summary
from .resume import RESUME_OVERRIDABLE, _dotted_keys, restore, resume_config  # noqa: F401
from .rundir import (
    HISTOGRAMS,
    RunDirLock,
    RunWriter,
    _clean,
    _json_default,
    _looks_like_run,
    _write_json,
    _write_text,
    abandoned_setup,  # noqa: F401
    checkpoint_path,
    claim_run_dir,
    discard_replaced,
    new_run_dir,
    open_run_dir,
    read_summary,
    remove_if_empty,
    restore_replaced,
)
from .rundir import locate_checkpoint as _locate_checkpoint  # noqa: F401
from .rundir import remove_stale_temp_files as _remove_stale_temp_files  # noqa: F401
from .setup import (
    class_count_of_data,
    compile_mode,
    create_estimator_scheduler,
    create_loaders,
    create_model,
    create_teacher,
    create_tracker,
    estimator_kernels,
    seed_everything,
    wrap_model,
)
from .signals import TrainingInterrupted, _StopRequest
from .signals import resume_command as _resume_command
from .state import TrainState

__all__ = [
    "Trainer",
    "train",
    "evaluate",
    "evaluate_model",
    "TrainingInterrupted",
    "NonFiniteLossError",
    "DistributedFailure",
    "FaultInjection",
    "RunDirLock",
    "RESUME_OVERRIDABLE",
]

#: ``on_step(epoch, step)``: called after every training step (``epoch`` 0-based, ``step`` the
#: steps done in that epoch), before the loop checks for a stop request
StepHook = Callable[[int, int], None]


class Trainer:
    """Trains one configuration; see the module docstring.

    Args:
        cfg: a validated :class:`Config` (see :func:`reste.train.load_config`).
        resume: a run directory to continue from its ``checkpoints/last.pt``.
        force: overwrite an existing run directory named by ``out.name``.
        progress: show the tqdm progress bar, a line per epoch under it (test top-1 and loss,
            o, e, s) and the final summary (rank 0 only).
        summary: print the final summary and the run directory (default: as ``progress``);
            ``reste train --quiet`` is ``progress=False, summary=True``.
        on_step: a :data:`StepHook` called after every training step (tests use it to stop a
            run at a chosen step); it must not change what is trained.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        resume: str | os.PathLike | None = None,
        force: bool = False,
        progress: bool = True,
        summary: bool | None = None,
        on_step: StepHook | None = None,
    ):
        self.cfg = cfg
        self.resume_dir = Path(resume) if resume is not None else None
        self.force = force
        self.progress = progress
        self.print_summary = progress if summary is None else summary
        self.on_step = on_step
        # set by _setup, in this order. None until then; typed as what they hold once _setup ran (the
        # methods that read them run after it, from fit), hence the ignores: issue #16 point 1 moves them
        # into a set-up result. fit's clean-up tests ctx, _lock and writer against None (a failed set-up).
        self.ctx: D.DistContext = None  # type: ignore[assignment]
        self.device: torch.device = None  # type: ignore[assignment]
        self.meta: Any = None  # the data set's reste.data.info
        self.num_classes = 0
        self.run_dir: Path = None  # type: ignore[assignment]
        self._lock: RunDirLock | None = None
        self._created_run_dir: Path | None = None  # a folder this trainer made: removed if set-up fails
        self._replaced: Path | None = None  # the run folder --force replaces: deleted once set-up succeeded
        self.fault: NoFaults = NoFaults()
        self.train_loader: Any = None
        self.test_loader: Any = None
        self.steps_per_epoch = 0
        # the plain module (its state_dict is what checkpoints hold); forward_model: it, its DDP or compiled wrapper
        self.model: nn.Module = None  # type: ignore[assignment]
        self.init_report: Any = None  # what model.init_from copied
        self.teacher: Any = None  # the frozen teacher of train.teacher (None without one)
        self.optimizer: torch.optim.Optimizer = None  # type: ignore[assignment]
        self.lr_scheduler: Any = None
        self.est_scheduler: Any = None
        self.state = TrainState()  # what a checkpoint resumes, besides the objects above
        self.forward_model: nn.Module = None  # type: ignore[assignment]
        self.tracker: Any = None  # the indicator tracker (rank 0, analysis.indicators, a model with binary layers)
        self.writer: RunWriter = None  # type: ignore[assignment]
        # set by fit
        self._stop: _StopRequest = None  # type: ignore[assignment]
        self.bar: ProgressBar = None  # type: ignore[assignment]
        self._params: list[torch.Tensor] = []  # the trained parameters, for the gradient norm
        self.kernels = ""  # the estimators' path (estimator_kernels): compiled C, Triton, traced or PyTorch formulas
        # what summary.json records of this session (rewritten after every epoch): computed once, in set-up
        self.machine: dict | None = None
        self.estimators: str | None = None
        self._compile_mode: str | None = None  # torch.compile's mode (train.compile on this device), None: eager
        self._first_step_timed = False  # the session's first step (compilation included) was timed and shown

    # -- set-up ----------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.cfg
        t = cfg.train
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        self.ctx = ctx = D.setup(t.device, t.dist_timeout_s)
        self.device = ctx.device
        if ctx.is_main:  # once per job, not once per rank
            warn_conflicts(cfg, ctx.world_size)
        if cfg.data.batch_size % ctx.world_size:
            raise ConfigError(
                f"data.batch_size={cfg.data.batch_size} (the global batch) is not divisible by the "
                f"{ctx.world_size} ranks; "
                f"use a multiple of {ctx.world_size}"
            )
        self.meta = data_info(cfg)
        check_model(cfg, self.meta)  # a model too big to build: before any folder or data
        # claim the run directory first: a name clash is reported before any data is loaded
        self.run_dir = self._prepare_run_dir()
        self.fault = fault_from_env(ctx.rank)
        seed_everything(cfg.seed)

        if cfg.data.root is not None:  # recorded absolute: the run is evaluated and exported from any folder
            cfg.data.root = os.path.abspath(os.path.expanduser(cfg.data.root))
        self.train_loader, self.test_loader = create_loaders(cfg, self.meta, ctx)
        self.meta = class_count_of_data(
            cfg,
            self.meta,
            self.train_loader,
            tell=ctx.is_main and self.print_summary,
            warn=ctx.is_main,
            resumed=self.resume_dir is not None,
        )
        self.num_classes = self.meta.num_classes
        self.steps_per_epoch = len(self.train_loader)
        tell = ctx.is_main and self.print_summary
        self.model, self.init_report = create_model(cfg, self.meta, ctx, warm_start=self.resume_dir is None, tell=tell)
        self.teacher = create_teacher(cfg, self.meta, ctx, tell=tell)
        self.optimizer = build_optimizer(self.model, cfg)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg, self.steps_per_epoch)
        self.est_scheduler = create_estimator_scheduler(self.model, cfg, self.steps_per_epoch)
        self.machine, self.estimators = run_machine(ctx.device), estimators_in_use(self.model)
        saved = restore(self.resume_dir, self) if self.resume_dir is not None else None
        if saved is not None and self._nothing_to_train():
            # a finished run: its files stay as they are (no config, metrics or TensorBoard writes)
            self.writer = RunWriter(self.run_dir, cfg, enabled=False)
            return
        self._compile_mode = compile_mode(t.compile, ctx.device)
        self.kernels = estimator_kernels(ctx.device, self._compile_mode)
        if self.kernels.startswith("torch (") and ctx.is_main and self.print_summary:
            # e.g. installed without a C compiler: pip hides the build's warning, so say it here
            slower = "; the compiled kernels train about twice as fast" if ctx.device.type == "cpu" else ""
            print(f"estimator kernels: {self.kernels[len('torch (') : -1]}{slower}", flush=True)
        self.forward_model = wrap_model(self.model, ctx, t.compile)
        self.tracker = create_tracker(self.model, cfg, ctx, saved)

        # epochs are TensorBoard's steps: the first not in the checkpoint is where a killed run's points are dropped
        purge = self.state.epoch + 1 if saved is not None else None
        self.writer = RunWriter(self.run_dir, cfg, enabled=ctx.is_main, purge_step=purge)
        self.writer.write_config(cfg)
        if saved is not None:
            self.writer.write_metrics(self.state.history)  # drop rows newer than the checkpoint
            self.writer.truncate_indicators(self.state.epoch * self.steps_per_epoch + self.state.step_in_epoch)
            set_rng_state(saved["rng"])  # last: building the model above drew random numbers

    def _nothing_to_train(self) -> bool:
        """After a resume's checkpoint is restored: whether it has every epoch of ``train.epochs``
        already (then nothing is trained or written). A ``train.epochs`` below what the checkpoint
        has trained is refused (it cannot be undone)."""
        epochs, done, step = self.cfg.train.epochs, self.state.epoch, self.state.step_in_epoch
        if done > epochs or (done == epochs and step > 0):
            trained = _count(done, "epoch") + (f" and {step} steps of epoch {done + 1}" if step else "")
            raise ConfigError(
                f"cannot resume {self.run_dir} with train.epochs={epochs}: it has already trained {trained}; "
                f"give train.epochs={done + (1 if step else 0)} or more, or leave train.epochs out"
            )
        return done == epochs

    def _prepare_run_dir(self) -> Path:
        """Rank 0 picks (or checks and locks) the folder; every rank learns the result, errors included.
        The path is made absolute, so summary.json and the messages name it wherever they are read."""
        path, self._lock, created, self._replaced = open_run_dir(
            self.cfg, self.ctx, resume_dir=self.resume_dir, force=self.force
        )
        path = Path(os.path.abspath(path))
        self._created_run_dir = path if created else None
        return path

    def _remove_empty_run_dir(self) -> None:
        """Set-up failed (e.g. data not found): do not leave the empty folder it claimed; with
        ``--force``, put the run it was to replace back where it was, unchanged."""
        if self._replaced is not None and self._created_run_dir is not None:
            restore_replaced(self._created_run_dir, self._replaced, self._lock)
            self._replaced = None
            return
        remove_if_empty(self._created_run_dir, self._lock)

    # -- the loop --------------------------------------------------------------
    def fit(self) -> dict:
        """Train (or continue training) to ``train.epochs``; returns the summary dict."""
        try:
            try:
                self._setup()
            except BaseException:
                self._remove_empty_run_dir()
                raise
            discard_replaced(self._replaced)  # set-up succeeded: the run --force replaces goes now
            self._replaced = None
            with _StopRequest() as stop:
                self._stop = stop
                try:
                    return self._run()
                except KeyboardInterrupt:  # a second Ctrl-C: aborted at once, without a new checkpoint
                    self._tell_how_to_resume_after_abort()
                    raise
                except RuntimeError as err:
                    if self.ctx.distributed and _is_collective_failure(err):
                        timeout = self.cfg.train.dist_timeout_s
                        raise distributed_failure(err, self.run_dir, self.ctx.rank, timeout) from err
                    raise
        finally:
            if self.writer is not None:
                self.writer.close()
            if self._lock is not None:
                self._lock.release()
            if self.ctx is not None:
                D.cleanup(self.ctx)

    def _tell_how_to_resume_after_abort(self) -> None:
        """After an abort (a second Ctrl-C): the resume command, when a checkpoint of this run exists."""
        last = checkpoint_path(self.run_dir, "last")
        if self.ctx.is_main and last.is_file():
            print(
                f"\naborted without a new checkpoint; the last one written, {last}, continues the run with:\n"
                f"  {_resume_command(self.run_dir)}",
                file=sys.stderr,
                flush=True,
            )

    def _run(self) -> dict:
        cfg, ctx = self.cfg, self.ctx
        epochs = cfg.train.epochs
        # where this session starts: the checkpoint's position (0, 0 for a new run)
        start_epoch, start_step, partial = self.state.epoch, self.state.step_in_epoch, self.state.partial
        show = self.progress and ctx.is_main
        tell = self.print_summary and ctx.is_main
        self.state.session_start = time.perf_counter()
        if start_epoch >= epochs:  # a finished run (_nothing_to_train): no bar, no files written
            try:
                old = read_summary(self.run_dir)
            except ValueError:  # damaged: written anew below
                old = None
            if not isinstance(old, dict):  # valid JSON but not a summary ([1], "x"): damaged too
                old = None
            summary = self._summary(complete=True)
            # this session trains nothing: the estimators' code path and the machine are those of the
            # sessions that trained, as the summary recorded them (a missing one: unknown, null)
            for key in ("estimator_kernels", "machine"):
                summary[key] = (old or {}).get(key)
            # but the summary, where a kill between the last checkpoint and it left none (or a stale one)
            wrote = ctx.is_main and self.writer.finish_summary(summary)
            if tell:
                print(
                    f"{self.run_dir} is already complete ({_count(start_epoch, 'epoch')}); "
                    + ("its summary.json was missing or incomplete and is written now; " if wrote else "")
                    + "raise train.epochs to continue it"
                )
            return summary
        self.bar = ProgressBar(
            epochs * self.steps_per_epoch,
            start_epoch * self.steps_per_epoch + start_step,
            show,
            self.steps_per_epoch,
            ctx.world_size,
        )
        try:
            for epoch in range(start_epoch, epochs):
                resumed = epoch == start_epoch and start_step > 0
                row, epoch_start = self._train_epoch(epoch, start_step if resumed else 0, partial if resumed else None)
                check_divergence(
                    self.run_dir,
                    epoch,
                    row,
                    steps_per_epoch=self.steps_per_epoch,
                    num_classes=self.num_classes,
                    lr=cfg.optim.lr,
                    warn=ctx.is_main,
                )
                # the plain module, not the DDP wrapper: ranks may hold different numbers of test
                # batches, and DDP's per-forward buffer broadcast would then wait forever; so rank 0's
                # BatchNorm statistics (the ones saved) are sent to every rank first
                D.broadcast_state(self.model, ctx)
                test = evaluate_model(
                    self.model,
                    self.test_loader,
                    self.device,
                    num_classes=self.num_classes,
                    amp=cfg.train.amp,
                    channels_last=cfg.train.channels_last,
                    ctx=ctx,
                )
                row.update({"test_loss": test["loss"], "test_top1": test["top1"], "test_top5": test["top5"]})
                row["epoch_time"] = time.perf_counter() - epoch_start
                self._end_epoch(epoch, row)
                if show:
                    self.bar.write(epoch_line(row, epochs))  # above the bar, which stays at the bottom
                if epoch + 1 < epochs:
                    self._check_stop(epoch + 1, 0)
        finally:
            self.bar.close()
        summary = self._summary(complete=True)
        if tell:
            print_summary(summary)
        return summary

    def _train_epoch(self, epoch: int, start_step: int = 0, partial: dict | None = None) -> tuple[dict, float]:
        """The steps of one epoch, from ``start_step`` (a mid-epoch checkpoint's, whose running sums
        and seconds are ``partial``); returns the epoch's metrics row and its start time."""
        if start_step:
            self.train_loader.set_epoch(epoch, start_batch=start_step)
        else:
            self.est_scheduler.step_epoch(epoch)
            self.train_loader.set_epoch(epoch)
        # running sums of the epoch (restored from a mid-epoch checkpoint): loss, top-1, top-5, count, skipped
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)
        seconds_before = 0.0
        if start_step and partial:
            if self.ctx.is_main:  # the saved sums are over all ranks already: count them once
                sums += torch.tensor(partial["sums"], dtype=torch.float64, device=self.device)
            seconds_before = float(partial["seconds"])
        self.model.train()
        amp = self.cfg.train.amp == "bf16"
        autocast = torch.autocast(device_type=self.device.type, dtype=torch.bfloat16) if amp else nullcontext()
        indicators: dict = {}
        epoch_start = time.perf_counter() - seconds_before
        self.bar.start_epoch(epoch, self.cfg.train.epochs)
        lr = self.optimizer.param_groups[0]["lr"]
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        for step, (images, labels) in enumerate(self.train_loader, start_step):
            first = not self._first_step_timed
            started = time.perf_counter()
            lr, measured = self._step(epoch, step, images, labels, sums, autocast)
            if first:
                self._show_first_step(started)
            if measured is not None:
                indicators = measured
            self._after_step(epoch, step + 1, sums, epoch_start, lr)
        if self.cfg.lr_schedule.per == "epoch":
            self.lr_scheduler.step()
        return self._epoch_row(epoch, sums, time.perf_counter() - epoch_start, lr, indicators), epoch_start

    def _step(self, epoch: int, step: int, images, labels, sums: torch.Tensor, autocast) -> tuple[float, dict | None]:
        """One training step (``step`` 0-based in the epoch); returns the lr it used and the indicators
        measured at the epoch's last step (None at other steps)."""
        t, model, optimizer = self.cfg.train, self.model, self.optimizer
        global_step = epoch * self.steps_per_epoch + step + 1  # 1-based over the run
        self.fault.before_step(global_step)
        if self._compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be overwritten
        self.est_scheduler.step_iter()
        if t.nonfinite == "skip":  # a skipped batch must not leave its BatchNorm statistics behind
            buffers = [b for b in model.buffers()]
            saved_buffers = [b.detach().clone() for b in buffers]
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if t.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = self.forward_model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=t.label_smoothing)
        if self.teacher is not None:
            loss = self.teacher.loss(images, logits, loss, autocast)
        loss = self.fault.on_loss(global_step, loss)
        # backward even on a NaN loss: every rank must join DDP's gradient all-reduce
        loss.backward()
        self.fault.on_grads(global_step, model)
        # the gradient is checked too: a NaN latent weight of a binary layer gives a finite
        # forward (sign(NaN) = +1) but a NaN gradient
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self._params if p.grad is not None])
        bad_loss, bad_grad = nonfinite(loss, grad_norm, self.ctx)
        measured = None
        if bad_loss or bad_grad:
            if t.nonfinite == "stop":
                raise nonfinite_step_error(
                    self.run_dir,
                    epoch,
                    step,
                    loss,
                    grad_norm,
                    bad_loss,
                    lr=optimizer.param_groups[0]["lr"],
                    o=self.est_scheduler.o,
                    world_size=self.ctx.world_size,
                )
            if self.ctx.is_main:
                sums[4] += 1  # skip: no update; the schedules still advance
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for buffer, saved in zip(buffers, saved_buffers):
                    buffer.copy_(saved)
        else:
            measured = self._sample_indicators(epoch, step, global_step)
            if t.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(self._params, t.grad_clip, grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                c1, c5 = topk_correct(logits.detach(), labels, self.num_classes)
                n = labels.numel()
                sums[:4] += torch.stack(
                    [
                        loss.detach().double() * n,
                        c1.double(),
                        c5.double(),
                        torch.tensor(float(n), dtype=torch.float64, device=self.device),
                    ]
                )
        lr = optimizer.param_groups[0]["lr"]  # the lr this step used
        if self.cfg.lr_schedule.per == "step":
            self.lr_scheduler.step()
        return lr, measured

    def _show_first_step(self, started: float) -> None:
        """Show how long the session's first step took when the model is compiled (it includes the
        compilation), above the progress bar."""
        self._first_step_timed = True
        if self._compile_mode is None or not (self.progress and self.ctx.is_main):
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.bar.write(first_step_line(time.perf_counter() - started, self._compile_mode))

    def _sample_indicators(self, epoch: int, step: int, global_step: int) -> dict | None:
        """Measure the indicators (after the backward, before the update) every ``analysis.every_steps``
        steps (a line of indicators.jsonl) and at the epoch's last step (the metrics row's values, and a
        histogram snapshot at ``analysis.histograms_at`` and the last epoch); returns the latter."""
        every = self.cfg.analysis.every_steps
        sampled = every > 0 and global_step % every == 0
        last_step = step == self.steps_per_epoch - 1
        if self.tracker is None or not (sampled or last_step):
            return None
        values = self.tracker.measure(epoch_end=last_step)
        if sampled:
            step_values = {k: v for k, v in values.items() if k != "epoch_flip_ratio"}
            self.writer.append_indicators(
                {
                    "epoch": epoch + 1,
                    "step": step + 1,
                    "global_step": global_step,
                    "o": self.est_scheduler.o,
                    **step_values,
                }
            )
        if not last_step:
            return None
        if (epoch + 1) in self.cfg.analysis.histograms_at or epoch + 1 == self.cfg.train.epochs:
            self.tracker.snapshot(self.run_dir / HISTOGRAMS / f"epoch{epoch + 1:04d}.npz")
        # the row's flip ratio: since the previous epoch's end, whatever analysis.every_steps sampled between
        row = {k: v for k, v in values.items() if k not in ("layers", "epoch_flip_ratio")}
        return {**row, "flip_ratio": values["epoch_flip_ratio"]}

    def _after_step(self, epoch: int, step: int, sums: torch.Tensor, epoch_start: float, lr: float) -> None:
        """After ``step`` steps of ``epoch`` (the last one used ``lr``): the bar, the :data:`StepHook`,
        a stop request, a mid-epoch checkpoint."""
        shown = sums
        if self.ctx.distributed and self.bar.refreshes_at(step):
            # the bar shows every rank's running values, as the epoch line does. A collective: every rank
            # joins it at the same steps whether it shows a bar or not (train(progress=(rank == 0)) is a
            # common idiom; a rank-dependent condition here would pair it with another collective)
            shown = D.all_reduce_sum(sums.clone(), self.ctx)
        # the lr the step used, as the metrics row records it (the optimizer holds the next step's already)
        self.bar.update(shown, epoch_start, step, self.est_scheduler.o, lr)
        if self.on_step is not None:
            self.on_step(epoch, step)
        self._check_stop(epoch, step, sums=sums, seconds=time.perf_counter() - epoch_start)
        every = self.cfg.train.checkpoint_every_steps
        # the epoch's last step is followed by the epoch-end checkpoint
        if every and (epoch * self.steps_per_epoch + step) % every == 0 and step < self.steps_per_epoch:
            partial = {"sums": self._global_sums(sums), "seconds": time.perf_counter() - epoch_start}
            self._save("last", epoch=epoch, step_in_epoch=step, partial=partial)

    def _epoch_row(self, epoch: int, sums: torch.Tensor, train_seconds: float, lr: float, indicators: dict) -> dict:
        """The epoch's metrics row (its training half; ``_run`` adds the test results)."""
        totals = D.all_reduce_sum(sums.clone(), self.ctx).tolist()
        row = train_row(
            epoch,
            totals,
            num_classes=self.num_classes,
            lr=lr,
            o=self.est_scheduler.o,
            o_mean=epoch_mean_o(self.est_scheduler, epoch),
            train_seconds=train_seconds,
        )
        self.state.skipped_total += row["skipped_batches"]
        if self.teacher is not None:
            row.update(self.teacher.pop_epoch_stats())
        if self.cfg.analysis.indicators and self.ctx.is_main and self.tracker is not None:
            for key in ("est_error", "est_error_end", "grad_instability", "flip_ratio"):
                row[key] = indicators.get(key)
        return row

    def _global_sums(self, sums: torch.Tensor) -> list[float]:
        """The epoch's running sums over all ranks (a collective: every rank calls it at the same step)."""
        return D.all_reduce_sum(sums.clone(), self.ctx).tolist()

    def _check_stop(self, epoch: int, step: int, sums: torch.Tensor | None = None, seconds: float = 0.0) -> None:
        """After a step (or an epoch): if SIGINT/SIGTERM arrived on any rank, checkpoint and stop."""
        signum = int(self._stop.signum or 0)
        if self.ctx.distributed:  # every rank must stop at the same step, or collectives would hang
            flag = torch.tensor([float(signum)], device=self.device)
            signum = int(D.all_reduce_max(flag, self.ctx).item())
        if not signum:
            return
        if step == self.steps_per_epoch:
            return  # the epoch is complete: stop right after its evaluation and checkpoint
        # a stop after a step of an epoch (step > 0) comes with the epoch's running sums
        partial = None if step == 0 else {"sums": self._global_sums(cast(torch.Tensor, sums)), "seconds": seconds}
        self._save("last", epoch=epoch, step_in_epoch=step, partial=partial)
        self.bar.close()
        raise TrainingInterrupted(signum, self.run_dir, _resume_command(self.run_dir))

    def _end_epoch(self, epoch: int, row: dict) -> None:
        self.state.history.append(row)
        if self.ctx.is_main:
            self.writer.write_metrics(self.state.history)
            self.writer.log_scalars(row)
        final = epoch + 1 == self.cfg.train.epochs
        if self.state.best_row() is row:
            self._save("best", epoch=epoch + 1)
        if final or (epoch + 1) % self.cfg.train.checkpoint_every == 0:
            self._save("last", epoch=epoch + 1)
        if self.ctx.is_main:
            self.writer.write_summary(self._summary(complete=final))

    def _save(self, which: str, *, epoch: int, step_in_epoch: int = 0, partial: dict | None = None) -> None:
        """Write checkpoints/<which>.pt (rank 0) at this position; ``epoch`` counts finished epochs."""
        self.state.move_to(epoch, step_in_epoch, partial)
        if not self.ctx.is_main:
            return
        model_state = self.model.state_dict()
        bad = nonfinite_entries(model_state)
        if bad:  # never write (nor call good) a checkpoint of a diverged model
            raise nonfinite_weights_error(self.run_dir, bad, which, epoch, step_in_epoch)
        tracker = self.tracker
        state = {
            "model": model_state,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "estimator_scheduler": self.est_scheduler.state_dict(),
            **self.state.state_dict(),  # epoch, step_in_epoch, partial, metrics, elapsed, skipped_total
            "rng": rng_state(),
            "config": config_to_dict(self.cfg),
            "indicators": tracker.state_dict() if tracker is not None and hasattr(tracker, "state_dict") else None,
            "world_size": self.ctx.world_size,
            "steps_per_epoch": self.steps_per_epoch,
            "torch_version": str(torch.__version__),  # TorchVersion is a str subclass weights_only refuses
        }
        save_checkpoint(state, checkpoint_path(self.run_dir, which))

    def _summary(self, complete: bool) -> dict:
        return run_summary(
            self.cfg,
            self.state,
            complete=complete,
            train_loader=self.train_loader,
            test_loader=self.test_loader,
            steps_per_epoch=self.steps_per_epoch,
            world_size=self.ctx.world_size,
            run_dir=self.run_dir,
            kernels=self.kernels,
            machine=self.machine,
            estimators=self.estimators,
            has_o=self.est_scheduler.has_o,
        )


def _count(n: int, noun: str) -> str:
    """``1 epoch``, ``2 epochs``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


# ----------------------------------------------------------------------------- public entry point
def train(
    config: str | os.PathLike[str] | dict | Config | None = None,
    *,
    resume: str | os.PathLike[str] | None = None,
    force: bool = False,
    progress: bool = True,
    summary: bool | None = None,
    overrides: list[str] | tuple[str, ...] | dict | None = None,
    on_step: StepHook | None = None,
    **sections: Any,
) -> dict:
    """Train a model; returns the summary dict (also written to ``summary.json``).

    Args:
        config: None (the defaults: binary ResNet-20 + ReSTE on Fashion-MNIST), a YAML
            path, a nested dict or a :class:`Config`.
        resume: a run directory to continue (its config is used; see :data:`RESUME_OVERRIDABLE`).
        force: overwrite an existing run directory named by ``out.name``.
        progress: progress bar, a line per epoch and the final summary on the terminal.
        summary: the final summary and run directory only (default: as ``progress``).
        overrides: ``["optim.lr=0.05", ...]`` or a nested dict, applied on top of ``config``.
        on_step: called after every training step (see :class:`Trainer`).
        **sections: more overrides by section, e.g. ``train={"epochs": 2}, optim={"lr": 0.05}, seed=1``.

    >>> summary = train(data={"subset": 2000}, train={"epochs": 1})   # doctest: +SKIP
    """
    extra = dict(sections)
    if overrides:
        from .config import parse_overrides

        nested = parse_overrides(overrides) if isinstance(overrides, (list, tuple)) else dict(overrides)
        extra = _deep_merge(extra, nested, replace=("kwargs", "params"))
    if resume is not None:
        if config is not None:
            raise ConfigError(
                "pass either a config or resume=RUN_DIR (a resumed run uses the config saved in its run directory)"
            )
        cfg = resume_config(resume, extra or None)
        if not checkpoint_path(resume, "last").is_file():  # resume_config checked it is a stopped set-up
            if D.launched_as_rank_0():  # once per job, not once per rank
                print(
                    f"note: {resume} was stopped during set-up, before its first checkpoint: starting it over with its "
                    "config.yaml",
                    file=sys.stderr,
                    flush=True,
                )
            resume = None
    else:
        cfg = load_config(config, extra or None)
    return Trainer(cfg, resume=resume, force=force, progress=progress, summary=summary, on_step=on_step).fit()
