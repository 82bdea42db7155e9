"""Tests of reste.analysis: equilibrium indicators, sweeps and reports."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import reste
from reste.analysis.indicators import (
    FIT_RANGE,
    HIST_BINS,
    IndicatorTracker,
    estimating_error,
    load_snapshot,
    read_metrics,
    reference_aggregates,
)
from reste.analysis.report import NotARunError, build_report
from reste.analysis.sweep import Sweep, SweepConfigError, SweepError, launch_subprocess, parse_grid, split_values
from reste.nn import BinaryConv2d, BinaryLinear


def tiny_model(weight_estimator="reste", o=2.0, seed=0):
    """A float first conv, a binary conv, a binary linear: two binary-weight layers."""
    torch.manual_seed(seed)
    est = reste.estimator("reste", o=o) if weight_estimator == "reste" else weight_estimator
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        BinaryConv2d(4, 6, 3, padding=1, bias=False, weight_estimator=est, input_estimator="ste"),
        nn.ReLU(),
        nn.Flatten(),
        BinaryLinear(6 * 5 * 5, 3, weight_estimator=est, input_estimator=None),
    )
    with torch.no_grad():  # spread latent weights over [-1.5, 1.5] so |w| > 1 is represented too
        for m in (model[2], model[5]):
            m.weight.uniform_(-1.5, 1.5)
    return model


def backward_once(model, seed=1):
    torch.manual_seed(seed)
    x = torch.randn(8, 1, 5, 5)
    y = torch.randint(0, 3, (8,))
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def numpy_indicators(model, o, o_end):
    """The indicators computed independently with NumPy, per binary layer."""
    out = {}
    for name in ("2", "5"):
        w = model.get_submodule(name).weight.detach().double().numpy().ravel()
        g = model.get_submodule(name).weight.grad.detach().double().numpy().ravel()
        sign = np.where(w >= 0, 1.0, -1.0)

        def err(order):
            f = sign * np.abs(w) ** (1.0 / order)
            return float(np.sqrt(np.sum((f - sign) ** 2)))

        out[name] = {
            "est_error": err(o),
            "est_error_end": err(o_end),
            "grad_instability": float(np.var(np.abs(g), ddof=1)),
        }
    return out


def test_indicators_match_numpy_on_a_tiny_model():
    model = tiny_model(o=2.0)
    backward_once(model)
    values = IndicatorTracker(model, o_end=3.0).measure()
    expected = numpy_indicators(model, o=2.0, o_end=3.0)
    assert set(values["layers"]) == {"2", "5"}
    for name, exp in expected.items():
        got = values["layers"][name]
        assert got["o"] == pytest.approx(2.0)
        for key in ("est_error", "est_error_end", "grad_instability"):
            assert got[key] == pytest.approx(exp[key], rel=1e-5), (name, key)
    for key in ("est_error", "est_error_end", "grad_instability"):
        assert values[key] == pytest.approx(sum(e[key] for e in expected.values()), rel=1e-5)
    assert values["flip_ratio"] is None  # nothing to compare with yet
    # at o != o_end the two estimating errors really differ
    assert values["est_error"] > values["est_error_end"] * 1.05


def test_estimating_error_falls_as_o_grows():
    torch.manual_seed(0)
    w = torch.randn(2000) * 0.5
    errors = [float(estimating_error(w, o)) for o in (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    # at o = 1 f_o is the identity: e = ||w - sign(w)||
    assert errors[0] == pytest.approx(float(torch.linalg.vector_norm(w - torch.where(w >= 0, 1.0, -1.0))), rel=1e-5)


def test_flip_ratio_counts_sign_changes_since_last_measurement():
    model = tiny_model()
    tracker = IndicatorTracker(model, o_end=3.0)
    tracker.measure()
    conv, lin = model[2].weight, model[5].weight
    with torch.no_grad():
        conv.view(-1)[:5] *= -1  # 5 flips
        lin.view(-1)[:7] *= -1  # 7 flips
        lin.view(-1)[7:10] *= 2.0  # magnitude changes are not flips
    values = tracker.measure()
    assert values["layers"]["2"]["flips"] == 5
    assert values["layers"]["2"]["flip_ratio"] == pytest.approx(5 / conv.numel())
    assert values["layers"]["5"]["flip_ratio"] == pytest.approx(7 / lin.numel())
    assert values["flip_ratio"] == pytest.approx(12 / (conv.numel() + lin.numel()))
    # relative to the previous measurement, not the first one
    assert tracker.measure()["flip_ratio"] == 0.0


def test_flip_ratio_treats_zero_as_positive():
    model = tiny_model()
    tracker = IndicatorTracker(model, o_end=3.0)
    with torch.no_grad():
        model[5].weight.view(-1)[0] = 0.3
    tracker.measure()
    with torch.no_grad():
        model[5].weight.view(-1)[0] = 0.0  # +0.3 -> 0: still +1 in the forward pass
    assert tracker.measure()["layers"]["5"]["flips"] == 0


def test_non_reste_estimators_have_no_current_error_and_fp_models_no_values():
    model = tiny_model(weight_estimator="ste")
    backward_once(model)
    values = IndicatorTracker(model, o_end=3.0).measure()
    assert values["est_error"] is None and values["layers"]["2"]["o"] is None
    expected = numpy_indicators(model, o=3.0, o_end=3.0)
    assert values["est_error_end"] == pytest.approx(sum(e["est_error_end"] for e in expected.values()), rel=1e-5)

    fp = nn.Sequential(nn.Linear(4, 2))
    empty = IndicatorTracker(fp, o_end=3.0).measure()
    assert empty == {
        "est_error": None,
        "est_error_end": None,
        "grad_instability": None,
        "flip_ratio": None,
        "layers": {},
    }


def test_gradient_instability_is_none_without_gradients():
    values = IndicatorTracker(tiny_model(), o_end=3.0).measure()
    assert values["grad_instability"] is None
    assert values["est_error_end"] is not None


def test_tracker_follows_the_o_schedule():
    model = tiny_model(o=1.0)
    tracker = IndicatorTracker(model, o_end=3.0)
    sched = reste.EstimatorScheduler(
        model, reste.o_schedule("cosine", o_end=3.0), epochs=4, steps_per_epoch=1, per="epoch"
    )
    errors = []
    for epoch in range(4):
        sched.step_epoch(epoch)
        values = tracker.measure()
        assert values["layers"]["2"]["o"] == pytest.approx(sched.o)
        errors.append(values["est_error"])
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert values["est_error_end"] < errors[-1]  # o is still below o_end in the last epoch


def test_snapshot_histograms_hold_every_weight_and_load_without_pickle(tmp_path):
    model = tiny_model(o=2.0)
    backward_once(model)
    path = IndicatorTracker(model, o_end=3.0).snapshot(tmp_path / "histograms" / "epoch0001.npz")
    snap = load_snapshot(path)  # allow_pickle=False inside
    with np.load(path, allow_pickle=False) as raw:
        assert set(raw.files) == set(snap)
    assert list(snap["layer_names"]) == ["2", "5"]
    assert snap["fit_edges"].shape == (HIST_BINS + 1,) and snap["fit_counts"].shape == (2, HIST_BINS)
    for i, name in enumerate(("2", "5")):
        layer = model.get_submodule(name)
        n = layer.weight.numel()
        assert snap["numel"][i] == n
        for key in ("fit", "fit_end"):
            assert snap[f"{key}_counts"][i].sum() + snap[f"{key}_under"][i] + snap[f"{key}_over"][i] == n
        assert (
            snap["grad_log10_counts"][i].sum() + snap["grad_zero"][i] + snap["grad_under"][i] + snap["grad_over"][i]
            == n
        )
        assert snap["grad_counts"][i].sum() == n
        # the histogram agrees with NumPy's on the same values
        w = layer.weight.detach().double().numpy().ravel()
        sign = np.where(w >= 0, 1.0, -1.0)
        fit_end = sign * np.abs(w) ** (1 / 3.0) - sign
        expected, _ = np.histogram(fit_end, bins=HIST_BINS, range=FIT_RANGE)
        assert np.abs(snap["fit_end_counts"][i] - expected).sum() <= 2  # float32 vs float64 at bin edges
    assert snap["o"][0] == pytest.approx(2.0) and float(snap["o_end"]) == 3.0
    assert snap["has_grad"].all()


def write_metrics(run_dir, rows):
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def test_reference_aggregates_mean_of_error_and_sum_of_instability(tmp_path):
    rows = [
        {"epoch": 1, "est_error": 9.0, "est_error_end": 4.0, "grad_instability": 0.5},
        {"epoch": 2, "est_error": 7.0, "est_error_end": 3.0, "grad_instability": 1.5},
        {"epoch": 3, "est_error": 5.0, "est_error_end": 2.0, "grad_instability": 2.5},
    ]
    write_metrics(tmp_path / "run", rows)
    assert read_metrics(tmp_path / "run") == rows
    agg = reference_aggregates(tmp_path / "run")
    assert agg == {
        "est_error_end_mean": 3.0,
        "est_error_mean": 7.0,
        "grad_instability_sum": 4.5,
        "epochs": 3,
        "logged_epochs": 3,
        "est_error_end_epochs": 3,
        "est_error_epochs": 3,
        "grad_instability_epochs": 3,
    }
    none = reference_aggregates([{"epoch": 1, "test_top1": 50.0}])
    assert none["est_error_end_mean"] is None and none["grad_instability_sum"] is None


def test_tracker_names_ignore_wrappers():
    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    values = IndicatorTracker(Wrapper(tiny_model()), o_end=2.0).measure()
    assert set(values["layers"]) == {"2", "5"}


def test_o_end_below_one_is_refused():
    with pytest.raises(ValueError, match="o_end must be >= 1"):
        IndicatorTracker(tiny_model(), o_end=0.5)


# --------------------------------------------------------------------------- sweep


def test_grid_values_are_yaml_and_brackets_do_not_split():
    assert split_values("1,2, 3") == ["1", "2", "3"]
    assert split_values("[1,2],[3]") == ["[1,2]", "[3]"]
    grid = parse_grid(["estimator.o_end=1,2.5", "estimator.schedule=cosine", "analysis.histograms_at=[1,2],[]"])
    assert grid["estimator.o_end"] == [("1", 1), ("2.5", 2.5)]
    assert grid["estimator.schedule"] == [("cosine", "cosine")]
    assert grid["analysis.histograms_at"] == [("[1,2]", [1, 2]), ("[]", [])]
    for bad, message in (
        ("o_end", "not key=v1,v2"),
        ("a=1,,2", "empty value"),
        ("a=[1,2", "unbalanced"),
        ("a=1,1", "twice"),
    ):
        with pytest.raises(SweepError, match=message):
            parse_grid([bad])


def write_config_as_trained(run_dir, config, items):
    from reste.train.config import config_to_yaml, load_config

    (Path(run_dir) / "config.yaml").write_text(config_to_yaml(load_config(config, items)))


class FakeRun:
    """Stands in for a `reste train` subprocess: writes what a finished run writes."""

    def __init__(self, argv, calls):
        calls.append(argv)
        if "--resume" in argv:
            run_dir = Path(argv[argv.index("--resume") + 1])
            overrides = {}
        else:
            opts = dict(a.split("=", 1) for a in argv if "=" in a)
            run_dir = Path(opts["out.dir"]) / opts["out.name"]
            overrides = {k: yaml.safe_load(v) for k, v in opts.items() if not k.startswith("out.")}
            config = next((a for a in argv[4:] if a.endswith(".yaml") and "=" not in a), None)
            run_dir.mkdir(parents=True, exist_ok=True)
            # the resolved config, as the trainer saves it at set-up
            write_config_as_trained(run_dir, config, [a for a in argv if "=" in a])
        run_dir.mkdir(parents=True, exist_ok=True)
        top1 = 50.0 + 10 * float(overrides.get("estimator.o_end", 0)) + overrides.get("seed", 0)
        (run_dir / "summary.json").write_text(json.dumps({"final_top1": top1, "best_top1": top1 + 1}))
        self.returncode = 0

    def poll(self):
        return self.returncode


def fake_launcher(calls, interrupt_at=None):
    def launch(argv, log_path, env):
        if interrupt_at is not None and len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return FakeRun(argv, calls)

    return launch


def test_sweep_runs_the_cartesian_product_and_writes_sweep_json(tmp_path):
    calls = []
    sweep = Sweep(
        None,
        ["estimator.o_end=1,3", "train.epochs=1"],
        tmp_path / "sw",
        seeds=[0, 1],
        launch=fake_launcher(calls),
        poll_s=0,
    )
    assert [r.name for r in sweep.runs] == [
        "estimator.o_end=1,seed=0",
        "estimator.o_end=1,seed=1",
        "estimator.o_end=3,seed=0",
        "estimator.o_end=3,seed=1",
    ]
    assert sweep.run(progress=None) == 0
    assert len(calls) == 4
    # the single-valued key is passed to every run but not part of the names
    assert all("train.epochs=1" in argv and "estimator.o_end=" in " ".join(argv) for argv in calls)
    doc = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert doc["grid"] == {"estimator.o_end": ["1", "3"], "seed": ["0", "1"]} and doc["fixed"] == {"train.epochs": 1}
    assert [r["status"] for r in doc["runs"]] == ["done"] * 4
    assert [r["final_top1"] for r in doc["runs"]] == [60.0, 61.0, 80.0, 81.0]


def test_interrupted_sweep_restarts_without_redoing_finished_runs(tmp_path):
    calls = []
    out = tmp_path / "sw"
    first = Sweep(None, ["estimator.o_end=1,2,3"], out, launch=fake_launcher(calls, interrupt_at=1), poll_s=0)
    assert first.run(progress=None) == 130
    statuses = {r["name"]: r["status"] for r in json.loads((out / "sweep.json").read_text())["runs"]}
    assert statuses == {"estimator.o_end=1": "done", "estimator.o_end=2": "pending", "estimator.o_end=3": "pending"}
    finished = (out / "estimator.o_end=1" / "summary.json").stat().st_mtime_ns

    # a run that died after a checkpoint is resumed, not restarted
    (out / "estimator.o_end=2" / "checkpoints").mkdir(parents=True)
    (out / "estimator.o_end=2" / "checkpoints" / "last.pt").write_bytes(b"x")
    write_config_as_trained(out / "estimator.o_end=2", None, ["estimator.o_end=2", f"out.dir={out}"])
    calls.clear()
    second = Sweep(None, ["estimator.o_end=1,2,3"], out, launch=fake_launcher(calls), poll_s=0)
    assert second.run(progress=None) == 0
    assert len(calls) == 2
    assert calls[0][-2:] == ["--resume", str(out / "estimator.o_end=2")]
    assert "out.name=estimator.o_end=3" in calls[1]
    assert (out / "estimator.o_end=1" / "summary.json").stat().st_mtime_ns == finished
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert [(r["status"], r["action"]) for r in runs] == [("done", "skip"), ("done", "resume"), ("done", "start")]


def test_failed_run_is_reported_and_the_rest_still_run(tmp_path):
    class Failing:
        returncode = 3

        def poll(self):
            return 3

    calls = []

    def launch(argv, log_path, env):
        if "out.name=estimator.o_end=1" in argv:
            calls.append(argv)
            return Failing()
        return FakeRun(argv, calls)

    sweep = Sweep(None, ["estimator.o_end=1,2"], tmp_path / "sw", launch=launch, poll_s=0)
    assert sweep.run(progress=None) == 1
    assert [(r.status, r.returncode) for r in sweep.runs] == [("failed", 3), ("done", 0)]


def test_sweep_cli_rejects_bad_grids(tmp_path):
    from reste.cli import main

    assert main(["sweep", "estimator.o_end", "--out", str(tmp_path / "x")]) == 2
    assert main(["sweep", str(tmp_path / "missing.yaml"), "seed=1,2", "--out", str(tmp_path / "x")]) == 2
    assert main(["sweep", "seed=1,2", "--seeds", "0,1", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_sweep_checks_every_run_before_starting_any_with_trains_message(tmp_path, capsys):
    from reste.analysis.sweep import SweepConfigError
    from reste.cli import main

    out = tmp_path / "x"
    assert main(["train", "estimator.o_endd=1", f"out.dir={tmp_path / 'runs'}"]) == 2
    train_err = capsys.readouterr().err
    assert "Did you mean 'estimator.o_end'?" in train_err
    assert main(["sweep", "estimator.o_endd=1,2", "--out", str(out)]) == 2
    sweep_err = capsys.readouterr().err
    assert sweep_err.splitlines()[0] == train_err.strip()  # the same message, on the terminal
    assert "estimator.o_endd=1" in sweep_err and not out.exists() and not (tmp_path / "runs").exists()

    # only the third run is invalid: it is named, and not even the valid ones start
    calls = []
    with pytest.raises(SweepConfigError) as info:
        Sweep(None, ["estimator.o_end=2,3,0.5"], out, launch=fake_launcher(calls), poll_s=0)
    assert info.value.run == "estimator.o_end=0.5" and "estimator.o_end must be >= 1" in info.value.message
    assert calls == [] and not out.exists()
    # a value of the wrong type, caught by the same loader `reste train` uses
    assert main(["sweep", "train.epochs=1,two", "--out", str(out)]) == 2
    assert "train.epochs" in capsys.readouterr().err and not out.exists()
    # a model.kwargs the model does not take (YAML read {width:0.25} as the key "width:0.25"): was caught
    # only when each run built its model, so every run started and failed
    with pytest.raises(SweepConfigError) as info:
        Sweep(None, ["estimator.o_end=2,3", "model.kwargs={width:0.25}"], out, launch=fake_launcher(calls), poll_s=0)
    assert "does not take width:0.25" in info.value.message
    assert "YAML needs a space after the colon: model.kwargs={width: 0.25}" in info.value.message
    assert calls == [] and not out.exists()


def test_sweep_resumes_a_run_with_its_new_neutral_options_and_checks_its_config(tmp_path):
    # a run with a checkpoint trains on the config saved in its folder: the sweep resumes it only if that
    # config is the one the sweep gives it; options that cannot change results go to --resume
    out = tmp_path / "sw"
    run = out / "estimator.o_end=2"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"x")
    write_config_as_trained(run, None, ["estimator.o_end=2", "train.threads=2", "out.dir=elsewhere"])
    calls = []
    sweep = Sweep(None, ["estimator.o_end=2,3", "train.threads=1"], out, launch=fake_launcher(calls), poll_s=0)
    assert sweep.run(progress=None) == 0 and len(calls) == 2
    assert calls[0][-3:] == ["--resume", str(run), "train.threads=1"]
    # an invalid value is refused for a run that would be resumed too (its saved config could not match)
    with pytest.raises(SweepConfigError) as info:
        Sweep(None, ["estimator.o_end=0.5,2"], out, launch=fake_launcher(calls), poll_s=0)
    assert info.value.run == "estimator.o_end=0.5"


def test_a_sweep_rerun_with_equal_values_of_another_type_reuses_its_runs(tmp_path):
    # model.kwargs keeps 1 and 1.0 apart, but they build the same model: not a difference (True and 1 are)
    out, calls = tmp_path / "sw", []
    grid = ["estimator.o_end=2,3", "model.kwargs={width: 1}"]
    assert Sweep(None, grid, out, launch=fake_launcher(calls), poll_s=0).run(progress=None) == 0
    calls.clear()
    again = Sweep(None, [grid[0], "model.kwargs={width: 1.0}"], out, launch=fake_launcher(calls), poll_s=0)
    assert again.run(progress=None) == 0 and calls == []  # both runs reused, none trained again
    from reste.analysis.sweep import SweepMismatchError

    with pytest.raises(SweepMismatchError):
        Sweep(None, [grid[0], "model.kwargs={width: true}"], out, launch=fake_launcher(calls), poll_s=0)


def test_a_sweep_rerun_with_other_options_refuses_to_reuse_its_runs(tmp_path, capsys):
    from reste.analysis.sweep import SweepMismatchError
    from reste.cli import main

    out = tmp_path / "sw1"
    calls = []
    assert Sweep(None, ["estimator.o_end=2,3"], out, launch=fake_launcher(calls), poll_s=0).run(progress=None) == 0
    doc = (out / "sweep.json").read_text()
    # the QA case: the same grid with another lr was "2 runs, 2 already finished, 0 to run", exit 0,
    # and sweep.json then recorded optim.lr 0.01 for runs trained at 0.002
    assert main(["sweep", "estimator.o_end=2,3", "optim.lr=0.01", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: reste sweep: ") and len(err.strip().splitlines()) == 1
    assert (
        "run 'estimator.o_end=2' (and 1 more of its runs: estimator.o_end=3) differs in optim.lr: 0.002 -> 0.01" in err
    )
    assert "another --out" in err and "sweep.json is unchanged" in err
    assert (out / "sweep.json").read_text() == doc
    # a run with a checkpoint is checked too (it would be resumed with its old config), from Python as well
    run = out / "estimator.o_end=3"
    (run / "summary.json").unlink()
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_bytes(b"x")
    with pytest.raises(SweepMismatchError) as info:
        Sweep(None, ["estimator.o_end=2,3", "train.epochs=2"], out, launch=fake_launcher(calls), poll_s=0)
    assert info.value.runs == {n: {"train.epochs": (4, 2)} for n in ("estimator.o_end=2", "estimator.o_end=3")}
    # a key only one side has (a model.kwargs entry) and a changed base config are differences too
    base = tmp_path / "base.yaml"
    base.write_text("optim:\n  lr: 0.002\n")
    with pytest.raises(SweepMismatchError) as info:
        Sweep(str(base), ["estimator.o_end=2,3", "model.kwargs={width: 2}"], out, launch=fake_launcher(calls))
    assert info.value.runs["estimator.o_end=2"] == {"model.kwargs.width": ("(unset)", 2)}
    # options that cannot change results do not block reuse: the runs are skipped or resumed
    calls.clear()
    same = Sweep(
        None,
        ["estimator.o_end=2,3", "train.threads=1", "data.test_batch_size=64"],
        out,
        launch=fake_launcher(calls),
        poll_s=0,
    )
    assert same.run(progress=None) == 0
    assert [r.action for r in same.runs] == ["skip", "resume"]
    assert calls[0][-2:] == ["data.test_batch_size=64", "train.threads=1"]
    # a run whose config.yaml is gone cannot be checked: exit 1, named
    (out / "estimator.o_end=2" / "config.yaml").unlink()
    assert main(["sweep", "estimator.o_end=2,3", "--out", str(out)]) == 1
    assert "sweep run 'estimator.o_end=2'" in capsys.readouterr().err


# --------------------------------------------------------------------------- report


def fixture_run(root, name, top1s, seed=0, snapshot=True, **settings):
    """A run directory as `reste train` writes it, with made-up but consistent numbers."""
    cfg = {
        "name": name,
        "seed": seed,
        "model": {
            "name": settings.get("model", "resnet20"),
            "precision": settings.get("precision", "1w1a"),
            "estimator": settings.get("estimator", "reste"),
            "kwargs": settings.get("kwargs", {}),
        },
        "estimator": {
            "o_end": settings.get("o_end", 3.0),
            "schedule": settings.get("schedule", "cosine"),
            "per": "epoch",
            "p": 2.0,
            "params": {},
        },
        "data": {"name": "fashion_mnist", "subset": 1000, "batch_size": 128},
        "train": {"epochs": len(top1s)},
        "out": {"dir": str(root), "name": name},
    }
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    o_end = cfg["estimator"]["o_end"]
    rows = []
    for epoch, top1 in enumerate(top1s, 1):
        rows.append(
            {
                "epoch": epoch,
                "test_top1": top1,
                "test_top5": top1 + 10,
                "o": 1 + (o_end - 1) * epoch / len(top1s),
                "est_error": 10.0 / epoch,
                "est_error_end": 6.0 / o_end + seed,
                "grad_instability": 0.1 * o_end * epoch,
            }
        )
    write_metrics(run, rows)
    best = max(top1s)
    (run / "summary.json").write_text(
        json.dumps(
            {
                "final_top1": top1s[-1],
                "best_top1": best,
                "best_epoch": top1s.index(best) + 1,
                "final_top5": top1s[-1] + 10,
                "best_top5": best + 10,
                "epochs": len(top1s),
                "seed": seed,
            }
        )
    )
    if snapshot:
        model = tiny_model(o=o_end, seed=seed)
        backward_once(model)
        IndicatorTracker(model, o_end=o_end).snapshot(run / "histograms" / f"epoch{len(top1s):04d}.npz")
    return run


def test_report_builds_the_seed_tables_and_figures(tmp_path):
    sweep = tmp_path / "sweep"
    for o_end in (1, 2, 3):
        for seed in (0, 1):
            fixture_run(sweep, f"prog{o_end}-{seed}", [60.0, 70.0 + o_end + seed], seed=seed, o_end=float(o_end))
    for o_end in (2, 3):
        for seed in (0, 1):
            fixture_run(
                sweep, f"fixed{o_end}-{seed}", [60.0, 65.0 + 2 * seed], seed=seed, o_end=float(o_end), schedule="fixed"
            )
    for way in ("linear", "power"):
        for seed in (0, 1):
            fixture_run(sweep, f"{way}-{seed}", [60.0, 72.0 + seed], seed=seed, schedule=way)
    for est in ("ste", "ede"):
        for seed in (0, 1):
            fixture_run(sweep, f"{est}-{seed}", [50.0, 68.0 + 4 * seed], seed=seed, estimator=est)
    vit = tmp_path / "vit"
    for label, extra in (
        ("fp", {"precision": "fp"}),
        ("dorefa", {"precision": "1w32a", "kwargs": {"weight_estimator": "dorefa"}}),
        ("reste", {"precision": "1w32a"}),
    ):
        fixture_run(vit, f"vit-{label}", [40.0, 55.0], model="vit_tiny", snapshot=False, **extra)
    # an unfinished run is listed but left out of the numbers
    (vit / "vit-unfinished").mkdir()
    write_metrics(vit / "vit-unfinished", [{"epoch": 1, "test_top1": 1.0}])

    report = build_report([sweep, vit], tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text()
    assert text == report.markdown
    assert "Left out, unfinished" in text and "vit-unfinished" in text
    for title in ("## Results", "## Table 2", "## Table 3", "## Estimator comparison", "## Table 1", "## Equilibrium"):
        assert title in text, title

    def row(section, first_cell):
        part = text.split(section, 1)[1].split("\n## ", 1)[0]
        return next(line for line in part.splitlines() if line.startswith(f"| {first_cell} |"))

    # Table 2, o_end = 3: progressive final = mean(73, 74) ± sd; fixed final = mean(65, 67)
    t2 = row("## Table 2", "3")
    assert "73.50 ± 0.71" in t2 and "66.00 ± 1.41" in t2 and "86.75" in t2 and "83.19" in t2
    # o = 1: only the progressive run exists; it doubles as fixed o = 1, marked
    assert "71.50 ± 0.71 *" in row("## Table 2", "1")
    # progressive minus fixed, paired by seed: (73 - 65, 74 - 67) = (8, 7): mean 7.5, t = 7.5 / (0.7071 / sqrt 2) = 15
    assert "+7.50 (t = 15.00, 2 seeds, p < 0.05)" in t2
    assert "+6.50 (t = 13.00, 2 seeds, p < 0.05)" in row("## Table 2", "2")  # (72 - 65, 73 - 67)
    assert "seeds" not in row("## Table 2", "1")  # o = 1 is one training, nothing to pair
    # Table 3 holds the cosine cell of the o_end sweep too
    assert "73.50 ± 0.71" in row("## Table 3", "cosine") and "86.59" in row("## Table 3", "power (p = 2)")
    # estimator comparison: mean(68, 72) ± sd(68, 72) = 70.00 ± 2.83, and the paper's STE number
    # rows use the docs' display names (STE, EDE; was the config's "ste", "ede")
    assert "70.00 ± 2.83" in row("## Estimator comparison", "STE") and "84.44" in row("## Estimator comparison", "STE")
    assert "| EDE |" in text and "| ede |" not in text
    # ReSTE (73, 74) minus STE (68, 72): (5, 2), mean 3.5, t = 3.5 / (2.1213 / sqrt 2) = 2.33 < 12.71: not significant
    assert "+3.50 (t = 2.33, 2 seeds) |" in row("## Estimator comparison", "STE")
    assert "seeds" not in row("## Estimator comparison", "ReSTE")
    assert "—" in row("## Table 1", "FP") or "64.50 (85.14)" in row("## Table 1", "FP")
    assert "53.05 (76.83)" in row("## Table 1", "DoReFa")
    # Figure 1 table: e = mean over epochs of est_error_end (6/o_end + seed), s = sum over epochs
    eq = row("## Equilibrium", "2")
    assert "3.5 ± 0.71" in eq  # seeds 0, 1: 3.0 and 4.0
    assert "0.6 ± 0" in eq  # 0.2 * (1 + 2) = 0.6 for both seeds
    # o_end = 3 has the best mean (73.5); o_end = 2 (72, 73) against it: (1, 1), the same difference on
    # both seeds: t is undefined, and two equal differences are no evidence of p < 0.05
    assert "o_end = 3 (best mean) minus it" in text and "+1.00 (the same on each of 2 seeds) |" in eq
    assert "seeds" not in row("## Equilibrium", "3").split("|")[-2]
    assert "paper (reported" in text
    names = sorted(p.name for p in report.figures)
    assert names == ["figure1_o_end.png", "figure2_distributions.png", "figure3_o_schedules.png"]
    for p in report.figures:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_paired_difference_and_t_against_numpy(tmp_path):
    from reste.analysis.cells import Cell, paired
    from reste.analysis.runs import load_run

    a_top1, b_top1 = [66.6, 63.9, 68.9, 68.1, 66.1], [65.0, 65.0, 67.9, 64.6, 65.8]
    a = Cell(
        [load_run(fixture_run(tmp_path, f"a{k}", [50.0, v], seed=k, snapshot=False)) for k, v in enumerate(a_top1)]
    )
    # b ran seeds 0-4 in another order, plus seed 7 that a lacks: pairing is by seed, not position
    b_runs = [fixture_run(tmp_path, f"b{k}", [50.0, b_top1[k]], seed=k, snapshot=False) for k in (3, 1, 4, 0, 2)]
    b = Cell(
        [load_run(r) for r in b_runs] + [load_run(fixture_run(tmp_path, "b7", [50.0, 10.0], seed=7, snapshot=False))]
    )
    d = np.array(a_top1) - np.array(b_top1)
    result = paired(a, b)
    assert result is not None and result.n == 5
    assert result.mean == pytest.approx(d.mean()) and result.t == pytest.approx(d.mean() / (d.std(ddof=1) / np.sqrt(5)))
    assert 1.3 < result.t < 1.5 and not result.significant  # 4 d.o.f.: needs |t| > 2.776
    same = paired(
        a,
        Cell(
            [
                load_run(fixture_run(tmp_path, f"c{k}", [50.0, v - 3.0], seed=k, snapshot=False))
                for k, v in enumerate(a_top1)
            ]
        ),
    )
    # every difference is +3.00: sd = 0, t undefined; no significance is claimed (it was "all seeds equal, p < 0.05")
    assert same is not None and same.t is None and not same.significant
    assert str(same) == "+3.00 (the same on each of 5 seeds)"
    assert paired(a, Cell([load_run(b_runs[0])])) is None  # one shared seed: no statistic


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path):
    empty = tmp_path / "not_a_run"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("hello")
    with pytest.raises(NotARunError, match="not_a_run is not a run directory"):
        build_report([empty], tmp_path / "out")
    with pytest.raises(NotARunError, match="does not exist"):
        build_report([tmp_path / "missing"], tmp_path / "out")

    from reste.cli import main

    assert main(["report", str(empty), "--out", str(tmp_path / "out")]) == 1  # an unusable input (reste.cli exit codes)
    assert not (tmp_path / "out").exists()


def test_report_reads_config_yaml_as_training_does_and_refuses_a_key_given_twice(tmp_path):
    fixture_run(tmp_path, "dup", [80.0], snapshot=False)
    path = tmp_path / "dup" / "config.yaml"
    path.write_text(path.read_text() + "seed: 1\n")  # seed is already there: yaml.safe_load would keep the last
    with pytest.raises(NotARunError, match="seed"):
        build_report([tmp_path / "dup"], tmp_path / "out")


def test_report_without_matplotlib_writes_tables_and_says_how_to_get_plots(tmp_path, monkeypatch):
    import reste.analysis.report as report_module

    run = fixture_run(tmp_path / "runs", "one", [50.0, 60.0], snapshot=False)
    monkeypatch.setattr(report_module, "_pyplot", lambda: None)
    report = build_report([run], tmp_path / "out")
    assert report.figures == [] and "pip install reste[plot]" in report.markdown
    assert "| fashion_mnist | resnet20 | 1/1 | ReSTE | cosine | 3 |" in report.markdown


def _edit_run(run, config=None, summary=None, rows=None):
    """Change a fixture run's config.yaml / summary.json (nested dicts merged one level) / metrics."""
    if config:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        for section, values in config.items():
            cfg.setdefault(section, {}).update(values)
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    if summary:
        data = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**data, **summary}))
    if rows is not None:
        write_metrics(run, rows)


