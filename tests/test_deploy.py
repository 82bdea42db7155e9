"""reste.deploy: packing, exact XNOR-popcount layers, export/load, fusion, summary, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import reste
from reste.deploy import ExportError, export, load, pack_signs, summary, unpack_signs
from reste.deploy import packed as packed_mod
from reste.deploy.packed import PackedBinaryConv2d, PackedBinaryLinear
from reste.nn import BinaryConv2d, BinaryLinear

torch.set_num_threads(2)

HAS_EXT = packed_mod._ext() is not None
ISAS = ["auto", "generic"] if HAS_EXT else ["reference"]


@pytest.fixture(params=ISAS)
def isa(request):
    """Run a test with the best kernel for this CPU and with the portable one."""
    if request.param != "reference":
        packed_mod._ext().select(request.param)
    yield request.param
    if request.param != "reference":
        packed_mod._ext().select("auto")


# ----------------------------------------------------------------------------- packing
def test_pack_signs_bit_layout_by_hand():
    w = torch.tensor([[1.0, -1.0, -1.0, 1.0, 0.0, -2.0, 3.0, -4.0, 5.0, -6.0]])
    # element 8b + t -> bit t of byte b; sign(0) = +1 -> bit 1
    # byte 0: bits (lsb first) 1 0 0 1 1 0 1 0 = 0b01011001; byte 1: bits 1 0 = 0b01
    assert pack_signs(w).tolist() == [[0b01011001, 0b01]]


@pytest.mark.parametrize("shape", [(7, 3, 3, 3), (16, 16, 3, 3), (5, 70), (64, 64, 1, 1)])
def test_pack_round_trip(shape):
    w = torch.randn(shape)
    w.view(-1)[::7] = 0.0  # zeros binarize to +1
    bits = pack_signs(w)
    k = math.prod(shape[1:])
    assert bits.dtype == torch.uint8 and bits.shape == (shape[0], (k + 7) // 8)
    signs = unpack_signs(bits, k).reshape(shape)
    assert torch.equal(signs, torch.where(w >= 0, 1.0, -1.0))


# ----------------------------------------------------------------------------- exact integer sums
CONV_CASES = [
    # in, out, kernel, stride, padding, input_padding, batch, H, W
    (16, 16, 3, 1, 1, "zero", 2, 8, 9),
    (16, 32, 3, 2, 1, "zero", 3, 9, 8),
    (3, 5, 3, 2, 1, "+1", 1, 7, 7),
    (70, 33, 3, 1, 1, "-1", 2, 6, 5),
    (64, 64, 3, 2, 1, "zero", 1, 10, 10),
    (128, 130, 1, 1, 0, "zero", 2, 5, 4),
    (200, 17, 3, 1, 0, "zero", 2, 6, 6),
    (16, 24, 5, 2, 2, "zero", 2, 11, 9),
    (24, 16, 3, 1, 1, "+1", 2, 5, 6),
    (40, 8, 3, 1, 2, "zero", 1, 4, 4),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "c{}o{}k{}s{}p{}{}n{}".format(*c[:7]))
def test_packed_conv_integer_sums_exact(case, isa):
    cin, cout, k, stride, pad, input_padding, n, h, w = case
    torch.manual_seed(cin * 31 + cout)
    trained = BinaryConv2d(cin, cout, k, stride, pad, bias=False, weight_scale="none", input_padding=input_padding).eval()
    packed = PackedBinaryConv2d.from_binary(trained)
    x = torch.randn(n, cin, h, w)
    x.view(-1)[::5] = 0.0  # sign(0) = +1 on inputs as well
    with torch.no_grad():
        expected = trained(x)  # alpha = 1: the plain +-1 dot products
        reference = packed.reference_forward(x)
        fast = packed(x)
        fast_cl = packed(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(expected, torch.round(expected)), "sanity: the trained layer gives integers"
    assert torch.equal(reference, expected)
    assert torch.equal(fast, expected) and torch.equal(fast_cl, expected)


@pytest.mark.parametrize("scale", ["layer_mean", "channel_mean"])
def test_packed_conv_scaled_with_bias_matches_trained_layer(scale, isa):
    torch.manual_seed(1)
    trained = BinaryConv2d(24, 40, 3, 1, 1, bias=True, weight_scale=scale).eval()
    packed = PackedBinaryConv2d.from_binary(trained)
    assert packed.alpha.numel() == (40 if scale == "channel_mean" else 1)
    x = torch.randn(3, 24, 7, 7)
    with torch.no_grad():
        assert torch.allclose(packed(x), trained(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("features,out,rows", [(64, 10, 1), (100, 33, 7), (192, 48, 65), (5, 3, 4)])
def test_packed_linear_integer_sums_exact(features, out, rows, isa):
    torch.manual_seed(features)
    trained = BinaryLinear(features, out, bias=False, weight_scale="none").eval()
    packed = PackedBinaryLinear.from_binary(trained)
    x = torch.randn(2, rows, features)  # leading dims are flattened and restored
    with torch.no_grad():
        expected = trained(x)
        assert torch.equal(packed.reference_forward(x), expected)
        assert torch.equal(packed(x), expected)


def test_real_input_layers_use_unpacked_weights_exactly():
    torch.manual_seed(2)
    conv = BinaryConv2d(8, 8, 3, 1, 1, bias=False, input_estimator=None).eval()
    lin = BinaryLinear(8, 4, input_estimator=None).eval()
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        assert torch.equal(PackedBinaryConv2d.from_binary(conv)(x), conv(x))
        assert torch.equal(PackedBinaryLinear.from_binary(lin)(x[:, :, 0, 0]), lin(x[:, :, 0, 0]))


@pytest.fixture
def no_extension(monkeypatch):
    """As if the process started with RESTE_NO_EXT=1."""
    monkeypatch.setenv(packed_mod.NO_EXTENSION_ENV, "1")
    monkeypatch.setattr(packed_mod, "_extension_loaded", False)
    monkeypatch.setattr(packed_mod, "_extension", None)
    monkeypatch.setattr(packed_mod, "_warned", False)


def test_fallback_without_extension_warns_and_stays_exact(no_extension):
    torch.manual_seed(3)
    trained = BinaryConv2d(16, 16, 3, 1, 1, bias=False, weight_scale="none").eval()
    x = torch.randn(2, 16, 6, 6)
    assert packed_mod.kernel_info()["extension"] is False
    assert "RESTE_NO_EXT" in packed_mod.kernel_info()["reason"]
    layer = PackedBinaryConv2d.from_binary(trained)
    with pytest.warns(RuntimeWarning, match="unavailable"):
        with torch.no_grad():
            out = layer(x)
    with torch.no_grad():
        assert torch.equal(out, trained(x))


def test_whole_model_without_extension(no_extension, tmp_path):
    model = _tiny("1w1a")
    with pytest.warns(RuntimeWarning, match="unavailable"):
        deployed = load(export(model, tmp_path / "t.safetensors"), model=TinyResNet())
        x = torch.randn(3, 1, 12, 12)
        with torch.no_grad():
            assert torch.allclose(deployed(x), model(x), atol=1e-4, rtol=0)
    assert isinstance(deployed.bn1, nn.BatchNorm2d)  # nothing fused without the kernel


# ----------------------------------------------------------------------------- export / load
class TinyResNet(nn.Module):
    """A small binary-ready ResNet: real stem, conv -> ReLU -> BN units, residuals, real head."""

    def __init__(self, in_channels=1, width=16, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.ReLU(), nn.BatchNorm2d(width))
        self.conv1, self.relu1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.ReLU(), nn.BatchNorm2d(width)
        self.conv2, self.relu2, self.bn2 = nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False), nn.ReLU(), nn.BatchNorm2d(2 * width)
        self.down = nn.Conv2d(width, 2 * width, 1, 2, bias=False)
        self.fc1 = nn.Linear(2 * width, 2 * width)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.bn1(self.relu1(self.conv1(x)))
        x = self.down(x) + self.bn2(self.relu2(self.conv2(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x + self.fc1(x))


def _trained(model: nn.Module, in_channels=1, size=12) -> nn.Module:
    """Random weights plus batch-norm statistics from a few train-mode passes, in eval mode."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, in_channels, size, size))
    return model.eval()


