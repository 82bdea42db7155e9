"""What `reste train` shows while it runs: a line per epoch under the progress bar (test top-1
and loss, the epoch's mean o, estimating error e, gradient instability s), the same scalars
in TensorBoard, and the final summary and run folder even with --quiet.

Tiny runs on generated IDX files (tests/data_fixtures.py): no network, no real data set.
"""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import data_fixtures as fx  # noqa: E402
import reste  # noqa: E402
from reste import cli  # noqa: E402
from reste.train import trainer as T  # noqa: E402

# 64 training images, batch 32: 2 steps per epoch; 64 // 5 = 12 test images
TINY = [
    "data.name=fashion_mnist",
    "data.subset=64",
    "data.batch_size=32",
    "data.test_batch_size=64",
    "train.device=cpu",
    "train.threads=1",
    "model.kwargs={width: 0.25}",
    "train.epochs=2",
]


@pytest.fixture
def data_root(tmp_path):
    root = tmp_path / "data"
    fx.make_idx_dataset(root / "fashion_mnist", n_train=64, n_test=16)
    return root


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_line_per_epoch_with_test_accuracy_and_the_indicators(tmp_path, data_root, capsys):
    code = cli.main(["train", *TINY, f"data.root={data_root}", f"out.dir={tmp_path}", "out.name=run"])
    out = capsys.readouterr().out
    assert code == 0
    rows = rows_of(tmp_path / "run")
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2 == len(rows)
    for line, row in zip(lines, rows):
        assert line.startswith(f"epoch {row['epoch']}/2 | train loss {row['train_loss']:.4f}")
        assert f"test loss {row['test_loss']:.4f} top-1 {row['test_top1']:5.2f}%" in line
        assert f"o {row['o_mean']:.3f}" in line
        assert f" e {row['est_error']:.4g} " in line and f"e@o_end {row['est_error_end']:.4g}" in line
        assert f" s {row['grad_instability']:.3g} |" in line
    # the epoch's mean o, from the schedule the run used (per step, cosine to 3 over 4 steps);
    # the row's o is the last step's
    schedule = reste.o_schedule("cosine", o_end=3.0)
    assert rows[0]["o_mean"] == pytest.approx((schedule(0 / 4) + schedule(1 / 4)) / 2)
    assert rows[1]["o_mean"] == pytest.approx((schedule(2 / 4) + schedule(3 / 4)) / 2)
    assert rows[1]["o"] == pytest.approx(schedule(3 / 4))
    assert "run directory: " + str(tmp_path / "run") in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["train_images"], summary["test_images"], summary["steps_per_epoch"]) == (64, 12, 2)