def report_section(text, title):
    return "## " + text.split("## " + title, 1)[1].split("\n## ", 1)[0]


def table_rows(section):
    """The rows of a section's Markdown table as lists of stripped cells, the header first."""
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[:1] + lines[2:]]


def test_estimator_comparison_pairs_within_a_precision_and_shows_paper_numbers_only_for_their_setting(tmp_path):
    runs = tmp_path / "runs"
    for name, top1s, extra in (
        ("reste11", (74.0, 76.0), {}),
        ("ste11", (70.0, 71.0), {"estimator": "ste"}),
        ("reste132", (80.0, 83.0), {"precision": "1w32a"}),
        ("dorefa132", (79.0, 79.5), {"precision": "1w32a", "kwargs": {"weight_estimator": "dorefa"}}),
        ("fp", (85.0, 86.0), {"precision": "fp"}),  # model.estimator is still 'reste' in its config
    ):
        for seed, top1 in enumerate(top1s):
            fixture_run(runs, f"{name}-{seed}", [50.0, top1], seed=seed, snapshot=False, **extra)
    text = build_report([runs], tmp_path / "out", plots=False).markdown
    section = report_section(text, "Estimator comparison")
    # the heading names the precisions shown (was "1W/1A" above rows of three precisions)
    assert "\n## Estimator comparison, W/A 1/1, 1/32 and 32/32\n" in text
    header, *rows = table_rows(section)
    by = {(r[0], r[header.index("W/A")]): r for r in rows}
    assert sorted(by) == [("DoReFa", "1/32"), ("FP", "32/32"), ("ReSTE", "1/1"), ("ReSTE", "1/32"), ("STE", "1/1")]
    paper = header.index("paper (reported, CIFAR-10 ResNet-20 1W/1A)")
    # only the 1W/1A rows are the paper's setting (was 86.75 beside FP, the 1W/32A ReSTE and DoReFa too)
    assert {k: r[paper] for k, r in by.items()} == {
        ("ReSTE", "1/1"): "86.75",
        ("STE", "1/1"): "84.44",
        ("ReSTE", "1/32"): "—",
        ("DoReFa", "1/32"): "—",
        ("FP", "32/32"): "—",
    }
    diff = header.index("ReSTE minus it, same seeds and W/A")
    # 1/1: ReSTE (74, 76) minus STE (70, 71) = (4, 5): mean 4.5, t = 4.5 / (0.7071 / sqrt 2) = 9
    assert by[("STE", "1/1")][diff] == "+4.50 (t = 9.00, 2 seeds)"
    # 1/32: against ReSTE 1/32 (80, 83), not 1/1: (1, 3.5), mean 2.25, t = 2.25 / (1.7678 / sqrt 2) = 1.8
    assert by[("DoReFa", "1/32")][diff] == "+2.25 (t = 1.80, 2 seeds)"
    # no ReSTE at full precision: nothing to pair; ReSTE 1/32 is not "ReSTE minus ReSTE"
    assert by[("FP", "32/32")][diff] == "—" and by[("ReSTE", "1/32")][diff] == "—"

    # Tables 2 and 3 are the paper's 1W/1A ResNet-20 numbers too: a 1W/32A Table 3 gets none (was 86.80, ...)
    ways = tmp_path / "ways"
    for way in ("linear", "cosine"):
        fixture_run(ways, way, [50.0, 60.0], schedule=way, precision="1w32a", snapshot=False)
    header, *rows = table_rows(report_section(build_report([ways], tmp_path / "w", plots=False).markdown, "Table 3"))
    assert [r[header.index("paper (reported, CIFAR-10 ResNet-20 1W/1A)")] for r in rows] == ["—", "—"]


