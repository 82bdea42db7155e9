"""Runs survive faults and bad input, and load nothing unsafe.

Every test injects a real fault (a signal, a killed or hung rank, a NaN, a full disk)
or feeds real bad input (corrupt, truncated, malicious or mismatched files, bad
configurations) and checks what the user gets: an exit code, one clear error line that
names the file or key, intact earlier results, and a run that can be resumed.
docs/reliability.md lists every case with the test that shows it.

Runs use a tiny binary ResNet-20 (``model.kwargs={width: 0.25}``: 4/8/16 channels) on a
Fashion-MNIST subset with one thread, so a run takes a few seconds. The default suite
stays under 90 s; ``pytest -m slow tests/test_reliability.py`` adds the longer drills
(many kills, a hung rank, resuming one process's run with two, exact distributed resume).
"""

from __future__ import annotations

import errno
import hashlib
import http.server
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import data_fixtures as fx
from reste import cli
from reste.train import checkpoint as ckpt
from reste.train import trainer as T
from reste.train.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").is_file(), reason="needs the Debian dataset-fashion-mnist package"
)

#: a tiny real run: 512 images, batch 64 -> 8 steps per epoch (also with 2 ranks x 32)
TINY = [
    "data.subset=512",
    "data.batch_size=64",
    "data.test_batch_size=256",
    "train.device=cpu",
    "model.kwargs={width: 0.25}",
    "optim.lr=0.02",
]
STEPS_PER_EPOCH = 8
#: the runs whose accuracy is checked use twice the data (16 steps per epoch): 512 images
#: leave too much to chance (measured 16.7% and 38.2% final top-1 for two equally valid runs)
DIST = [*TINY, "data.subset=1024"]
DIST_STEPS = 16


def env(**extra) -> dict:
    """The environment of a child process: this checkout's sources, one thread, no fault unless asked."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RESTE_FAULT")}
    base.update(PYTHONPATH=str(REPO / "src"), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    base.update({k: str(v) for k, v in extra.items()})
    return base


def reste_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "reste", *args]


def torchrun_cmd(nproc: int, *args) -> list[str]:
    # --standalone: a local rendezvous on a free port, so parallel test runs do not collide
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "reste",
        *args,
    ]


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """``reste ARGV`` in-process: (exit code, stdout, stderr)."""
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def error_lines(stderr: str) -> list[str]:
    """The lines a user reads as the error: without progress bars (tqdm redraws them with \\r),
    Python warnings and the fault hook's announcement."""
    return [
        line
        for line in re.split(r"[\r\n]", stderr)
        if line.strip()
        and not re.search(r"\d+%\|", line)
        and "Warning" not in line
        and "warnings.warn" not in line
        and not line.startswith("RESTE_FAULT:")
    ]


def assert_one_clear_error(stderr: str, *fragments: str) -> None:
    lines = error_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("error"), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def checkpoint_path(run: Path, which: str = "last") -> Path:
    return run / "checkpoints" / f"{which}.pt"


def progress(run: Path) -> int:
    """Training steps a run's last checkpoint has done (loading it also proves it is intact)."""
    state = ckpt.load_checkpoint(checkpoint_path(run), required=ckpt.REQUIRED_KEYS)
    return state["epoch"] * STEPS_PER_EPOCH + state["step_in_epoch"]


