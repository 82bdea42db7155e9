"""The trainer end to end on real Fashion-MNIST files (small subsets, 1 thread).

Covers: a short real run that learns; the run directory's files and their contents;
``reste eval``; checkpoints (weights_only, atomic, refusing malicious / truncated /
mismatched files); exact resume (at an epoch boundary and mid-epoch after a real
SIGINT, in-process and through the console command); non-finite losses; run
directories never overwritten; the lr schedule; weight-decay groups.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from reste import cli
from reste.train import checkpoint as ckpt
from reste.train import trainer as T
from reste.train.checkpoint import CheckpointError
from reste.train.config import ConfigError, config_to_dict, load_config

REPO = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")

pytestmark = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").is_file(), reason="needs the Debian dataset-fashion-mnist package"
)

METRIC_KEYS = {
    "epoch",
    "train_loss",
    "train_top1",
    "train_top5",
    "test_loss",
    "test_top1",
    "test_top5",
    "lr",
    "o",
    "epoch_time",
    "images_per_s",
    "est_error",
    "est_error_end",
    "grad_instability",
    "flip_ratio",
    "skipped_batches",
}
SUMMARY_KEYS = {
    "final_top1",
    "best_top1",
    "best_epoch",
    "final_top5",
    "best_top5",
    "epochs",
    "seconds",
    "model",
    "dataset",
    "precision",
    "estimator",
    "o_end",
    "seed",
}


def tiny(tmp_path, name, **sections):
    """Overrides for a tiny run: 256 training images, batch 64 (4 steps per epoch), 2 epochs, 1 thread."""
    base = {
        "data": {"subset": 256, "batch_size": 64, "test_batch_size": 256},
        "train": {"epochs": 2, "threads": 1, "device": "cpu"},
        "out": {"dir": str(tmp_path), "name": name},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            base.setdefault(section, {}).update(values)
        else:
            base[section] = values
    return base


def weights(run_dir, which="last"):
    return torch.load(Path(run_dir) / "checkpoints" / f"{which}.pt", weights_only=True)


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def interrupt_after(steps: int, signum=signal.SIGINT):
    """An ``on_step`` hook that delivers a real ``signum`` to this process after ``steps`` training
    steps (counted across epochs)."""
    seen = {"n": 0}

    def on_step(epoch, step):
        seen["n"] += 1
        if seen["n"] == steps:
            signal.raise_signal(signum)

    return on_step


def test_the_summary_names_the_estimators_a_model_uses_and_an_o_schedule_only_where_a_reste_has_one(tmp_path, capsys):
    # a DoReFa ViT (1W/32A: no ReSTE anywhere) said estimator reste, o_end 3, o_schedule cosine
    vit = {"name": "vit_tiny", "precision": "1w32a", "kwargs": {"weight_estimator": "dorefa", "dim": 24, "depth": 1,
           "heads": 2, "mlp_dim": 32, "patch_size": 7}}  # fmt: skip
    for model, expected in (
        (vit, ("dorefa", None, None)),
        ({"precision": "fp"}, (None, None, None)),
        ({"estimator": "ste"}, ("ste", None, None)),
        ({"precision": "1w32a"}, ("reste", 3.0, "cosine")),
    ):
        summary = T.train(progress=False, **tiny(tmp_path, str(len(list(tmp_path.iterdir()))), model=model,
                                                 train={"epochs": 1}))  # fmt: skip
        assert (summary["estimator"], summary["o_end"], summary["o_schedule"]) == expected, model
        if model.get("precision") == "fp":  # the final summary's first line: no "None" for the estimator
            from reste.train.progress import print_summary

            print_summary(summary)
            assert "\nresnet20_bireal fp on fashion_mnist: 1 epoch in " in capsys.readouterr().out


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The reference tiny run, 2 epochs without interruption (shared by the resume and checkpoint tests)."""
    tmp = tmp_path_factory.mktemp("straight")
    summary = T.train(progress=False, **tiny(tmp, "straight"))
    return Path(summary["run_dir"]), summary