def test_indicator_aggregates_over_fewer_epochs_are_marked_not_mixed_silently(tmp_path):
    sweep = tmp_path / "sweep"
    for o_end in (1, 2, 3):
        for seed in (0, 1):
            fixture_run(sweep, f"p{o_end}-{seed}", [60.0, 70.0], seed=seed, o_end=float(o_end), snapshot=False)
    # the last step of epoch 1 was skipped as non-finite (train.nonfinite: skip): no indicators that epoch
    run = sweep / "p2-1"
    rows = read_metrics(run)
    rows[0].update(est_error=None, est_error_end=None, grad_instability=None)
    _edit_run(run, rows=rows)
    agg = reference_aggregates(run)
    assert (agg["grad_instability_sum"], agg["grad_instability_epochs"], agg["logged_epochs"]) == (0.4, 1, 2)
    section = report_section(build_report([sweep], tmp_path / "out", plots=False).markdown, "Equilibrium")
    header, *rows_ = table_rows(section)
    row = next(r for r in rows_ if r[0] == "2")
    s = row[header.index("grad. instability s (sum over epochs)")]
    # s: seed 0 over 2 epochs 0.2 + 0.4 = 0.6, seed 1 over epoch 2 only 0.4 (was "0.5 ± 0.14", unmarked)
    assert s == "0.5 ± 0.14 (seed 1: s over 1 of 2 epochs)"
    assert row[header.index("est. error e (mean over epochs, at o_end)")] == "3.5 ± 0.71 (seed 1: e over 1 of 2 epochs)"
    assert "train.nonfinite: skip" in section and "not comparable" in section
    full = next(r for r in rows_ if r[0] == "3")
    assert "over" not in full[header.index("grad. instability s (sum over epochs)")]


