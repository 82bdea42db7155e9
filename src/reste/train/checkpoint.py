"""Safe, atomic checkpoints.

Saving: a checkpoint holds only tensors and plain containers (dict, list, tuple,
str, int, float, bool, None) -- RNG states as tensors, the config as a plain dict --
so it loads with ``torch.load(path, weights_only=True)``, which cannot run code.
The file is written to a temporary file in the same folder, flushed and fsynced,
then renamed over the target with ``os.replace`` (atomic on POSIX and Windows) and
the folder is fsynced: a crash leaves either the old or the new checkpoint, never
half of one.

Loading: always ``weights_only=True``. A missing, truncated, corrupt or unsafe file
(e.g. a pickle that would call ``os.system``), or one whose weights do not fit the
model, raises :class:`CheckpointError` naming the file. Loading never writes.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import secrets
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ReSTEError

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "atomic_write",
    "load_checkpoint",
    "load_model_weights",
    "rng_state",
    "set_rng_state",
    "REQUIRED_KEYS",
]

#: keys every training checkpoint written by :class:`reste.train.Trainer` has
REQUIRED_KEYS = ("model", "optimizer", "lr_scheduler", "estimator_scheduler", "epoch", "rng", "config", "metrics")


class CheckpointError(ReSTEError, RuntimeError):
    """A checkpoint cannot be used; the message names the file and the reason (exit code 1)."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(state: dict, path) -> Path:
    """Write ``state`` to ``path`` atomically (temp file + fsync + ``os.replace`` + dir fsync).

    Serialised in memory first: torch's zip writer turns a failed write (a full disk) into a
    RuntimeError without the cause, a plain file write keeps the OSError and its errno."""

    def write(handle):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        handle.write(buffer.getbuffer())

    return atomic_write(path, write)


def atomic_write(path, write) -> Path:
    """Create or replace ``path`` with what ``write(binary_file)`` writes, atomically: a
    temp file beside it, fsync, ``os.replace``, fsync of the folder. A reader sees the old
    file or the new one, never half of one; if ``write`` fails, the old file stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # os.open with mode 0o666 honours the umask (mkstemp would force 0600); O_EXCL: never clobber
    tmp_name = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as err:
        # never leave a half-written temp file behind (KeyboardInterrupt included)
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        if isinstance(err, OSError) and err.filename is None:  # say which file could not be written
            raise OSError(err.errno, err.strerror or str(err), str(path)) from None
        raise
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path, map_location="cpu", required: tuple[str, ...] = ()) -> dict:
    """Load a checkpoint with ``weights_only=True``; any problem is a :class:`CheckpointError`.

    Args:
        path: the ``.pt`` file.
        map_location: where tensors go (default CPU).
        required: top-level keys that must be present (e.g. :data:`REQUIRED_KEYS`).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}; check the path (a run directory has checkpoints/last.pt and best.pt)"
        )
    try:
        with warnings.catch_warnings():
            # bytes that are no checkpoint can name any pickle protocol; torch warns about it before failing
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        # torch's message is long; its line naming the offending global or opcode is the useful one
        reason = next(
            (line for line in lines if "GLOBAL" in line or "Unsupported" in line),
            lines[-1] if lines else type(err).__name__,
        )
        if "global" not in reason.lower():
            # e.g. "Unsupported operand 205": bytes that are no pickle stream at all (nothing was run)
            raise CheckpointError(
                f"checkpoint {path} is corrupt or not a PyTorch checkpoint (the weights-only loader stopped at: "
                f"{reason[:200]}); "
                f"{_another(path)} or re-run training"
            ) from None
        # weights_only refuses any global it does not know: arbitrary classes, functions, os.system ...
        raise CheckpointError(
            f"refusing to load {path}: it contains objects other than tensors and plain containers "
            f"({reason[:200]}). It was not written by reste and could run code if unpickled "
            "without weights_only; only use checkpoints you created or trust."
        ) from None
    except PermissionError as err:  # the file cannot be read, whatever it holds
        raise CheckpointError(
            f"cannot read checkpoint {path} ({err.strerror or err}); check the file's permissions"
        ) from None
    except Exception as err:  # whatever torch's readers raise on bytes that are no checkpoint
        # RuntimeError, EOFError, BadZipFile, ValueError, KeyError; the legacy (non-zip) reader
        # also fails with IndexError (b"t...", b"(..."), struct.error (b"G..."), AssertionError, ...
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(err).__name__}: {str(err).strip()[:200]}); "
            f"{_another(path)} or re-run training"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(state).__name__}, not a dict of training state; was it written by reste?"
        )
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks {', '.join(missing)}; it was not written by `reste train` (a plain state_dict?)"
        )
    return state


def _another(path) -> str:
    """The fix that names a checkpoint other than the damaged one."""
    name = Path(path).name
    if name in ("best.pt", "last.pt"):
        other = "last" if name == "best.pt" else "best"
        return (
            f"use the run's other checkpoint (checkpoints/{other}.pt: --which {other} for eval, "
            f"--checkpoint {other} for export)"
        )
    return "use another checkpoint (e.g. a run's checkpoints/best.pt)"


def nonfinite_entries(state_dict: dict) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` holding a NaN or an infinity."""
    return [
        k
        for k, v in state_dict.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]


def load_model_weights(model: nn.Module, state_dict: dict, path) -> None:
    """``model.load_state_dict(state_dict)`` with a clear error when the checkpoint is of another model."""
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"checkpoint {path}: 'model' is a {type(state_dict).__name__}, not a state_dict")
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and isinstance(state_dict[k], torch.Tensor) and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch (file vs model)", wrong_shape),
        ):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{label}: {', '.join(items[:5])}{more}")
        raise CheckpointError(
            f"checkpoint {path} does not fit this model ({'; '.join(parts)}); "
            "it was saved from a different architecture, precision or number of classes"
        )
    bad = nonfinite_entries(state_dict)
    if bad:  # a diverged model: its outputs (and an eval "loss nan") would mean nothing
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise CheckpointError(
            f"checkpoint {path} holds non-finite weights or statistics (NaN/inf in {', '.join(bad[:3])}{more}); "
            "the run had diverged when it was written: use an earlier checkpoint (e.g. best.pt) or train again "
            "with a lower optim.lr"
        )
    model.load_state_dict(state_dict)


# ----------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """The state of every random generator, as tensors and plain values (weights_only-safe)."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
