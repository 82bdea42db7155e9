"""Tests of the model registry: architectures, precisions, shapes, gradients, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reste
from reste.models import registry
from reste.models.resnet import ZeroPadShortcut
from reste.nn import BinaryLayer

torch.set_num_threads(2)

CIFAR_MODELS = ("resnet20", "resnet20_bireal", "resnet18_cifar", "vgg_small")
IMAGENET_MODELS = ("resnet18", "resnet34")
ALL_MODELS = CIFAR_MODELS + IMAGENET_MODELS + ("vit_tiny",)


# ---------------------------------------------------------------------------
# parameter counts, derived by hand from the architecture description


def conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k  # no bias


def bn(c: int) -> int:
    return 2 * c  # weight and bias (running stats are buffers)


def linear(fin: int, fout: int) -> int:
    return fin * fout + fout


def resnet_params(stem: int, stem_channels: int, stages, blocks, num_classes: int, shortcut_has_params: bool) -> int:
    """Two 3x3 conv + BN per block; a 1x1 conv + BN where the shape changes (unless option A);
    head BatchNorm1d + Linear."""
    total = stem
    cin = stem_channels
    for c, n in zip(stages, blocks):
        for _ in range(n):
            total += conv(cin, c, 3) + bn(c) + conv(c, c, 3) + bn(c)
            if cin != c and shortcut_has_params:
                total += conv(cin, c, 1) + bn(c)
            cin = c
    return total + bn(cin) + linear(cin, num_classes)


def expected_params(name: str, num_classes: int) -> int:
    if name in ("resnet20", "resnet20_bireal"):
        return resnet_params(conv(3, 16, 3) + bn(16), 16, (16, 32, 64), (3, 3, 3), num_classes, False)
    if name == "resnet18_cifar":
        return resnet_params(conv(3, 64, 3) + bn(64), 64, (64, 128, 256, 512), (2, 2, 2, 2), num_classes, True)
    if name in ("resnet18", "resnet34"):
        blocks = (2, 2, 2, 2) if name == "resnet18" else (3, 4, 6, 3)
        return resnet_params(conv(3, 64, 7) + bn(64), 64, (64, 128, 256, 512), blocks, num_classes, True)
    if name == "vgg_small":
        widths = (128, 128, 256, 256, 512, 512)
        convs = sum(conv(cin, cout, 3) + bn(cout) for cin, cout in zip((3,) + widths[:-1], widths))
        return convs + linear(512 * 4 * 4, num_classes)
    if name == "vit_tiny":
        dim, mlp, tokens = 192, 768, (224 // 16) ** 2 + 1
        block = 2 * dim + linear(dim, 3 * dim) + linear(dim, dim) + 2 * dim + linear(dim, mlp) + linear(mlp, dim)
        patch_embed = 3 * dim * 16 * 16 + dim
        return patch_embed + dim + tokens * dim + 12 * block + 2 * dim + linear(dim, num_classes)
    raise KeyError(name)


# the integers the derivation gives, pinned so a change of either is noticed
PINNED = {
    ("resnet20", 10): 269_850,
    ("resnet20_bireal", 10): 269_850,
    ("resnet18_cifar", 10): 11_174_986,
    ("vgg_small", 10): 4_660_106,
    ("resnet18", 10): 11_182_666,
    ("resnet18", 1000): 11_690_536,
    ("resnet34", 10): 21_290_826,
    ("resnet34", 1000): 21_798_696,
    ("vit_tiny", 10): 5_526_346,
    ("vit_tiny", 1000): 5_717_416,
}


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_names_lists_the_paper_models():
    assert set(ALL_MODELS) <= set(reste.models.names())
    assert reste.models.names() == sorted(reste.models.names())


@pytest.mark.parametrize("name, num_classes", sorted(PINNED))
def test_parameter_count_matches_the_architecture(name, num_classes):
    assert expected_params(name, num_classes) == PINNED[name, num_classes]
    model = reste.models.create(name, num_classes=num_classes, in_channels=3, precision="fp")
    assert count(model) == PINNED[name, num_classes]


def test_parameter_counts_are_near_the_published_sizes():
    # facts sheet: ResNet-20 ~0.27M, VGG-small ~4.66M, CIFAR ResNet-18 ~11.2M, ViT-tiny ~5.7M (ImageNet head)
    assert round(PINNED["resnet20", 10] / 1e6, 2) == 0.27
    assert round(PINNED["vgg_small", 10] / 1e6, 2) == 4.66
    assert round(PINNED["resnet18_cifar", 10] / 1e6, 1) == 11.2
    assert round(PINNED["vit_tiny", 1000] / 1e6, 1) == 5.7


@pytest.mark.parametrize("name", ALL_MODELS)
def test_fp_and_binary_are_the_same_network(name):
    fp = reste.models.create(name, precision="fp")
    binary = reste.models.create(name, precision="1w1a")
    assert count(fp) == count(binary)
    # same parameter names and shapes: a float checkpoint initialises the binary model
    assert {n: p.shape for n, p in fp.named_parameters()} == {n: p.shape for n, p in binary.named_parameters()}


# ---------------------------------------------------------------------------
# which layers are binary

SHORTCUTS = [f"stages.{s}.0.shortcut.conv" for s in (1, 2, 3)]
FULL_PRECISION = {
    "resnet20": {"stem.conv", "head.fc"},
    "resnet20_bireal": {"stem.conv", "head.fc"},
    "resnet18_cifar": {"stem.conv", "head.fc", *SHORTCUTS},
    "resnet18": {"stem.conv", "head.fc", *SHORTCUTS},
    "resnet34": {"stem.conv", "head.fc", *SHORTCUTS},
    "vgg_small": {"features.conv0", "fc"},
    "vit_tiny": {"patch_embed", "head"},
}
BINARY_COUNT = {
    "resnet20": 18,
    "resnet20_bireal": 18,
    "resnet18_cifar": 16,
    "resnet18": 16,
    "resnet34": 32,
    "vgg_small": 5,
    "vit_tiny": 48,
}


@pytest.mark.parametrize("precision", ["1w1a", "1w32a", "fp"])
@pytest.mark.parametrize("name", ALL_MODELS)
def test_binary_and_real_layers(name, precision):
    model = reste.models.create(name, precision=precision)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    binary = {n for n, m in layers if isinstance(m, BinaryLayer)}
    if precision == "fp":
        assert binary == set()
        return
    assert {n for n, _ in layers} - binary == FULL_PRECISION[name]
    assert len(binary) == BINARY_COUNT[name]
    # first and last layer in forward order, and every 1x1 conv, stay real
    assert layers[0][0] not in binary and layers[-1][0] not in binary
    assert all(n not in binary for n, m in layers if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))
    for n in binary:
        layer = model.get_submodule(n)
        assert layer.binary_weights
        assert layer.binary_inputs == (precision == "1w1a")
        assert layer.bias is None or name == "vit_tiny"  # binary convs have no bias
    # normalization layers are never touched
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm))]
    assert norms and all(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm) for m in norms)
    assert {n for n, _ in reste.nn.binary_layers(model)} == binary


def test_binary_conv_computes_with_layer_mean_scaled_signs():
    model = reste.models.create("resnet20", precision="1w1a").eval()
    layer = model.get_submodule("stages.1.0.conv1")
    w = layer.weight.detach()
    expected = w.abs().mean() * torch.where(w >= 0, 1.0, -1.0)
    torch.testing.assert_close(layer.quantized_weight().detach(), expected)
    x = torch.randn(2, 16, 8, 8)
    y = layer(x)
    ref = nn.functional.conv2d(torch.where(x >= 0, 1.0, -1.0), expected, None, 2, 1)
    torch.testing.assert_close(y.detach(), ref)


def test_estimator_options_reach_every_binary_layer():
    model = reste.models.create("resnet20", estimator="reste", estimator_params={"o": 2.5})
    for _, layer in reste.nn.binary_layers(model):
        assert float(layer.weight_estimator.o) == 2.5
        assert float(layer.input_estimator.o) == 2.5
    # each layer owns its estimator (schedules set them all, but they are separate buffers)
    ests = [layer.weight_estimator for _, layer in reste.nn.binary_layers(model)]
    assert len({id(e) for e in ests}) == len(ests)
    # an o schedule reaches all of them: 18 layers x (weights + inputs)
    assert reste.set_params(model, o=3.0) == 36
    assert all(float(e.o) == 3.0 for e in ests)

    ste = reste.models.create("resnet20", estimator="ste", precision="1w32a")
    assert {layer.weight_estimator.name for _, layer in reste.nn.binary_layers(ste)} == {"ste"}

    dorefa = reste.models.create(
        "vit_tiny", precision="1w32a", weight_estimator="dorefa", depth=2, image_size=32, patch_size=4
    )
    layers = [layer for _, layer in reste.nn.binary_layers(dorefa)]
    assert len(layers) == 8 and all(
        layer.weight_estimator.name == "dorefa" and not layer.binary_inputs for layer in layers
    )

    scaled = reste.models.create("vgg_small", weight_scale="channel_mean", input_padding="+1")
    layer = scaled.get_submodule("features.conv1")
    assert layer.weight_scale == "channel_mean" and layer.input_padding == "+1"


# ---------------------------------------------------------------------------
# shapes and gradients


SMALL_INPUTS = {
    "mnist": dict(shape=(2, 1, 28, 28), kwargs=dict(in_channels=1, image_size=28)),
    "cifar": dict(shape=(2, 3, 32, 32), kwargs=dict(in_channels=3, image_size=32)),
}


@pytest.mark.parametrize("data", sorted(SMALL_INPUTS))
@pytest.mark.parametrize("name", CIFAR_MODELS + ("vit_tiny",))
def test_forward_shape_on_small_images(name, data):
    shape, kwargs = SMALL_INPUTS[data]["shape"], dict(SMALL_INPUTS[data]["kwargs"])
    if name == "vit_tiny":
        kwargs.update(patch_size=4, depth=2)
    model = reste.models.create(name, num_classes=7, precision="1w1a", **kwargs)
    y = model(torch.randn(shape))
    assert y.shape == (2, 7) and torch.isfinite(y).all()


@pytest.mark.parametrize("size", [64, 36])  # 36: odd feature maps (9 -> 5 -> 3) in the later stages
@pytest.mark.parametrize("name", IMAGENET_MODELS)
def test_imagenet_models_on_small_inputs(name, size):
    model = reste.models.create(name, num_classes=1000, precision="1w1a", width=0.25 if size == 36 else 1.0)
    y = model(torch.randn(2, 3, size, size))
    assert y.shape == (2, 1000) and torch.isfinite(y).all()


@pytest.mark.parametrize(
    "name, kwargs, shape",
    [
        ("resnet20_bireal", {"in_channels": 1}, (4, 1, 28, 28)),
        ("resnet18_cifar", {"width": 0.25}, (4, 3, 32, 32)),
        ("vgg_small", {"width": 0.25}, (4, 3, 32, 32)),
        ("resnet18", {"width": 0.25}, (4, 3, 64, 64)),
        ("vit_tiny", {"image_size": 32, "patch_size": 8, "depth": 2}, (4, 3, 32, 32)),
    ],
)
def test_backward_reaches_latent_weights(name, kwargs, shape):
    torch.manual_seed(0)
    model = reste.models.create(name, precision="1w1a", **kwargs)
    loss = nn.functional.cross_entropy(model(torch.randn(shape)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
    for n, layer in reste.nn.binary_layers(model):
        assert layer.weight.grad.abs().sum() > 0, f"no gradient reached the latent weights of {n}"


# ---------------------------------------------------------------------------
# shortcuts


def test_option_a_shortcut_is_a_parameter_free_zero_padded_subsample():
    shortcut = ZeroPadShortcut(16, 32, stride=2)
    assert list(shortcut.parameters()) == []
    x = torch.randn(2, 16, 9, 9)
    y = shortcut(x)
    assert y.shape == (2, 32, 5, 5)
    torch.testing.assert_close(y[:, 8:24], x[:, :, ::2, ::2])
    assert (y[:, :8] == 0).all() and (y[:, 24:] == 0).all()

    model = reste.models.create("resnet20", precision="1w1a")
    transitions = [model.get_submodule(f"stages.{s}.0.shortcut") for s in (1, 2)]
    assert all(isinstance(s, ZeroPadShortcut) for s in transitions)
    shortcut_params = [n for n, _ in model.named_parameters() if ".shortcut." in n]
    assert shortcut_params == []


def _block_output_with(block, x, zero: str):
    """Block output (eval mode, fresh BN stats) with conv ``zero`` set to 0."""
    with torch.no_grad():
        getattr(block, zero).weight.zero_()
        return block(x)


@pytest.mark.parametrize("zero", ["conv1", "conv2"])
def test_bireal_adds_a_shortcut_around_each_conv(zero):
    # with fresh BN statistics in eval mode, a zeroed conv makes its conv -> ReLU -> BN unit output 0;
    # the plain block then returns exactly its shortcut, the Bi-Real block does not
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8, 8)
    plain = reste.models.create("resnet20", precision="fp").eval().get_submodule("stages.0.0")
    bireal = reste.models.create("resnet20_bireal", precision="fp").eval().get_submodule("stages.0.0")
    torch.testing.assert_close(_block_output_with(plain, x, zero), x)
    assert not torch.allclose(_block_output_with(bireal, x, zero), x)


def test_imagenet_downsampling_is_average_pool_then_real_1x1_conv():
    model = reste.models.create("resnet18", precision="1w1a")
    shortcut = model.get_submodule("stages.1.0.shortcut")
    assert isinstance(shortcut.pool, nn.AvgPool2d)
    assert type(shortcut.conv) is nn.Conv2d and shortcut.conv.kernel_size == (1, 1) and shortcut.conv.stride == (1, 1)
    assert isinstance(shortcut.bn, nn.BatchNorm2d)


# ---------------------------------------------------------------------------
# describe, register_model, errors


def test_describe_lists_binary_layers():
    model = reste.models.create("resnet20", precision="1w32a")
    info = reste.models.describe(model)
    assert [l.name for l in info.layers if not l.binary_weights] == ["stem.conv", "head.fc"]
    assert all(l.weights == "reste" and l.inputs == "real" for l in info.layers if l.binary_weights)
    assert info.total_params == PINNED["resnet20", 10]
    # binary = every 3x3 conv after the stem
    # binary = every 3x3 conv after the stem: 6 per stage, the first of stages 2 and 3 widening the channels
    stage1 = 6 * conv(16, 16, 3)
    stage2 = conv(16, 32, 3) + 5 * conv(32, 32, 3)
    stage3 = conv(32, 64, 3) + 5 * conv(64, 64, 3)
    assert info.binary_params == stage1 + stage2 + stage3
    assert info.real_params == info.total_params - info.binary_params
    text = str(info)
    assert "stages.2.2.conv2" in text and "18 with binary weights" in text


def test_a_weight_tied_between_two_binary_layers_counts_once():
    # describe said 128 binary and 10 real parameters of 138 (the tied 8x8 weight twice); the indicator
    # tracker measured it twice too
    from reste.analysis.indicators import IndicatorTracker

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.l1, self.l2, self.z = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
            self.l2.weight = self.l1.weight

        def forward(self, x):
            return self.z(self.l2(torch.tanh(self.l1(self.a(x)))))

    model = reste.binarize(Tied(), keep=["a", "z"])
    assert model.l1.weight is model.l2.weight
    info = reste.models.describe(model)
    assert (info.total_params, info.binary_params, info.real_params) == (138, 64, 74)
    assert [l.name for l in info.layers if l.binary_weights] == ["l1", "l2"]  # both layers still listed
    assert [name for name, _ in IndicatorTracker(model, o_end=3.0).layers] == ["l1"]


def test_register_model_adds_a_model(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @reste.models.register_model("tiny_mlp")
    def tiny_mlp(num_classes=10, in_channels=1, hidden=32):
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * 28 * 28, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.Linear(hidden, num_classes),
        )

    assert "tiny_mlp" in reste.models.names()
    model = reste.models.create("tiny_mlp", num_classes=5, in_channels=1, precision="1w1a", hidden=16)
    kinds = [isinstance(m, BinaryLayer) for m in model if isinstance(m, nn.Linear)]
    assert kinds == [False, True, False]  # default: first and last layer real
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 5)
    with pytest.raises(ValueError, match="already registered"):
        reste.models.register_model("tiny_mlp")(tiny_mlp)
    with pytest.raises(TypeError, match="num_classes"):
        reste.models.register_model("bad")(lambda classes=10: nn.Linear(2, classes))


def test_errors_name_the_problem_and_the_fix():
    with pytest.raises(ValueError, match=r"unknown model 'resnet21'.*resnet20_bireal.*Did you mean 'resnet20'"):
        reste.models.create("resnet21")
    with pytest.raises(ValueError, match=r"unknown precision 'w1a1'.*1w1a, 1w32a, fp"):
        reste.models.create("resnet20", precision="w1a1")
    with pytest.raises(TypeError, match=r"'resnet20' does not take patch_size.*width"):
        reste.models.create("resnet20", patch_size=4)
    with pytest.raises(ValueError, match=r"patch_size=16 does not divide image_size=28.*7"):
        reste.models.create("vit_tiny", image_size=28)
    with pytest.raises(ValueError, match=r"built for 28x28 inputs but got 32x32; create it with image_size=32"):
        reste.models.create("vgg_small", image_size=28, precision="fp")(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="in_channels must be a positive integer"):
        reste.models.create("resnet20", in_channels=0)


def test_resnets_ignore_image_size_and_fp_ignores_binarization_options():
    # one configuration can pass image_size and estimator options to every model and precision
    model = reste.models.create("resnet20", image_size=28, in_channels=1, precision="fp", estimator_params={"o": 3.0})
    assert not any(isinstance(m, BinaryLayer) for m in model.modules())
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


# ---------------------------------------------------------------------------
# ImageNet downsampling shortcut: avgpool (default) or stride (the paper's code)


@pytest.mark.parametrize("name", IMAGENET_MODELS)
def test_imagenet_downsample_stride_is_the_reference_strided_1x1_conv_and_avgpool_stays_the_default(name):
    # the reference (model/models_imagenet/resnet18.py, resnet34.py, _make_layer): Conv2d(k=1, stride) + BN
    default = reste.models.create(name, precision="1w1a", width=0.25)
    pooled = reste.models.create(name, precision="1w1a", width=0.25, downsample="avgpool")
    strided = reste.models.create(name, precision="1w1a", width=0.25, downsample="stride")
    names = [f"stages.{stage}.0.shortcut" for stage in (1, 2, 3)]
    for model in (default, pooled):
        for where in names:
            shortcut = model.get_submodule(where)
            assert list(dict(shortcut.named_children())) == ["pool", "conv", "bn"]
            assert shortcut.conv.stride == (1, 1)
    for where in names:
        shortcut = strided.get_submodule(where)
        assert list(dict(shortcut.named_children())) == ["conv", "bn"]  # no pooling
        conv = shortcut.conv
        assert type(conv) is nn.Conv2d  # stays real in 1w1a
        assert (conv.kernel_size, conv.stride, conv.padding, conv.bias) == ((1, 1), (2, 2), (0, 0), None)
        assert isinstance(shortcut.bn, nn.BatchNorm2d)
    # the same parameters under the same names: a state dict loads into either
    shapes = {k: tuple(v.shape) for k, v in pooled.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in strided.state_dict().items()} == shapes
    assert sum(p.numel() for p in strided.parameters()) == sum(p.numel() for p in pooled.parameters())


def test_imagenet_stride_shortcut_computes_a_strided_1x1_conv_and_differs_from_avgpool():
    torch.manual_seed(0)
    pooled = reste.models.create("resnet18", precision="fp", width=0.25).eval()
    strided = reste.models.create("resnet18", precision="fp", width=0.25, downsample="stride").eval()
    strided.load_state_dict(pooled.state_dict())
    x = torch.randn(2, 16, 9, 9)  # odd: both give 5x5, as the strided 3x3 conv beside them
    shortcut = strided.get_submodule("stages.1.0.shortcut")
    bn = shortcut.bn
    functional = torch.nn.functional
    expected = functional.batch_norm(
        functional.conv2d(x, shortcut.conv.weight, stride=2),
        bn.running_mean,
        bn.running_var,
        bn.weight,
        bn.bias,
        eps=bn.eps,
    )
    with torch.no_grad():
        got = shortcut(x)
        other = pooled.get_submodule("stages.1.0.shortcut")(x)
    torch.testing.assert_close(got, expected)
    assert got.shape == other.shape == (2, 32, 5, 5)
    assert not torch.allclose(got, other)
    images = torch.randn(2, 3, 36, 36)
    with torch.no_grad():
        assert not torch.allclose(strided(images), pooled(images))  # same weights, another network


def test_imagenet_downsample_rejects_other_values_naming_the_allowed_ones():
    for bad in ("strided", "avg", None, 2):
        with pytest.raises(ValueError, match=r"downsample must be one of 'avgpool', 'stride', got "):
            reste.models.create("resnet34", downsample=bad)
    with pytest.raises(TypeError, match="does not take downsample"):  # the CIFAR nets have no such option
        reste.models.create("resnet18_cifar", downsample="stride")
