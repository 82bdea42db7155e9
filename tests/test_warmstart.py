"""Training recipes of the BNN literature: start from a float run (model.init_from) and distil
from a float teacher (train.teacher). Tiny runs on generated Fashion-MNIST files."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import reste
from data_fixtures import make_idx_dataset
from reste.nn.weights import load_float_weights
from reste.train import trainer as T
from reste.train.checkpoint import CheckpointError
from reste.train.config import ConfigError, config_from_dict
from reste.train.distill import distillation_loss


# ----------------------------------------------------------------------------- loading float weights
def test_float_resnet_loads_into_binary_one_completely():
    torch.manual_seed(0)
    fp = reste.models.create("resnet20", in_channels=1, precision="fp")
    binary = reste.models.create("resnet20", in_channels=1, precision="1w1a")
    fresh_o = {k: v.clone() for k, v in binary.state_dict().items() if "estimator" in k}
    report = load_float_weights(binary, fp.state_dict())
    assert report.complete and len(report.copied) == len(fp.state_dict())
    for key, value in fp.state_dict().items():
        assert torch.equal(binary.state_dict()[key], value), key
    assert fresh_o and all(torch.equal(binary.state_dict()[k], v) for k, v in fresh_o.items())  # estimators untouched
    # a plain load_state_dict fails on exactly these keys: what the report leaves out on purpose
    with pytest.raises(RuntimeError, match="weight_estimator"):
        binary.load_state_dict(fp.state_dict())


def test_report_names_what_does_not_fit():
    src = reste.models.create("resnet20", in_channels=1, num_classes=10, precision="1w32a").state_dict()
    src["extra.weight"] = torch.zeros(3)
    model = reste.models.create("resnet20", in_channels=1, num_classes=5, precision="1w1a")
    report = load_float_weights(model, src)
    assert report.unexpected == ["extra.weight"]
    assert [k for k, _, _ in report.mismatched] == ["head.fc.weight", "head.fc.bias"]
    assert report.mismatched[0][1:] == ((10, 64), (5, 64))
    assert report.estimator_state_skipped and all("estimator" in k for k in report.estimator_state_skipped)
    text = str(report)
    assert "head.fc.weight (source [10, 64], model [5, 64])" in text and "extra.weight" in text


def test_torch_attention_checkpoint_starts_binarized_attention():
    torch.manual_seed(1)
    layer = lambda: nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)  # noqa: E731
    float_model, binary = (
        nn.Sequential(layer(), nn.Linear(16, 3)),
        reste.binarize(nn.Sequential(layer(), nn.Linear(16, 3))),
    )
    report = load_float_weights(binary, float_model.state_dict())
    assert report.complete, str(report)
    assert torch.equal(binary[0].self_attn.in_proj.weight, float_model[0].self_attn.in_proj_weight)


# ----------------------------------------------------------------------------- the distillation loss
def test_distillation_loss_against_the_formula():
    s = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]])
    t = torch.tensor([[1.0, 1.0, 0.0], [4.0, -2.0, 1.0]])
    for temp in (1.0, 4.0):
        want = 0.0
        for zs, zt in zip(s.tolist(), t.tolist()):
            p = [math.exp(v / temp) / sum(math.exp(u / temp) for u in zt) for v in zt]
            q = [math.exp(v / temp) / sum(math.exp(u / temp) for u in zs) for v in zs]
            want += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        want = want / 2 * temp**2
        assert distillation_loss(s, t, temp).item() == pytest.approx(want, rel=1e-6)
    assert distillation_loss(t, t).item() == pytest.approx(0.0, abs=1e-7)
    # ReActNet's soft cross-entropy -sum p log q has the same gradient (they differ by H(p))
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    distillation_loss(a, t).backward()
    (-(t.softmax(1) * b.log_softmax(1)).sum(1).mean()).backward()
    torch.testing.assert_close(a.grad, b.grad)


# ----------------------------------------------------------------------------- end to end
@pytest.fixture
def data_root(tmp_path):
    make_idx_dataset(tmp_path / "fmnist", n_train=64, n_test=16)
    return str(tmp_path / "fmnist")


def _cfg(tmp_path, data_root, name, precision="1w1a", **train):
    return config_from_dict(
        {
            "model": {"name": "resnet20", "precision": precision, "kwargs": {"width": 4}},
            "data": {"name": "fashion_mnist", "root": data_root, "batch_size": 32, "test_batch_size": 16},
            "train": {"epochs": 1, "threads": 1, "device": "cpu", **train},
            "analysis": {"indicators": False},
            "out": {"dir": str(tmp_path), "name": name},
        }
    )


def test_two_step_recipe_and_teacher_end_to_end(tmp_path, data_root, capsys):
    fp = T.train(_cfg(tmp_path, data_root, "fp", "fp"), progress=False, summary=False)
    cfg = _cfg(tmp_path, data_root, "student", teacher=fp["run_dir"], distill_weight=0.5, distill_temperature=2.0)
    cfg.model.init_from = fp["run_dir"]
    trainer = T.Trainer(cfg, progress=False, summary=True)
    trainer._setup()
    start = torch.load(f"{fp['run_dir']}/checkpoints/best.pt", weights_only=True)["model"]
    for key, value in start.items():  # the step-2 model starts from the float run's weights
        assert torch.equal(trainer.model.state_dict()[key], value), key
    assert trainer.init_report.complete
    assert "model.init_from" in capsys.readouterr().out
    teacher = trainer.teacher.model
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer.writer.close()

    cfg.out.name = "student2"
    summary = T.Trainer(cfg, progress=False, summary=False).fit()
    assert summary["teacher_ms_per_step"] > 0 and summary["init_from"] == fp["run_dir"]
    rows = [json.loads(line) for line in (tmp_path / "student2" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["teacher_ms_per_step"] > 0
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # eval mode: BN stats frozen


def test_init_from_and_teacher_errors_name_the_key(tmp_path, data_root):
    cfg = _cfg(tmp_path, data_root, "a")
    cfg.model.init_from = str(tmp_path / "no-such-run")
    with pytest.raises(CheckpointError, match=r"model.init_from=.*does not exist"):
        T.Trainer(cfg, progress=False, summary=False).fit()
    vit = _cfg(tmp_path, data_root, "vit", "fp")
    vit.model.name, vit.model.kwargs = "vit_tiny", {"patch_size": 7, "dim": 12, "depth": 1, "heads": 2, "mlp_dim": 8}
    vit = T.train(vit, progress=False, summary=False)
    cfg = _cfg(tmp_path, data_root, "b")
    cfg.model.init_from = vit["run_dir"]
    with pytest.raises(CheckpointError, match=r"none of its .* tensors' weights fits this model; .*vit_tiny"):
        T.Trainer(cfg, progress=False, summary=False).fit()
    # the same model at another width: only the BatchNorm step counters and the head's bias fit, which
    # started a "two-step" run from scratch with exit 0
    narrow = T.train(_cfg(tmp_path, data_root, "narrow", "fp"), progress=False, summary=False)
    cfg = _cfg(tmp_path, data_root, "wide")
    cfg.model.kwargs, cfg.model.init_from = {"width": 8}, narrow["run_dir"]
    with pytest.raises(
        CheckpointError,
        match=r"weights fits this model \(only \d+ counters or biases do\); .*resnet20 with model.kwargs",
    ):
        T.Trainer(cfg, progress=False, summary=False).fit()
    with pytest.raises(ConfigError, match="train.distill_weight must be in"):
        reste.train.load_config(None, ["train.distill_weight=1.5"])
    with pytest.warns(UserWarning, match="no effect without train.teacher"):
        from reste.train.config import warn_conflicts

        warn_conflicts(config_from_dict({"train": {"distill_temperature": 4.0}}), 1)


# ----------------------------------------------------------------------------- shipped recipes
def test_shipped_recipes_chain_their_steps():
    from pathlib import Path

    from reste.train.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    main = load_config(root / "fashion_mnist/resnet20_reste.yaml")
    pairs = [("fashion_mnist/recipes/two_step_1_1w32a.yaml", "fashion_mnist/recipes/two_step_2_1w1a.yaml")]
    pairs += [
        (f"cifar10/two_step/{m}_step1_1w32a.yaml", f"cifar10/two_step/{m}_step2_1w1a.yaml")
        for m in ("resnet20", "resnet18")
    ]
    pairs += [
        (f"imagenet/two_step/{m}_step1_1w32a.yaml", f"imagenet/two_step/{m}_step2_1w1a.yaml")
        for m in ("resnet18", "resnet34")
    ]
    for first, second in pairs:
        a, b = load_config(root / first), load_config(root / second)
        assert b.model.init_from == f"runs/{a.out.name}", second
        assert (a.model.precision, b.model.precision) == ("1w32a", "1w1a") and a.model.name == b.model.name
        assert a.train.epochs == b.train.epochs  # half of the paper's (or the main job's) budget each
    a, b = (load_config(root / f"fashion_mnist/recipes/two_step_{i}.yaml") for i in ("1_1w32a", "2_1w1a"))
    assert a.train.epochs + b.train.epochs == main.train.epochs
    teacher, student = (load_config(root / f"fashion_mnist/recipes/{n}.yaml") for n in ("teacher_fp", "distill_1w1a"))
    assert student.train.teacher == f"runs/{teacher.out.name}" and teacher.model.precision == "fp"
    assert student.train.epochs == teacher.train.epochs == main.train.epochs and student.model == main.model


def test_teacher_under_ddp_matches_one_process(tmp_path, data_root):
    """One SGD step distilled under 2-rank DDP equals the same step in one process with the
    same global batch (as tests/test_distributed.py checks without a teacher): the teacher
    runs per rank on its half, unwrapped, and the KL's batch mean is averaged by DDP."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    common = [
        f"data.root={data_root}",
        "data.subset=64",
        "data.batch_size=64",
        "data.test_batch_size=8",
        "train.epochs=1",
        "train.device=cpu",
        "model.name=resnet20",
        "model.kwargs={width: 0.5}",
        "optim.name=sgd",
        "optim.lr=0.1",
        f"out.dir={tmp_path}",
        "analysis.indicators=false",
    ]
    teacher = T.train(
        overrides=[*common, "model.precision=fp", "out.name=teacher", "train.threads=1"], progress=False, summary=False
    )
    distil = [
        *common,
        f"train.teacher={teacher['run_dir']}",
        "train.distill_weight=0.5",
        "train.distill_temperature=2.0",
    ]
    env = dict(os.environ, PYTHONPATH=str(repo / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "reste",
            "train",
            *distil,
            "train.sync_bn=true",
            "out.name=ddp",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = T.train(overrides=[*distil, "out.name=single", "train.threads=1"], progress=False, summary=False)
    a = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "single" / "checkpoints" / "last.pt", weights_only=True)
    worst = max((a["model"][k] - v).abs().max().item() for k, v in b["model"].items() if v.is_floating_point())
    assert a["world_size"] == 2 and worst < 1e-5
    assert a["metrics"][0]["train_loss"] == pytest.approx(b["metrics"][0]["train_loss"], rel=1e-5)
    assert a["metrics"][0]["teacher_ms_per_step"] > 0 and single["teacher_ms_per_step"] > 0


def test_init_from_warns_when_the_source_is_another_architecture_whose_tensors_fit(tmp_path):
    # an ImageNet ResNet-18 with the avgpool shortcut loaded "copied 127 tensors" into a downsample=stride one,
    # silently: the same shapes, another network
    import warnings

    from reste.train.warmstart import init_from

    torch.manual_seed(0)
    source = reste.models.create("resnet18", num_classes=10, width=0.25, precision="fp")
    path = tmp_path / "avgpool.pt"
    torch.save(
        {"model": source.state_dict(), "config": {"model": {"name": "resnet18", "kwargs": {"width": 0.25}}}}, path
    )
    target = reste.models.create("resnet18", num_classes=10, width=0.25, downsample="stride")
    with pytest.warns(UserWarning) as caught:
        report = init_from(
            target, path, model_config={"name": "resnet18", "kwargs": {"width": 0.25, "downsample": "stride"}}
        )
    assert len(report.copied) > 100
    assert str(caught[0].message) == (
        f"model.init_from={str(path)!r} was trained with model.kwargs.downsample='avgpool', this model has "
        f"model.kwargs.downsample='stride': its tensors that fit ({len(report.copied)}) were copied into another "
        "network; start from a run of the same architecture if that is not what you want"
    )
    # the same architecture, its default written out or not, and binarization options aside: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        init_from(
            reste.models.create("resnet18", num_classes=10, width=0.25),
            path,
            model_config={
                "name": "resnet18",
                "kwargs": {"width": 0.25, "downsample": "avgpool", "weight_estimator": "dorefa"},
            },
        )
    # a plain state_dict file says nothing of its architecture: a config.yaml beside it (a list, the user's
    # own config with base:) was read, failed the load or warned "trained with model.name None" (review)
    plain = tmp_path / "plain" / "weights"
    plain.mkdir(parents=True)
    torch.save(source.state_dict(), plain / "fp.pt")
    (plain.parent / "config.yaml").write_text("- 1\n- 2\n")
    (plain / "config.yaml").write_text("base: ../other.yaml\nmodel: {init_from: fp.pt}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = init_from(
            reste.models.create("resnet18", num_classes=10, width=0.25),
            plain / "fp.pt",
            model_config={"name": "resnet18", "kwargs": {"width": 0.25, "downsample": "stride"}},
        )
    assert len(report.copied) > 100
