"""``reste eval`` of a run and of an exported 1-bit file, and the export's check on real test images.

End to end through the command line, in process, on a tiny generated MNIST (official IDX
files, class = the height of a bright band, so a binary ResNet learns something in seconds)
read from an explicit data folder: no network, no system data set.
"""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch

from data_fixtures import IDX_FILES, write_idx
from reste import cli
from reste.data import info
from reste.deploy import export, load
from reste.deploy.verify import read_metadata, write_metadata
from reste.train import trainer as T

N_TRAIN, N_TEST, SUBSET = 400, 100, 160  # the run keeps SUBSET // 5 = 32 test images


def write_banded_mnist(folder, seed=0):
    """MNIST files where image k shows a bright horizontal band at a height set by its label."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(1, 90, (n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            images[i, 2 * k + 4 : 2 * k + 7] = 255
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    for role, name in IDX_FILES.items():
        write_idx(folder / name, arrays[role])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-epoch binary ResNet-20 (half width) run on 160 training images, 1 thread."""
    base = tmp_path_factory.mktemp("eval")
    write_banded_mnist(base / "data")
    summary = T.train(
        progress=False,
        model={"name": "resnet20", "kwargs": {"width": 0.5}},
        data={"name": "mnist", "root": str(base / "data"), "subset": SUBSET, "batch_size": 32, "test_batch_size": 16},
        train={"epochs": 3, "threads": 1, "device": "cpu"},
        analysis={"indicators": False},
        out={"dir": str(base), "name": "run"},
    )
    rows = [json.loads(line) for line in (base / "run" / "metrics.jsonl").read_text().splitlines()]
    return base, base / "run", summary, rows


def eval_json(capsys, *args):
    capsys.readouterr()
    code = cli.main(["eval", *map(str, args), "--json"])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else captured.err)


