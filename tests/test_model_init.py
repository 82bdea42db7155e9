"""model.init: ``reference`` (the paper's code's initialisation, per model) and ``pytorch`` (as built).

The expected values are derived here from the reference code's calls (DravenALG/ReSTE,
``model/models_cifar/*.py``, ``model/models_imagenet/*.py``), not from reste.models.init:

- ``init.kaiming_normal_(w, nonlinearity="relu")`` and ``init.kaiming_normal_(w)``: N(0, sqrt(2 / fan_in)),
  fan_in = in_channels * kh * kw (in_features for a Linear);
- VGG-small's ``w.normal_(0, sqrt(2. / n))``, n = kh * kw * out_channels; its Linear ``normal_(0, 0.01)``;
- PyTorch's default (``kaiming_uniform_(a=sqrt(5))``): U(-b, b), b = 1/sqrt(fan_in), std b/sqrt(3).
"""

from __future__ import annotations

import glob
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import reste
from data_fixtures import make_idx_dataset
from reste.models import registry
from reste.nn import BinaryLayer, binarize, binary_layers
from reste.train import trainer as T
from reste.train.config import ConfigError, config_from_dict, help_epilog, load_config

torch.set_num_threads(2)
REPO = Path(__file__).resolve().parents[1]

#: small but faithful variants (the formulas do not depend on the width)
ARCH = {
    "resnet20": {},
    "resnet20_bireal": {},
    "resnet18_cifar": {"width": 0.25},
    "vgg_small": {"width": 0.5, "image_size": 16},
    "resnet18": {"width": 0.25},
    "resnet34": {"width": 0.25},
    "vit_tiny": {"image_size": 32, "patch_size": 8, "dim": 48, "depth": 2, "heads": 3, "mlp_dim": 96},
}


def build(name, init=None, precision="fp", seed=0, **extra):
    torch.manual_seed(seed)
    kwargs = dict(ARCH[name], **extra)
    if init is not None:
        kwargs["init"] = init
    return reste.models.create(name, num_classes=10, in_channels=3, precision=precision, **kwargs)


def fan_in(m: nn.Module) -> int:
    return m.weight[0].numel()


def fan_out_vgg(m: nn.Conv2d) -> int:
    return m.kernel_size[0] * m.kernel_size[1] * m.out_channels


def pytorch_default_std(m: nn.Module) -> float:
    return 1.0 / math.sqrt(fan_in(m)) / math.sqrt(3.0)


def expected(name: str, qualname: str, m: nn.Module):
    """(std, distribution) of the weight of layer ``m`` under init=reference, from the reference code."""
    if name in ("resnet20", "resnet20_bireal"):  # every Conv2d and Linear: kaiming_normal_(relu), fan-in
        return math.sqrt(2.0 / fan_in(m)), "normal"
    if name == "vgg_small":
        if isinstance(m, nn.Conv2d):
            return math.sqrt(2.0 / fan_out_vgg(m)), "normal"
        return 0.01, "normal"
    if name in ("resnet18", "resnet34"):  # every Conv2d: kaiming_normal_ (leaky_relu, a=0), fan-in; Linear default
        if isinstance(m, nn.Conv2d):
            return math.sqrt(2.0 / fan_in(m)), "normal"
        return pytorch_default_std(m), "uniform"
    raise AssertionError(name)