def _tiny(precision: str) -> nn.Module:
    torch.manual_seed(4)
    model = reste.binarize(TinyResNet(), activations=precision == "1w1a", keep=("first", "last", "pointwise"))
    return _trained(model)


@pytest.mark.parametrize("precision", ["1w1a", "1w32a"])
def test_export_load_reproduces_eval_logits(precision, tmp_path):
    model = _tiny(precision)
    path = export(model, tmp_path / "tiny.safetensors")
    x = torch.randn(6, 1, 12, 12)
    for fuse in (True, False):
        deployed = load(path, model=TinyResNet(), fuse=fuse)
        assert not any(isinstance(m, reste.Estimator) for m in deployed.modules())
        with torch.no_grad():
            assert torch.allclose(deployed(x), model(x), atol=1e-4, rtol=0)


def test_export_load_registry_model_without_passing_architecture(tmp_path):
    torch.manual_seed(5)
    arch = {"name": "resnet20", "num_classes": 10, "in_channels": 1, "precision": "1w1a"}
    model = _trained(reste.models.create(**arch), size=16)
    path = export(model, tmp_path / "r20.safetensors", architecture=arch)
    deployed = load(path)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), atol=1e-4, rtol=0)
    if HAS_EXT:  # every conv -> ReLU -> BN unit of ResNet-20 is fused into its kernel
        fused = [n for n, m in deployed.named_modules() if getattr(m, "post_bn", None) is not None]
        assert len(fused) == 18