def test_eval_of_a_run_uses_its_test_subset_and_best_checkpoint(run, capsys):
    _, run_dir, summary, rows = run
    best = next(r for r in rows if r["epoch"] == summary["best_epoch"])
    code, result = eval_json(capsys, run_dir, "--device", "cpu")
    assert code == 0
    # the 32 test images the run reported on, not the 100 on disk
    assert result["count"] == SUBSET // 5 and result["subset"] == SUBSET
    assert result["checkpoint"].endswith("best.pt") and result["epoch"] == summary["best_epoch"]
    assert result["top1"] == pytest.approx(best["test_top1"]) and result["loss"] == pytest.approx(
        best["test_loss"], rel=1e-5
    )

    code, last = eval_json(capsys, run_dir, "--which", "last", "--device", "cpu")
    assert code == 0 and last["epoch"] == 3 and last["top1"] == pytest.approx(rows[-1]["test_top1"])

    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        code, full = eval_json(capsys, run_dir, "--full", "--device", "cpu", "--threads", "2")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert code == 0 and full["count"] == N_TEST and full["subset"] is None

    # the plain output names the number of images and how to get them all
    assert cli.main(["eval", str(run_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"{SUBSET // 5} images (the first ones, as data.subset={SUBSET}; --full for all)" in out
    assert cli.main(["eval", str(run_dir), "--threads", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err


def test_export_is_checked_on_real_test_images_and_evaluates_like_the_run(run, capsys):
    base, run_dir, summary, rows = run
    out = base / "model.safetensors"
    capsys.readouterr()
    assert cli.main(["export", str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"verified on {SUBSET // 5} mnist test images" in printed and "agree on 100.00%" in printed

    meta = read_metadata(out)
    data, check = meta["data"], meta["verification"]
    mnist = info("mnist")
    assert (data["name"], data["subset"], data["input_shape"]) == ("mnist", SUBSET, [1, 28, 28])
    assert (data["mean"], data["std"]) == (list(mnist.mean), list(mnist.std))
    assert check["passed"] and check["images"] == SUBSET // 5 and check["agreement"] == 1.0
    assert 0.0 <= check["max_abs_logit_diff"] <= 1e-3 and 0.0 <= check["random_max_abs_logit_diff"] <= 1e-3
    best = next(r for r in rows if r["epoch"] == summary["best_epoch"])
    assert check["trained_top1"] == check["exported_top1"] == pytest.approx(best["test_top1"])

    # eval of the file: the same images, the same accuracy as eval of the run
    code, of_run = eval_json(capsys, run_dir, "--device", "cpu")
    code_file, of_file = eval_json(capsys, out, "--threads", "1")
    assert code == code_file == 0
    assert (of_file["count"], of_file["epoch"], of_file["checkpoint"]) == (
        of_run["count"],
        summary["best_epoch"],
        "best.pt",
    )
    assert of_file["top1"] == of_run["top1"] and of_file["loss"] == pytest.approx(of_run["loss"], abs=1e-4)
    code, full = eval_json(capsys, out, "--full")
    assert code == 0 and full["count"] == N_TEST

    # the normalisation recorded in the file is the one applied
    other = base / "renormalised.safetensors"
    other.write_bytes(out.read_bytes())
    write_metadata(other, {"data": {**data, "mean": [0.0], "std": [1.0]}})
    code, renormalised = eval_json(capsys, other)
    assert (
        code == 0
        and renormalised["count"] == of_file["count"]
        and renormalised["loss"] != pytest.approx(of_file["loss"], abs=1e-3)
    )

    # --no-verify still records the data set, and no check
    bare = base / "unchecked.safetensors"
    assert cli.main(["export", str(run_dir), "--out", str(bare), "--no-verify"]) == 0
    assert "verified" not in capsys.readouterr().out
    assert read_metadata(bare) == {"data": data}

    # predictions of the packed model are those of the trained one, image for image
    from reste.deploy.export import load_run_model
    from reste.deploy.verify import eval_loader

    model, _, _ = load_run_model(run_dir, "best")
    deployed = load(out)
    with torch.no_grad():
        for images, _ in eval_loader(data, subset=None):
            assert torch.equal(model.eval()(images).argmax(1), deployed(images).argmax(1))


def test_a_run_with_data_test_subset_reports_evaluates_and_exports_on_those_test_images(tmp_path, capsys):
    # a training subset with its own number of test images (here 60 of the 100, not 160 // 5 = 32)
    write_banded_mnist(tmp_path / "data")
    summary = T.train(
        progress=False,
        model={"name": "resnet20", "kwargs": {"width": 0.25}},
        data={"name": "mnist", "root": str(tmp_path / "data"), "subset": SUBSET, "test_subset": 60, "batch_size": 32},
        train={"epochs": 1, "threads": 1, "device": "cpu"},
        analysis={"indicators": False},
        out={"dir": str(tmp_path), "name": "run"},
    )
    run_dir = tmp_path / "run"
    assert (summary["train_images"], summary["test_images"]) == (SUBSET, 60)
    code, result = eval_json(capsys, run_dir, "--device", "cpu")
    assert code == 0 and (result["count"], result["subset"], result["test_subset"]) == (60, SUBSET, 60)
    assert result["top1"] == pytest.approx(summary["final_top1"])
    assert cli.main(["eval", str(run_dir), "--device", "cpu"]) == 0
    assert "60 images (the first ones, as data.subset=160 and data.test_subset=60; --full for all)" in (
        capsys.readouterr().out
    )

    out = tmp_path / "model.safetensors"
    assert cli.main(["export", str(run_dir), "--out", str(out)]) == 0
    assert "verified on 60 mnist test images" in capsys.readouterr().out
    assert read_metadata(out)["data"]["test_subset"] == 60
    code, of_file = eval_json(capsys, out, "--threads", "1")
    assert code == 0 and of_file["count"] == 60 and of_file["top1"] == result["top1"]


def test_data_test_subset_larger_than_the_test_set_is_a_config_error_naming_the_key():
    from reste.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"data.test_subset=20000 is larger than the fashion_mnist test set"):
        load_config(overrides=["data.test_subset=20000"])
    with pytest.raises(ConfigError, match=r"data.test_subset must be a positive number"):
        load_config(overrides=["data.test_subset=0"])


def test_export_without_its_data_set_is_checked_on_random_inputs_and_says_so(run, capsys, tmp_path):
    base, run_dir, _, _ = run
    moved = tmp_path / "elsewhere"
    (base / "data").rename(moved)
    try:
        out = tmp_path / "m.safetensors"
        assert cli.main(["export", str(run_dir), "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert "warning: could not read the run's test images" in printed and "8 random inputs" in printed
        check = read_metadata(out)["verification"]
        assert check["images"] == 0 and check["passed"] and str(base / "data") in check["reason"]
        # eval of the file looks in the run's folder too, and says where else to look
        code = cli.main(["eval", str(out)])
        assert code == 1 and "error:" in capsys.readouterr().err
        code, result = eval_json(capsys, out, "--root", moved)
        assert code == 0 and result["count"] == SUBSET // 5
    finally:
        moved.rename(base / "data")


def test_eval_of_a_file_that_is_not_an_export_is_a_clear_error(run, capsys, tmp_path):
    base, run_dir, _, _ = run
    from safetensors.torch import save_file

    plain = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(3)}, str(plain))
    assert cli.main(["eval", str(plain)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(plain) in err and "not a reste export" in err and "reste export" in err
    assert cli.main(["eval", str(tmp_path / "missing.safetensors")]) == 1
    assert "no exported model at" in capsys.readouterr().err

    # a file exported from Python records no data set: eval asks for one
    from reste.deploy.export import load_run_model

    model, arch, _ = load_run_model(run_dir, "best")
    bare = tmp_path / "bare.safetensors"
    export(model, bare, architecture=arch)
    assert cli.main(["eval", str(bare)]) == 2
    assert "give it with --data NAME" in capsys.readouterr().err
    code, result = eval_json(capsys, bare, "--data", "mnist", "--root", base / "data")
    assert code == 0 and result["count"] == N_TEST  # no recorded subset: the whole test set
    assert cli.main(["eval", str(bare), "--which", "last"]) == 2
    assert "--which chooses a checkpoint of a run directory" in capsys.readouterr().err
    assert cli.main(["eval", str(bare), "--data", "cifar10"]) == 2
    assert "cannot be evaluated on cifar10" in capsys.readouterr().err


def test_export_check_fails_when_the_file_predicts_other_classes(run, capsys, tmp_path, monkeypatch):
    export_module = importlib.import_module("reste.deploy.export")  # the module; reste.deploy.export is the function

    class Negated(torch.nn.Module):  # a broken deploy path: every prediction changes
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return -self.inner(x)

    real_load = export_module.load
    monkeypatch.setattr(export_module, "load", lambda *a, **k: Negated(real_load(*a, **k)))
    _, run_dir, _, _ = run
    out = tmp_path / "m.safetensors"
    capsys.readouterr()
    assert cli.main(["export", str(run_dir), "--out", str(out), "--verify-images", "20"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the exported model predicts another class") and "of 20 test images" in err
    check = read_metadata(out)["verification"]
    assert not check["passed"] and check["images"] == 20 and check["agreement"] < 0.99
    assert check["images_over_tolerance"] == 20 and check["random_max_abs_logit_diff"] > 1e-3


@pytest.mark.parametrize(
    "option, expected",
    [
        (["--subset", "0"], "--subset must be a positive number of training images"),
        (["--subset", "-5"], "--subset must be a positive number of training images"),
        (["--batch-size", "-1"], "--batch-size must be at least 1, got -1"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--device", "foo"], "--device must be auto, cpu, cuda or cuda:N, got 'foo'"),
        (["--device", "cuda:x"], "--device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    ],
)
def test_eval_options_out_of_range_are_usage_errors_naming_the_option(run, capsys, option, expected):
    """Were a ValueError / RuntimeError traceback with exit 1 (--batch-size 0: silently the run's batch)."""
    _, run_dir, _, _ = run
    for source in (run_dir, run_dir / "model.safetensors"):  # a run and an export are checked alike
        capsys.readouterr()
        code = cli.main(["eval", str(source), *option])
        captured = capsys.readouterr()
        assert code == 2 and captured.out == ""
        assert captured.err.startswith("error: ") and captured.err.count("\n") == 1  # one line
        assert expected in captured.err and "Traceback" not in captured.err


def test_eval_on_cuda_without_cuda_names_the_option(run, capsys, monkeypatch):
    _, run_dir, _, _ = run
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        code = cli.main(["eval", str(run_dir), "--device", device])
        err = capsys.readouterr().err
        assert code == 2
        assert err == f"error: --device {device}: CUDA is not available here; use --device cpu (or auto)\n"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli.main(["eval", str(run_dir), "--device", "cuda:3"]) == 2
    assert "--device cuda:3: this machine has 1 GPU (cuda:0 to cuda:0)" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # the library names its argument the same way
    with pytest.raises(T.ConfigError, match="device=cuda: CUDA is not available here; use device=cpu"):
        T.evaluate(run_dir, device="cuda")
    with pytest.raises(T.ConfigError, match="batch_size must be a whole number >= 1"):
        T.evaluate(run_dir, batch_size=0, device="cpu")
    with pytest.raises(T.ConfigError, match="subset must be 'run', None"):
        T.evaluate(run_dir, subset=0, device="cpu")


def test_eval_of_a_run_without_best_pt_suggests_which_last(run, capsys, tmp_path):
    """A run stopped in its first epoch has only last.pt: was 'has no checkpoints/best.pt; is it a run directory'."""
    import shutil

    _, run_dir, _, _ = run
    early = tmp_path / "early"
    shutil.copytree(run_dir, early)
    (early / "checkpoints" / "best.pt").unlink()
    code = cli.main(["eval", str(early)])
    assert code == 1
    assert capsys.readouterr().err == (
        f"error: {early} has no checkpoints/best.pt, only checkpoints/last.pt (it was stopped before its first "
        "epoch ended); use that one with --which last\n"
    )
    code, result = eval_json(capsys, early, "--which", "last", "--device", "cpu")
    assert code == 0 and result["checkpoint"] == str(early / "checkpoints" / "last.pt")


def test_an_imagenet_tree_of_3_class_folders_trains_evaluates_and_exports_a_3_way_model(tmp_path, capsys):
    # ImageNet-100-style: the head follows the class folders, is recorded as data.num_classes, and
    # eval / export / resume rebuild it; a tree with other folders is refused, not scored
    pytest.importorskip("PIL")
    from data_fixtures import write_image_folders
    from reste.train.config import ConfigError, load_config

    classes = write_image_folders(tmp_path / "tree" / "imagenet", per_class=4, val_per_class=2)
    common = dict(
        progress=False,
        model={"name": "resnet18", "kwargs": {"width": 0.125}},
        data={"name": "imagenet", "root": str(tmp_path / "tree"), "batch_size": 4, "test_batch_size": 3},
        analysis={"indicators": False},
    )
    T.train(
        **common,
        summary=True,
        train={"epochs": 1, "threads": 1, "device": "cpu"},
        out={"dir": str(tmp_path), "name": "run"},
    )
    printed = capsys.readouterr().out
    assert f"has {len(classes)} class folders (not imagenet's 1000): the model gets a 3-way head" in printed
    run_dir = tmp_path / "run"
    assert load_config(run_dir / "config.yaml").data.num_classes == 3
    state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert state["model"]["head.fc.weight"].shape[0] == 3

    code, result = eval_json(capsys, run_dir, "--device", "cpu")
    assert code == 0 and result["count"] == 6 and result["top5"] is None  # 3 classes: no top-5

    out = tmp_path / "model.safetensors"
    assert cli.main(["export", str(run_dir), "--out", str(out)]) == 0
    assert "agree on 100.00%" in capsys.readouterr().out
    assert load(out)(torch.zeros(1, 3, 224, 224)).shape == (1, 3)
    code, of_file = eval_json(capsys, out, "--threads", "1")
    assert code == 0 and of_file["top1"] == result["top1"]

    # resumed for a second epoch: the recorded head, not ImageNet's 1000
    T.train(resume=str(run_dir), progress=False, train={"epochs": 2})
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 2

    # a tree of 4 classes is not the one the model was trained on
    write_image_folders(tmp_path / "four" / "imagenet", classes=(*classes, "n01491361"), per_class=1)
    code, err = eval_json(capsys, run_dir, "--root", tmp_path / "four")
    assert code == 2 and "model for 3 classes, but" in err and "has 4 class folders" in err
    code, err = eval_json(capsys, out, "--root", tmp_path / "four")
    assert code == 2 and "has 4 class folders" in err

    # a data.num_classes that is not the tree's, and one for a data set with fixed classes
    with pytest.raises(ConfigError, match="data.num_classes=5, but .* has 3 class folders"):
        T.train(**{**common, "data": {**common["data"], "num_classes": 5}}, out={"dir": str(tmp_path), "name": "five"})
    assert not (tmp_path / "five").exists()
    with pytest.raises(ConfigError, match="data.num_classes=5: mnist has 10 classes; leave data.num_classes out"):
        load_config(None, ["data.name=mnist", "data.num_classes=5"])


def test_an_imagenet_tree_run_of_an_older_reste_keeps_its_1000_way_head(tmp_path, capsys, monkeypatch):
    # before data.num_classes, a tree of 3 class folders trained ImageNet's 1000-way head and its
    # config has no class count: it must still resume, evaluate and export (with a warning), not be
    # rebuilt with 3 outputs (a shape mismatch) or refused
    pytest.importorskip("PIL")
    import reste.train.trainer as trainer_module
    from data_fixtures import write_image_folders

    write_image_folders(tmp_path / "tree" / "imagenet", per_class=2, val_per_class=1)
    with monkeypatch.context() as old_reste:  # what the trainer built before data.num_classes
        old_reste.setattr(trainer_module, "class_count_of_data", lambda cfg, meta, loader, **_: meta)
        T.train(
            progress=False,
            model={"name": "resnet18", "kwargs": {"width": 0.125}},
            data={"name": "imagenet", "root": str(tmp_path / "tree"), "batch_size": 3, "test_batch_size": 3},
            train={"epochs": 1, "threads": 1, "device": "cpu"},
            analysis={"indicators": False},
            out={"dir": str(tmp_path), "name": "old"},
        )
    run_dir = tmp_path / "old"
    assert "num_classes: null" in (run_dir / "config.yaml").read_text()

    with pytest.warns(UserWarning, match="started by an older reste, which built imagenet's 1000-way head"):
        T.train(resume=str(run_dir), progress=False, train={"epochs": 2})
    state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 2 and state["model"]["head.fc.weight"].shape[0] == 1000

    with pytest.warns(UserWarning, match="model for 1000 classes and .* has 3 class folders"):
        code, result = eval_json(capsys, run_dir, "--device", "cpu")
    assert code == 0 and result["count"] == 3
    out = tmp_path / "old.safetensors"
    assert cli.main(["export", str(run_dir), "--out", str(out)]) == 0
    with pytest.warns(UserWarning, match="has 3 class folders"):
        code, of_file = eval_json(capsys, out)
    assert code == 0 and of_file["top1"] == result["top1"]


def test_a_new_run_on_a_full_imagenet_tree_records_its_class_count_too():
    # else it would look like a run of an older reste, and eval on a tree of other folders only warns
    from types import SimpleNamespace

    from reste.data import info as data_info_of
    from reste.train.config import load_config
    from reste.train.setup import class_count_of_data

    loader = SimpleNamespace(classes=[f"n{i:08d}" for i in range(1000)], folder="tree/train")
    cfg = load_config(None, ["data.name=imagenet"])
    meta = class_count_of_data(cfg, data_info_of("imagenet"), loader, tell=False)
    assert meta.num_classes == 1000 and cfg.data.num_classes == 1000
    resumed = load_config(None, ["data.name=imagenet"])  # a run of an older reste: left as it was
    class_count_of_data(resumed, data_info_of("imagenet"), loader, tell=False, resumed=True)
    assert resumed.data.num_classes is None