def conv_linear(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def check_weight(w: torch.Tensor, std: float, dist: str, where: str) -> None:
    w = w.detach().double().flatten()
    n = w.numel()
    # the sample std of n iid draws has a relative standard deviation of about 1/sqrt(2n) (normal;
    # smaller for uniform): 6 of them, so a 2.45x smaller or larger init can never pass
    rel = 6 / math.sqrt(2 * n)
    assert abs(w.std().item() / std - 1) < rel, f"{where}: std {w.std().item():.5f}, expected {std:.5f} (n={n})"
    assert abs(w.mean().item()) < 6 * std / math.sqrt(n), f"{where}: mean {w.mean().item():.5f}"
    if n >= 2000:  # the shape: share within one std is 68.3% for a normal, 57.7% for a uniform
        share = (w.abs() <= std).double().mean().item()
        target = 0.6827 if dist == "normal" else 1 / math.sqrt(3)
        assert abs(share - target) < 6 * math.sqrt(target * (1 - target) / n), f"{where}: {share:.4f} within 1 std"


# ----------------------------------------------------------------------------- reference, per model
@pytest.mark.parametrize("name", ["resnet20", "resnet20_bireal", "vgg_small", "resnet18", "resnet34"])
def test_reference_init_matches_the_reference_codes_call(name):
    model = build(name, "reference")
    layers = conv_linear(model)
    assert layers
    for qualname, m in layers:
        std, dist = expected(name, qualname, m)
        check_weight(m.weight, std, dist, f"{name}.{qualname}")
    for _qualname, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))


def test_reference_biases_as_in_the_reference_code():
    # ResNet-20: the classifier's bias is left at PyTorch's default, U(-1/sqrt(64), 1/sqrt(64))
    fc = build("resnet20", "reference").head.fc
    assert fc.bias.abs().max() <= 1 / 8 and fc.bias.abs().sum() > 0
    # VGG-small: Linear bias zeroed
    assert torch.equal(build("vgg_small", "reference").fc.bias, torch.zeros(10))
    # ImageNet ResNets: the Linear (weight and bias) is PyTorch's default, exactly as built with init=pytorch
    for name in ("resnet18", "resnet34"):
        ref, default = build(name, "reference").head.fc, build(name, "pytorch").head.fc
        assert torch.equal(ref.bias, default.bias) and torch.equal(ref.weight, default.weight)


@pytest.mark.parametrize("name", ["resnet18_cifar", "vit_tiny"])
def test_reference_is_the_model_as_built_where_the_reference_code_sets_nothing(name):
    # resnet18_cifar: no initialisation code in the reference; vit_tiny: no ViT in it (the model keeps its own)
    ref, default = build(name, "reference").state_dict(), build(name, "pytorch").state_dict()
    assert ref.keys() == default.keys()
    assert all(torch.equal(ref[k], default[k]) for k in ref)
    for qualname, m in conv_linear(build(name, "reference")):
        if name == "resnet18_cifar":
            check_weight(m.weight, pytorch_default_std(m), "uniform", qualname)


@pytest.mark.parametrize("name", sorted(ARCH))
@pytest.mark.parametrize("precision", ["1w1a", "1w32a"])
def test_binary_layers_latent_weights_get_the_init_applied_before_binarization(name, precision):
    fp = build(name, "reference", "fp").state_dict()
    binary = build(name, "reference", precision)
    assert any(isinstance(m, BinaryLayer) for m in binary.modules())
    state = binary.state_dict()
    for key, value in fp.items():  # the same draws: binarization happens after the init and draws nothing that stays
        assert torch.equal(state[key], value), key


def test_resnet20_binary_latent_weights_have_the_reference_std():
    model = build("resnet20", "reference", "1w1a")
    layers = list(binary_layers(model))
    assert len(layers) == 18
    for qualname, m in layers:
        check_weight(m.weight, math.sqrt(2.0 / fan_in(m)), "normal", qualname)


# ----------------------------------------------------------------------------- pytorch: bit-identical to before
def _old_create(name, precision, seed=0):
    """What reste.models.create did before model.init existed: build, then binarize."""
    torch.manual_seed(seed)
    kwargs = dict(ARCH[name])
    builder = registry._builder(name)
    image_size = kwargs.pop("image_size", None)
    if image_size is not None:
        kwargs["image_size"] = image_size
    model = builder(num_classes=10, in_channels=3, **kwargs)
    if precision == "fp":
        return model
    return binarize(
        model, estimator="reste", activations=precision == "1w1a", keep=model.full_precision, keep_defaults=False
    )