def test_report_names_the_runs_it_found_without_results_and_why(tmp_path, capsys):
    from reste.cli import main

    sweep = tmp_path / "sweep"
    fixture_run(sweep, "ok", [50.0, 60.0], snapshot=False)
    # stopped in its first epoch: config and a checkpoint, no summary.json or metrics.jsonl
    crashed = sweep / "crashed"
    (crashed / "checkpoints").mkdir(parents=True)
    (crashed / "checkpoints" / "last.pt").write_bytes(b"x")
    (crashed / "config.yaml").write_text("seed: 0\n")
    # stopped after epoch 1 of 2: metrics but no complete summary
    partial = fixture_run(sweep, "partial", [50.0, 60.0], snapshot=False)
    _edit_run(partial, summary={"complete": False}, rows=read_metrics(partial)[:1])
    (sweep / "logs").mkdir()
    (sweep / "logs" / "nodata.log").write_text("error: no data\n")
    listing = [
        {"name": "ok", "dir": "elsewhere/sweep/ok", "status": "done", "returncode": 0, "log": None},
        {"name": "nodata", "dir": "elsewhere/sweep/nodata", "status": "failed", "returncode": 1,
         "log": "elsewhere/sweep/logs/nodata.log"},
    ]  # fmt: skip
    (sweep / "sweep.json").write_text(json.dumps({"runs": listing}))
    report = build_report([sweep], tmp_path / "out", plots=False)
    # were silently missing (only runs with some results were listed)
    assert report.left_out == [
        f"`{sweep / 'nodata'}` (failed in sweep.json, exit 1, see {sweep / 'logs' / 'nodata.log'}; no run folder)",
        f"`{crashed}` (no summary.json or metrics.jsonl: it stopped before the end of its first epoch; "
        f"finish it with `reste train --resume {crashed}`)",
        f"`{partial}` (no complete summary.json: 1 of 2 epochs logged)",
    ]
    assert "1 finished run in 1 setting, from: " in report.markdown  # was "1 finished runs in 1 settings"
    assert "Left out, unfinished or failed (not counted): " + "; ".join(report.left_out) + "." in report.markdown
    assert main(["report", str(sweep), "--out", str(tmp_path / "cli"), "--no-plots"]) == 0
    assert f"left out: {sweep / 'nodata'} (failed in sweep.json, exit 1" in capsys.readouterr().out
    # no finished run at all: the error names what was found and why it does not count
    (sweep / "ok" / "summary.json").unlink()
    (sweep / "ok" / "metrics.jsonl").unlink()
    with pytest.raises(NotARunError, match="no finished run .*nodata \\(failed in sweep.json, exit 1"):
        build_report([sweep], tmp_path / "none", plots=False)


