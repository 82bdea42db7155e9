"""Every experiment config in configs/ loads, validates, and builds its model and data pipeline.

The data comes from small files generated in the official formats (IDX, CIFAR pickle
batches, ImageNet class folders of JPEGs), so the paper's configs are checked here
without the real data sets.
"""

from pathlib import Path

import pytest
import torch

import reste
from data_fixtures import make_idx_dataset, write_cifar_folder, write_image_folders
from reste.train.config import ConfigError, load_config, read_config_file
from reste.train.trainer import build_model

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_ROOT.rglob("*.yaml"))


@pytest.fixture(scope="module")
def data_roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    roots = {}
    for name in ("fashion_mnist", "mnist"):
        make_idx_dataset(base / name, n_train=64, n_test=16)
        roots[name] = base / name
    for name in ("cifar10", "cifar100"):
        write_cifar_folder(base / name, name, per_batch=8, n_test=10)
        roots[name] = base / name
    pytest.importorskip("PIL")
    write_image_folders(base / "imagenet", per_class=2, val_per_class=1)
    roots["imagenet"] = base / "imagenet"
    return roots


def test_there_is_a_config_for_every_reported_experiment():
    names = {p.relative_to(CONFIG_ROOT).as_posix() for p in CONFIGS}
    expected = {
        "cifar10/resnet20_1w1a.yaml",
        "cifar10/resnet20_1w32a.yaml",
        "cifar10/resnet20_bireal_1w1a.yaml",
        "cifar10/resnet18_1w1a.yaml",
        "cifar10/vgg_small_1w1a.yaml",
        "imagenet/resnet18_1w1a.yaml",
        "imagenet/resnet18_1w32a.yaml",
        "imagenet/resnet34_1w1a.yaml",
        "imagenet/resnet34_1w32a.yaml",
        "imagenet/vit_tiny_fp.yaml",
        "imagenet/vit_tiny_dorefa_1w32a.yaml",
        "imagenet/vit_tiny_reste_1w32a.yaml",
        *(
            f"cifar10/estimators/resnet20_{e}.yaml"
            for e in ("ste", "clipped_ste", "dsq", "ede", "fda", "rbnn", "reste")
        ),
        *(f"cifar10/seed_table2/fixed_o{o}.yaml" for o in range(1, 5)),
        *(f"cifar10/seed_table2/progressive_o_end{o}.yaml" for o in range(1, 5)),
        *(f"cifar10/seed_table3/{w}.yaml" for w in ("linear", "cosine", "power")),
    }
    assert expected <= names, sorted(expected - names)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(CONFIG_ROOT).as_posix())
def test_config_builds_model_and_data(path, data_roots):
    cfg = load_config(path)
    cfg = load_config(path, [f"data.root={data_roots[cfg.data.name]}"])
    info = reste.data.info(cfg.data.name)
    model = build_model(cfg, info)
    train, test = reste.data.create_loaders(
        cfg.data.name,
        root=cfg.data.root,
        batch_size=2,
        test_batch_size=2,
        augment=cfg.data.augment,
        seed=cfg.seed,
        subset=8,
    )
    x, y = next(iter(train))
    assert x.shape[1:] == (info.in_channels, info.image_size, info.image_size)
    out = model(x)
    assert out.shape == (2, info.num_classes)
    torch.nn.functional.cross_entropy(out, y).backward()
    binary = dict(reste.nn.binary_layers(model))
    if cfg.model.precision == "fp":
        assert not binary
    else:
        assert binary and all(layer.binary_inputs == (cfg.model.precision == "1w1a") for layer in binary.values())


def test_paper_recipes_are_as_written():
    cifar = load_config(CONFIG_ROOT / "cifar10/resnet20_1w1a.yaml")
    assert (cifar.optim.name, cifar.optim.lr, cifar.optim.momentum, cifar.optim.weight_decay) == ("sgd", 0.1, 0.9, 1e-4)
    assert (cifar.train.epochs, cifar.data.batch_size, cifar.lr_schedule.warmup_epochs) == (1000, 256, 5)
    assert (cifar.estimator.schedule, cifar.estimator.o_end, cifar.estimator.per) == ("cosine", 3.0, "epoch")
    r18 = load_config(CONFIG_ROOT / "cifar10/resnet18_1w1a.yaml")
    assert (r18.train.epochs, r18.data.batch_size, r18.model.name) == (2000, 96, "resnet18_cifar")
    imnet = load_config(CONFIG_ROOT / "imagenet/resnet34_1w32a.yaml")
    assert (imnet.train.epochs, imnet.data.batch_size, imnet.lr_schedule.warmup_epochs) == (250, 750, 0)
    assert (imnet.model.name, imnet.model.precision) == ("resnet34", "1w32a")
    fixed = load_config(CONFIG_ROOT / "cifar10/seed_table2/fixed_o3.yaml")
    assert (fixed.estimator.schedule, fixed.estimator.o_end) == ("fixed", 3.0)
    vit = load_config(CONFIG_ROOT / "imagenet/vit_tiny_dorefa_1w32a.yaml")
    assert vit.model.kwargs["weight_estimator"] == "dorefa" and vit.optim.name == "adamw" and vit.optim.lr == 1e-3


def test_base_chain_merges_sections_and_reports_loops(tmp_path):
    (tmp_path / "a.yaml").write_text("optim:\n  lr: 0.5\n  name: sgd\ntrain:\n  epochs: 7\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\noptim:\n  lr: 0.25\n")
    merged = read_config_file(tmp_path / "b.yaml")
    assert merged == {"optim": {"lr": 0.25, "name": "sgd"}, "train": {"epochs": 7}}
    (tmp_path / "c.yaml").write_text("base: d.yaml\n")
    (tmp_path / "d.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="loop"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "e.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        load_config(tmp_path / "e.yaml")