# ----------------------------------------------------------------------------- a real run
def test_short_run_learns_and_writes_the_run_directory(tmp_path, capsys):
    start = time.perf_counter()
    summary = T.train(
        progress=True,
        data={"subset": 2000, "batch_size": 64, "test_batch_size": 400},
        train={"epochs": 2, "threads": 1, "device": "cpu"},
        analysis={"histograms_at": [1]},
        out={"dir": str(tmp_path), "name": "learn"},
    )
    seconds = time.perf_counter() - start
    run = tmp_path / "learn"
    out = capsys.readouterr()
    # measured 59.75% final test top-1 (400 test images) on the 2-core dev machine; chance is 10%
    assert summary["final_top1"] > 40.0, summary
    assert "final test top-1" in out.out and str(run) in out.out
    print(f"short run: final top-1 {summary['final_top1']:.2f}%, best {summary['best_top1']:.2f}%, {seconds:.1f} s")

    # metrics: one row per epoch in both files, with the contract's keys
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert METRIC_KEYS <= set(rows[0])
    with open(run / "metrics.csv", newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in csv_rows] == [1, 2]
    assert float(csv_rows[1]["test_top1"]) == pytest.approx(rows[1]["test_top1"])
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    assert rows[0]["o"] < rows[1]["o"] <= 3.0  # per-step cosine o schedule rising towards o_end
    assert rows[0]["est_error"] is not None and rows[0]["grad_instability"] > 0
    assert rows[1]["flip_ratio"] is not None  # needs a previous measurement: from epoch 2 on

    # summary consistent with the metrics
    on_disk = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(on_disk)
    assert on_disk["data_source"] == str(FASHION)  # the folder actually read (no data.root: the system copy)
    assert on_disk["estimator_kernels"].startswith("c (compiled C kernels")
    # the machine, as /proc/cpuinfo and torch say (the report names it; no number without its machine)
    machine = on_disk["machine"]
    assert (machine["device"], machine["gpu"], machine["torch"]) == ("cpu", None, str(torch.__version__))
    assert machine["torch_threads"] == torch.get_num_threads() and machine["cpu"]
    with open("/proc/cpuinfo") as fh:
        assert f"model name\t: {machine['cpu']}\n" in fh.read()
    best = max(rows, key=lambda r: r["test_top1"])
    assert on_disk["final_top1"] == rows[-1]["test_top1"] == summary["final_top1"]
    assert on_disk["best_top1"] == best["test_top1"] and on_disk["best_epoch"] == best["epoch"]
    assert on_disk["final_top5"] == rows[-1]["test_top5"] and on_disk["epochs"] == 2 and on_disk["complete"]
    assert (on_disk["model"], on_disk["dataset"], on_disk["o_end"]) == ("resnet20_bireal", "fashion_mnist", 3.0)
    assert (on_disk["estimator"], on_disk["o_schedule"]) == ("reste", "cosine")

    # config.yaml is the resolved config; histograms at epoch 1 (asked) and 2 (final)
    assert load_config(run / "config.yaml") == load_config(yaml.safe_load((run / "config.yaml").read_text()))
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["subset"] == 2000
    assert sorted(p.name for p in (run / "histograms").iterdir()) == ["epoch0001.npz", "epoch0002.npz"]

    # checkpoints load with weights_only=True and hold the contract's keys
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert set(ckpt.REQUIRED_KEYS) <= set(last)
    assert last["epoch"] == 2 and last["config"]["data"]["subset"] == 2000 and len(last["metrics"]) == 2
    best_ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert best_ckpt["epoch"] == best["epoch"]

    # `reste eval` rebuilds the model and test loader and reproduces the final accuracy
    capsys.readouterr()
    code = cli.main(
        ["eval", str(run), "--which", "last", "--batch-size", "400", "--device", "cpu", "--json"]
    )  # the run's 400 test images by default
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["count"] == 400
    assert result["top1"] == pytest.approx(rows[-1]["test_top1"]) and result["loss"] == pytest.approx(
        rows[-1]["test_loss"], rel=1e-5
    )