def test_report_says_a_run_is_still_training_rather_than_to_start_or_resume_it(tmp_path):
    # a run training right now was "stopped before its first checkpoint: start it again ... --force"
    # (or "finish it with reste train --resume", which would be refused: the run is in use)
    from reste.analysis.runs import load_run
    from reste.train.rundir import RunDirLock

    sweep = tmp_path / "sweep"
    fixture_run(sweep, "ok", [50.0, 60.0], snapshot=False)
    starting = sweep / "starting"
    (starting / "checkpoints").mkdir(parents=True)
    (starting / "config.yaml").write_text("seed: 0\n")
    partial = fixture_run(sweep, "partial", [50.0, 60.0], snapshot=False)
    _edit_run(partial, summary={"complete": False}, rows=read_metrics(partial)[:1])
    locks = [RunDirLock(starting), RunDirLock(partial)]
    for lock in locks:
        lock.acquire()
    try:
        with pytest.raises(NotARunError, match=f"still training \\(process {os.getpid()} holds its lock\\)"):
            load_run(starting)
        report = build_report([sweep], tmp_path / "out", plots=False)
        assert report.left_out == [
            f"`{partial}` (still training (process {os.getpid()}): 1 of 2 epochs logged so far)",
            f"`{starting}` (still training (process {os.getpid()}): no results yet, its first epoch has not ended)",
        ]
    finally:
        for lock in locks:
            lock.release()
    with pytest.raises(NotARunError, match="stopped before its first checkpoint"):  # once the process is gone
        load_run(starting)
    assert (
        "no complete summary.json: 1 of 2 epochs logged"
        in build_report([sweep], tmp_path / "o2", plots=False).left_out[0]
    )


def test_report_reads_a_folder_of_sweeps_and_says_how_to_give_deeper_folders(tmp_path):
    top = tmp_path / "sweeps"
    for name, o_ends in (("a", (1, 2)), ("b", (3,))):
        for o_end in o_ends:
            fixture_run(top / name, f"o{o_end}", [50.0, 60.0 + o_end], o_end=float(o_end), snapshot=False)
        (top / name / "sweep.json").write_text(json.dumps({"runs": []}))
    # was: "sweeps is not a run directory: it has neither summary.json nor metrics.jsonl"
    report = build_report([top, top], tmp_path / "out", plots=False)
    assert f"3 finished runs in 3 settings, from: `{top}` (the sweeps `{top / 'a'}`, `{top / 'b'}`)." in report.markdown
    assert "## Equilibrium" in report.markdown  # o_end 1, 2 and 3 from the two sweeps, pooled
    # folders of runs one level further down are not guessed at: the error names them and how to give them
    deeper = tmp_path / "deeper"
    fixture_run(deeper / "runs1", "r", [50.0, 60.0], snapshot=False)
    (deeper / "notes").mkdir()
    with pytest.raises(
        NotARunError, match=r"its folders runs1 hold runs or sweeps: give them \(e\.g\. `reste report .*deeper/\*"
    ):
        build_report([deeper], tmp_path / "out2")


def test_equilibrium_reference_column_says_when_means_tie(tmp_path):
    def header(top1s, name):
        for o_end, top1 in zip((1, 2, 3), top1s):
            fixture_run(tmp_path / name, f"o{o_end}", [50.0, top1], o_end=float(o_end), snapshot=False)
        text = build_report([tmp_path / name], tmp_path / f"out-{name}", plots=False).markdown
        return table_rows(report_section(text, "Equilibrium"))[0][-1]

    # was "o_end = 1 (best mean) minus it" when all three had 10.00
    assert header((10.0, 10.0, 10.0), "all") == "o_end = 1 (all o_end tie on mean final top-1) minus it, same seeds"
    assert header((10.0, 12.0, 12.0), "two") == "o_end = 2 (best mean, tied with o_end = 3) minus it, same seeds"
    assert header((10.0, 12.0, 11.0), "one") == "o_end = 2 (best mean) minus it, same seeds"


def test_tables_of_one_kind_name_the_settings_that_tell_them_apart(tmp_path):
    sweep = tmp_path / "sweep"
    for lr, top1 in ((0.002, 60.0), (0.01, 70.0)):  # the QA case: o_end swept at two learning rates
        for o_end in (1, 2, 3):
            run = fixture_run(sweep, f"o{o_end}-lr{lr}", [50.0, top1 + o_end], o_end=float(o_end), snapshot=False)
            _edit_run(run, config={"optim": {"lr": lr}})
    text = build_report([sweep], tmp_path / "out", plots=False).markdown
    headings = [line for line in text.splitlines() if line.startswith("## Equilibrium")]
    # were two identical headings over identical context lines
    assert headings == [
        "## Equilibrium: indicators and accuracy against o_end (seed Figure 1) — optim.lr=0.002",
        "## Equilibrium: indicators and accuracy against o_end (seed Figure 1) — optim.lr=0.01",
    ]
    first, second = text.split(headings[0], 1)[1].split(headings[1])
    assert "o schedule cosine, optim.lr=0.002. " in first and "| 63.00 |" in first
    assert "o schedule cosine, optim.lr=0.01. " in second and "| 73.00 |" in second
    # one table of its kind: nothing to tell apart, no suffix
    alone = build_report([sweep / "o1-lr0.01", sweep / "o2-lr0.01", sweep / "o3-lr0.01"], tmp_path / "one", plots=False)
    assert "## Equilibrium: indicators and accuracy against o_end (seed Figure 1)\n" in alone.markdown


def test_report_puts_the_scale_above_every_table_and_one_meaning_per_column(tmp_path):
    sweep = tmp_path / "sweep"
    for o_end in (1, 2, 3):
        for seed in (0, 1):
            run = fixture_run(sweep, f"p{o_end}-{seed}", [60.0, 70.0], seed=seed, o_end=float(o_end), snapshot=False)
            _edit_run(run, summary={"train_images": 512, "test_images": 102})  # what a real run records
    for name, extra in (("linear", {"schedule": "linear"}), ("ste", {"estimator": "ste"})):
        _edit_run(
            fixture_run(sweep, name, [60.0, 66.0], snapshot=False, **extra),
            summary={"train_images": 512, "test_images": 102},
        )
    fixture_run(
        sweep, "fixed3", [60.0, 65.0], o_end=3.0, schedule="fixed", snapshot=False
    )  # no summary counts: from data.subset
    report = build_report([sweep], tmp_path / "out", plots=False)
    text = report.markdown
    scale = "Scale: data set fashion_mnist, model resnet20, 512 training images, 102 test images, 2 epochs."
    for title in ("Results", "Table 2", "Table 3", "Estimator comparison", "Equilibrium"):
        section = report_section(text, title)
        assert section.index("\nScale") < section.index("\n|"), title  # above the table
        assert "Machine: not recorded (runs of a reste before 2026-12-02)." in section, title
    assert scale in report_section(text, "Equilibrium")
    # the machine of summary.json: named in the Scale line, with run counts when the runs differ
    xeon = {"device": "cpu", "cpu": "Intel Xeon", "cpu_family_model": "family 6 model 143", "torch_threads": 2,
            "torch": "2.13.0"}  # fmt: skip
    h200 = {"device": "cuda", "gpu": "NVIDIA H200", "cpu": "Intel Xeon", "torch": "2.13.0"}
    for run in sorted(sweep.iterdir()):
        _edit_run(run, summary={"machine": h200 if run.name == "ste" else xeon})
    text = build_report([sweep], tmp_path / "out2", plots=False).markdown
    machine = "Intel Xeon (family 6 model 143), cpu, 2 threads, torch 2.13.0"
    assert f"{scale} Machine: {machine}." in report_section(text, "Equilibrium")
    assert (
        "Machines (differ between the runs below): NVIDIA H200 (GPU), host CPU Intel Xeon, torch 2.13.0 (1 run); "
        f"{machine} (2 runs)."
    ) in report_section(text, "Estimator comparison")
    # the fixed run has no counts in its summary: 1000 images of data.subset, 1000 // 5 test images
    table2 = report_section(text, "Table 2")
    assert "Scale (differs between the runs below): " in table2
    assert "1,000 training images, 200 test images" in table2 and "512 training images, 102 test images" in table2
    # "seeds" holds the seed ids in every table (Tables 2 and 3 and the estimator comparison had no such
    # column: cosine over seeds 0,1 was compared with linear over seed 0 invisibly)
    seeds = {}
    for title in ("Results", "Equilibrium", "Table 2", "Table 3", "Estimator comparison"):
        header, *rows = table_rows(report_section(text, title))
        seeds[title] = {" ".join(row[:6]): row[header.index("seeds")] for row in rows}
    assert {k.split()[0]: v for k, v in seeds["Table 3"].items()} == {"linear": "0", "cosine": "0,1"}
    assert {k.split()[0]: v for k, v in seeds["Estimator comparison"].items()} == {"STE": "0", "ReSTE": "0,1"}
    # a row of unequal seeds names each cell's
    assert {k.split()[0]: v for k, v in seeds["Table 2"].items()} == {
        "1": "0,1",
        "2": "0,1",
        "3": "cosine 0,1; fixed 0",
    }
    assert set(seeds["Equilibrium"].values()) == {"0,1"} and "0,1" in seeds["Results"].values()


def test_report_prints_booleans_as_yes_and_no(tmp_path):
    for name, augment in (("aug", True), ("plain", False)):
        _edit_run(
            fixture_run(tmp_path / "runs", name, [50.0, 60.0], snapshot=False), config={"data": {"augment": augment}}
        )
    report = build_report([tmp_path / "runs"], tmp_path / "out", plots=False)
    header, _, *rows = [
        line for line in report_section(report.markdown, "Results").splitlines() if line.startswith("|")
    ]
    column = [c.strip() for c in header.strip("|").split("|")].index("data.augment")
    assert sorted(row.strip("|").split("|")[column].strip() for row in rows) == ["no", "yes"]


def test_report_says_which_tables_and_figures_it_did_not_draw_and_why(tmp_path, capsys):
    from reste.cli import main

    sweep = tmp_path / "sweep"
    for o_end in (1, 3):  # the issue's 2-cell sweep
        fixture_run(sweep, f"p{o_end}", [60.0, 70.0], o_end=float(o_end), snapshot=False)
    report = build_report([sweep], tmp_path / "out")
    assert report.figures == []
    equilibrium = next(line for line in report.not_drawn if line.startswith("Equilibrium table and Figures 1 and 2"))
    assert "3 or more o_end values" in equilibrium and "found estimator.o_end 1, 3" in equilibrium
    assert any(line.startswith("Figure 3") for line in report.not_drawn)
    assert any(line.startswith("Table 2") and "`fixed`" in line for line in report.not_drawn)
    for line in report.not_drawn:
        assert f"- {line}" in report.markdown
    assert main(["report", str(sweep), "--out", str(tmp_path / "cli")]) == 0
    assert f"not drawn: {equilibrium}" in capsys.readouterr().out
    assert "Figures: not drawn, --no-plots was given." in build_report([sweep], tmp_path / "np", plots=False).not_drawn
    # three o_end values: the table and Figure 1 are drawn; Figure 2 lacks snapshots and says so
    fixture_run(sweep, "p2", [60.0, 70.0], o_end=2.0, snapshot=False)
    report = build_report([sweep], tmp_path / "out3")
    assert [p.name for p in report.figures] == ["figure1_o_end.png"]
    assert any(line.startswith("Figure 2") and "histograms" in line for line in report.not_drawn)
    assert not any(line.startswith("Equilibrium") for line in report.not_drawn)


