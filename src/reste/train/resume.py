"""Resuming a run: which options may change (:data:`RESUME_OVERRIDABLE`), the config a resume
trains with (:func:`resume_config`), and restoring a checkpoint into a fresh trainer's objects
(:func:`restore`)."""

from __future__ import annotations

import warnings
from pathlib import Path

from .checkpoint import REQUIRED_KEYS, CheckpointError, load_checkpoint, load_model_weights
from .config import Config, ConfigError, load_config, validate
from .distributed import launched_as_rank_0
from .optim import realign_step_schedule
from .rundir import CONFIG, abandoned_setup, checkpoint_path, looks_like_run, read_config
from .state import TrainState

__all__ = ["RESUME_OVERRIDABLE", "resume_config", "restore"]

#: options that may change when resuming (they do not change what is computed,
#: except train.epochs, which extends the run and stretches the lr and o schedules). All but
#: train.epochs are also what ``reste sweep`` ignores when it decides whether a run can be reused,
#: and what ``reste report`` ignores when it groups runs into cells (reste.analysis.runs.NEUTRAL_KEYS):
#: only a key that cannot change a run's results belongs here
RESUME_OVERRIDABLE = (
    "train.epochs",
    "train.device",
    "train.threads",
    "train.compile",
    "train.checkpoint_every",
    "train.checkpoint_every_steps",
    "train.dist_timeout_s",
    "data.root",
    "data.num_workers",
    "data.download",
    "data.test_batch_size",
    "analysis.every_steps",  # the indicators are read from weights and gradients, under no_grad: no RNG
    "analysis.histograms_at",
)


def _saved_config(run_dir: Path, has_last: bool) -> dict:
    """The run's ``config.yaml``; if that file was lost, the configuration its ``last.pt`` was trained
    with (every checkpoint holds it, as ``reste eval`` and ``reste export`` use), with a warning: the
    resumed run writes ``config.yaml`` again."""
    if (run_dir / CONFIG).is_file() or not has_last:
        return read_config(run_dir)
    state = load_checkpoint(checkpoint_path(run_dir, "last"), required=("config",))
    if not isinstance(state["config"], dict):
        raise CheckpointError(
            f"cannot resume {run_dir}: its {CONFIG} is missing and checkpoints/last.pt holds no configuration; "
            f"put back {CONFIG}, or start the run again with its command and --force"
        )
    if launched_as_rank_0():  # once per job
        warnings.warn(
            f"{run_dir / CONFIG} is missing: resuming with the configuration saved in checkpoints/last.pt "
            f"(a resume that trains writes {CONFIG} again)",
            UserWarning,
            stacklevel=3,
        )
    return state["config"]


def resume_config(run_dir, overrides=None) -> Config:
    """The configuration of ``run_dir`` with the few overrides a resume allows (:data:`RESUME_OVERRIDABLE`)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise CheckpointError(
            f"cannot resume {run_dir}: it does not exist; give the run directory that `reste train` printed "
            "(runs are folders under out.dir, default runs/)"
        )
    if not run_dir.is_dir():
        raise CheckpointError(f"cannot resume {run_dir}: it is a file, not a run directory written by `reste train`")
    has_last = checkpoint_path(run_dir, "last").is_file()
    restart = not has_last and abandoned_setup(run_dir)
    if restart and not (run_dir / CONFIG).is_file():
        raise CheckpointError(
            f"cannot resume {run_dir}: its set-up was stopped before it wrote anything; run the "
            "command that started it again (it reuses the folder), or add --force to it"
        )
    if not restart and not has_last:
        hint = (
            "it has no checkpoint yet; start it again with its command and --force"
            if looks_like_run(run_dir)
            else "is it a run directory written by `reste train`?"
        )
        raise CheckpointError(f"cannot resume {run_dir}: no checkpoints/last.pt there ({hint})")
    cfg = load_config(_saved_config(run_dir, has_last), check=False)
    if restart:  # nothing was trained: start the run over in the same folder
        cfg.out.dir, cfg.out.name = str(run_dir.parent), run_dir.name
    if overrides:
        from .config import parse_overrides

        nested = parse_overrides(overrides) if isinstance(overrides, (list, tuple)) else overrides
        for key in _dotted_keys(nested):
            if key not in RESUME_OVERRIDABLE:
                raise ConfigError(
                    f"cannot change {key} when resuming (it would make the run inconsistent); start a new run instead. "
                    f"Options that may change on resume: {', '.join(RESUME_OVERRIDABLE)}"
                )
        planned = cfg.train.epochs
        cfg = load_config(cfg, nested, check=False)
        if cfg.train.epochs != planned and not restart:
            # the schedules stretch from here on: not the run a fresh start with these epochs would be
            cfg.train.extended_from = [*cfg.train.extended_from, planned]
    return validate(cfg)


def _dotted_keys(nested: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in nested.items():
        if isinstance(value, dict) and key not in ("kwargs", "params"):
            keys += _dotted_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def restore(run_dir: Path, trainer) -> dict:
    """Load ``run_dir``'s ``checkpoints/last.pt`` into a set-up trainer: model, optimizer, both
    schedulers and its :class:`TrainState`; returns the checkpoint (its RNG states and indicator
    state are restored later, by the caller). A checkpoint written mid-epoch by another number of
    ranks is refused when the steps per epoch differ, and warned about otherwise."""
    path = checkpoint_path(run_dir, "last")
    state = load_checkpoint(path, map_location=trainer.device, required=REQUIRED_KEYS)
    load_model_weights(trainer.model, state["model"], path)
    try:
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(
            f"checkpoint {path}: optimizer or lr-scheduler state does not fit this configuration ({err})"
        ) from None
    trainer.est_scheduler.load_state_dict(state["estimator_scheduler"])
    ts: TrainState = trainer.state
    ts.load_state_dict(state)
    steps, world = trainer.steps_per_epoch, trainer.ctx.world_size
    saved_world = int(state.get("world_size", 1))
    saved_steps = int(state.get("steps_per_epoch", steps))
    if saved_steps != steps:
        if ts.step_in_epoch:
            raise CheckpointError(
                f"checkpoint {path} stopped at batch {ts.step_in_epoch} of an epoch of {saved_steps} steps "
                f"({saved_world} ranks), "
                f"but an epoch now has {steps} steps ({world} ranks); resume with {saved_world} "
                "ranks to finish that epoch, then with any number"
            )
        realign_step_schedule(trainer.lr_scheduler, trainer.optimizer, trainer.cfg, ts.epoch, steps)
    if ts.step_in_epoch and saved_world != world and trainer.ctx.is_main:  # once per job, not per rank
        # each rank takes a contiguous slice of the epoch's permutation, so the rest of this
        # epoch's batches are a different (same-sized) selection of images; later epochs are not affected
        warnings.warn(
            f"{path} was written mid-epoch (batch {ts.step_in_epoch}) by {saved_world} ranks and is resumed by "
            f"{world}: the rest of epoch {ts.epoch + 1} draws its batches from a different split of "
            "that epoch's shuffled images, so some are seen twice and others not at all in that epoch",
            stacklevel=2,
        )
    return state