@pytest.mark.parametrize("name", sorted(ARCH))
@pytest.mark.parametrize("precision", ["1w1a", "fp"])
def test_pytorch_init_is_bit_identical_to_the_old_default(name, precision):
    old = _old_create(name, precision).state_dict()
    for init in (None, "pytorch"):  # the default is pytorch
        new = build(name, init, precision).state_dict()
        assert new.keys() == old.keys()
        assert all(torch.equal(new[k], old[k]) for k in old), (name, init)
    # and the random stream after building is where it was (later draws, e.g. data order, unchanged)
    _old_create(name, precision, seed=3)
    after_old = torch.rand(4)
    build(name, "pytorch", precision, seed=3)
    assert torch.equal(torch.rand(4), after_old)


def test_reference_is_deterministic_for_a_seed_and_differs_between_seeds():
    a, b, c = (build("resnet20", "reference", "1w1a", seed=s).state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["stages.0.0.conv1.weight"], c["stages.0.0.conv1.weight"])


# ----------------------------------------------------------------------------- the |W| <= m band (issue 18)
def _band_share(model, m=0.1):
    w = torch.cat([layer.weight.detach().flatten() for _, layer in binary_layers(model)])
    return (w.abs() <= m).double().mean().item(), w.numel()


def test_share_of_resnet20_binary_weights_inside_the_band():
    # pytorch: U(-1/sqrt(fan_in), ...) with fan_in >= 144: every weight within 1/12 < 0.1
    share, n = _band_share(build("resnet20", "pytorch", "1w1a"))
    assert share == 1.0 and n == 267_264
    # reference: N(0, sqrt(2/fan_in)); expected share per layer 2*Phi(0.1/std) - 1, weighted by layer size
    model = build("resnet20", "reference", "1w1a")
    want = 0.0
    for _, layer in binary_layers(model):
        std = math.sqrt(2.0 / fan_in(layer))
        want += layer.weight.numel() * math.erf(0.1 / std / math.sqrt(2))
    share, n = _band_share(model)
    want /= n
    assert abs(want - 0.8553) < 5e-4  # 60.4% (fan-in 144), 77.0% (288), 91.0% (576) of the weights
    assert abs(share - want) < 0.005, share
    # the first stage's layers (16 channels, fan-in 144), where the 60% comes from
    first = torch.cat([model.stages[0][i].conv1.weight.flatten() for i in range(3)]).detach()
    assert abs((first.abs() <= 0.1).double().mean().item() - 0.6039) < 0.03


# ----------------------------------------------------------------------------- errors
def test_create_rejects_an_unknown_init_with_the_choices_and_the_closest():
    message = r"unknown init 'refrence'; use one of reference, pytorch \(see docs/models.md\)\. Did you mean 'refer"
    with pytest.raises(ValueError, match=message):
        reste.models.create("resnet20", init="refrence")
    with pytest.raises(ValueError, match="use one of reference, pytorch"):
        reste.models.create("resnet20", init=None)


def test_reference_on_a_model_without_one_is_an_error_naming_the_way_out():
    @reste.models.register_model("_test_init_tiny")
    def tiny(num_classes=10, in_channels=1):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 4, 8), nn.Linear(8, 8), nn.Linear(8, num_classes))

    try:
        reste.models.create("_test_init_tiny", init="pytorch")
        with pytest.raises(ValueError, match=r"'_test_init_tiny' has no reference initialisation.*init='pytorch'"):
            reste.models.create("_test_init_tiny", init="reference")
    finally:
        registry._REGISTRY.pop("_test_init_tiny", None)


# ----------------------------------------------------------------------------- the config
def test_config_default_is_pytorch_and_the_option_is_documented():
    assert load_config().model.init == "pytorch"
    assert load_config(overrides=["model.init=reference"]).model.init == "reference"
    assert "model.init " in help_epilog() and "[pytorch | reference]" in help_epilog()
    assert "| `model.init` |" in (REPO / "docs" / "training.md").read_text()