def test_figure3_shows_the_o_each_run_reached_on_its_schedule(tmp_path):
    from reste.analysis.report import Cell, load_run, o_points

    steps, epochs = 4, 2
    runs = tmp_path / "runs"
    for way in ("linear", "cosine"):
        schedule = reste.o_schedule(way, o_end=3.0)
        run = fixture_run(runs, way, [60.0, 70.0], schedule=way, snapshot=False)
        # as the trainer logs it per step: o of each epoch's last step, o_end never reached
        rows = [{"epoch": e, "test_top1": 60.0, "o": schedule((e * steps - 1) / (epochs * steps))} for e in (1, 2)]
        _edit_run(run, config={"estimator": {"per": "step"}}, summary={"steps_per_epoch": steps}, rows=rows)
        cell = Cell([load_run(run)])
        points = o_points(cell)
        assert [o for _, o in points] == [row["o"] for row in rows]
        assert all(schedule(r) == pytest.approx(o) for r, o in points)  # on the line, not below its end
        assert points[-1][0] == pytest.approx(7 / 8) and points[-1][1] < 3.0
        # an older run without steps_per_epoch: the same points, found on the schedule
        _edit_run(run, summary={"steps_per_epoch": None})
        found = o_points(Cell([load_run(run)]))
        assert [r for r, _ in found] == pytest.approx([r for r, _ in points], abs=1e-9) and [o for _, o in found] == [
            o for _, o in points
        ]
        _edit_run(run, summary={"steps_per_epoch": steps})
    # a linear run planned for 2 epochs, then extended to 4 (--resume train.epochs=4): its first two epochs
    # computed o over 2 epochs (logged 1.75 and 2.75 per step); they were drawn at r = 3/16 and 7/16, off the line
    linear = reste.o_schedule("linear", o_end=3.0)
    extended = fixture_run(tmp_path / "ext", "linear", [60.0, 70.0, 72.0, 74.0], schedule="linear", snapshot=False)
    logged = [linear(3 / 8), linear(7 / 8), linear(11 / 16), linear(15 / 16)]  # o of each epoch's last step
    _edit_run(
        extended,
        config={"estimator": {"per": "step"}, "train": {"extended_from": [2]}},
        summary={"steps_per_epoch": steps},
        rows=[{"epoch": e, "test_top1": 60.0, "o": o} for e, o in enumerate(logged, 1)],
    )
    points = o_points(Cell([load_run(extended)]))
    assert [r for r, _ in points] == pytest.approx([3 / 8, 7 / 8, 11 / 16, 15 / 16], abs=1e-9)
    assert all(linear(r) == pytest.approx(o) for r, o in points)
    report = build_report([runs], tmp_path / "out")
    assert [p.name for p in report.figures] == ["figure3_o_schedules.png"]
    reached = reste.o_schedule("cosine", o_end=3.0)(7 / 8)
    assert f"cosine {reached:.2f} (o_end 3)" in report.markdown and "reaches o_end only at r = 1" in report.markdown


def test_real_sweep_interrupted_then_restarted_trains_only_what_is_missing(tmp_path):
    """Two real tiny `reste train` runs; the sweep is stopped after the first and restarted."""
    grid = [
        "data.subset=256",
        "data.batch_size=64",
        "train.epochs=1",
        "train.threads=1",
        "model.name=resnet20",
        "analysis.histograms_at=[1]",
    ]
    out = tmp_path / "sweep"
    launched = []

    def stop_before_second(argv, log_path, env):
        if launched:
            raise KeyboardInterrupt  # as if Ctrl-C arrived while the first run was finishing
        launched.append(argv)
        return launch_subprocess(argv, log_path, env)

    first = Sweep(None, grid, out, seeds=[0, 1], launch=stop_before_second, poll_s=0.2)
    assert first.run(progress=None) == 130
    assert [r.status for r in first.runs] == ["done", "pending"], (out / "logs" / "seed=0.log").read_text()[-2000:]
    finished_at = (out / "seed=0" / "summary.json").stat().st_mtime_ns

    relaunched = []

    def recording(argv, log_path, env):
        relaunched.append(argv)
        return launch_subprocess(argv, log_path, env)

    second = Sweep(None, grid, out, seeds=[0, 1], launch=recording, poll_s=0.2)
    assert second.run(progress=None) == 0, (out / "logs" / "seed=1.log").read_text()[-2000:]
    assert [(r.action, r.status) for r in second.runs] == [("skip", "done"), ("start", "done")]
    assert len(relaunched) == 1 and "seed=1" in relaunched[0]
    assert (out / "seed=0" / "summary.json").stat().st_mtime_ns == finished_at  # not trained again
    for run in second.runs:
        summary = json.loads((run.path / "summary.json").read_text())
        assert summary["complete"] and summary["seed"] == int(run.name.split("=")[1])
        cfg = yaml.safe_load((run.path / "config.yaml").read_text())
        assert cfg["data"]["subset"] == 256 and cfg["out"]["name"] == run.name
        rows = read_metrics(run.path)
        assert len(rows) == 1 and rows[0]["est_error_end"] > 0 and rows[0]["grad_instability"] > 0
        assert (run.path / "histograms" / "epoch0001.npz").is_file()
    # and the report reads the real sweep, with the images the runs used
    report = build_report([out], tmp_path / "report", plots=False)
    assert "| fashion_mnist | resnet20 | 1/1 | ReSTE | cosine | 3 |" in report.markdown
    assert (
        "Scale: data set fashion_mnist, model resnet20, 256 training images, 51 test images, 1 epoch."
        in report.markdown
    )


def test_indicator_cost_times_a_step_measure_and_snapshot():
    from reste.analysis.cost import indicator_cost

    model = tiny_model()
    torch.manual_seed(0)
    result = indicator_cost(model, torch.randn(4, 1, 5, 5), torch.randint(0, 3, (4,)), reps=2)
    assert result["binary_layers"] == 2
    assert result["binary_weights"] == model[2].weight.numel() + model[5].weight.numel()
    assert result["step_s"] > 0 and result["measure_s"] > 0 and result["snapshot_s"] > 0
    assert result["measure_per_step"] == pytest.approx(result["measure_s"] / result["step_s"])