def test_a_run_on_the_pytorch_formulas_says_so_and_records_paths_absolute(tmp_path, capsys, monkeypatch):
    # without the compiled kernels (no C compiler at install time: pip hides the build's warning)
    # training runs at half speed; the run says so and records it. A relative data.root is
    # recorded absolute, so the run is evaluated and exported from any folder.
    import reste.ops

    real = reste.ops.kernel_info

    def without_kernels(device="cpu"):
        info = real(device)
        return {**info, "path": "torch", "why": "PyTorch formulas (not built (test))"}

    monkeypatch.setattr(reste.ops, "kernel_info", without_kernels)
    (tmp_path / "data").symlink_to(FASHION, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    overrides = tiny(tmp_path, "slow", data={"root": "data"})
    overrides["train"]["epochs"] = 1
    summary = T.train(progress=False, summary=True, **overrides)
    out = capsys.readouterr().out
    assert "estimator kernels: PyTorch formulas (not built (test)); the compiled kernels train about twice" in out
    assert summary["estimator_kernels"] == "torch (PyTorch formulas (not built (test)))"
    recorded = load_config(tmp_path / "slow" / "config.yaml").data.root
    assert recorded == str(tmp_path / "data") and Path(summary["data_source"]).is_absolute()


def test_the_metrics_rows_do_not_depend_on_analysis_every_steps(tmp_path, straight_run):
    # every_steps only adds indicators.jsonl lines (a neutral option: report and --resume treat runs
    # that differ in it as the same); the epoch rows, flip_ratio included, must be the same
    straight, _ = straight_run
    sampled = Path(T.train(progress=False, **tiny(tmp_path, "sampled", analysis={"every_steps": 3}))["run_dir"])

    def rows(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    drop = ("images_per_s", "train_time", "epoch_time")
    plain, with_steps = rows(straight), rows(sampled)
    assert [{k: v for k, v in r.items() if k not in drop} for r in plain] == [
        {k: v for k, v in r.items() if k not in drop} for r in with_steps
    ]
    assert plain[1]["flip_ratio"] > 0 and len((sampled / "indicators.jsonl").read_text().splitlines()) == 2


# ----------------------------------------------------------------------------- resume
def test_resume_from_an_epoch_boundary_gives_identical_weights(tmp_path, monkeypatch, straight_run):
    straight, _ = straight_run
    stop_at = interrupt_after(steps=4)  # the last step of epoch 1: stops after its evaluation
    with pytest.raises(T.TrainingInterrupted) as stop:
        T.train(progress=False, on_step=stop_at, **tiny(tmp_path, "resumed"))
    assert stop.value.exit_code == 130
    run = tmp_path / "resumed"
    state = weights(run)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 0)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    monkeypatch.undo()
    summary = T.train(resume=run, progress=False)
    assert summary["epochs"] == 2 and summary["complete"]
    assert_same_weights(weights(run)["model"], weights(straight)["model"])
    assert_same_weights(weights(run)["optimizer"]["state"][0], weights(straight)["optimizer"]["state"][0])
    a = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (straight / "metrics.jsonl").read_text().splitlines()]
    for key in ("train_loss", "train_top1", "test_loss", "test_top1", "lr", "o", "est_error"):
        assert [r[key] for r in a] == [r[key] for r in b], key


def test_resume_from_the_middle_of_an_epoch_gives_identical_weights(tmp_path, monkeypatch, straight_run):
    straight, _ = straight_run
    stop_at = interrupt_after(steps=6, signum=signal.SIGTERM)  # step 2 of epoch 2
    with pytest.raises(T.TrainingInterrupted) as stop:
        T.train(progress=False, on_step=stop_at, **tiny(tmp_path, "mid"))
    assert stop.value.exit_code == 143 and "--resume" in str(stop.value)
    run = tmp_path / "mid"
    assert (weights(run)["epoch"], weights(run)["step_in_epoch"]) == (1, 2)
    monkeypatch.undo()
    T.train(resume=run, progress=False)
    assert_same_weights(weights(run)["model"], weights(straight)["model"])
    a = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (straight / "metrics.jsonl").read_text().splitlines()]
    # the interrupted epoch's training metrics are stitched together from both halves
    assert (
        a[1]["train_loss"] == pytest.approx(b[1]["train_loss"], rel=1e-12) and a[1]["train_top1"] == b[1]["train_top1"]
    )