@pytest.mark.parametrize("value, closest", [("refrence", "reference"), ("PyTorch", "pytorch"), ("kaiming", None)])
def test_config_rejects_an_unknown_init_naming_the_key_the_choices_and_the_closest(value, closest):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f"model.init={value}"])
    message = str(err.value)
    assert message.startswith(f"model.init: unknown value '{value}'; choose one of pytorch, reference.")
    assert (f"Did you mean '{closest}'?" in message) if closest else ("Did you mean" not in message)


def test_config_rejects_a_misspelt_key_with_the_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.int'. Did you mean 'model.init'\?"):
        load_config(overrides=["model.int=reference"])


def test_every_paper_config_uses_the_reference_init():
    paths = sorted(
        glob.glob(str(REPO / "configs" / "cifar10" / "**" / "*.yaml"), recursive=True)
        + glob.glob(str(REPO / "configs" / "imagenet" / "**" / "*.yaml"), recursive=True)
    )
    assert len(paths) >= 30
    for path in paths:
        assert load_config(path).model.init == "reference", path


def test_the_config_reaches_create_through_the_trainer():
    cfg = config_from_dict({"model": {"name": "resnet20", "precision": "1w1a", "init": "reference"}})
    meta = reste.data.info("fashion_mnist")
    from reste.deploy.export import architecture_from_config

    assert architecture_from_config(cfg)["init"] == "reference"  # what an export stores to rebuild the model
    torch.manual_seed(0)
    model = T.build_model(cfg, meta)
    for qualname, m in binary_layers(model):
        check_weight(m.weight, math.sqrt(2.0 / fan_in(m)), "normal", qualname)
    cfg.model.init = "pytorch"
    torch.manual_seed(0)
    default = T.build_model(cfg, meta).state_dict()
    torch.manual_seed(0)
    old = reste.models.create("resnet20", num_classes=10, in_channels=1, precision="1w1a").state_dict()
    assert all(torch.equal(default[k], old[k]) for k in old)


# ----------------------------------------------------------------------------- loading weights overrides it
@pytest.fixture
def data_root(tmp_path):
    make_idx_dataset(tmp_path / "fmnist", n_train=64, n_test=16)
    return str(tmp_path / "fmnist")


def _cfg(tmp_path, data_root, name, **model):
    return config_from_dict(
        {
            "model": {"name": "resnet20", "precision": "1w1a", "kwargs": {"width": 0.5}, "init": "reference", **model},
            "data": {"name": "fashion_mnist", "root": data_root, "batch_size": 32, "test_batch_size": 16},
            "train": {"epochs": 1, "threads": 1, "device": "cpu"},
            "analysis": {"indicators": False},
            "out": {"dir": str(tmp_path), "name": name},
        }
    )


def test_a_run_starts_from_the_reference_init_and_init_from_and_resume_replace_it(tmp_path, data_root):
    trainer = T.Trainer(_cfg(tmp_path, data_root, "fresh"), progress=False, summary=False)
    trainer._setup()
    for qualname, m in binary_layers(trainer.model):
        check_weight(m.weight, math.sqrt(2.0 / fan_in(m)), "normal", qualname)
    trainer.writer.close()

    torch.manual_seed(123)
    source = reste.models.create("resnet20", num_classes=10, in_channels=1, precision="fp", width=0.5).state_dict()
    torch.save(source, tmp_path / "fp.pt")
    warm = _cfg(tmp_path, data_root, "warm", init_from=str(tmp_path / "fp.pt"))
    trainer = T.Trainer(warm, progress=False, summary=False)
    trainer._setup()
    state = trainer.model.state_dict()
    assert trainer.init_report.complete
    for key, value in source.items():
        assert torch.equal(state[key], value), key
    trainer.writer.close()

    summary = T.train(_cfg(tmp_path, data_root, "run"), progress=False, summary=False)
    saved = torch.load(Path(summary["run_dir"]) / "checkpoints" / "last.pt", weights_only=False)["model"]
    resumed = T.Trainer(_cfg(tmp_path, data_root, "run"), resume=summary["run_dir"], progress=False, summary=False)
    resumed._setup()
    state = resumed.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    resumed.writer.close()