def test_exported_file_holds_bits_not_latent_weights(tmp_path):
    from safetensors import safe_open

    torch.manual_seed(6)
    arch = {"name": "resnet20", "num_classes": 10, "in_channels": 3, "precision": "1w1a"}
    model = reste.models.create(**arch).eval()
    path = export(model, tmp_path / "r20.safetensors", architecture=arch)
    binary = dict(reste.nn.binary_layers(model))
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for name, layer in binary.items():
            assert f"{name}.weight" not in keys
            bits = f.get_tensor(f"{name}.weight_bits")
            assert bits.dtype == torch.uint8
            assert bits.shape == (layer.out_channels, (layer.weight[0].numel() + 7) // 8)
            assert f.get_tensor(f"{name}.alpha").shape == (1,)
        assert not any("estimator" in k or "num_batches_tracked" in k for k in keys)
        assert all(f.get_tensor(k).dtype in (torch.uint8, torch.float32) for k in keys)
        graph = json.loads(f.metadata()["graph"])
    assert set(graph["binary_layers"]) == set(binary)
    assert graph["architecture"] == arch
    float_bytes = 4 * sum(t.numel() for k, t in model.state_dict().items() if t.is_floating_point() and "estimator" not in k)
    assert path.stat().st_size * 15 < float_bytes


def test_fusion_leaves_shared_or_reused_outputs_alone(tmp_path):
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 16, 3, padding=1)
            self.conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
            self.relu, self.bn = nn.ReLU(), nn.BatchNorm2d(16)
            self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            y = self.conv(self.stem(x))
            z = self.bn(self.relu(y)) + y  # y is used twice: no fusion of conv
            z = self.relu(self.conv2(z))  # the ReLU module is shared: no fusion of conv2 either
            return self.head(z.mean((2, 3)))

    torch.manual_seed(7)
    model = _trained(reste.binarize(Reuse()))
    path = export(model, tmp_path / "reuse.safetensors")
    deployed = load(path, model=Reuse())
    assert isinstance(deployed.relu, nn.ReLU) and isinstance(deployed.bn, nn.BatchNorm2d)
    assert getattr(deployed.conv, "post_relu", False) is False and getattr(deployed.conv2, "post_relu", False) is False
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), atol=1e-4, rtol=0)


def test_load_errors_name_the_fix(tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ExportError, match="not a reste export"):
        load(other)
    path = export(_tiny("1w1a"), tmp_path / "tiny.safetensors")
    with pytest.raises(ExportError, match="model="):
        load(path)
    with pytest.raises(ExportError, match="no exported model"):
        load(tmp_path / "missing.safetensors")
    with pytest.raises(ExportError, match="no binary layers"):
        export(TinyResNet(), tmp_path / "float.safetensors")