def test_console_sigint_writes_a_checkpoint_prints_the_resume_command_and_exits_130(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), PYTHONUNBUFFERED="1")
    args = [
        sys.executable,
        "-m",
        "reste",
        "train",
        "data.subset=512",
        "data.batch_size=64",
        "train.epochs=2",
        "train.threads=1",
        "train.device=cpu",
        "analysis.indicators=false",
        f"out.dir={tmp_path}",
        "out.name=cli",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    # wait for the progress bar to show a few steps, then press Ctrl-C
    buffer = ""
    deadline = time.time() + 120
    while "3/16" not in buffer and time.time() < deadline and proc.poll() is None:
        buffer += proc.stderr.read(1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, buffer + err
    assert f"reste train --resume {tmp_path / 'cli'}" in err
    state = weights(tmp_path / "cli")
    assert state["epoch"] * 8 + state["step_in_epoch"] >= 3
    done = subprocess.run(
        [sys.executable, "-m", "reste", "train", "--resume", str(tmp_path / "cli"), "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["epochs"] == 2


def test_resume_allows_only_harmless_overrides(tmp_path, straight_run):
    straight, _ = straight_run
    with pytest.raises(ConfigError, match="cannot change optim.lr when resuming"):
        T.resume_config(straight, ["optim.lr=0.5"])
    cfg = T.resume_config(straight, ["train.epochs=5", "train.threads=2"])
    assert (cfg.train.epochs, cfg.train.threads) == (5, 2)
    with pytest.raises(CheckpointError, match="no checkpoints/last.pt"):
        T.train(resume=tmp_path, progress=False)
    # was "no checkpoints/last.pt there" for a path that does not exist at all
    with pytest.raises(CheckpointError, match=f"cannot resume {tmp_path / 'nonexist'}: it does not exist; give"):
        T.train(resume=tmp_path / "nonexist", progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="it is a file, not a run directory"):
        T.resume_config(tmp_path / "file")
    with pytest.raises(ConfigError, match="either a config or resume"):
        T.train({"seed": 1}, resume=straight, progress=False)


def test_a_run_that_lost_its_config_yaml_resumes_with_the_checkpoints_config(straight_run, tmp_path):
    # was: "config file RUN/config.yaml does not exist; give the path of a YAML file" and exit 2, a
    # message about a file the user never gave; every checkpoint holds the config it was trained with
    import shutil

    straight, _ = straight_run
    run = tmp_path / "lost"
    shutil.copytree(straight, run)
    saved = (run / "config.yaml").read_text()
    (run / "config.yaml").unlink()
    with pytest.warns(UserWarning, match="config.yaml is missing: resuming with the configuration saved in"):
        cfg = T.resume_config(run, ["train.epochs=3"])
    assert config_to_dict(cfg) == config_to_dict(T.resume_config(straight, ["train.epochs=3"]))
    with pytest.warns(UserWarning, match="config.yaml is missing"):
        T.train(resume=run, progress=False, overrides=["train.epochs=3"])
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["train"]["epochs"] == 3 and {**written, "train": None} == {**yaml.safe_load(saved), "train": None}


def test_resuming_a_finished_run_does_nothing(straight_run, tmp_path, capsys, monkeypatch):
    """A finished run's files stay byte for byte (config.yaml was rewritten with the overrides); a
    train.epochs below the epochs done is refused; the message counts the real epochs; no bar."""
    import shutil

    straight, summary = straight_run
    run = tmp_path / "runs" / "done"
    shutil.copytree(straight, run)

    def files():
        return {
            str(p.relative_to(run)): p.read_bytes() if p.is_file() else "folder"
            for p in sorted(run.rglob("*"))
            if p.name != ".lock"
        }

    before = files()
    monkeypatch.chdir(tmp_path)
    for extra in ([], ["data.test_batch_size=128"], ["train.epochs=2", "train.threads=1"]):
        code = cli.main(["train", "--resume", "runs/done", *extra])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert f"{run} is already complete (2 epochs); raise train.epochs to continue it" in captured.out
        assert "step" not in captured.err  # no progress bar
        assert files() == before, extra
    code = cli.main(["train", "--resume", "runs/done", "train.epochs=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == (
        f"error: cannot resume {run} with train.epochs=1: it has already trained 2 epochs; "
        "give train.epochs=2 or more, or leave train.epochs out"
    )
    assert files() == before
    again = T.train(resume="runs/done", progress=False)
    assert again["final_top1"] == summary["final_top1"] and again["run_dir"] == str(run)  # absolute
    # the estimators' code path and the machine of the session that trained it, as its summary says
    assert again["estimator_kernels"] == summary["estimator_kernels"] is not None
    assert again["machine"] == summary["machine"] is not None
    # a kill between the last checkpoint and the summary leaves summary.json stale or missing: a resume
    # writes it (and only it), so the run, and a sweep waiting on it, is complete
    path = run / "summary.json"
    # the stale summary's machine, made up: the rewritten one must keep it, not this session's
    elsewhere = dict(summary["machine"], cpu="Another CPU", torch_threads=7)
    path.write_text(json.dumps(dict(json.loads(path.read_text()), complete=False, machine=elsewhere)))
    for stale, damage in ((True, lambda: None), (False, path.unlink), (False, lambda: path.write_text("[1]"))):
        damage()
        assert cli.main(["train", "--resume", "runs/done"]) == 0
        assert "its summary.json was missing or incomplete and is written now" in capsys.readouterr().out
        rewritten = json.loads(path.read_text())
        assert rewritten["complete"] is True and rewritten["final_top1"] == summary["final_top1"]
        # this session trained nothing: the code path and machine come from the stale summary, else unknown
        expected = (summary["estimator_kernels"], elsewhere) if stale else (None, None)
        assert (rewritten["estimator_kernels"], rewritten["machine"]) == expected
        assert {k: v for k, v in files().items() if k != "summary.json"} == {
            k: v for k, v in before.items() if k != "summary.json"
        }


def test_a_resumed_run_records_its_absolute_run_directory(straight_run, tmp_path, capsys, monkeypatch):
    import shutil

    straight, _ = straight_run
    shutil.copytree(straight, tmp_path / "runs" / "more")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--resume", "runs/more", "train.epochs=3", "--quiet"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "more"
    assert f"run directory: {run}\n" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["run_dir"] == str(run) and summary["epochs"] == 3
    train = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert train["epochs"] == 3  # an extension is written
    # and marked: its schedules stretched at epoch 2, so `reste report` does not pool it with runs
    # planned for 3 epochs, and a sweep does not take it for one
    assert train["extended_from"] == [2]
    from reste.analysis.runs import neutral

    assert not neutral("train.extended_from")
    assert T.resume_config(run, ["train.epochs=3"]).train.extended_from == [2]  # resumed again: once
    assert T.resume_config(run, ["train.epochs=4"]).train.extended_from == [2, 3]


# ----------------------------------------------------------------------------- checkpoints
class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {Path('/tmp') / 'reste-test-pwned'}",))


def test_malicious_checkpoint_is_refused_without_running_it(tmp_path, capsys):
    marker = Path("/tmp") / "reste-test-pwned"
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.pt"
    torch.save({"model": Evil(), "config": {}}, path)
    with pytest.raises(CheckpointError) as err:
        ckpt.load_checkpoint(path)
    assert str(path) in str(err.value) and "system" in str(err.value)
    code = cli.main(["eval", str(path), "--device", "cpu"])
    assert code == 1 and "refusing to load" in capsys.readouterr().err
    assert not marker.exists()


def test_truncated_checkpoint_is_a_clear_error_and_is_not_overwritten(tmp_path, straight_run, capsys):
    straight, _ = straight_run
    run = tmp_path / "copy"
    import shutil

    shutil.copytree(straight, run)
    last = run / "checkpoints" / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"checkpoint {last} is truncated or corrupt"):
        ckpt.load_checkpoint(last)
    code = cli.main(["train", "--resume", str(run), "train.epochs=3", "--quiet"])
    assert code == 1 and str(last) in capsys.readouterr().err
    assert last.read_bytes() == data[: len(data) // 2]  # nothing was overwritten
    code = cli.main(["eval", str(run / "checkpoints" / "missing.pt")])
    assert code == 1 and "no checkpoint at" in capsys.readouterr().err


def test_checkpoint_of_another_model_is_refused(straight_run):
    straight, _ = straight_run
    state = weights(straight)
    cfg = load_config(state["config"], ["model.kwargs={width: 2}"], check=False)
    import reste.data

    other = T.build_model(cfg, reste.data.info("fashion_mnist"))
    with pytest.raises(CheckpointError, match="does not fit this model.*shape mismatch"):
        ckpt.load_model_weights(other, state["model"], straight / "checkpoints" / "last.pt")
    with pytest.raises(CheckpointError, match="lacks"):
        path = straight.parent / "plain.pt"
        torch.save({"model": state["model"]}, path)
        ckpt.load_checkpoint(path, required=ckpt.REQUIRED_KEYS)


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    ckpt.save_checkpoint({"x": torch.ones(3)}, path)

    def broken_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint({"x": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(ckpt.load_checkpoint(path)["x"], torch.ones(3))  # the old file survived intact
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(1)
    ckpt.save_checkpoint({"rng": ckpt.rng_state()}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(ckpt.load_checkpoint(tmp_path / "r.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# ----------------------------------------------------------------------------- loop behaviour
def test_nonfinite_loss_stops_with_a_clear_message_or_is_skipped(tmp_path):
    blow_up = {"optim": {"name": "sgd", "lr": 1e30}}
    with pytest.raises(T.NonFiniteLossError) as err:
        T.train(progress=False, **tiny(tmp_path, "nan", **blow_up))
    message = str(err.value)
    assert "non-finite loss" in message and "epoch 1, step 2" in message and "lr " in message and "o " in message
    # step 1 is finite (lr only hits the weights after it), every later step is skipped: a run that
    # skips most of an epoch is diverging, and fails instead of reporting a normal summary (issue 15)
    with pytest.raises(T.NonFiniteLossError, match="epoch 1 skipped 3 of 4 batches"):
        T.train(progress=False, **tiny(tmp_path, "skip", train={"nonfinite": "skip"}, **blow_up))
    assert not (tmp_path / "skip" / "checkpoints" / "last.pt").exists()


def test_existing_run_directory_is_never_overwritten_without_force(tmp_path, capsys):
    args = [
        "train",
        "data.subset=64",
        "data.batch_size=64",
        "train.epochs=1",
        "train.threads=1",
        "train.device=cpu",
        f"out.dir={tmp_path}",
        "out.name=once",
        "--quiet",
    ]
    assert cli.main(args) == 0
    stamp = (tmp_path / "once" / "summary.json").stat().st_mtime_ns
    assert cli.main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "once" / "summary.json").stat().st_mtime_ns == stamp
    assert cli.main(args + ["--force"]) == 0
    assert (tmp_path / "once" / "summary.json").stat().st_mtime_ns != stamp


def test_a_failed_force_start_keeps_the_run_it_was_to_replace(tmp_path, capsys, monkeypatch):
    """--force moves the old run aside and deletes it only once the new run's set-up succeeded: a
    start that fails (data not found, a bad model.init_from, Ctrl-C during set-up) puts it back."""
    import hashlib

    def files(folder):
        return {  # the lock file too: its content (the last holder's pid) is left as it was
            str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*"))
        }

    args = ["train", "data.subset=64", "data.batch_size=64", "train.epochs=1", "train.threads=1"]
    args += ["train.device=cpu", f"out.dir={tmp_path}", "out.name=old", "--quiet"]
    assert cli.main(args) == 0
    old = tmp_path / "old"
    before = files(old)
    assert "checkpoints/last.pt" in before and "summary.json" in before
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"tood: yes\n")
    failures = [
        (["data.root=" + str(tmp_path / "nodata"), "--force"], 1, "not found"),
        ([f"model.init_from={bad}", "--force"], 1, f"checkpoint {bad} is truncated or corrupt"),
    ]
    for extra, code, message in failures:
        assert cli.main(args + extra) == code
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert files(old) == before, extra  # the old run is back, byte for byte
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt", "old"]  # nothing left aside
    (old / ".lock").unlink()  # a run copied without its lock file gets none either
    before = files(old)
    assert cli.main(args + failures[0][0]) == 1 and files(old) == before
    capsys.readouterr()
    # Ctrl-C during set-up unwinds the same way
    import reste.train.setup as setup

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "create_loaders", interrupted)
    with pytest.raises(KeyboardInterrupt):
        T.train(overrides=args[1:-1], force=True, progress=False)
    monkeypatch.undo()
    assert files(old) == before and sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt", "old"]
    assert setup.create_loaders is T.create_loaders
    # a start that succeeds replaces it
    assert cli.main(args + ["--force"]) == 0
    assert files(old) != before and sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt", "old"]


def _fake_run(folder, marker: bytes):
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.yaml").write_text("seed: 0\n")
    (folder / "checkpoints" / "last.pt").write_bytes(marker)  # a checkpoint: results, not an abandoned set-up


def test_a_force_start_that_loses_the_name_to_another_run_deletes_neither(tmp_path, capsys, monkeypatch):
    """The old run is set aside, then another run claims the name before this one: the other run's
    folder stays as it is (it was deleted, and the old run renamed into the live run's place)."""
    from reste.train import rundir

    _fake_run(tmp_path / "old", b"OLD RUN")
    set_aside = rundir._set_aside

    def and_another_run_starts(path):
        aside = set_aside(path)
        _fake_run(path, b"OTHER RUN")
        return aside

    monkeypatch.setattr(rundir, "_set_aside", and_another_run_starts)
    args = ["train", "train.epochs=1", f"out.dir={tmp_path}", "out.name=old", "--force", "--quiet"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "was just created by another run started at the same time" in err
    assert (tmp_path / "old" / "checkpoints" / "last.pt").read_bytes() == b"OTHER RUN"
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(".old.replaced-")]
    assert len(kept) == 1 and (kept[0] / "checkpoints" / "last.pt").read_bytes() == b"OLD RUN"
    assert f"it is kept at {kept[0]}" in err


def test_a_run_set_aside_by_a_killed_force_start_is_put_back(tmp_path, capsys):
    """SIGKILL during a --force set-up leaves the old run as .NAME.replaced-PID-TOKEN: the next start
    under that name puts it back (the start then finds it, as if the killed one had never run)."""
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid whose process is gone
    aside = tmp_path / f".old.replaced-{dead.pid}-0a1b2c3d"
    _fake_run(aside, b"OLD RUN")
    busy = tmp_path / f".old.replaced-{os.getpid()}-4e5f6a7b"  # a live process's own: left alone
    _fake_run(busy, b"BUSY")
    (tmp_path / "old").mkdir()  # what the killed start had claimed: a set-up with nothing in it
    (tmp_path / "old" / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "old" / ".lock").write_text("")
    args = ["train", "train.epochs=1", f"out.dir={tmp_path}", "out.name=old", "--quiet"]
    assert cli.main(args) == 2  # no --force: the old run is back, so the name is taken
    err = capsys.readouterr().err
    assert f"note: put back {tmp_path / 'old'}" in err and "already exists" in err
    assert (tmp_path / "old" / "checkpoints" / "last.pt").read_bytes() == b"OLD RUN"
    assert not aside.exists() and (busy / "checkpoints" / "last.pt").read_bytes() == b"BUSY"


def test_default_run_directories_get_a_timestamp_and_never_collide(tmp_path):
    cfg = load_config(None, [f"out.dir={tmp_path}"])
    first = T.new_run_dir(cfg, force=False)
    second = T.new_run_dir(cfg, force=False)  # same second: gets a suffix instead of sharing the folder
    assert first.is_dir() and second.is_dir() and second != first
    assert first.name.startswith("fashion_mnist-resnet20_bireal-1w1a-reste-2")


def test_a_failed_setup_leaves_no_empty_run_directory(tmp_path):
    with pytest.raises(ConfigError, match="cannot build model"):
        T.train(progress=False, **tiny(tmp_path, "broken", model={"kwargs": {"depth_of_field": 3}}))
    assert not (tmp_path / "broken").exists()


def test_every_steps_indicators_and_per_epoch_lr(tmp_path):
    T.train(
        progress=False,
        **tiny(
            tmp_path,
            "ind",
            analysis={"every_steps": 3},
            optim={"name": "sgd", "lr": 0.1},
            lr_schedule={"per": "epoch", "warmup_epochs": 1},
            train={"epochs": 3},
        ),
    )
    lines = [json.loads(l) for l in (tmp_path / "ind" / "indicators.jsonl").read_text().splitlines()]
    assert [l["global_step"] for l in lines] == [3, 6, 9, 12]  # 12 steps in all
    assert {"est_error", "est_error_end", "grad_instability", "flip_ratio", "layers", "o"} <= set(lines[0])
    rows = [json.loads(l) for l in (tmp_path / "ind" / "metrics.jsonl").read_text().splitlines()]
    # reference schedule: 1 warm-up epoch at full lr, then cosine per epoch (constant within an epoch)
    expected = [0.1 * T.lr_factor(e, 3, 1, "cosine", 0.0) for e in range(3)]
    assert [r["lr"] for r in rows] == pytest.approx(expected)
    assert expected == pytest.approx([0.1, 0.1, 0.05])


def test_lr_factor_warmup_then_cosine():
    assert [T.lr_factor(u, 10, 4, "cosine", 0.0) for u in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert T.lr_factor(7, 10, 4, "cosine", 0.0) == pytest.approx(0.5)
    assert T.lr_factor(10, 10, 0, "cosine", 0.1) == pytest.approx(0.1)
    assert T.lr_factor(5, 10, 0, "linear", 0.0) == pytest.approx(0.5)
    assert T.lr_factor(9, 10, 0, "constant", 0.0) == 1.0


def test_weight_decay_spares_norm_bias_and_estimator_parameters_when_asked():
    import reste.data

    cfg = load_config(
        None, ["optim.name=sgd", "optim.weight_decay=1e-4", "model.estimator=dsq", "optim.decay_all=false"]
    )
    model = T.build_model(cfg, reste.data.info("fashion_mnist"))
    decay, no_decay = T.build_optimizer(model, cfg).param_groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() > 1 for p in decay["params"]) and all(p.dim() <= 1 for p in no_decay["params"])
    dsq_alphas = [p for name, p in model.named_parameters() if name.endswith("alpha")]
    assert dsq_alphas and all(any(p is q for q in no_decay["params"]) for p in dsq_alphas)
    reference = T.build_optimizer(model, load_config(None, ["optim.name=sgd", "optim.weight_decay=1e-4"]))
    assert len(reference.param_groups) == 1 and reference.param_groups[0]["weight_decay"] == 1e-4  # decays everything


def test_eval_refuses_an_incompatible_data_set(straight_run, capsys):
    straight, _ = straight_run
    code = cli.main(["eval", str(straight), "--data", "cifar10", "--device", "cpu"])
    assert code == 2 and "cannot be evaluated on cifar10" in capsys.readouterr().err


def test_channels_last_and_bf16_autocast_run_on_cpu(tmp_path):
    summary = T.train(
        progress=False,
        **tiny(
            tmp_path, "bf16", train={"epochs": 1, "channels_last": True, "amp": "bf16"}, analysis={"indicators": False}
        ),
    )
    state = weights(tmp_path / "bf16")
    assert summary["epochs"] == 1 and 0.0 <= summary["final_top1"] <= 100.0
    assert all(v.dtype != torch.bfloat16 for v in state["model"].values())  # autocast keeps float32 weights
    assert torch.isfinite(torch.tensor(state["metrics"][0]["train_loss"]))


def test_tensorboard_scalars_are_written_when_tensorboard_is_importable(tmp_path, monkeypatch):
    """The real SummaryWriter needs the optional `tensorboard` package; a stand-in records the calls."""
    import types

    calls = []

    class RecordingWriter:
        def __init__(self, log_dir, purge_step=None):
            calls.append(("init", Path(log_dir), purge_step))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            calls.append(("close",))

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = RecordingWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    T.train(progress=False, **tiny(tmp_path, "tb", train={"epochs": 1}, analysis={"indicators": False}))
    assert calls[0] == ("init", tmp_path / "tb" / "tb", None) and calls[-1] == ("close",)
    scalars = {tag: (value, step) for tag, value, step in (c for c in calls if len(c) == 3 and c[0] != "init")}
    row = json.loads((tmp_path / "tb" / "metrics.jsonl").read_text())
    assert scalars["test_top1"] == (row["test_top1"], 1) and scalars["train_loss"] == (row["train_loss"], 1)
    # a resume purges TensorBoard's points from the first epoch the checkpoint lacks: a run killed after
    # logging an epoch but before checkpointing it showed that epoch twice (steps 1, 2, 3, 3, 4)
    calls.clear()
    T.train(resume=tmp_path / "tb", overrides=["train.epochs=2"], progress=False)
    assert calls[0] == ("init", tmp_path / "tb" / "tb", 2)


@pytest.mark.parametrize("rank, shown", [("1", False), ("0", True), (None, True)])
def test_the_stop_message_is_printed_by_rank_0_only(monkeypatch, capsys, rank, shown):
    """torchrun sends SIGTERM to every rank: the "finishing the current step" line was printed once per
    rank; rank 0 (or a single process, RANK unset) says it for the job, and every rank still stops."""
    from reste.train.signals import _StopRequest

    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    with _StopRequest() as stop:
        signal.raise_signal(signal.SIGTERM)  # a real signal, to the real handler
    assert stop.signum == signal.SIGTERM
    err = capsys.readouterr().err
    assert ("SIGTERM received: finishing the current step and writing a checkpoint" in err) is shown