def test_indicator_cost_command_takes_model_options_and_says_what_is_wrong(capsys):
    # --model vit_tiny crashed with a traceback (patch 16 does not divide 28) and had no way to pass options
    from reste.analysis.cost import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "vit_tiny", "--reps", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "cannot build vit_tiny for fashion_mnist: patch_size=16 does not divide image_size=28" in err
    assert "give its options with --kwargs" in err
    with pytest.raises(SystemExit):
        main(["--model", "vit_tiny", "--kwargs", "[7]"])
    assert "--kwargs must be a YAML mapping" in capsys.readouterr().err
    kwargs = "{patch_size: 7, dim: 16, depth: 1, heads: 2, mlp_dim: 16}"
    assert main(["--model", "vit_tiny", "--kwargs", kwargs, "--batch", "2", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    # qkv, proj, fc1, fc2 of the one block: 16*48 + 16*16 + 16*16 + 16*16 binary weights
    assert "vit_tiny 1w1a, batch 2 of 1x28x28, 1 thread(s): 4 binary layers, 1,536 binary weights" in out


def test_report_treats_an_option_a_run_predates_as_its_default(tmp_path):
    from reste.train.config import Config

    default_threads = Config().train.threads
    old = fixture_run(tmp_path / "runs", "old", [50.0, 60.0], seed=0, snapshot=False)
    new = fixture_run(tmp_path / "runs", "new", [50.0, 62.0], seed=1, snapshot=False)
    cfg = yaml.safe_load((new / "config.yaml").read_text())
    cfg["train"]["threads"] = default_threads  # written by a newer trainer that knows the option
    (new / "config.yaml").write_text(yaml.safe_dump(cfg))
    report = build_report([old, new], tmp_path / "out", plots=False)
    assert "61.00 ± 1.41" in report.markdown  # one cell, two seeds


def test_report_counts_a_copied_run_once_and_ignores_options_that_cannot_change_results(tmp_path, capsys):
    import shutil

    from reste.cli import main

    runs = tmp_path / "runs"
    one = fixture_run(runs, "one", [40.0, 49.39], seed=0, snapshot=False)
    shutil.copytree(one, runs / "one-copy")  # the QA case: two copies of one run
    fixture_run(runs, "seed1", [40.0, 51.0], seed=1, snapshot=False)
    # the same setting, checkpointed more often and tested in other batches: one more seed of the same cell
    _edit_run(
        fixture_run(runs, "seed2", [40.0, 53.0], seed=2, snapshot=False),
        config={
            "train": {"checkpoint_every_steps": 5, "threads": 1},
            "data": {"test_batch_size": 100},
            "analysis": {"every_steps": 1, "histograms_at": [1]},  # measuring more often trains the same
        },
    )
    assert main(["report", str(runs), "--out", str(tmp_path / "rep"), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert f"duplicate: {runs / 'one-copy'} has the same setting and seed (0) as {one}; only {one} is counted" in out
    text = (tmp_path / "rep" / "report.md").read_text()
    results = report_section(text, "Results")
    # was: seeds "0,0" and 49.39 ± 0.00 for the copies, and a separate row for the checkpoint_every_steps run
    rows = [line for line in results.splitlines() if line.startswith("| fashion_mnist")]
    assert len(rows) == 1 and "| 0,1,2 | 51.13 ± 1.81 |" in rows[0]  # mean and sd of 49.39, 51, 53
    assert "3 finished runs in 1 setting," in text and "Counted once" in text
    # a copy whose numbers differ (another machine) says so; the folder given twice is not a duplicate
    _edit_run(runs / "one-copy", summary={"final_top1": 48.0})
    report = build_report([runs, one], tmp_path / "rep2", plots=False)
    assert len(report.duplicates) == 1 and "the run left out has 48.00" in report.duplicates[0]
    # the same training at another thread count: not a copy, and which one counts does not depend on the
    # order of the report's arguments (it did: the first given won, and a t-statistic moved with it)
    machine = {"device": "cpu", "gpu": None, "cpu": "Some CPU", "cpu_family_model": None, "torch": "2.13.0"}
    _edit_run(one, summary={"machine": dict(machine, torch_threads=2)})
    _edit_run(runs / "one-copy", summary={"machine": dict(machine, torch_threads=1)})
    other = tmp_path / "elsewhere"
    shutil.move(str(runs / "one-copy"), other)
    forward = build_report([runs, other], tmp_path / "rep3", plots=False)
    backward = build_report([other, runs], tmp_path / "rep4", plots=False)

    def rows(report):
        return [line for line in report_section(report.markdown, "Results").splitlines() if line.startswith("| ")]

    assert rows(forward) == rows(backward) and any("| 0,1,2 |" in row for row in rows(forward))
    assert forward.duplicates == backward.duplicates and len(forward.duplicates) == 1
    assert f"only `{other}` is counted" in forward.duplicates[0]  # the first by path: /.../elsewhere < /.../runs/one
    assert "2 threads" in forward.duplicates[0] and "1 thread" in forward.duplicates[0]
    assert "which round differently (not a copy)" in forward.duplicates[0]


def test_report_errors_name_the_output_the_damaged_file_and_an_unfinished_run(tmp_path, capsys):
    from reste.cli import main

    run = fixture_run(tmp_path / "runs", "r", [40.0, 50.0], snapshot=False)
    afile = tmp_path / "afile"
    afile.write_text("x")
    # was: a NotADirectoryError traceback
    for out in (afile, afile / "sub"):
        assert main(["report", str(run), "--out", str(out), "--no-plots"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out} ") and "an existing file, not a directory" in err
    assert afile.read_text() == "x"

    # a damaged metrics.jsonl and no summary.json: was a ValueError traceback from rundir.read_metrics
    (run / "summary.json").unlink()
    (run / "metrics.jsonl").write_text('{"epoch": 1, "test_top1": 40.0}\n{"epoch": 2, "test_')
    assert main(["report", str(run), "--out", str(tmp_path / "rep"), "--no-plots"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run / 'metrics.jsonl'}, line 2: not valid JSON") and len(err.splitlines()) == 1
    (run / "metrics.jsonl").write_text("[1, 2]\n")
    with pytest.raises(NotARunError, match="row 1: not a JSON object"):
        build_report([run], tmp_path / "rep")

    # a run stopped before its first epoch ended: only checkpoints/last.pt (was: "not a run directory")
    early = tmp_path / "early5"
    (early / "checkpoints").mkdir(parents=True)
    (early / "checkpoints" / "last.pt").write_bytes(b"x")
    (early / "config.yaml").write_text("seed: 0\n")
    assert main(["report", str(early), "--out", str(tmp_path / "rep"), "--no-plots"]) == 1
    err = capsys.readouterr().err
    assert f"{early} is an unfinished run" in err and f"`reste train --resume {early}`" in err
    (early / "checkpoints" / "last.pt").unlink()  # killed during set-up: nothing to resume
    with pytest.raises(NotARunError, match="stopped before its first checkpoint"):
        build_report([early], tmp_path / "rep")
    assert not (tmp_path / "rep").exists()


def test_a_sweep_rerun_reuses_imagenet_runs_that_recorded_their_trees_class_count(tmp_path):
    # a run on a tree of 3 class folders writes data.num_classes: 3 into its config.yaml; the sweep
    # gives none (the count comes from the data), so re-running the sweep must reuse the run
    import yaml

    from reste.analysis.sweep import SweepMismatchError

    out, calls = tmp_path / "sw", []
    grid = ["estimator.o_end=2,3", "data.name=imagenet"]
    assert Sweep(None, grid, out, launch=fake_launcher(calls), poll_s=0).run(progress=None) == 0
    for config in out.glob("*/config.yaml"):
        saved = yaml.safe_load(config.read_text())
        saved["data"]["num_classes"] = 3
        config.write_text(yaml.safe_dump(saved))
    calls.clear()
    assert Sweep(None, grid, out, launch=fake_launcher(calls), poll_s=0).run(progress=None) == 0 and calls == []
    with pytest.raises(SweepMismatchError, match="data.num_classes: 3 -> 5"):  # a count given is compared
        Sweep(None, [*grid, "data.num_classes=5"], out, launch=fake_launcher(calls), poll_s=0)


def test_report_of_runs_reads_the_sweeps_beside_loose_runs_and_names_plain_folders(tmp_path):
    # with the defaults, runs/ holds reste train's run folders beside reste sweep's sweep folders:
    # the sweeps were dropped without a word as soon as one loose run was there
    top = tmp_path / "runs"
    fixture_run(top, "loose", [50.0, 61.0], o_end=3.0, snapshot=False)
    for o_end in (1, 2):
        fixture_run(top / "sweep-a", f"o{o_end}", [50.0, 60.0 + o_end], o_end=float(o_end), snapshot=False)
    (top / "sweep-a" / "sweep.json").write_text(json.dumps({"runs": []}))
    fixture_run(top / "plain", "p", [50.0, 55.0], o_end=2.0, snapshot=False)  # a folder of runs, no sweep.json
    report = build_report([top], tmp_path / "out", plots=False)
    assert f"3 finished runs in 3 settings, from: `{top}` (the sweeps `{top / 'sweep-a'}`)." in report.markdown
    (plain,) = [line for line in report.left_out if "plain" in line]
    assert "a folder of runs, not read (inside runs/ only sweep folders are): add it to the command" in plain


def test_full_precision_runs_of_a_sweep_over_estimators_form_one_cell(tmp_path):
    # model.estimator=ste,reste x model.precision=1w1a,fp gave two identical FP rows
    from reste.analysis.runs import load_run

    sweep = tmp_path / "sweep"
    for estimator in ("ste", "reste"):
        for precision, top1 in (("1w1a", 60.0), ("fp", 70.0)):
            for seed in (0, 1):
                fixture_run(
                    sweep,
                    f"{estimator}-{precision}-{seed}",
                    [50.0, top1 + seed],
                    seed=seed,
                    estimator=estimator,
                    precision=precision,
                    snapshot=False,
                )
    runs = [load_run(p) for p in sorted(sweep.iterdir())]
    assert len({r.setting for r in runs}) == 3  # STE 1W/1A, ReSTE 1W/1A, FP
    assert len({r.setting for r in runs if r.get("model.precision") == "fp"}) == 1


def test_fp_runs_are_one_cell_whatever_their_o_schedule_and_stand_in_every_estimator_comparison(tmp_path):
    # a sweep over precision x o_end x schedule gave one FP row per (o_end, schedule), though FP has no o
    sweep = tmp_path / "sweep"
    for o_end in (2.0, 4.0):
        for schedule in ("cosine", "fixed"):
            fixture_run(sweep, f"fp-{o_end:g}-{schedule}", [80.0, 85.0], precision="fp", o_end=o_end,
                        schedule=schedule, snapshot=False)  # fmt: skip
        for estimator, top1 in (("reste", 70.0), ("ste", 65.0)):
            fixture_run(sweep, f"{estimator}-{o_end:g}", [50.0, top1 + o_end], estimator=estimator, o_end=o_end,
                        snapshot=False)  # fmt: skip
    report = build_report([sweep], tmp_path / "out", plots=False)
    results = table_rows(report_section(report.markdown, "Results"))
    assert [r[3] for r in results[1:]].count("FP") == 1
    # one comparison per o_end, each with the FP row; the context line names the binary rows' o_end, not FP's
    sections = [s for s in report.sections if s.startswith("## Estimator comparison")]
    assert len(sections) == 2
    for section, o_end in zip(sections, ("2", "4")):
        header, *rows = table_rows(section)
        assert sorted(r[0] for r in rows) == ["FP", "ReSTE", "STE"]
        assert f"o_end {o_end}" in section and f"estimator.o_end={o_end}" in section.splitlines()[0]
    # no Table 2 or 3 made of FP runs alone (FP at fixed and cosine, at two o_end, was drawn as Table 2)
    assert not any(s.startswith(("## Table 2", "## Table 3")) for s in report.sections)


def test_the_power_exponent_splits_only_power_runs(tmp_path):
    # estimator.p acts only in the power way: linear and cosine runs with another p are the same runs,
    # and stand beside each power row; two exponents give two Table 3s told apart by p
    ways = tmp_path / "ways"
    for way, p, top1 in (("linear", 3.0, 60.0), ("cosine", 2.0, 61.0), ("power", 2.0, 62.0), ("power", 3.0, 63.0)):
        run = fixture_run(ways, f"{way}-{p:g}", [50.0, top1], schedule=way, snapshot=False)
        _edit_run(run, config={"estimator": {"p": p}})
    report = build_report([ways], tmp_path / "out", plots=False)
    tables = [s for s in report.sections if s.startswith("## Table 3")]
    assert [s.splitlines()[0] for s in tables] == [
        "## Table 3: tuning ways of the progressive strategy — estimator.p=2",
        "## Table 3: tuning ways of the progressive strategy — estimator.p=3",
    ]
    paper = "paper (reported, CIFAR-10 ResNet-20 1W/1A)"
    for section, p, top1, reported in zip(tables, ("2", "3"), ("62.00", "63.00"), ("86.59", "—")):
        header, *rows = table_rows(section)
        named = {r[0]: r for r in rows}
        assert list(named) == ["linear", "cosine", f"power (p = {p})"]
        assert named[f"power (p = {p})"][header.index("final top-1 (%)")] == top1
        # the seed gives no formula for its power way: its number stands beside p = 2, this project's default
        assert named[f"power (p = {p})"][header.index(paper)] == reported
    results = table_rows(report_section(report.markdown, "Results"))
    header = results[0]
    assert [r[header.index("estimator.p")] for r in results[1:]] == ["—", "—", "2", "3"]


def test_cells_standing_in_several_families_give_no_duplicate_or_spurious_tables(tmp_path):
    # found by review: fixed/cosine runs (no p) stood beside power runs at p = 2 and p = 3 (one o_end each),
    # so Table 2 came out twice, byte-identical; an o_end/schedule sweep with one FP run gave one
    # "estimator comparison" per o_end (ReSTE and FP only); a power way missing at one learning rate
    # gave headings "estimator.p=(unset)"
    sweep = tmp_path / "sweep"
    for o_end in (2.0, 3.0, 4.0):
        for seed in (0, 1):
            fixture_run(sweep, f"cos{o_end:g}-{seed}", [50.0, 70.0 + o_end + seed], seed=seed, o_end=o_end,
                        snapshot=False)  # fmt: skip
            fixture_run(sweep, f"fix{o_end:g}-{seed}", [50.0, 60.0 + o_end + seed], seed=seed, o_end=o_end,
                        schedule="fixed", snapshot=False)  # fmt: skip
    for p in (2.0, 3.0):
        for seed in (0, 1):
            run = fixture_run(sweep, f"pow{p:g}-{seed}", [50.0, 75.0 + p + seed], seed=seed, schedule="power",
                              snapshot=False)  # fmt: skip
            _edit_run(run, config={"estimator": {"p": p}})
    for seed in (0, 1):
        fixture_run(sweep, f"zfp-{seed}", [50.0, 90.0 + seed], seed=seed, precision="fp", snapshot=False)
    headings = [s.splitlines()[0] for s in build_report([sweep], tmp_path / "out", plots=False).sections]
    assert headings.count("## Table 2: fixed vs progressive o") == 1
    # FP beside the ReSTE cell its config names (cosine, o_end 3): one comparison, as before FP could join any
    assert [h for h in headings if h.startswith("## Estimator comparison")] == [
        "## Estimator comparison, W/A 1/1 and 32/32"
    ]

    ways = tmp_path / "ways"
    for lr in (0.1, 0.01):
        for way in ("linear", "cosine", "power") if lr == 0.1 else ("linear", "cosine"):
            _edit_run(fixture_run(ways, f"{way}-{lr}", [50.0, 70.0], schedule=way, snapshot=False),
                      config={"optim": {"lr": lr}})  # fmt: skip
    headings = [s.splitlines()[0] for s in build_report([ways], tmp_path / "w", plots=False).sections]
    assert [h for h in headings if h.startswith("## Table 3")] == [
        "## Table 3: tuning ways of the progressive strategy — optim.lr=0.01",
        "## Table 3: tuning ways of the progressive strategy — optim.lr=0.1",
    ]


def test_dorefa_rows_that_differ_in_their_input_estimator_say_so(tmp_path):
    runs = tmp_path / "runs"
    for name, estimator, top1 in (("dorefa-ste", "ste", 64.0), ("dorefa-reste", "reste", 66.0)):
        fixture_run(runs, name, [50.0, top1], estimator=estimator, kwargs={"weight_estimator": "dorefa"},
                    snapshot=False)  # fmt: skip
    fixture_run(runs, "reste", [50.0, 70.0], snapshot=False)
    section = report_section(build_report([runs], tmp_path / "out", plots=False).markdown, "Estimator comparison")
    assert sorted(r[0] for r in table_rows(section)[1:]) == ["DoReFa (inputs ReSTE)", "DoReFa (inputs STE)", "ReSTE"]


def test_review_follow_ups_weights_rows_table2_power_column_and_partial_separators(tmp_path):
    # rows that differ in model.kwargs.weight_estimator were both "ReSTE" (the variant paired as ReSTE minus
    # ReSTE, with the paper's 86.75); DoReFa ViTs at 1W/32A differing only in the unused model.estimator were two
    # rows "DoReFa (inputs ...)"; Table 2's power columns did not say p; a way missing at one lr read "p=(unset)"
    runs = tmp_path / "weights"
    for seed in (0, 1):
        fixture_run(runs, f"reste-{seed}", [50.0, 70.0 + seed], seed=seed, snapshot=False)
        fixture_run(runs, f"wste-{seed}", [50.0, 68.0 + 2 * seed], seed=seed, kwargs={"weight_estimator": "ste"},
                    snapshot=False)  # fmt: skip
        fixture_run(runs, f"ste-{seed}", [50.0, 66.0 + seed], seed=seed, estimator="ste", snapshot=False)
    header, *rows = table_rows(
        report_section(build_report([runs], tmp_path / "o1", plots=False).markdown, "Estimator comparison")
    )
    named = {r[0]: r for r in rows}
    paper = header.index("paper (reported, CIFAR-10 ResNet-20 1W/1A)")
    diff = header.index("ReSTE minus it, same seeds and W/A")
    assert (named["ReSTE (weights ReSTE)"][paper], named["ReSTE (weights STE)"][paper]) == ("86.75", "—")
    assert named["ReSTE (weights STE)"][diff] == "+1.50 (t = 3.00, 2 seeds)"  # against the plain ReSTE row

    vit = tmp_path / "vit"
    for name, extra in (("dorefa-ste", {"estimator": "ste"}), ("dorefa-reste", {})):
        fixture_run(vit, name, [50.0, 61.0], model="vit_tiny", precision="1w32a", kwargs={"weight_estimator": "dorefa"},
                    snapshot=False, **extra)  # fmt: skip
    fixture_run(vit, "reste", [50.0, 65.0], model="vit_tiny", precision="1w32a", snapshot=False)
    report = build_report([vit], tmp_path / "o2", plots=False)
    assert [r[0] for r in table_rows(report_section(report.markdown, "Table 1"))[1:]] == ["DoReFa", "ReSTE"]
    assert len(report.duplicates) == 1  # the two DoReFa runs are one training: real inputs, no estimator

    table2 = tmp_path / "table2"
    for o_end in (2.0, 3.0):
        for way in ("fixed", "cosine", "power"):
            fixture_run(table2, f"{way}-{o_end:g}", [50.0, 70.0], o_end=o_end, schedule=way, snapshot=False)
    header = table_rows(report_section(build_report([table2], tmp_path / "o3", plots=False).markdown, "Table 2"))[0]
    assert "progressive (power, p = 2) final" in header

    ways = tmp_path / "ways"
    for lr, p in ((0.1, 2.0), (0.1, 3.0), (0.01, None)):
        for way in ("linear", "cosine", "power") if p else ("linear", "cosine"):
            run = fixture_run(ways, f"{way}-{lr}-{p}", [50.0, 70.0], schedule=way, snapshot=False)
            _edit_run(run, config={"optim": {"lr": lr}, "estimator": {"p": p or 2.0}})
    headings = [s.splitlines()[0] for s in build_report([ways], tmp_path / "o4", plots=False).sections]
    assert [h.split(" — ")[1] for h in headings if h.startswith("## Table 3")] == [
        "optim.lr=0.01",
        "estimator.p=2, optim.lr=0.1",
        "estimator.p=3, optim.lr=0.1",
    ]


def test_estimator_rows_that_differ_only_in_estimator_params_name_them(tmp_path):
    runs = tmp_path / "runs"
    fixture_run(runs, "reste", [50.0, 70.0], snapshot=False)
    fixture_run(runs, "dsq", [50.0, 66.0], estimator="dsq", snapshot=False)
    run = fixture_run(runs, "dsq-alpha", [50.0, 64.0], estimator="dsq", snapshot=False)
    _edit_run(run, config={"estimator": {"params": {"alpha": 0.5}}})
    section = report_section(build_report([runs], tmp_path / "out", plots=False).markdown, "Estimator comparison")
    header, *rows = table_rows(section)
    paper = header.index("paper (reported, CIFAR-10 ResNet-20 1W/1A)")
    assert {r[0]: r[paper] for r in rows} == {"DSQ (defaults)": "84.11", "DSQ (alpha=0.5)": "—", "ReSTE": "86.75"}


def test_runs_without_their_config_are_left_out_not_pooled_and_a_sweep_given_twice_lists_its_left_out_once(
    tmp_path,
):
    runs = tmp_path / "runs"
    kept = fixture_run(runs, "kept", [50.0, 70.0], snapshot=False)
    for name, top1 in (("lost-a", 60.0), ("lost-b", 80.0)):
        (fixture_run(runs, name, [50.0, top1], estimator="ste", snapshot=False) / "config.yaml").write_text("")
    unfinished = fixture_run(runs, "unfinished", [50.0], snapshot=False)
    (unfinished / "summary.json").unlink()
    (runs / "sweep.json").write_text(json.dumps({"runs": []}))  # a sweep, given itself and through its parent
    report = build_report([runs, runs.parent], tmp_path / "out", plots=False)
    assert "1 finished run in 1 setting" in report.markdown
    left = "\n".join(report.left_out)
    assert left.count("lost-a") == 1 and left.count("lost-b") == 1 and left.count("unfinished") == 1
    assert "config.yaml is missing or empty" in left and "checkpoints/last.pt" in left
    assert str(kept) not in left


def test_model_options_written_out_at_their_default_are_the_run_that_left_them_out(tmp_path):
    # model.kwargs {width: 1} and {} and {width: 1.0} were three cells; an explicit downsample: avgpool two
    from reste.analysis.runs import load_run

    runs = tmp_path / "runs"
    for name, kwargs in (("none", {}), ("int", {"width": 1}), ("float", {"width": 1.0}), ("half", {"width": 0.5})):
        fixture_run(runs, name, [50.0, 60.0], kwargs=kwargs, snapshot=False)
    for name, kwargs in (("r18", {}), ("r18-avg", {"downsample": "avgpool"}), ("r18-stride", {"downsample": "stride"})):
        fixture_run(runs, name, [50.0, 60.0], model="resnet18", kwargs=kwargs, snapshot=False)
    settings = {p.name: load_run(p).setting for p in runs.iterdir()}
    assert settings["none"] == settings["int"] == settings["float"] != settings["half"]
    assert settings["r18"] == settings["r18-avg"] != settings["r18-stride"]
    # the Results table shows the option that varies, with its default value where it was left out
    results = table_rows(report_section(build_report([runs], tmp_path / "out", plots=False).markdown, "Results"))
    header, rows = results[0], results[1:]
    assert sorted(r[header.index("model.kwargs.width")] for r in rows if r[1] == "resnet20") == ["0.5", "1"]
    assert sorted(r[header.index("model.kwargs.downsample")] for r in rows if r[1] == "resnet18") == [
        "avgpool",
        "stride",
    ]


def test_equal_differences_one_image_apart_claim_no_significance():
    # 100 * correct / count is unrounded: equal per-seed differences came out 1e-14 apart and read
    # "+0.02 (t = 2814749767107.00, 2 seeds, p < 0.05)"
    from reste.analysis.cells import Cell, paired
    from reste.analysis.runs import RunRecord

    def cell(top1s):
        return Cell([RunRecord(Path(f"r{s}"), {"seed": s}, {"final_top1": v}, []) for s, v in enumerate(top1s)])

    a, b = cell([100 * 8677 / 10000, 100 * 8512 / 10000]), cell([100 * 8675 / 10000, 100 * 8510 / 10000])
    result = paired(a, b)
    assert result.t is None and str(result) == "+0.02 (the same on each of 2 seeds)"