def test_quiet_prints_only_the_final_summary_and_the_run_folder(tmp_path, data_root, capsys):
    code = cli.main(
        [
            "train",
            *TINY,
            "estimator.per=epoch",
            f"data.root={data_root}",
            f"out.dir={tmp_path}",
            "out.name=q",
            "--quiet",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    assert not re.search(r"^epoch ", captured.out, re.M) and "%|" not in captured.err  # no epoch lines, no bar
    summary = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert f"final test top-1 {summary['final_top1']:.2f}%" in captured.out
    assert f"run directory: {tmp_path / 'q'}" in captured.out
    rows = rows_of(tmp_path / "q")
    schedule = reste.o_schedule("cosine", o_end=3.0)
    # per epoch: o = schedule(epoch / epochs), constant within the epoch
    assert [r["o_mean"] for r in rows] == [r["o"] for r in rows] == [schedule(0.0), schedule(0.5)]
    # the library stays silent unless asked
    T.train(
        overrides=[*TINY, f"data.root={data_root}", f"out.dir={tmp_path}", "out.name=lib", "train.epochs=1"],
        progress=False,
    )
    assert capsys.readouterr().out == ""


def test_tensorboard_gets_the_same_scalars_as_the_epoch_line(tmp_path, data_root, monkeypatch):
    calls = []

    class RecordingWriter:  # the real SummaryWriter needs the optional tensorboard package
        def __init__(self, log_dir, purge_step=None):
            pass

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            pass

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = RecordingWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    T.train(overrides=[*TINY, f"data.root={data_root}", f"out.dir={tmp_path}", "out.name=tb"], progress=False)
    rows = rows_of(tmp_path / "tb")
    scalars = {(tag, step): value for tag, value, step in calls}
    for row in rows:
        for key in ("test_top1", "test_loss", "o_mean", "est_error", "est_error_end", "grad_instability"):
            assert scalars[(key, row["epoch"])] == pytest.approx(row[key]), key


def test_epoch_line_leaves_out_what_a_run_does_not_measure():
    row = {
        "epoch": 3,
        "train_loss": 0.5,
        "train_top1": 80.0,
        "test_loss": 0.6,
        "test_top1": 75.5,
        "o_mean": None,
        "est_error": None,
        "est_error_end": None,
        "grad_instability": None,
        "epoch_time": 1.25,
    }
    assert (
        T.epoch_line(row, 10)
        == "epoch  3/10 | train loss 0.5000 top-1 80.00% | test loss 0.6000 top-1 75.50% | time 1.2 s"
    )


def test_a_compiled_run_shows_its_first_step_time_labelled(tmp_path, data_root, capsys, monkeypatch):
    """train.compile=true: the first step's time (compilation included) is shown once, above the bar;
    torch.compile is replaced by a wrapper whose first call takes 0.3 s, as a compilation would."""
    import time

    from reste.train import setup

    modes = []

    def fake_compile(model, mode=None):
        modes.append(mode)
        calls = []

        def forward(x):
            if not calls:
                time.sleep(0.3)
            calls.append(1)
            return model(x)

        return forward

    monkeypatch.setattr(setup.torch, "compile", fake_compile)
    base = [*TINY, f"data.root={data_root}", f"out.dir={tmp_path}"]
    assert cli.main(["train", *base, "train.compile=true", "out.name=compiled"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("first step ")]
    assert len(lines) == 1 and modes == ["default"]
    seconds = float(re.match(r"first step (\d+\.\d) s \(torch.compile, mode default: compilation", lines[0]).group(1))
    assert seconds >= 0.3
    # auto on the CPU: eager, no compilation, no line
    assert cli.main(["train", *base, "out.name=auto"]) == 0
    assert "first step" not in capsys.readouterr().out and modes == ["default"]


def test_a_second_ctrl_c_names_the_checkpoint_to_resume_from(tmp_path, data_root, capsys):
    """A second Ctrl-C aborts without a new checkpoint; when the run has one, the resume command is
    printed (was: nothing but `interrupted by SIGINT`). Real SIGINTs, delivered after a step."""
    import signal

    def double_ctrl_c_at(epoch_wanted, step_wanted):
        def on_step(epoch, step):
            if (epoch, step) == (epoch_wanted, step_wanted):
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGINT)

        return on_step

    base = [*TINY, f"data.root={data_root}", f"out.dir={tmp_path}"]
    # epoch 2, step 1: the epoch-1 checkpoint and a step checkpoint exist
    with pytest.raises(KeyboardInterrupt):
        T.train(
            overrides=[*base, "out.name=ck", "train.checkpoint_every_steps=1"],
            progress=False,
            on_step=double_ctrl_c_at(1, 1),
        )
    err = capsys.readouterr().err
    last = tmp_path / "ck" / "checkpoints" / "last.pt"
    assert last.is_file()
    assert f"aborted without a new checkpoint; the last one written, {last}, continues the run with:" in err
    assert f"\n  reste train --resume {tmp_path / 'ck'}\n" in err
    assert T.train(resume=tmp_path / "ck", progress=False)["epochs"] == 2  # and it does
    # epoch 1, step 1 without step checkpoints: nothing to resume from, nothing promised
    with pytest.raises(KeyboardInterrupt):
        T.train(overrides=[*base, "out.name=none"], progress=False, on_step=double_ctrl_c_at(0, 1))
    err = capsys.readouterr().err
    assert "SIGINT received" in err and "--resume" not in err


def test_the_bar_starts_each_epoch_without_old_numbers_and_shows_the_lr_each_step_used(
    tmp_path, data_root, capsys, monkeypatch
):
    """Were: the previous epoch's loss/acc/o on show for the first steps of the next epoch, and the
    final bar's lr=0.00e+00 (the scheduler's next value) where metrics record the last step's lr."""
    from reste.train.progress import ProgressBar

    seen = []  # (postfix before the update, lr given, postfix after)

    class Recording(ProgressBar):
        def update(self, sums, epoch_start, step, o, lr):
            before = self.bar.postfix
            super().update(sums, epoch_start, step, o, lr)
            seen.append((before, lr, self.bar.postfix))

    monkeypatch.setattr(T, "ProgressBar", Recording)
    T.train(overrides=[*TINY, f"data.root={data_root}", f"out.dir={tmp_path}", "out.name=bar"], progress=True)
    rows = rows_of(tmp_path / "bar")
    assert len(seen) == 4  # 2 epochs of 2 steps; the numbers refresh at each epoch's last step
    assert "loss=" in seen[1][2] and seen[2][0] == ""  # epoch 2's first step: epoch 1's numbers are gone
    for epoch, row in enumerate(rows):
        _, lr, postfix = seen[2 * epoch + 1]
        assert lr == row["lr"] and f"lr={row['lr']:.2e}" in postfix
    assert rows[-1]["lr"] > 0 and "lr=0.00e+00" not in seen[-1][2]


def test_a_warning_during_training_gets_its_own_line_above_the_bar(tmp_path, data_root):
    """Was: the divergence warning printed onto the bar's line (`...2.95step/s]UserWarning: epoch 1: ...`).
    A real process with a real stderr: pytest records warnings in-process, so the terminal is not seen there."""
    import os
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"), OMP_NUM_THREADS="1")
    args = [*TINY, f"data.root={data_root}", f"out.dir={tmp_path}", "out.name=div", "optim.lr=1e6"]
    proc = subprocess.run(
        [sys.executable, "-m", "reste", "train", *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # text mode reads the bar's carriage returns as line ends: each redraw is a line of its own
    lines = proc.stderr.splitlines()
    at = [i for i, line in enumerate(lines) if "UserWarning: epoch 1: train loss" in line]
    assert len(at) == 1, proc.stderr[-3000:]
    assert lines[at[0]].startswith("UserWarning: epoch 1: train loss") and "lower optim.lr" in lines[at[0]]
    assert any(re.match(r"epoch [12]/2: .*step", line) for line in lines[at[0] + 1 :])  # the bar, drawn below it
