"""benchmarks/bench_train.py: the issue-17 target checks (on synthetic results) and a quick CPU run
of its code path. The numbers of a quick run mean nothing; only that it runs and what it records."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_train  # noqa: E402


def test_parse_models_takes_a_batch_per_model():
    assert bench_train.parse_models("resnet20, vgg_small,resnet18:256", 128) == [
        ("resnet20", 128),
        ("vgg_small", 128),
        ("resnet18", 256),
    ]
    assert bench_train.shape_of("resnet18") == (224, 1000) and bench_train.shape_of("resnet20") == (32, 10)


def test_targets_are_checked_on_cuda_only_and_against_issue_17s_bounds():
    def row(model, mode, batch, ratio, peak=None, triton=True):
        r = {"model": model, "mode": mode, "batch": batch, "ratio": ratio, "triton": triton}
        if peak is not None:
            r["cuda_peak_ratio"] = peak
        return r

    results = {
        "machine": {"device": "cuda"},
        "train_step": [
            row("resnet20", "eager", 128, 0.81, peak=1.02),
            row("resnet20", "eager", 128, 0.40, peak=1.02, triton=False),  # the kernels off: not a target row
            row("vgg_small", "compiled", 128, 0.94, peak=1.12),
            row("resnet18", "eager", 256, 0.95, peak=1.10),
            row("resnet20", "eager", 64, 0.10),  # another batch: no target
        ],
        "estimator": [{"elements": 2_000_000, "path": "triton", "ratio": 1.49, "triton": True}],
    }
    targets = {t["what"]: t for t in bench_train.check_targets(results)}
    assert len(targets) == 7
    assert targets["resnet20 eager batch 128 binary/float throughput"]["met"]
    assert not targets["vgg_small compiled batch 128 binary/float throughput"]["met"]  # 0.94 < 0.95
    assert targets["resnet18 eager batch 256 binary/float throughput"]["met"]  # 0.95 >= 0.95
    assert not targets["vgg_small compiled batch 128 peak memory binary/float"]["met"]  # 1.12 > 1.1
    assert targets["resnet18 eager batch 256 peak memory binary/float"]["met"]
    assert targets["estimator fwd+bwd 2000000 elements, ReSTE/bare clipped STE (triton)"]["met"]
    results["machine"]["device"] = "cpu"
    assert bench_train.check_targets(results) == []


def test_quick_cpu_run_records_every_field(tmp_path):
    out = tmp_path / "quick.json"
    bench_train.main(["--device", "cpu", "--quick", "--models", "resnet20", "--modes", "eager", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["quick"] is True and data["machine"]["device"] == "cpu" and data["targets"] == []
    (row,) = data["train_step"]
    assert (row["model"], row["batch"], row["mode"]) == ("resnet20", 4, "eager")
    assert row["binary_img_s"] > 0 and row["float_img_s"] > 0 and row["saved_mib_binary"] > 0
    assert data["estimator"][0]["elements"] == 200_000
    assert data["machine"]["kernel_path"] in ("c", "torch")