# ----------------------------------------------------------------------------- summary
def test_summary_numbers_by_hand():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),  # real
        nn.BatchNorm2d(8),
        BinaryConv2d(8, 16, 3, stride=2, padding=1, bias=False),  # 1W/1A, one alpha
        nn.BatchNorm2d(16),
        nn.Flatten(),
        BinaryLinear(16 * 4 * 4, 10, bias=True, input_estimator=None),  # 1W/32A, one alpha, real bias
    )
    s = summary(model, (3, 8, 8))
    conv, bn8, bconv, bn16, blin = s.layers
    # real conv: 3*8*9 = 216 weights at 32 bits; 8*8 outputs x 8 channels x 27 taps
    assert (conv.params, conv.params_32bit, conv.memory_bits, conv.macs_32x32) == (216, 216, 216 * 32, 64 * 8 * 27)
    # BN(8): weight + bias are parameters, running mean/var buffers also stored
    assert (bn8.params, bn8.memory_bits) == (16, 32 * 32)
    # binary conv: 8*16*9 = 1152 one-bit weights + one float alpha; 4*4*16 outputs x 72 taps, all XNOR
    assert (bconv.params_1bit, bconv.memory_bits, bconv.macs_1x1, bconv.output_shape) == (1152, 1152 + 32, 16 * 16 * 72, (16, 4, 4))
    assert (bn16.params, bn16.memory_bits) == (32, 64 * 32)
    # binary linear with real inputs: 2560 one-bit weights, 10 real biases, alpha
    assert (blin.params, blin.params_1bit, blin.params_32bit, blin.memory_bits, blin.macs_1x32) == (2570, 2560, 10, 2560 + 320 + 32, 2560)
    assert s.memory_bits == 6912 + 1024 + 1184 + 2048 + 2912 == 14080 and s.memory_bytes == 1760
    assert s.float32_bits == 32 * (216 + 32 + 1152 + 64 + 2570) == 129088
    assert s.compression == pytest.approx(129088 / 14080)
    assert s.macs == 13824 + 18432 + 2560 and s.binary_mac_share == pytest.approx(18432 / 34816)
    text = str(s)
    assert "binary MAC share" in text and "1,760 bytes" in text


@pytest.mark.parametrize("fuse", [False, True])
def test_summary_of_deployed_model_matches_trained(tmp_path, fuse):
    model = _tiny("1w1a")
    deployed = load(export(model, tmp_path / "t.safetensors"), model=TinyResNet(), fuse=fuse)
    a, b = summary(model, (1, 12, 12)), summary(deployed, (1, 12, 12))
    keys = ("params", "params_1bit", "memory_bits", "macs_1x1", "macs_32x32", "float32_bits")
    assert [getattr(a, k) for k in keys] == [getattr(b, k) for k in keys]


# ----------------------------------------------------------------------------- command line
def _fake_run(tmp_path, precision="1w1a"):
    from reste.train.config import config_from_dict, config_to_dict

    cfg = config_to_dict(config_from_dict({"model": {"name": "resnet20", "precision": precision}, "data": {"name": "fashion_mnist"}}))
    torch.manual_seed(8)
    model = _trained(reste.models.create("resnet20", num_classes=10, in_channels=1, precision=precision, image_size=28), size=28)
    run = tmp_path / "run-20250101-000000"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    torch.save({"model": model.state_dict(), "config": cfg, "epoch": 3}, run / "checkpoints" / "last.pt")
    return run, model


def test_cli_export_and_summary(tmp_path, capsys):
    from reste.cli import main

    run, model = _fake_run(tmp_path)
    assert main(["export", str(run)]) == 2  # no best.pt: the error says to use last
    assert "--checkpoint last" in capsys.readouterr().err
    out = tmp_path / "m.safetensors"
    assert main(["export", str(run), "--checkpoint", "last", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "verified" in printed and str(out) in printed
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(load(out)(x), model(x), atol=1e-4, rtol=0)
    assert main(["summary", str(run), "--json", str(tmp_path / "s.json")]) == 0
    totals = json.loads((tmp_path / "s.json").read_text())["totals"]
    assert totals["params_1bit"] == sum(l.weight.numel() for _, l in reste.nn.binary_layers(model))
    assert totals["binary_mac_share"] > 0.99
    assert main(["summary", str(out)]) == 0
    assert "memory compression" in capsys.readouterr().out


@pytest.mark.skipif(not HAS_EXT, reason="times the compiled kernel; the reference path is covered above")
def test_bench_conv_smoke():
    from reste.deploy.bench import bench_conv

    (row,) = bench_conv([(16, 16, 8, 1)], batches=(2,), repeats=1, min_sample_s=0.0)
    assert row["exact"] and row["float_ms"] > 0 and row["binary_ms"] > 0