def temp_files(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob(".*.tmp"))


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` but the lock file (whose content is the holder's pid)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        if isinstance(a[key], dict):
            assert_same_tensors(a[key], b[key], f"{what}.{key}")
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{what}.{key} differs"


def wait_until(condition, proc: subprocess.Popen, timeout: float = 180.0, poll: float = 0.002) -> bool:
    """Poll ``condition`` until it holds (True) or ``proc`` exits (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    proc.kill()
    raise AssertionError(f"timed out after {timeout} s waiting for the run")


def inode(path: Path):
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


class Evil:
    """A pickle payload that runs a shell command when unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 1-epoch tiny run (in-process) that the bad-file tests copy and damage."""
    tmp = tmp_path_factory.mktemp("finished")
    summary = T.train(
        overrides=[
            *TINY,
            "data.subset=256",
            "train.epochs=1",
            "train.threads=1",
            "analysis.indicators=false",
            f"out.dir={tmp}",
            "out.name=run",
        ],
        progress=False,
    )
    return Path(summary["run_dir"])


@pytest.fixture
def run_copy(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


# ============================================================================ kills and signals
def kill_resume_drill(tmp_path: Path, kills: int, seed: int, epochs: int) -> dict:
    """Train in a subprocess and stop it again and again, resuming each time, until it finishes.

    Stop 1 is a SIGTERM (graceful: checkpoint, resume command, exit 143). Then SIGKILLs:
    odd ones at a seeded random moment after the next checkpoint lands, even ones the
    instant a checkpoint's temporary file appears (so inside the write). After every
    stop, checkpoints/last.pt must load and must not have gone backwards.
    """
    rng = random.Random(seed)
    run = tmp_path / "killed"
    args = [
        *TINY,
        f"train.epochs={epochs}",
        "train.threads=1",
        "train.checkpoint_every_steps=1",
        f"out.dir={tmp_path}",
        "out.name=killed",
        "--quiet",
    ]
    report = {"steps_at_stop": [], "mid_write_kills": 0}

    proc = subprocess.Popen(
        reste_cmd("train", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=tmp_path
    )
    assert wait_until(lambda: checkpoint_path(run).is_file(), proc), proc.communicate()[1]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert f"reste train --resume {run}" in err and "SIGTERM received" in err
    done = progress(run)
    report["steps_at_stop"].append(done)

    for k in range(kills):
        before = inode(checkpoint_path(run))
        stale = set(temp_files(run))  # left by an earlier kill; the resume deletes them
        proc = subprocess.Popen(
            reste_cmd("train", "--resume", str(run), "--quiet"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env(),
            cwd=tmp_path,
        )
        if k % 2 == 0:
            # wait for one new checkpoint, then kill at a random moment of the following steps
            alive = wait_until(lambda: inode(checkpoint_path(run)) != before, proc)
            time.sleep(rng.uniform(0.0, 0.4))
        else:
            # kill while a checkpoint is being written: the temporary file exists, the rename has not happened
            alive = wait_until(
                lambda: any(e.name.endswith(".tmp") and e.name not in stale for e in os.scandir(run / "checkpoints")),
                proc,
                poll=0.0,
            )
        assert alive, f"the run ended before kill {k + 1}; give it more steps"
        proc.kill()
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        if set(temp_files(run)) - stale:
            report["mid_write_kills"] += 1
        now = progress(run)  # raises CheckpointError if the kill had left a broken checkpoint
        assert now >= done
        done = now
        report["steps_at_stop"].append(now)

    finish = subprocess.run(
        reste_cmd("train", "--resume", str(run), "--quiet"),
        capture_output=True,
        text=True,
        env=env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert finish.returncode == 0, finish.stderr
    assert temp_files(run) == []  # the resume removed what the killed writers left
    return report


def straight_reference(tmp_path: Path, epochs: int) -> Path:
    summary = T.train(
        overrides=[*TINY, f"train.epochs={epochs}", "train.threads=1", f"out.dir={tmp_path}", "out.name=straight"],
        progress=False,
    )
    return Path(summary["run_dir"])


def assert_same_as_straight(run: Path, straight: Path) -> None:
    a = torch.load(checkpoint_path(run), weights_only=True)
    b = torch.load(checkpoint_path(straight), weights_only=True)
    assert_same_tensors(a["model"], b["model"], "model")
    assert_same_tensors(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer")
    rows_a = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    for key in (
        "epoch",
        "train_loss",
        "train_top1",
        "test_loss",
        "test_top1",
        "lr",
        "o",
        "est_error",
        "grad_instability",
    ):
        assert [r[key] for r in rows_a] == [r[key] for r in rows_b], key
    from reste.analysis.indicators import IndicatorTracker

    if hasattr(IndicatorTracker, "state_dict"):
        assert [r["flip_ratio"] for r in rows_a] == [r["flip_ratio"] for r in rows_b]
    else:
        # the tracker cannot checkpoint the signs flip_ratio compares against, so the first
        # measurement after a resume is None; every other one must match
        assert all(a["flip_ratio"] in (None, b["flip_ratio"]) for a, b in zip(rows_a, rows_b))


@needs_fashion
def test_sigterm_then_sigkills_at_random_moments_and_mid_write_leave_a_loadable_checkpoint_and_resume_exactly(tmp_path):
    report = kill_resume_drill(tmp_path, kills=2, seed=0, epochs=2)
    print("kill drill:", report)
    assert report["mid_write_kills"] >= 1, report  # the second kill landed inside a checkpoint write
    assert_same_as_straight(tmp_path / "killed", straight_reference(tmp_path, epochs=2))


@pytest.mark.slow
@needs_fashion
def test_many_sigkills_at_random_moments(tmp_path):
    report = kill_resume_drill(tmp_path, kills=10, seed=1, epochs=4)
    print("kill drill:", report)
    assert report["mid_write_kills"] >= 3, report
    assert_same_as_straight(tmp_path / "killed", straight_reference(tmp_path, epochs=4))


@needs_fashion
def test_mid_epoch_checkpoints_every_n_steps(tmp_path, monkeypatch):
    saves = []

    def record(state, path):
        saves.append((Path(path).name, state["epoch"], state["step_in_epoch"], state["partial"]))
        return ckpt.save_checkpoint(state, path)

    monkeypatch.setattr(T, "save_checkpoint", record)
    T.train(
        overrides=[
            *TINY,
            "train.epochs=2",
            "train.threads=1",
            "train.checkpoint_every_steps=3",
            "analysis.indicators=false",
            f"out.dir={tmp_path}",
            "out.name=n",
        ],
        progress=False,
    )
    last = [(epoch, step) for name, epoch, step, _ in saves if name == "last.pt"]
    # every 3rd global step (3, 6 | 9, 12, 15 = steps 1, 4, 7 of epoch 2), plus every epoch's end
    assert last == [(0, 3), (0, 6), (1, 0), (1, 1), (1, 4), (1, 7), (2, 0)]
    partial = next(p for name, epoch, step, p in saves if (epoch, step) == (0, 6))
    assert partial["sums"][3] == 6 * 64  # the epoch's running sums so far: 6 batches of 64 images


# ============================================================================ non-finite values
def test_binary_sign_hides_a_nan_weight_so_gradients_are_checked_too():
    import reste

    x = torch.tensor([float("nan"), -2.0, 3.0])
    assert torch.sign(x).tolist()[1:] == [-1.0, 1.0] and torch.sign(x)[0].item() == 0.0
    assert reste.estimator("reste")(x).tolist() == [1.0, -1.0, 1.0]  # the forward stays finite


@needs_fashion
def test_nan_gradient_with_a_finite_loss_stops_the_run_or_is_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RESTE_FAULT", "nan_grad")
    monkeypatch.setenv("RESTE_FAULT_STEP", str(STEPS_PER_EPOCH + 2))  # epoch 2, step 2
    base = [
        "train",
        *TINY,
        "train.epochs=2",
        "train.threads=1",
        "analysis.indicators=false",
        f"out.dir={tmp_path}",
        "--quiet",
    ]
    code, _, err = run_cli([*base, "out.name=stop"], capsys)
    assert code == 1
    last = checkpoint_path(tmp_path / "stop")
    assert_one_clear_error(
        err, "non-finite gradient", "epoch 2, step 2", "lr ", "o ", f"the last good checkpoint is {last}"
    )
    assert re.search(r"\(loss \d", err)  # the loss itself was finite
    assert ckpt.load_checkpoint(last)["epoch"] == 1  # the last good checkpoint is kept

    code, _, _ = run_cli([*base, "out.name=skip", "train.nonfinite=skip"], capsys)
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_batches"] for r in rows] == [0, 1]
    weights = ckpt.load_checkpoint(checkpoint_path(tmp_path / "skip"))["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())  # the NaN never reached them


def test_nonfinite_config_values_are_refused():
    for override, message in [
        ("optim.lr=.nan", "optim.lr must be a finite number > 0, got nan"),
        ("optim.lr=.inf", "optim.lr must be a finite number > 0, got inf"),  # was: "must be > 0, got inf"
        ("estimator.o_end=.inf", "estimator.o_end must be a finite number >= 1"),
        ("optim.weight_decay=.inf", "optim.weight_decay must be a finite number"),
        ("train.grad_clip=.nan", "train.grad_clip must be a finite number"),
        ("estimator.p=.inf", "estimator.p must be a finite number"),
        ("train.checkpoint_every_steps=-1", "train.checkpoint_every_steps must be >= 0"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, [override])


# ============================================================================ configuration and run directories
def test_batch_larger_than_the_whole_data_set_is_refused_before_any_work(tmp_path, capsys):
    code, _, err = run_cli(["train", "data.batch_size=60001", f"out.dir={tmp_path}", "--quiet"], capsys)
    assert code == 2
    assert_one_clear_error(err, "data.batch_size (60001) is larger than the fashion_mnist training set (60000 images)")
    assert list(tmp_path.iterdir()) == []  # the run directory it had claimed is gone again


def test_yaml_python_tags_are_refused_and_never_run(tmp_path, capsys):
    marker = tmp_path / "pwned"
    payload = f"!!python/object/apply:os.system ['touch {marker}']"
    config = tmp_path / "evil.yaml"
    config.write_text(f"optim:\n  lr: {payload}\n")
    code, _, err = run_cli(["train", str(config), "--print-config"], capsys)
    assert code == 2 and f"config file {config} is not valid YAML" in err
    code, _, err = run_cli(["train", f"name={payload}", "--print-config"], capsys)
    assert (
        code == 2
        and "cannot parse the value of name" in err
        and "tags that build Python objects are not allowed" in err
    )
    assert not marker.exists()


def test_tampered_config_of_a_run_is_refused_on_resume(run_copy, capsys):
    marker = run_copy / "pwned"
    (run_copy / "config.yaml").write_text(f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    before = digests(run_copy)
    code, _, err = run_cli(["train", "--resume", str(run_copy), "--quiet"], capsys)
    assert code == 2
    assert_one_clear_error(
        err,
        f"config file {run_copy / 'config.yaml'} is not valid YAML: line 1, column 7",
        "tags that build Python objects are not allowed",
    )
    assert not marker.exists() and digests(run_copy) == before


def test_a_run_directory_in_use_is_neither_resumed_nor_overwritten(run_copy, capsys):
    holder = T.RunDirLock(run_copy)
    holder.acquire()  # another process training into it (a lock taken through another open file acts the same)
    before = digests(run_copy)
    try:
        code, _, err = run_cli(["train", "--resume", str(run_copy), "--quiet"], capsys)
        assert code == 2
        assert_one_clear_error(err, f"run directory {run_copy} is in use by another process (pid {os.getpid()})")
        code, _, err = run_cli(
            ["train", *TINY, f"out.dir={run_copy.parent}", "out.name=run", "--force", "--quiet"], capsys
        )
        assert code == 2 and "is in use by another process" in err
        assert digests(run_copy) == before
    finally:
        holder.release()


@needs_fashion
def test_a_killed_run_does_not_keep_its_directory_locked(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    # a process that took the lock and died without releasing it
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from reste.train.trainer import RunDirLock; import os; "
            f"RunDirLock({str(run)!r}).acquire(); os.kill(os.getpid(), 9)",
        ],
        env=env(),
        timeout=60,
    )
    assert child.returncode == -signal.SIGKILL
    summary = T.train(resume=run, train={"epochs": 2}, progress=False)  # the kernel released the lock
    assert summary["epochs"] == 2


# ============================================================================ bad checkpoint files
def damage(path: Path, how: str, finished_run: Path) -> None:
    good = checkpoint_path(finished_run).read_bytes()
    if how == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif how == "not a dict":
        torch.save([torch.ones(2)], path)
    elif how == "plain state_dict":
        torch.save(torch.load(checkpoint_path(finished_run), weights_only=True)["model"], path)
    elif how == "another model":
        state = torch.load(checkpoint_path(finished_run), weights_only=True)
        cfg = load_config(state["config"], ["model.kwargs={width: 0.5}"], check=False)
        import reste.data

        state["model"] = T.build_model(cfg, reste.data.info("fashion_mnist")).state_dict()
        torch.save(state, path)
    elif how in LEGACY_READER_CRASHES:  # bytes that torch's legacy (non-zip) reader fails on with odd errors
        path.write_bytes(LEGACY_READER_CRASHES[how])


#: were tracebacks (IndexError: pop from empty list, struct.error: unpack requires a buffer of 8 bytes)
LEGACY_READER_CRASHES = {"starts with t": b"tood: yes\n", "starts with (": b"(tt", "starts with G": b"G" + bytes(7)}

BAD_CHECKPOINTS = [
    ("truncated", "is truncated or corrupt"),
    ("empty", "is truncated or corrupt"),
    ("garbage", "is corrupt or not a PyTorch checkpoint"),
    ("not a dict", "holds a list, not a dict"),
    ("plain state_dict", "lacks"),
    ("another model", "does not fit this model"),
    ("starts with t", "is truncated or corrupt (IndexError: pop from empty list)"),
    ("starts with (", "is truncated or corrupt (IndexError: pop from empty list)"),
    ("starts with G", "is truncated or corrupt (error: unpack requires a buffer"),
]


@needs_fashion
@pytest.mark.parametrize("how, message", BAD_CHECKPOINTS)
def test_bad_checkpoint_through_eval_export_and_resume(how, message, run_copy, finished_run, capsys):
    for which in ("last", "best"):
        damage(checkpoint_path(run_copy, which), how, finished_run)
    before = digests(run_copy)
    last, best = checkpoint_path(run_copy), checkpoint_path(run_copy, "best")

    code, out, err = run_cli(["eval", str(last), "--device", "cpu"], capsys)
    assert code == 1 and out == ""
    assert_one_clear_error(err, str(last), message)

    if "corrupt" in message:  # the fix names the run's other checkpoint, not the damaged one
        assert "use the run's other checkpoint (checkpoints/best.pt: --which best" in err

    code, _, err = run_cli(["export", str(run_copy)], capsys)  # uses best.pt
    assert code == 1  # the same exit code as eval and resume for the same bad file
    assert_one_clear_error(err, str(best), message)
    if "corrupt" in message:
        assert "(checkpoints/last.pt: --which last for eval, --checkpoint last for export)" in err

    code, _, err = run_cli(["train", "--resume", str(run_copy), "train.epochs=2", "--quiet"], capsys)
    assert code == 1
    assert_one_clear_error(err, str(last))
    assert digests(run_copy) == before  # nothing was overwritten, no export was written


def test_a_file_with_any_first_byte_is_a_clear_checkpoint_error(tmp_path, capsys):
    """Every possible first byte, alone and followed by a few bytes: torch's readers fail on them with
    many exception types (IndexError, struct.error, AssertionError, ...); each is one error line, exit 1,
    through the library, `reste eval` and `model.init_from`."""
    rng = random.Random(0)
    for first in range(256):
        for tail in (b"", b"ood: yes\n", rng.randbytes(24)):
            path = tmp_path / f"{first:02x}-{len(tail)}.pt"
            path.write_bytes(bytes([first]) + tail)
            with pytest.raises(ckpt.CheckpointError, match=re.escape(str(path))):
                ckpt.load_checkpoint(path)
            if tail == b"ood: yes\n":
                code, out, err = run_cli(["eval", str(path), "--device", "cpu"], capsys)
                assert code == 1 and out == "", (first, err)
                assert_one_clear_error(err, str(path))
    data = tmp_path / "data"
    fx.make_idx_dataset(data / "fashion_mnist", n_train=64, n_test=16)
    bad = tmp_path / "74-9.pt"  # b"tood: yes\n"
    code, _, err = run_cli(
        ["train", "data.subset=64", "data.batch_size=32", "train.epochs=1", "train.threads=1",
         f"data.root={data}", f"model.init_from={bad}", f"out.dir={tmp_path / 'runs'}", "--quiet"],
        capsys,
    )  # fmt: skip
    assert code == 1
    assert_one_clear_error(err, f"checkpoint {bad} is truncated or corrupt")
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


# ============================================================================ malicious files
@needs_fashion
def test_malicious_checkpoint_is_refused_by_eval_export_and_resume(run_copy, capsys):
    marker = run_copy.parent / "pwned"
    state = torch.load(checkpoint_path(run_copy), weights_only=True)
    state["model"] = Evil(marker)
    for which in ("last", "best"):
        torch.save(state, checkpoint_path(run_copy, which))
    last, best = checkpoint_path(run_copy), checkpoint_path(run_copy, "best")
    for argv, expected_code, path in (
        [["eval", str(run_copy), "--which", "best"], 1, best],
        [["export", str(run_copy)], 1, best],
        [["train", "--resume", str(run_copy), "--quiet"], 1, last],
    ):
        code, _, err = run_cli(argv, capsys)
        assert code == expected_code, argv
        assert_one_clear_error(err, f"refusing to load {path}", "system")  # torch names the global it refused
    assert not marker.exists()


def test_malicious_cifar_batch_is_refused_through_train(tmp_path, capsys):
    marker = tmp_path / "pwned"
    folder = tmp_path / "data" / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    import pickle

    evil = pickle.dumps({b"data": Evil(marker), b"labels": [0]}, protocol=2)
    for member in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / member).write_bytes(evil)
    code, _, err = run_cli(
        [
            "train",
            "data.name=cifar10",
            f"data.root={tmp_path / 'data'}",
            "data.subset=64",
            "data.batch_size=64",
            f"out.dir={tmp_path / 'runs'}",
            "--quiet",
        ],
        capsys,
    )
    assert code == 1
    assert_one_clear_error(err, str(folder / "data_batch_1"), "forbidden global")
    assert not marker.exists()
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


UNSAFE = [
    (re.compile(r"torch\.load\((?![^)]*weights_only=True)"), "torch.load without weights_only=True"),
    (re.compile(r"\bpickle\.loads?\("), "pickle.load (use a restricted unpickler)"),
    (re.compile(r"\byaml\.(load|unsafe_load|full_load|load_all)\("), "yaml.load (use yaml.safe_load)"),
    (re.compile(r"\byaml\.(Unsafe|Full)?Loader\b"), "an unsafe YAML loader class (subclass yaml.SafeLoader)"),
    (re.compile(r"(?<![\w.])(?<!def )(eval|exec)\("), "eval/exec"),  # a method named eval is no call
    (re.compile(r"allow_pickle=True"), "np.load(allow_pickle=True)"),
]


#: the one exec allowed, and why: reste.deploy.capture compiles the function it generated from a traced
#: graph (its own templates, identifiers it checks, reprs of literals), as torch.fx's own code generation does;
#: no text from a file or the network reaches it
ALLOWED = {("src/reste/deploy/replay.py", "eval/exec", "exec(compile(source, ")}


def test_library_sources_use_only_safe_loaders():
    found = []
    for path in sorted((REPO / "src" / "reste").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for pattern, what in UNSAFE:
                rel = str(path.relative_to(REPO))
                if pattern.search(code) and not any(
                    rel == f and what == w and code.strip().startswith(start) for f, w, start in ALLOWED
                ):
                    found.append(f"{rel}:{number}: {what}: {line.strip()}")
    assert found == []
    # the check itself finds what it looks for
    assert UNSAFE[0][0].search("torch.load(path)") and not UNSAFE[0][0].search("torch.load(p, weights_only=True)")
    assert UNSAFE[4][0].search("x = eval(s)") and not UNSAFE[4][0].search("model.eval()")
    assert not UNSAFE[4][0].search("    def eval(self):")
    assert UNSAFE[3][0].search("yaml.load(s, Loader=yaml.FullLoader)") and UNSAFE[3][0].search("class L(yaml.Loader):")
    assert not UNSAFE[3][0].search("class L(yaml.SafeLoader):")


# ============================================================================ bad data files
@pytest.mark.parametrize("how, message", [("truncated", "truncated gzip"), ("garbage", "not a gzip file")])
def test_corrupt_data_file_through_train(tmp_path, capsys, how, message):
    fx.make_idx_dataset(tmp_path / "data" / "mnist", n_train=64, n_test=16)
    target = tmp_path / "data" / "mnist" / "train-images-idx3-ubyte.gz"
    raw = target.read_bytes()
    target.write_bytes(raw[: len(raw) // 2] if how == "truncated" else b"not gzip at all")
    before = digests(tmp_path / "data")
    code, _, err = run_cli(
        [
            "train",
            "data.name=mnist",
            f"data.root={tmp_path / 'data'}",
            "data.subset=64",
            "data.batch_size=32",
            f"out.dir={tmp_path / 'runs'}",
            "--quiet",
        ],
        capsys,
    )
    assert code == 1
    assert_one_clear_error(err, f"corrupt data file {target}", message)
    assert digests(tmp_path / "data") == before
    assert list((tmp_path / "runs").iterdir()) == []


@pytest.fixture
def http_folder(tmp_path):
    """Serve a folder on 127.0.0.1 (a download mirror); yields (folder, URL)."""
    served = tmp_path / "served"
    served.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_download_with_a_wrong_checksum_through_train(tmp_path, monkeypatch, capsys, http_folder):
    served, url = http_folder
    fx.make_idx_dataset(served, n_train=64, n_test=16)  # real IDX files, but not the official ones: md5 differs
    monkeypatch.setenv("RESTE_MIRROR", url)
    root = tmp_path / "data"
    code, _, err = run_cli(
        [
            "train",
            "data.name=mnist",
            f"data.root={root}",
            "data.download=true",
            "data.subset=64",
            "data.batch_size=32",
            f"out.dir={tmp_path / 'runs'}",
            "--quiet",
        ],
        capsys,
    )
    assert code == 1
    announced, _, rest = err.partition("\n")
    assert announced == f"mnist was not found; downloading the official files into {root / 'mnist'} (md5-checked) ..."
    assert_one_clear_error(rest, "md5 mismatch", "train-images-idx3-ubyte.gz")
    assert not (root / "mnist").exists()  # the bad download was not kept, nor the folder made for it
    assert list((tmp_path / "runs").iterdir()) == []


# ============================================================================ disk full
@needs_fashion
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, handle, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # epoch 1 wrote best.pt and last.pt; the next write finds the disk full
            handle.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    code, _, err = run_cli(
        [
            "train",
            *TINY,
            "data.subset=256",
            "train.epochs=2",
            "train.threads=1",
            "analysis.indicators=false",
            f"out.dir={tmp_path}",
            "out.name=full",
            "--quiet",
        ],
        capsys,
    )
    monkeypatch.undo()
    assert code == 1
    assert_one_clear_error(err, "No space left on device", "files written before it are intact")
    run = tmp_path / "full"
    assert ckpt.load_checkpoint(checkpoint_path(run))["epoch"] == 1 and temp_files(run) == []
    assert T.train(resume=run, progress=False)["epochs"] == 2  # and it resumes once there is space


# ============================================================================ distributed
def summary_of(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@needs_fashion
def test_a_dead_rank_stops_the_job_quickly_and_the_run_resumes_with_one_process(tmp_path):
    run = tmp_path / "ddp"
    args = ["train", *DIST, "train.epochs=2", f"out.dir={tmp_path}", "out.name=ddp", "--quiet"]
    start = time.monotonic()
    # rank 1 is SIGKILLed at the 4th step of epoch 2
    proc = subprocess.run(
        torchrun_cmd(2, *args),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env=env(RESTE_FAULT="kill", RESTE_FAULT_RANK=1, RESTE_FAULT_STEP=DIST_STEPS + 4),
    )
    seconds = time.monotonic() - start
    print(f"torchrun with a killed rank returned {proc.returncode} after {seconds:.1f} s")
    assert proc.returncode != 0 and seconds < 60
    assert f"RESTE_FAULT: injecting 'kill' at step {DIST_STEPS + 4}" in proc.stderr
    assert "error: a collective operation failed on rank 0" in proc.stderr and f"--resume {run}" in proc.stderr
    state = ckpt.load_checkpoint(checkpoint_path(run), required=ckpt.REQUIRED_KEYS)
    assert (state["epoch"], state["step_in_epoch"], state["world_size"]) == (1, 0, 2)

    done = subprocess.run(
        reste_cmd("train", "--resume", str(run), "train.threads=1", "--quiet"),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    summary = summary_of(run)
    assert (summary["epochs"], summary["complete"], summary["world_size"]) == (2, True, 1)
    # measured 31.9% on 2026-12-02 (204 test images; 34.3% for 2 epochs on 2 ranks, 52.5% on 1); chance is 10%
    assert summary["final_top1"] > 20.0, summary  # learnt (chance: 10%); such short runs vary by CPU


@needs_fashion
def test_mid_epoch_checkpoint_of_another_number_of_ranks(tmp_path, monkeypatch):
    """A mid-epoch checkpoint resumed by another number of ranks: a warning when the epochs
    have the same number of steps, a clear refusal when they do not."""
    monkeypatch.setenv("RESTE_FAULT", "raise")
    monkeypatch.setenv("RESTE_FAULT_STEP", "5")
    with pytest.raises(RuntimeError, match="injected failure at step 5"):
        T.train(
            overrides=[
                *TINY,
                "train.epochs=1",
                "train.threads=1",
                "train.checkpoint_every_steps=3",
                "analysis.indicators=false",
                f"out.dir={tmp_path}",
                "out.name=a",
            ],
            progress=False,
        )
    monkeypatch.delenv("RESTE_FAULT_STEP")
    run = tmp_path / "a"
    state = torch.load(checkpoint_path(run), weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["steps_per_epoch"]) == (0, 3, STEPS_PER_EPOCH)

    other = tmp_path / "b"
    shutil.copytree(run, other)
    ckpt.save_checkpoint({**state, "world_size": 2, "steps_per_epoch": 2 * STEPS_PER_EPOCH}, checkpoint_path(other))
    with pytest.raises(
        ckpt.CheckpointError, match="stopped at batch 3 of an epoch of 16 steps \\(2 ranks\\).*resume with 2 ranks"
    ):
        T.train(resume=other, progress=False)

    two = tmp_path / "c"  # the 1-rank checkpoint resumed by 2 ranks: the same 8 steps per epoch
    shutil.copytree(run, two)
    ckpt.save_checkpoint({**state, "world_size": 2}, checkpoint_path(run))
    with pytest.warns(UserWarning, match="written mid-epoch \\(batch 3\\) by 2 ranks and is resumed by 1"):
        summary = T.train(resume=run, progress=False)
    assert summary["complete"] and summary["epochs"] == 1

    proc = subprocess.run(
        torchrun_cmd(2, "train", "--resume", str(two), "--quiet"),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env=env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # once for the job (was: once per rank)
    assert proc.stderr.count("written mid-epoch (batch 3) by 1 ranks and is resumed by 2") == 1, proc.stderr[-3000:]


@needs_fashion
def test_epoch_boundary_checkpoint_with_another_number_of_steps_realigns_the_lr_schedule(run_copy):
    """E.g. written by 2 ranks whose epochs had 8 steps, resumed where an epoch has 4."""
    state = torch.load(checkpoint_path(run_copy), weights_only=True)
    assert (state["epoch"], state["steps_per_epoch"], state["lr_scheduler"]["last_epoch"]) == (1, 4, 4)
    state["steps_per_epoch"], state["lr_scheduler"]["last_epoch"] = 8, 8
    ckpt.save_checkpoint(state, checkpoint_path(run_copy))
    T.train(resume=run_copy, train={"epochs": 2}, progress=False)
    rows = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    # epoch 2 runs steps 4..7 of 8: its last lr is the cosine at step 7, not at step 11 (past the end: 0)
    assert rows[1]["lr"] == pytest.approx(0.02 * T.lr_factor(7, 8, 0, "cosine", 0.0)) and rows[1]["lr"] > 0


@pytest.mark.slow
@needs_fashion
def test_a_one_process_run_resumes_with_two(tmp_path):
    run = tmp_path / "one"
    args = ["train", *DIST, "train.epochs=2", f"out.dir={tmp_path}", "out.name=one", "--quiet"]
    proc = subprocess.run(
        reste_cmd(*args, "train.threads=1"),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env=env(RESTE_FAULT="kill", RESTE_FAULT_STEP=DIST_STEPS + 4),
    )
    assert proc.returncode == -signal.SIGKILL
    assert ckpt.load_checkpoint(checkpoint_path(run))["world_size"] == 1
    done = subprocess.run(
        torchrun_cmd(2, "train", "--resume", str(run), "--quiet"),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = summary_of(run)
    assert (summary["epochs"], summary["complete"], summary["world_size"]) == (2, True, 2)
    # measured 47.5% on 2026-12-02 (52.5% for 2 epochs on 1 process, 34.3% on 2 ranks); chance is 10%
    assert summary["final_top1"] > 20.0, summary  # learnt (chance: 10%); such short runs vary by CPU


@pytest.mark.slow
@needs_fashion
def test_a_hung_rank_fails_the_job_after_the_collective_timeout(tmp_path):
    args = [
        "train",
        *TINY,
        "train.epochs=2",
        "train.dist_timeout_s=10",
        f"out.dir={tmp_path}",
        "out.name=hung",
        "--quiet",
    ]
    start = time.monotonic()
    proc = subprocess.run(
        torchrun_cmd(2, *args),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env=env(RESTE_FAULT="hang", RESTE_FAULT_RANK=1, RESTE_FAULT_STEP=STEPS_PER_EPOCH + 2),
    )
    seconds = time.monotonic() - start
    print(f"torchrun with a hung rank returned {proc.returncode} after {seconds:.1f} s")
    assert proc.returncode != 0
    # rank 0 gives up after dist_timeout_s; torchrun then SIGTERMs the hung rank, which ignores it,
    # and SIGKILLs it after its 30 s grace period
    assert seconds < 10 + 30 + 60
    assert "error: a collective operation failed on rank 0" in proc.stderr and "train.dist_timeout_s=10" in proc.stderr
    assert ckpt.load_checkpoint(checkpoint_path(tmp_path / "hung"))["epoch"] == 1


@pytest.mark.slow
@needs_fashion
def test_a_nan_on_one_rank_stops_every_rank(tmp_path):
    args = ["train", *TINY, "train.epochs=1", f"out.dir={tmp_path}", "out.name=nan", "--quiet"]
    start = time.monotonic()
    proc = subprocess.run(
        torchrun_cmd(2, *args),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env=env(RESTE_FAULT="nan_loss", RESTE_FAULT_RANK=1, RESTE_FAULT_STEP=3),
    )
    assert proc.returncode != 0 and time.monotonic() - start < 60
    assert "error: non-finite loss on at least one rank" in proc.stderr and "epoch 1, step 3 " in proc.stderr
    assert "error [rank 1]: non-finite loss on at least one rank" in proc.stderr  # rank 1 stopped at the same step
    assert "collective operation failed" not in proc.stderr  # a clean, agreed stop: nobody was left waiting


@pytest.mark.slow
@needs_fashion
def test_distributed_stop_and_resume_mid_epoch_is_exact(tmp_path):
    """Two ranks, killed mid-epoch and resumed with two ranks, end like an uninterrupted two-rank run."""
    common = ["train", *TINY, "train.epochs=2", "train.checkpoint_every_steps=3", f"out.dir={tmp_path}", "--quiet"]
    straight = subprocess.run(
        torchrun_cmd(2, *common, "out.name=straight"),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env(),
        timeout=300,
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = subprocess.run(
        torchrun_cmd(2, *common, "out.name=killed"),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env=env(RESTE_FAULT="kill", RESTE_FAULT_RANK=0, RESTE_FAULT_STEP=STEPS_PER_EPOCH + 5),
    )
    assert killed.returncode != 0
    run = tmp_path / "killed"
    state = ckpt.load_checkpoint(checkpoint_path(run))
    assert (state["epoch"], state["step_in_epoch"]) == (1, 4)  # the save at global step 12: 4 steps into epoch 2
    resumed = subprocess.run(
        torchrun_cmd(2, "train", "--resume", str(run), "--quiet"),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env(),
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_as_straight(run, tmp_path / "straight")
