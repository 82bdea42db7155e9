"""reste.deploy: packing, exact XNOR-popcount layers, export/load, fusion, summary, CLI."""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import reste
from deploy_helpers import disagreements_across_threads, forced_kernel_path
from reste import _ext as _loader
from reste.deploy import ExportError, export, load, pack_signs, summary, unpack_signs
from reste.deploy import packed as packed_mod
from reste.deploy.packed import PackedBinaryConv2d, PackedBinaryLinear
from reste.nn import BinaryConv2d, BinaryLinear

torch.set_num_threads(2)

HAS_EXT = packed_mod._ext() is not None
# every kernel path this CPU supports (portable, avx2, avx512, neon), each tested on its own
ISAS = packed_mod.kernel_info()["available"] if HAS_EXT else ["reference"]


@pytest.fixture(params=ISAS)
def isa(request):
    """Run a test once per kernel path this machine can run (or on the reference without the extension)."""
    with forced_kernel_path(request.param) as name:
        yield name


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
    # wide rows: blocks of 8, 4, 2 and 1 pixels between the border columns
    (16, 16, 3, 1, 1, "zero", 1, 4, 32),
    (32, 32, 3, 1, 1, "zero", 2, 5, 16),
    (32, 64, 3, 2, 1, "zero", 1, 6, 16),
    (64, 16, 3, 1, 1, "zero", 1, 3, 23),
    (8, 16, 3, 1, 1, "+1", 1, 4, 23),
    (128, 16, 3, 1, 1, "zero", 1, 3, 15),
    # more than 31 words per output (the AVX2 kernel's byte counters are flushed), odd counts
    (256, 20, 3, 1, 1, "zero", 1, 5, 7),
    (701, 9, 3, 2, 1, "+1", 1, 5, 6),
    (77, 31, 3, 2, 1, "zero", 2, 7, 6),
    (13, 3, 1, 1, 0, "zero", 1, 3, 5),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "c{}o{}k{}s{}p{}{}n{}".format(*c[:7]))
def test_packed_conv_integer_sums_exact(case, isa):
    cin, cout, k, stride, pad, input_padding, n, h, w = case
    torch.manual_seed(cin * 31 + cout)
    trained = BinaryConv2d(
        cin, cout, k, stride, pad, bias=False, weight_scale="none", input_padding=input_padding
    ).eval()
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


# Layers big enough for two threads whose channel blocks (16 each) do not fit L1 in one group:
# 144 outputs over 128 inputs make 9 blocks in 2 groups on avx2 (nibble weights), 80 outputs
# over 512 inputs 5 blocks in 2 groups on avx512 and 5 on avx2; the groups are of unequal size.
@pytest.mark.parametrize("cin,cout,size", [(128, 144, 16), (512, 80, 8)])
def test_packed_conv_exact_when_channel_groups_are_split_across_threads(cin, cout, size, isa):
    torch.manual_seed(cin + cout)
    trained = BinaryConv2d(cin, cout, 3, 1, 1, bias=False, weight_scale="none").eval()
    packed = PackedBinaryConv2d.from_binary(trained)
    x = torch.randn(3, cin, size, size)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            with torch.no_grad():
                results.append(packed(x))
        finally:
            torch.set_num_threads(2)
    with torch.no_grad():
        expected = trained(x)
    assert torch.equal(results[0], expected) and torch.equal(results[1], expected)


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


@pytest.mark.parametrize(
    "estimator,scale",
    [
        *itertools.product(["reste", "dsq", "swish_sign", "ste"], ["layer_mean", "channel_mean", "none"]),
        ("dorefa", "layer_mean"),  # DoReFa scales the whole layer (E|W|): other weight_scale values are refused
    ],
)
def test_every_estimator_and_scale_with_a_bias_packs_bit_identically(estimator, scale):
    # DSQ does not recompute sign(x) in backward, so its layers took another forward; weight_scale="none"
    # added the bias inside the matrix product; DoReFa's linear read alpha back from its straight-through
    # weights, 1 ulp off in most outputs: all rounded differently from the packed layer
    torch.manual_seed(3)
    inputs = "reste" if estimator == "dorefa" else estimator  # DoReFa binarizes weights only
    lin = BinaryLinear(300, 70, weight_estimator=estimator, input_estimator=inputs, weight_scale=scale).eval()
    conv = BinaryConv2d(24, 40, 3, 1, 1, weight_estimator=estimator, input_estimator=inputs, weight_scale=scale)
    conv.eval()
    with torch.no_grad():
        torch.nn.init.normal_(lin.bias)
        torch.nn.init.normal_(conv.bias)
        x = torch.randn(64, 300)
        assert torch.equal(PackedBinaryLinear.from_binary(lin)(x), lin(x))
        x = torch.randn(3, 24, 7, 7)
        assert torch.equal(PackedBinaryConv2d.from_binary(conv)(x), conv(x))


def test_packed_layers_give_an_empty_batch_an_empty_output(isa):
    conv = PackedBinaryConv2d.from_binary(BinaryConv2d(8, 16, 3, 1, 1).eval())
    lin = PackedBinaryLinear.from_binary(BinaryLinear(8, 4).eval())
    with torch.no_grad():
        assert conv(torch.randn(0, 8, 6, 6)).shape == (0, 16, 6, 6)
        assert lin(torch.randn(0, 8)).shape == (0, 4)


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
    monkeypatch.setattr(_loader, "BITOPS", _loader.BITOPS.fresh())
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


def _reload_with_env(monkeypatch, var, value):
    """As if the process started with var=value: _ext() applies it on its next call."""
    monkeypatch.setenv(var, value)
    monkeypatch.setattr(_loader, "BITOPS", _loader.BITOPS.fresh())


@pytest.mark.skipif(not HAS_EXT, reason="the compiled extension is not built")
@pytest.mark.parametrize("var", ["RESTE_DEPLOY_ISA", "RESTE_BITOPS_ISA"])
def test_forcing_a_path_by_environment(monkeypatch, var):
    ext = packed_mod._ext()
    before = ext.isa()
    try:
        for name in ISAS:
            _reload_with_env(monkeypatch, var, name)
            info = packed_mod.kernel_info()
            assert info["isa"] == name and info["why"] == f"forced by {var}={name}"
        _reload_with_env(monkeypatch, var, f" {ISAS[0].upper()} ")  # any case, spaces around
        assert packed_mod.kernel_info()["isa"] == ISAS[0]
        _reload_with_env(monkeypatch, var, "generic")  # the portable kernel's former name
        assert packed_mod.kernel_info()["isa"] == "portable"
        _reload_with_env(monkeypatch, var, "auto")
        info = packed_mod.kernel_info()
        assert info["isa"] == ISAS[0] and info["why"].startswith("auto: ")
    finally:
        ext.select(before)


@pytest.mark.skipif(not HAS_EXT, reason="the compiled extension is not built")
def test_forcing_a_path_the_cpu_lacks_is_a_clear_error(monkeypatch):
    ext = packed_mod._ext()
    lacking = [n for n in ("neon", "avx2", "avx512") if n not in ISAS][0]  # x86 never has neon, ARM never avx*
    with pytest.raises(ValueError, match=f"'{lacking}'.*this CPU supports: {ISAS[0]}.*Unset RESTE_DEPLOY_ISA"):
        ext.select(lacking)
    assert ext.isa() == ISAS[0]  # the previous choice stays
    with pytest.raises(ValueError, match="known names: auto, portable, avx2, avx512, neon"):
        ext.select("avx3")
    _reload_with_env(monkeypatch, "RESTE_DEPLOY_ISA", lacking)
    layer = packed_mod.PackedBinaryConv2d.from_binary(BinaryConv2d(16, 16, 3, 1, 1).eval())
    for _ in range(2):  # refused on every use, never a silent fallback
        with pytest.raises(RuntimeError, match=f"RESTE_DEPLOY_ISA={lacking}: .*'{lacking}'"), torch.no_grad():
            layer(torch.randn(1, 16, 5, 5))
        # kernel_info, the function that says what is wrong, reports the refusal instead of raising it
        info = packed_mod.kernel_info()
        assert info["extension"] and info["isa"] is None and info["available"] == list(ISAS)
        assert info["reason"].startswith(f"RESTE_DEPLOY_ISA={lacking}: ") and f"'{lacking}'" in info["reason"]
        assert packed_mod.slow_kernel_note() == info["reason"]
    monkeypatch.setattr(_loader.BITOPS, "forced_error", None)


@pytest.mark.skipif(not HAS_EXT, reason="the compiled extension is not built")
def test_forcing_by_environment_in_a_fresh_process():
    import os
    import subprocess
    import sys

    code = (
        "import torch, reste.deploy as d\n"
        "from reste.nn import BinaryConv2d\n"
        "info = d.kernel_info(); print(info['isa'], '|', info['why'])\n"
        "layer = d.PackedBinaryConv2d.from_binary(BinaryConv2d(16, 16, 3, 1, 1).eval())\n"
        "x = torch.randn(2, 16, 6, 5)\n"
        "with torch.no_grad(): print(torch.equal(layer(x), layer._epilogue_reference(layer.reference_forward(x))))\n"
    )
    env = dict(os.environ, RESTE_DEPLOY_ISA=ISAS[-1])
    env.pop("RESTE_BITOPS_ISA", None)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [ISAS[-1], "|", "forced", "by", f"RESTE_DEPLOY_ISA={ISAS[-1]}", "True"]
    lacking = [n for n in ("neon", "avx2", "avx512") if n not in ISAS][0]
    run = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(env, RESTE_DEPLOY_ISA=lacking),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0 and f"KernelPathError: RESTE_DEPLOY_ISA={lacking}: " in run.stderr
    assert "Unset RESTE_DEPLOY_ISA (or set it to auto)" in run.stderr


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
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.ReLU(), nn.BatchNorm2d(width)
        )
        self.conv1, self.relu1, self.bn1 = (
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.BatchNorm2d(width),
        )
        self.conv2, self.relu2, self.bn2 = (
            nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False),
            nn.ReLU(),
            nn.BatchNorm2d(2 * width),
        )
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


def test_a_loaded_model_runs_its_kernels_without_no_grad(tmp_path, monkeypatch):
    # load() returned parameters that required grad: outside torch.no_grad() the activations did too,
    # and every binary conv fed by a real layer (the stem, the shortcuts) took the slow PyTorch path
    model = _tiny("1w1a")
    path = export(model, tmp_path / "tiny.safetensors")
    calls = {"kernel": 0, "reference": 0}
    kernel, reference = PackedBinaryConv2d._kernel_forward, PackedBinaryConv2d.reference_forward

    def counted(name, fn):
        def wrapper(self, *args, **kwargs):
            calls[name] += 1
            return fn(self, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(PackedBinaryConv2d, "_kernel_forward", counted("kernel", kernel))
    monkeypatch.setattr(PackedBinaryConv2d, "reference_forward", counted("reference", reference))
    x = torch.randn(3, 1, 12, 12)
    with torch.no_grad():
        expected = model(x)
    for deployed in (load(path, model=TinyResNet()), reste.deploy.to_deploy(model)):
        assert not any(p.requires_grad for p in deployed.parameters())
        calls.update(kernel=0, reference=0)  # (load's fusion check runs the kernels too)
        y = deployed(x)  # autograd on, as by default
        assert not y.requires_grad and torch.allclose(y, expected, atol=1e-4, rtol=0)
        binary_convs = sum(isinstance(m, PackedBinaryConv2d) for m in deployed.modules())
        if packed_mod._ext() is not None:  # with the extension built (CI builds it): every conv on the kernel
            assert calls == {"kernel": binary_convs, "reference": 0}


class _SharedLayer(nn.Module):
    """One binary layer registered under two names and called twice."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.inp, self.a, self.out = nn.Linear(8, 16), BinaryLinear(16, 16), nn.Linear(16, 3)
        self.b = self.a

    def forward(self, x):
        return self.out(self.b(self.a(self.inp(x))))


def test_a_shared_binary_layer_is_packed_once_under_every_name(tmp_path):
    model = _SharedLayer().eval()
    path = export(model, tmp_path / "shared.safetensors")
    deployed = load(path, model=_SharedLayer())
    assert deployed.a is deployed.b and isinstance(deployed.a, PackedBinaryLinear)
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.equal(deployed(x), model(x))
    # it runs twice: its work counts twice in the summary (was once), its memory once
    for m in (model, deployed):
        row = next(r for r in summary(m, (8,)).layers if r.name == "a")
        assert row.macs_1x1 == 2 * 16 * 16 and row.params_1bit == 16 * 16


def test_a_shared_attention_module_loads_into_the_float_architecture(tmp_path):
    # the file names a shared layer once; loading into a float architecture rebuilt its attention at
    # that name only, and the other name's projections did not fit the file ("fingerprint differs")
    class TwoUses(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(6)
            mha = nn.MultiheadAttention(16, 2)
            self.inp, self.a, self.b, self.out = nn.Linear(4, 16), mha, mha, nn.Linear(16, 2)

        def forward(self, x):
            x = self.inp(x)
            x = self.a(x, x, x)[0]
            return self.out(self.b(x, x, x)[0])

    model = reste.binarize(TwoUses()).eval()
    path = export(model, tmp_path / "attention.safetensors")
    deployed = load(path, model=TwoUses())
    assert deployed.a is deployed.b
    x = torch.randn(3, 2, 4)
    with torch.no_grad():
        assert torch.equal(deployed(x), model(x))


def test_a_layer_that_cannot_be_packed_is_named_with_the_fix(tmp_path):
    model = reste.binarize(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
            nn.Conv2d(8, 2, 1),
        )
    ).eval()
    with pytest.raises(
        ExportError, match=r"layer '2' \(BinaryConv2d\) cannot be packed: padding_mode='reflect'.*keep="
    ):
        export(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


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
        assert set(f.keys()) == {"float32", "uint8"}  # one blob per dtype
        graph = json.loads(f.metadata()["graph"])
    tensors = reste.deploy.read_tensors(path)
    keys = set(tensors)
    for name, layer in binary.items():
        assert f"{name}.weight" not in keys
        bits = tensors[f"{name}.weight_bits"]
        assert bits.dtype == torch.uint8
        assert bits.shape == (layer.out_channels, (layer.weight[0].numel() + 7) // 8)
        assert tensors[f"{name}.alpha"].shape == (1,)
    assert not any("estimator" in k or "num_batches_tracked" in k for k in keys)
    assert all(t.dtype in (torch.uint8, torch.float32) for t in tensors.values())
    assert set(graph["binary_layers"]) == set(binary)
    assert graph["architecture"] == arch
    float_bytes = 4 * sum(
        t.numel() for k, t in model.state_dict().items() if t.is_floating_point() and "estimator" not in k
    )
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


@pytest.mark.skipif(packed_mod._ext() is None, reason="fusion belongs to the compiled kernel (not built here)")
def test_a_fused_model_refuses_state_dicts_before_loading_anything(tmp_path):
    """Its absorbed BatchNorms are nn.Identity: a state_dict cannot hold what its kernels apply, so
    loading one (even of the same file) would silently mix two models."""
    first = export(_tiny("1w1a"), tmp_path / "a.safetensors")
    torch.manual_seed(5)
    second = export(
        _trained(reste.binarize(TinyResNet(), keep=("first", "last", "pointwise"))), tmp_path / "b.safetensors"
    )
    fused, other = load(first, model=TinyResNet()), load(second, model=TinyResNet())
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    with pytest.raises(packed_mod.FusedStateDictError, match=r"'.*' applies a fused BatchNorm.*fuse=False"):
        fused.load_state_dict(other.state_dict())
    assert all(torch.equal(before[k], v) for k, v in fused.state_dict().items())  # nothing was loaded
    # nor is a fused model something load() can fill: refused before it is changed
    with pytest.raises(ExportError, match="model= is a deployed model whose BatchNorms are fused"):
        load(first, model=fused)
    assert all(torch.equal(before[k], v) for k, v in fused.state_dict().items())
    conv = next(m for m in fused.modules() if packed_mod.fused_batchnorm(m))
    with pytest.raises(packed_mod.FusedStateDictError, match="this PackedBinaryConv2d applies a fused BatchNorm"):
        conv.load_state_dict(conv.state_dict())
    # unfused models hold every BatchNorm in their state_dict: loading works and gives the other model
    plain, plain_other = (load(p, model=TinyResNet(), fuse=False) for p in (first, second))
    plain.load_state_dict(plain_other.state_dict())
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(plain(x), plain_other(x)) and torch.equal(plain(x), other(x))


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


# ----------------------------------------------------------------------------- format version 2: batch norms, header
def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _perturb_batchnorms(model: nn.Module, seed: int) -> nn.Module:
    """Affine parameters and statistics far from a fresh BatchNorm's, a zero weight (zero-init residual) included."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.weight.mul_(torch.randn(c, generator=gen) * 2)
                m.weight[c // 2] = 0.0
                m.bias.add_(torch.randn(c, generator=gen))
                m.running_mean.add_(torch.randn(c, generator=gen))
                m.running_var.mul_(torch.rand(c, generator=gen) * 3 + 0.05)
    return model.eval()


@pytest.mark.parametrize("name", ["resnet20", "resnet20_bireal", "vgg_small"])
def test_batchnorms_stored_as_scale_shift_with_bit_identical_outputs(name, tmp_path, isa):
    torch.manual_seed(9)
    arch = {"name": name, "num_classes": 10, "in_channels": 3, "precision": "1w1a", "image_size": 16, "width": 0.5}
    model = _perturb_batchnorms(_trained(reste.models.create(**arch), in_channels=3, size=16), seed=10)
    path = export(model, tmp_path / f"{name}.safetensors", architecture=arch)
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert any(isinstance(model.get_submodule(n), nn.BatchNorm1d) for n in bns) == name.startswith("resnet")
    keys = set(reste.deploy.read_tensors(path))
    for bn in bns:  # 2 tensors per BatchNorm instead of weight, bias, running_mean, running_var
        assert {k for k in keys if k.startswith(bn + ".")} == {bn + ".scale", bn + ".shift"}
    unfolded = reste.deploy.to_deploy(model)  # packed binary layers, the trained BatchNorms
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        want = unfolded(x)
        assert torch.allclose(want, model(x), atol=1e-4, rtol=0)
        for fuse in (False, True):
            deployed = load(path, fuse=fuse)
            assert all(type(deployed.get_submodule(n)) in (type(model.get_submodule(n)), nn.Identity) for n in bns)
            assert torch.equal(_bits(deployed(x)), _bits(want))
            assert torch.equal(_bits(deployed(x.contiguous(memory_format=torch.channels_last))), _bits(want))
            for n in bns:  # every BatchNorm, fused or not, computes what the trained one computes, bit for bit
                module = deployed.get_submodule(n)
                if isinstance(module, nn.Identity):
                    continue
                probe = torch.randn((5, module.num_features) + ((4, 3) if isinstance(module, nn.BatchNorm2d) else ()))
                assert torch.equal(_bits(module(probe)), _bits(unfolded.get_submodule(n)(probe)))
    if HAS_EXT:  # the loaded BatchNorm2d modules still fuse into this kernel path's epilogue (only if bit-exact)
        deployed = load(path)
        convs = sum(1 for m in deployed.modules() if isinstance(m, PackedBinaryConv2d))
        assert sum(1 for m in deployed.modules() if getattr(m, "post_bn", None) is not None) == convs


@pytest.mark.parametrize("name", ["resnet20", "resnet20_bireal"])
def test_residual_adds_land_in_the_conv_output_bit_exactly(name, tmp_path, isa):
    torch.manual_seed(12)
    arch = {"name": name, "num_classes": 10, "in_channels": 3, "precision": "1w1a", "image_size": 16, "width": 0.5}
    model = _perturb_batchnorms(_trained(reste.models.create(**arch), in_channels=3, size=16), seed=13)
    path = export(model, tmp_path / "r.safetensors", architecture=arch)
    plain, fused = load(path, fuse=False), load(path)
    if HAS_EXT:  # every block's add went into a conv; the blocks keep all their children's names
        blocks = [b for stage in fused.stages for b in stage]
        assert all(isinstance(b, torch.fx.GraphModule) for b in blocks)
        assert all("conv2(" in b.code for b in blocks)
        assert {n for n, _ in blocks[0].named_children()} == {n for n, _ in plain.stages[0][0].named_children()}
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        for xx in (x, x.contiguous(memory_format=torch.channels_last)):
            assert torch.equal(fused(xx), plain(xx))


def test_batchnorm_before_a_binary_conv_is_applied_while_packing(tmp_path, isa):
    torch.manual_seed(14)
    arch = {
        "name": "vgg_small",
        "num_classes": 10,
        "in_channels": 3,
        "precision": "1w1a",
        "image_size": 16,
        "width": 0.375,
    }
    model = _perturb_batchnorms(_trained(reste.models.create(**arch), in_channels=3, size=16), seed=15)
    path = export(model, tmp_path / "v.safetensors", architecture=arch)
    plain, fused = load(path, fuse=False), load(path)
    if HAS_EXT:  # the real first unit's ReLU and BN (48 channels) are absorbed by conv1
        assert isinstance(fused.features.bn0, nn.Identity) and isinstance(fused.features.relu0, nn.Identity)
        assert fused.features.conv1.pre_bn is not None and "fused_before=ReLU+BatchNorm2d" in repr(fused.features.conv1)
    x = torch.randn(5, 3, 16, 16)
    x[0] = 0.0  # the stem conv gives exact zeros: ReLU(0) then the BN's shift alone decides the sign
    with torch.no_grad():
        for xx in (x, x.contiguous(memory_format=torch.channels_last)):
            assert torch.equal(fused(xx), plain(xx))
        x.requires_grad_(True)  # the reference path applies the absorbed BN itself
        with torch.enable_grad():
            assert torch.equal(fused(x), plain(x))


@pytest.mark.skipif(not HAS_EXT, reason="the packed-input buffer belongs to the compiled kernel's path")
def test_packed_input_buffer_is_reused_and_safe_across_threads():
    torch.manual_seed(3)
    layer = PackedBinaryConv2d.from_binary(BinaryConv2d(24, 16, 3, 1, 1).eval())
    xs = [torch.randn(2, 24, 9, 7) for _ in range(4)]
    with torch.no_grad():
        want = [layer.reference_forward(x) for x in xs]
        assert torch.equal(layer(xs[0]), want[0])
        plan = layer._plans[tuple(xs[0].shape)]
        buf = plan["xbits_buf"].data_ptr()
        assert torch.equal(layer(xs[1]), want[1]) and plan["xbits_buf"].data_ptr() == buf  # no new buffer per call
    assert not disagreements_across_threads(layer, xs, want, rounds=30)


def test_used_deployed_model_can_be_copied_and_pickled(tmp_path):
    import copy
    import io

    torch.manual_seed(5)
    arch = {
        "name": "resnet20",
        "num_classes": 10,
        "in_channels": 3,
        "precision": "1w1a",
        "image_size": 16,
        "width": 0.5,
    }
    model = _trained(reste.models.create(**arch), in_channels=3, size=16)
    deployed = load(export(model, tmp_path / "r.safetensors", architecture=arch))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        want = deployed(x)  # builds the plans (raw addresses, a lock) that a copy must not take along
        twin = copy.deepcopy(deployed)
        buf = io.BytesIO()
        torch.save(deployed, buf)
        buf.seek(0)
        again = torch.load(buf, weights_only=False)
        del deployed
        assert torch.equal(twin(x), want) and torch.equal(again(x), want)


@pytest.mark.parametrize("out_channels", [16, 20])  # 20: a last block of 4 channels (masked loads and stores)
def test_packed_conv_residual_argument_is_the_plain_sum(out_channels, isa):
    torch.manual_seed(2)
    layer = PackedBinaryConv2d.from_binary(BinaryConv2d(8, out_channels, 3, 1, 1, bias=True).eval())
    x = torch.randn(2, 8, 5, 5)
    special = torch.randn(2, out_channels, 5, 5).contiguous(memory_format=torch.channels_last)
    special[0, 1, 2, 3], special[1, -1, 4, 4], special[1, 0, 0, 0] = float("nan"), float("-inf"), -0.0
    with torch.no_grad():
        y = layer(x)
        for residual in (
            torch.randn(2, out_channels, 5, 5),
            torch.randn(out_channels, 1, 1),
            torch.randn(2, out_channels, 5, 5, dtype=torch.float64),
            torch.randn(2, out_channels, 5, 5).contiguous(memory_format=torch.channels_last),
            special,
            torch.randn(1, out_channels, 5, 5).contiguous(memory_format=torch.channels_last),
        ):
            want = y + residual  # channels-last float32 of the output's shape: added by the kernel itself
            got = layer(x, residual)
            assert got.dtype == want.dtype and got.shape == want.shape
            bits = torch.int32 if want.dtype == torch.float32 else torch.int64  # bit for bit: NaN and -0 too
            assert torch.equal(got.contiguous().view(bits), want.contiguous().view(bits))


def test_batchnorm_scale_shift_read_back_exactly():
    from reste.deploy.export import _fold_bn, _restore_bn

    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        # shift = bias - mean * scale is -0 in channels 0 and 1 (positive and negative scale); a zero scale;
        # scales so small next to the shift that only probes near 2^127 show them; an ordinary channel
        bn.weight.copy_(torch.tensor([1.5, -2.0, 0.0, 1e-30, -3e-26, 0.7]))
        bn.bias.copy_(torch.tensor([-0.0, -0.0, 0.25, 0.5, 1e3, -1.1]))
        bn.running_mean.copy_(torch.tensor([0.0, -0.0, 3.0, 0.1, -2.0, 0.3]))
        bn.running_var.copy_(torch.tensor([1.0, 1.0, 0.5, 2.0, 0.01, 7.0]))
    scale, shift = _fold_bn(bn, seed=0)
    assert torch.signbit(shift[:2]).all() and scale[2] == 0 and scale[3] != 0 and scale[4] != 0
    twin = nn.BatchNorm2d(6).eval()
    _restore_bn(twin, scale, shift)
    big = torch.finfo(torch.float32).max
    values = torch.tensor([0.0, -0.0, 1.0, -3.0, 2.0**120, -(2.0**126), big, -big, 1e-40])
    x = torch.cat([values.reshape(-1, 1, 1, 1).expand(-1, 6, 2, 3), torch.randn(4, 6, 2, 3) * 1e30])
    with torch.no_grad():
        assert torch.equal(_bits(twin(x)), _bits(bn(x)))
        assert torch.equal(_bits(twin(x.contiguous(memory_format=torch.channels_last))), _bits(bn(x)))


def test_batchnorm_that_does_not_fold_exactly_is_stored_as_it_is(tmp_path):
    model = _tiny("1w1a")
    with torch.no_grad():  # a scale so small next to the shift that no finite input shows it exactly
        model.bn1.weight[3] = 1e-37
        model.bn1.bias[3] = 1e4
    path = export(model, tmp_path / "t.safetensors")
    assert reste.deploy.read_graph(path)["unfolded_batchnorms"] == ["bn1"]
    keys = set(reste.deploy.read_tensors(path, model=TinyResNet()))
    assert {k for k in keys if k.startswith("bn1.")} == {
        f"bn1.{k}" for k in ("weight", "bias", "running_mean", "running_var")
    }
    assert {k for k in keys if k.startswith("bn2.")} == {"bn2.scale", "bn2.shift"}
    x = torch.randn(4, 1, 12, 12)
    with torch.no_grad():
        want = reste.deploy.to_deploy(model)(x)
        for fuse in (False, True):
            assert torch.equal(_bits(load(path, model=TinyResNet(), fuse=fuse)(x)), _bits(want))


def test_graph_records_only_non_default_layer_options(tmp_path):
    torch.manual_seed(12)
    arch = {
        "name": "resnet20",
        "num_classes": 10,
        "in_channels": 1,
        "precision": "1w1a",
        "input_padding": "+1",
        "width": 0.5,
    }
    model = _trained(reste.models.create(**arch), size=8)
    path = export(model, tmp_path / "p1.safetensors", architecture=arch)
    assert set(map(json.dumps, reste.deploy.read_graph(path)["binary_layers"].values())) == {'{"input_padding": "+1"}'}
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(_bits(load(path)(x)), _bits(reste.deploy.to_deploy(model)(x)))
    narrower = reste.models.create(**dict(arch, width=0.25))
    with pytest.raises(ExportError, match="different architecture / model arguments: layout fingerprint differs"):
        load(path, model=narrower)


def test_per_channel_alpha_is_recorded_and_restored(tmp_path):
    torch.manual_seed(13)
    model = _trained(reste.binarize(TinyResNet(), weight_scale="channel_mean", keep=("first", "last", "pointwise")))
    path = export(model, tmp_path / "c.safetensors")
    layers = reste.deploy.read_graph(path)["binary_layers"]
    assert layers == {"conv1": {"alpha": "channel"}, "conv2": {"alpha": "channel"}, "fc1": {"alpha": "channel"}}
    deployed = load(path, model=TinyResNet())
    assert deployed.conv2.alpha.shape == (32,)
    x = torch.randn(3, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(_bits(deployed(x)), _bits(load(path, model=TinyResNet(), fuse=False)(x)))
        assert torch.allclose(deployed(x), model(x), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- format version 2: one blob per dtype
def _resnet20_export(tmp_path, **arch_args):
    torch.manual_seed(14)
    arch = {"name": "resnet20", "num_classes": 10, "in_channels": 3, "precision": "1w1a", "image_size": 32, **arch_args}
    model = _perturb_batchnorms(_trained(reste.models.create(**arch), in_channels=3, size=32), seed=15)
    return model, arch, export(model, tmp_path / "r20.safetensors", architecture=arch)


def test_layout_mismatch_is_refused_with_the_reason(tmp_path):
    model, arch, path = _resnet20_export(tmp_path)
    fingerprint = reste.deploy.read_graph(path)["layout"]["fingerprint"]
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    for other in ({"num_classes": 100}, {"width": 0.5}, {"in_channels": 1}):
        for call in (load, reste.deploy.read_tensors):
            with pytest.raises(
                ExportError,
                match=r"different architecture / model arguments: layout fingerprint differs"
                r" \(file [0-9a-f]{16}, this architecture [0-9a-f]{16}.*re-export it, or pass the model",
            ):
                call(path, model=reste.models.create(**dict(arch, **other)))
    # the same architecture in another float dtype: the message names the dtypes and the cast
    with pytest.raises(
        ExportError, match=r"holds float32 values, but the model given has float64 tensors.*model.float\(\)"
    ):
        load(path, model=reste.models.create(**arch).double())
    # and the other way: a float64 / float16 / bfloat16 export into a float32 model (its weight scales and
    # folded BatchNorms stay float32 in every export, so this read "different architecture ... re-export it")
    for dtype, cast in ((torch.float64, "double"), (torch.float16, "half"), (torch.bfloat16, "bfloat16")):
        other = export(copy.deepcopy(model).to(dtype), tmp_path / f"r20-{cast}.safetensors", architecture=arch)
        name = str(dtype).removeprefix("torch.")
        with pytest.raises(
            ExportError, match=rf"holds {name} values, but the model given has float32 tensors.*model.{cast}\(\)"
        ):
            load(other, model=reste.models.create(**arch))
        assert next(load(other, model=reste.models.create(**arch).to(dtype)).parameters()).dtype == dtype
    # a graph that claims other model arguments (here edited in the file) is refused the same way
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, blobs = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    graph = json.loads(meta["graph"])
    graph["architecture"]["num_classes"] = 100
    edited = tmp_path / "edited.safetensors"
    save_file(blobs, str(edited), metadata=dict(meta, graph=json.dumps(graph)))
    with pytest.raises(ExportError, match="layout fingerprint differs"):
        load(edited)
    # the right fingerprint with blob sizes that do not add up: a damaged file
    graph = json.loads(meta["graph"])
    graph["layout"]["blobs"]["float32"] += 1
    save_file(blobs, str(edited), metadata=dict(meta, graph=json.dumps(graph)))
    with pytest.raises(ExportError, match=r"blob sizes .* do not match its layout .*; the file is damaged"):
        load(edited)
    # the right graph with blobs of other sizes
    graph = json.loads(meta["graph"])
    save_file(
        {"float32": blobs["float32"][:-1], "uint8": blobs["uint8"]},
        str(edited),
        metadata=dict(meta, graph=json.dumps(graph)),
    )
    with pytest.raises(ExportError, match="needs 1-D blobs .* the file is damaged"):
        load(edited)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the untouched file still loads, with the recorded or the given architecture
        want = _bits(reste.deploy.to_deploy(model)(x))
        assert torch.equal(_bits(load(path)(x)), want)
        assert torch.equal(_bits(load(path, model=reste.models.create(**dict(arch, precision="fp")))(x)), want)


@pytest.mark.parametrize("keep", [0, 8, 100, 900, -1, -100])
def test_truncated_file_is_refused(tmp_path, keep):
    _, _, path = _resnet20_export(tmp_path)
    data = path.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    for call in (load, reste.deploy.read_tensors, reste.deploy.read_graph):
        with pytest.raises(ExportError, match=r"(not a readable safetensors file|truncated or corrupt).*re-export"):
            call(bad)


def test_named_tensors_read_back_equal_the_deploy_state(tmp_path):
    from reste.deploy.export import _fold_bn

    model, arch, path = _resnet20_export(tmp_path)
    tensors = reste.deploy.read_tensors(path)
    deploy = reste.deploy.to_deploy(model)
    state = {k: v for k, v in deploy.state_dict().items() if not k.endswith("num_batches_tracked")}
    bns = {n: m for n, m in deploy.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    expected = {}
    for key, value in state.items():  # the documented order: state_dict order, scale/shift at the place of weight
        owner, _, leaf = key.rpartition(".")
        if owner in bns:
            if leaf == "weight":
                index = [n for n, _ in deploy.named_modules()].index(owner)
                expected[f"{owner}.scale"], expected[f"{owner}.shift"] = _fold_bn(bns[owner], seed=index)
            continue
        expected[key] = value
    assert list(tensors) == list(expected)
    for key, value in expected.items():
        got = tensors[key]
        assert got.dtype == value.dtype and got.shape == value.shape, key
        assert torch.equal(
            got.view(torch.uint8) if got.dtype == torch.uint8 else _bits(got),
            value.view(torch.uint8) if value.dtype == torch.uint8 else _bits(value),
        ), key
    # the blobs are these tensors concatenated per dtype, in this order
    from safetensors.torch import load_file

    blobs = load_file(str(path))
    for dtype in (torch.float32, torch.uint8):
        joined = torch.cat([t.reshape(-1) for t in expected.values() if t.dtype == dtype])
        assert torch.equal(blobs[str(dtype).removeprefix("torch.")].view(torch.uint8), joined.view(torch.uint8))


def test_resnet20_export_is_25x_smaller_than_float_state_dict(tmp_path):
    import io

    torch.manual_seed(16)
    arch = {"name": "resnet20", "num_classes": 10, "in_channels": 3, "precision": "1w1a", "image_size": 32}
    path = export(
        _trained(reste.models.create(**arch), in_channels=3, size=32), tmp_path / "r20.safetensors", architecture=arch
    )
    buf = io.BytesIO()
    torch.save(reste.models.create(**dict(arch, precision="fp")).state_dict(), buf)
    ratio = buf.getbuffer().nbytes / path.stat().st_size
    assert ratio >= 25, (
        f"{buf.getbuffer().nbytes:,} B float state_dict / {path.stat().st_size:,} B export = {ratio:.2f}x"
    )


def _header(path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return 8 + size, json.loads(f.read(size))


def test_resnet20_header_is_compact(tmp_path):
    torch.manual_seed(11)
    arch = {"name": "resnet20", "num_classes": 10, "in_channels": 3, "precision": "1w1a"}
    source = {"run": "run-20250101-000000", "checkpoint": "best.pt", "epoch": 200}
    path = export(reste.models.create(**arch).eval(), tmp_path / "r20.safetensors", architecture=arch, source=source)
    size, header = _header(path)
    meta = header.pop("__metadata__")
    # one blob per dtype: 1-bit weights; stem conv, alphas, BatchNorm scale/shift, classifier
    assert set(header) == {"float32", "uint8"}
    # 1-bit weights, rows of ceil(k/8) bytes: 6 convs 16->16 (k=144), 16->32 (144), 5 32->32 (288),
    # 32->64 (288), 5 64->64 (576)
    assert header["uint8"]["shape"] == [6 * 16 * 18 + 32 * 18 + 5 * 32 * 36 + 64 * 36 + 5 * 64 * 72]
    # stem 3*16*9; 18 alphas; 20 BatchNorms' scale/shift over 16*7 + 32*6 + 64*7 channels; classifier 64*10 + 10
    assert header["float32"]["shape"] == [432 + 18 + 2 * (16 * 7 + 32 * 6 + 64 * 7) + 650]
    assert meta["format_version"] == "2" and ", " not in meta["graph"] and ": " not in meta["graph"]
    graph = json.loads(meta["graph"])
    assert graph["architecture"] == arch and graph["source"] == source
    assert all(options == {} for options in graph["binary_layers"].values())
    assert graph["unfolded_batchnorms"] == [] and graph["layout"]["blobs"] == {"float32": 2604, "uint8": 33408}
    # measured 1,008 bytes (7,176 with one safetensors entry per tensor; format version 1: 14,752)
    assert size < 1008 * 1.2


def test_version_1_file_is_rejected_with_the_fix(tmp_path, capsys):
    from safetensors.torch import save_file

    from reste.cli import main

    spec = {
        "type": "conv2d",
        "in_channels": 16,
        "out_channels": 16,
        "kernel_size": [3, 3],
        "stride": [1, 1],
        "padding": [1, 1],
        "dilation": [1, 1],
        "groups": 1,
        "bias": False,
        "binary_inputs": True,
        "input_padding": "zero",
        "alpha_size": 1,
    }
    graph = {
        "architecture": {"name": "resnet20", "num_classes": 10, "in_channels": 1, "precision": "1w1a"},
        "binary_layers": {"stages.0.0.conv1": spec},
        "source": None,
    }
    old = tmp_path / "v1.safetensors"
    save_file(
        {
            "stages.0.0.conv1.weight_bits": torch.zeros(16, 18, dtype=torch.uint8),
            "stages.0.0.conv1.alpha": torch.ones(1),
        },
        str(old),
        metadata={
            "format": "reste.packed",
            "format_version": "1",
            "reste_version": "0.1.0",
            "graph": json.dumps(graph),
        },
    )
    before = sorted(p.name for p in tmp_path.iterdir())
    for kwargs in ({}, {"model": TinyResNet()}):
        with pytest.raises(ExportError, match=r"format version 1.*re-export it with this reste: `reste export RUN_DIR"):
            load(old, **kwargs)
    assert main(["summary", str(old)]) == 1  # an input file it cannot use
    assert "re-export" in capsys.readouterr().err
    assert main(["summary", "no-such-model-or-file"]) == 2  # a usage error
    assert "is not a run directory, a .yaml config" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


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
    # BN(8): weight + bias are parameters; deployed as scale + shift (the running statistics fold in)
    assert (bn8.params, bn8.memory_bits, bn8.float32_bits) == (16, 16 * 32, 32 * 32)
    # binary conv: 8*16*9 = 1152 one-bit weights + one float alpha; 4*4*16 outputs x 72 taps, all XNOR
    assert (bconv.params_1bit, bconv.memory_bits, bconv.macs_1x1, bconv.output_shape) == (
        1152,
        1152 + 32,
        16 * 16 * 72,
        (16, 4, 4),
    )
    assert (bn16.params, bn16.memory_bits) == (32, 32 * 32)
    # binary linear with real inputs: 2560 one-bit weights, 10 real biases, alpha
    assert (blin.params, blin.params_1bit, blin.params_32bit, blin.memory_bits, blin.macs_1x32) == (
        2570,
        2560,
        10,
        2560 + 320 + 32,
        2560,
    )
    assert s.memory_bits == 6912 + 512 + 1184 + 1024 + 2912 == 12544 and s.memory_bytes == 1568
    assert s.float32_bits == 32 * (216 + 32 + 1152 + 64 + 2570) == 129088
    assert s.compression == pytest.approx(129088 / 12544)
    assert s.macs == 13824 + 18432 + 2560 and s.binary_mac_share == pytest.approx(18432 / 34816)
    text = str(s)
    assert "binary MAC share" in text and "1,568 bytes" in text


def test_summary_counts_every_conv_kind_and_the_bytes_rows_are_padded_to(tmp_path):
    model = reste.binarize(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False),  # 4 * 9 = 36 taps: 5 bytes per row
            nn.ConvTranspose2d(8, 8, 2, stride=2),  # binarize cannot convert it: kept real
            nn.Conv2d(8, 2, 1),
        ),
        keep=["2"],
    ).eval()
    s = summary(model, (3, 8, 8))
    grouped, transposed = s.layers[1], s.layers[2]
    assert grouped.macs_1x1 == 64 * 8 * 36 and grouped.params_1bit == 8 * 36
    assert grouped.memory_bits == 8 * 5 * 8 + 32  # whole bytes per output channel, then alpha
    # a transposed conv: every input element meets out/groups * kh * kw weights
    assert (transposed.macs_32x32, transposed.weight_bits) == (64 * 8 * 8 * 2 * 2, 32)
    assert s.binary_mac_share == pytest.approx(18432 / (13824 + 18432 + 16384 + 2 * 8 * 256))
    conv1d = summary(nn.Sequential(nn.Conv1d(3, 8, 3, padding=1)), (3, 16)).layers[0]
    assert conv1d.macs_32x32 == 16 * 8 * 3 * 3
    export(model, tmp_path / "m.safetensors")
    from reste.deploy import read_tensors

    stored = read_tensors(tmp_path / "m.safetensors", model=model)
    assert s.memory_bytes == sum(t.numel() * t.element_size() for t in stored.values())


@pytest.mark.parametrize("batch_first", [True, False])
def test_summary_counts_attention_macs_per_sample_whatever_the_layout(batch_first):
    # the attention projections see [L, N, E] or [L*N, E], the feed-forward [N, L, E] or [L, N, E]:
    # each layer's MACs are L tokens x outputs x inputs for one sample, whichever dimension is the batch
    tokens, width, hidden = 4, 16, 32
    layer = reste.binarize(
        nn.TransformerEncoderLayer(width, 2, hidden, batch_first=batch_first), activations=False, keep_defaults=False
    )
    rows = {r.name: r for r in summary(layer, (tokens, width), batch_dim=0 if batch_first else 1).layers}
    expected = {
        "self_attn.in_proj": tokens * 3 * width * width,
        "self_attn.out_proj": tokens * width * width,
        "linear1": tokens * hidden * width,
        "linear2": tokens * width * hidden,
    }
    assert {name: rows[name].macs_1x32 for name in expected} == expected
    assert rows["linear1"].output_shape == ((tokens, hidden) if batch_first else (tokens, 1, hidden))
    with pytest.raises(ValueError, match="batch_dim must be between 0 and 2"):
        summary(layer, (tokens, width), batch_dim=3)


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

    cfg = config_to_dict(
        config_from_dict({"model": {"name": "resnet20", "precision": precision}, "data": {"name": "fashion_mnist"}})
    )
    torch.manual_seed(8)
    model = _trained(
        reste.models.create("resnet20", num_classes=10, in_channels=1, precision=precision, image_size=28), size=28
    )
    run = tmp_path / "run-20250101-000000"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    torch.save({"model": model.state_dict(), "config": cfg, "epoch": 3}, run / "checkpoints" / "last.pt")
    return run, model


def test_cli_export_and_summary(tmp_path, capsys):
    from reste.cli import main

    run, model = _fake_run(tmp_path)
    assert main(["export", str(run)]) == 1  # no best.pt: the error says to use last
    err = capsys.readouterr().err
    assert (
        "has no checkpoints/best.pt, only checkpoints/last.pt" in err and "use that one with --checkpoint last" in err
    )
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


def test_summary_takes_a_bundled_config_by_name_as_train_does(tmp_path, capsys, monkeypatch):
    from reste.cli import main

    monkeypatch.chdir(tmp_path)  # no configs/ here: the names resolve to the configs shipped with reste
    assert main(["summary", "cifar10/vgg_small_1w1a", "--json", "by_name.json"]) == 0
    assert main(["summary", "cifar10/vgg_small_1w1a.yaml", "--json", "with_yaml.json"]) == 0
    by_name, with_yaml = (json.loads(Path(f).read_text()) for f in ("by_name.json", "with_yaml.json"))
    assert by_name == with_yaml and by_name["totals"]["binary_mac_share"] > 0.9
    capsys.readouterr()
    config = "model: {name: vgg_small, precision: 1w1a}\ndata: {name: cifar10}\n"
    (tmp_path / "exp.v2.yaml").write_text(config)  # a dotted name of the user's, without .yaml
    assert main(["summary", "exp.v2", "--json", "dotted.json"]) == 0
    assert json.loads(Path("dotted.json").read_text())["totals"] == by_name["totals"]
    assert main(["summary", "vgg_small"]) == 0  # a model's name stays the model
    assert main(["summary", "cifar10/vgg_smal_1w1a"]) == 2  # neither: every kind of source named
    err = capsys.readouterr().err
    assert "a bundled name such as cifar10/resnet20_1w1a" in err and "vgg_small" in err


def _one_error(err: str, *parts: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for part in parts:
        assert part in lines[0], (part, lines[0])


def test_export_interrupted_or_failing_leaves_out_as_it_was(tmp_path, capsys, monkeypatch):
    """The file is written beside --out under a temporary name, checked, then renamed: an interrupt or
    an error before that leaves --out absent (or the old file), and no temporary file."""
    from reste.cli import main
    from reste.deploy import verify

    run, _ = _fake_run(tmp_path)
    folder = tmp_path / "out"
    out = folder / "m.safetensors"
    argv = ["export", str(run), "--checkpoint", "last", "--out", str(out)]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(verify, "check_export", interrupted)
        nested = tmp_path / "new" / "deeper" / "m.safetensors"
        assert main([*argv[:-1], str(nested)]) == 130  # Ctrl-C during the check: no file, nor the folders made for it
        assert not (tmp_path / "new").exists()
        folder.mkdir()
        assert main(argv) == 130
        assert list(folder.iterdir()) == []  # a folder that was there stays
        out.write_bytes(b"a previous export")
        assert main(argv) == 130  # the previous file is not replaced before the check
        assert out.read_bytes() == b"a previous export" and [p.name for p in folder.iterdir()] == ["m.safetensors"]
    capsys.readouterr()
    # a check that ran and failed never replaces a previous file: the new one goes beside it
    with monkeypatch.context() as m:
        m.setattr(verify, "check_export", lambda *a, **k: ([], "the exported model is wrong"))
        assert main(argv) == 1
    failed = folder / "m.failed.safetensors"
    _one_error(capsys.readouterr().err, "the exported model is wrong", f"{out} is unchanged", str(failed))
    assert out.read_bytes() == b"a previous export" and failed.is_file()
    failed.unlink()
    # success: the checked file, with its data and verification entries, replaces the old one, and the
    # size printed is the final file's (it was read before the verification entry was added)
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert verify.read_metadata(out)["verification"]["passed"]
    assert f"file {out.stat().st_size:,} bytes" in printed
    assert [p.name for p in folder.iterdir()] == ["m.safetensors"]


@pytest.mark.skipif(not HAS_EXT, reason="RESTE_DEPLOY_ISA applies to the compiled extension")
def test_export_with_a_bad_kernel_setting_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import importlib

    from reste.cli import main

    export_mod = importlib.import_module("reste.deploy.export")  # the module; reste.deploy.export is the function
    run, _ = _fake_run(tmp_path)
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"old")
    monkeypatch.setattr(export_mod, "load_run_model", lambda *a: pytest.fail("the run was read"))
    _reload_with_env(monkeypatch, "RESTE_DEPLOY_ISA", "bogus")
    for fmt in ("safetensors", "onnx"):
        target = out if fmt == "safetensors" else tmp_path / "m.onnx"
        assert main(["export", str(run), "--checkpoint", "last", "--out", str(target)]) == 2
        _one_error(capsys.readouterr().err, "RESTE_DEPLOY_ISA=bogus", "Unset RESTE_DEPLOY_ISA")
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", run.name]


def test_export_out_and_format_are_checked(tmp_path, capsys):
    import argparse

    from reste.cli import main
    from reste.deploy.commands import _export_target

    run, _ = _fake_run(tmp_path)
    folder = tmp_path / "somedir"
    folder.mkdir()
    assert main(["export", str(run), "--checkpoint", "last", "--out", str(folder)]) == 2
    _one_error(capsys.readouterr().err, f"--out {folder} is a directory", f"{folder / 'model-1bit.safetensors'}")
    for fmt, name in (("safetensors", "x.onnx"), ("onnx", "x.safetensors")):
        argv = ["export", str(run), "--checkpoint", "last", "--format", fmt, "--out", str(tmp_path / name)]
        assert main(argv) == 2
        _one_error(capsys.readouterr().err, f"--format is {fmt}", "give --format")
    assert list(folder.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == [run.name, "somedir"]

    def target(out=None, format=None):
        return _export_target(argparse.Namespace(out=out, format=format), run)

    # without --format, the extension decides
    assert target("x.onnx") == ("onnx", Path("x.onnx"))
    assert target("x.ONNX") == ("onnx", Path("x.ONNX"))
    assert target("x.safetensors") == ("safetensors", Path("x.safetensors"))
    assert target("x.bin") == ("safetensors", Path("x.bin"))
    assert target("x.bin", "onnx") == ("onnx", Path("x.bin"))
    assert target() == ("safetensors", run / "model-1bit.safetensors")
    assert target(None, "onnx") == ("onnx", run / "model.onnx")


def test_summary_refuses_an_input_size_it_cannot_run_naming_it(tmp_path, capsys):
    """Sizes below 1, the wrong channels for the model, an input whose activations would not fit memory
    (checked on the meta device, before anything is allocated): exit 2, one line naming --input-size."""
    from reste.cli import main

    run, model = _fake_run(tmp_path)
    arch = {"name": "resnet20", "num_classes": 10, "in_channels": 1, "precision": "1w1a", "image_size": 28}
    exported = export(model, tmp_path / "m.safetensors", architecture=arch)
    cases = [
        (["resnet20", "--input-size", "3", "0", "32"], ["--input-size 3 0 32: every size must be >= 1"]),
        ([str(exported), "--input-size", "3", "32", "32"], ["takes 1-channel images, not 3", "--input-size 1 H W"]),
        ([str(run), "--input-size", "3", "28", "28"], ["takes 1-channel images, not 3", "--input-size 1 H W"]),
        (["vgg_small", "--input-size", "3", "64", "48"], ["--input-size 3 64 48: vgg_small cannot run on this input"]),
        # a model name the size cannot even build (was exit 1, naming image_size, not the option)
        (["vgg_small", "--input-size", "3", "7", "7"], ["--input-size 3 7 7: vgg_small cannot be built", ">= 8"]),
        (
            ["resnet20", "--input-size", "3", "100000", "100000"],
            ["--input-size 3 100000 100000", "GiB of activations", "give a smaller size"],
        ),
    ]
    for argv, parts in cases:
        assert main(["summary", *argv]) == 2, argv
        _one_error(capsys.readouterr().err, *parts)
    assert main(["summary", str(exported), "--input-size", "1", "32", "32"]) == 0  # another size, right channels
    assert "input 1x32x32" in capsys.readouterr().out


def test_summary_json_creates_its_folder_and_refuses_a_folder(tmp_path, capsys):
    from reste.cli import main

    target = tmp_path / "new" / "deeper" / "s.json"
    assert main(["summary", "resnet20", "--json", str(target)]) == 0
    assert json.loads(target.read_text())["totals"]["params_1bit"] > 0
    assert f"wrote {target}" in capsys.readouterr().out
    assert main(["summary", "resnet20", "--json", str(tmp_path)]) == 2
    _one_error(capsys.readouterr().err, f"--json {tmp_path} is a directory", str(tmp_path / "summary.json"))


@pytest.mark.parametrize("name", ["resnet20", "vit_tiny"])
def test_summary_of_a_model_on_the_meta_device_is_the_real_ones(name):
    torch.manual_seed(0)
    real = reste.models.create(name, precision="1w1a", image_size=32)
    with torch.device("meta"):
        shape_only = reste.models.create(name, precision="1w1a", image_size=32)
    assert summary(shape_only, (3, 32, 32)).to_dict() == summary(real, (3, 32, 32)).to_dict()


@pytest.mark.skipif(not HAS_EXT, reason="times the compiled kernel; the reference path is covered above")
def test_bench_conv_smoke():
    from reste.deploy.bench import bench_conv

    (row,) = bench_conv([(16, 16, 8, 1)], batches=(2,), repeats=1, min_sample_s=0.0)
    assert row["exact"] and row["float_ms"] > 0 and row["binary_ms"] > 0


def test_slow_kernel_note_when_only_the_portable_kernel_runs(monkeypatch):
    base = {"extension": True, "isa": "portable", "why": "auto: ...", "openmp": True, "reason": None}
    monkeypatch.setattr(packed_mod, "kernel_info", lambda: dict(base, available=["portable"]))
    assert "only the portable XNOR-popcount kernel" in packed_mod.slow_kernel_note()
    monkeypatch.setattr(packed_mod, "kernel_info", lambda: dict(base, isa="avx2", available=["avx2", "portable"]))
    assert packed_mod.slow_kernel_note() is None
    monkeypatch.setattr(
        packed_mod, "kernel_info", lambda: dict(base, extension=False, isa=None, available=[], reason="not built")
    )
    assert "unavailable here (not built)" in packed_mod.slow_kernel_note()


@pytest.mark.skipif(not HAS_EXT, reason="needs the compiled kernel paths")
def test_bench_report_names_cpu_and_path_and_labels_a_forced_one(tmp_path, capsys):
    from reste.deploy import bench

    result = {"machine": bench.machine_info(), "repeats": 1, "conv": [], "e2e": [], "sizes": []}
    assert result["machine"]["cpu"] in bench.format_report(result)
    assert ISAS[0] in bench.default_json_path(result).name and bench.default_json_path(result).name.startswith("infer_")
    capped = dict(result["machine"], float_isa={"aten": "AVX2", "onednn_max": "AVX2"})
    assert f"_{ISAS[0]}_floatavx2_t" in bench.default_json_path(dict(result, machine=capped)).name
    # one VM model name covers several CPU generations: the family and model tell them apart
    zen2 = dict(result["machine"], cpu="AMD EPYC", cpu_family_model="family 23 model 49")
    assert bench.default_json_path(dict(result, machine=zen2)).name.startswith("infer_amd-epyc-family-23-model-49_")
    # a --quick smoke test is named as one (and its JSON says so)
    assert "_quick_" in bench.default_json_path(dict(result, quick=True)).name
    assert "_quick_" not in bench.default_json_path(dict(result, quick=False)).name
    # a second run of the same day goes beside the first, which is kept
    first = bench.save({"n": 1}, tmp_path / "r.json", keep_existing=True)  # each name claimed by creating it
    second = bench.save({"n": 2}, tmp_path / "r.json", keep_existing=True)
    third = bench.save({"n": 3}, tmp_path / "r.json", keep_existing=True)
    assert (first.name, second.name, third.name) == ("r.json", "r_run2.json", "r_run3.json")
    assert [json.loads(p.read_text())["n"] for p in (first, second, third)] == [1, 2, 3]
    assert json.loads(bench.save({"n": 4}, first).read_text()) == {"n": 4}  # a name the user gave is written
    if len(ISAS) > 1:  # force the second-best path: the report says it is not this CPU's default
        ext = packed_mod._ext()
        ext.select(ISAS[1], "the test")
        try:
            text = bench.format_report(dict(result, machine=bench.machine_info()))
        finally:
            ext.select(ISAS[0])
        assert f"kernel path: {ISAS[1]}" in text and f"NOT this CPU's default path ({ISAS[0]})" in text
        aten = torch.backends.cpu.get_cpu_capability()
        assert f"float side: ATen {aten}, oneDNN " in text
        if ISAS[1] == "avx2" and "ONEDNN_MAX_CPU_ISA" not in os.environ:  # says how to lower the float side too
            assert "ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2" in text


@pytest.mark.skipif(not HAS_EXT, reason="--isa chooses among the compiled kernel paths")
def test_bench_infer_refuses_bad_options_naming_them_before_running(capsys, monkeypatch):
    """--isa naming a path this CPU lacks or no path at all, and --repeats/--threads below 1, are usage
    errors (exit 2) that name the option, not RESTE_DEPLOY_ISA; nothing is measured."""
    from reste.cli import main
    from reste.deploy import bench

    monkeypatch.setattr(bench, "run", lambda **kwargs: pytest.fail("the benchmark ran"))
    lacking = [n for n in ("neon", "avx2", "avx512") if n not in ISAS][0]  # x86 never has neon, ARM never avx*
    supported = ", ".join(ISAS)
    cases = [
        (["--isa", lacking], [f"--isa {lacking}: this CPU cannot run", f"paths it supports are {supported}"]),
        (["--isa", "foo"], ["--isa foo: no kernel path of that name", f"This CPU supports {supported}"]),
        (["--isa", f"{ISAS[0]},avx3"], ["--isa avx3: no kernel path", "Did you mean 'avx2'?"]),
        (["--isa", ","], ["--isa is empty"]),
        (["--repeats", "0"], ["--repeats must be >= 1, got 0"]),
        (["--threads", "0"], ["--threads must be >= 1, got 0"]),
        (["--threads", "-2"], ["--threads must be >= 1, got -2"]),
    ]
    for extra, parts in cases:
        assert main(["bench-infer", "--quick", "--json", "-", *extra]) == 2, extra
        err = capsys.readouterr().err
        _one_error(err, *parts)
        assert "RESTE_DEPLOY_ISA" not in err
    # the benchmark script says it the same way (one line, exit 2), not with a traceback
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_infer

    assert bench_infer.main(["--quick", "--json", "-", "--repeats", "0"]) == 2
    _one_error(capsys.readouterr().err, "--repeats must be >= 1, got 0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", ["resnet20", "vgg_small"])
def test_loaded_model_on_cuda_matches_trained_model_on_cuda(name, tmp_path, capsys):
    """Version-2 files hold each BatchNorm's CPU coefficients; cuDNN applies a BatchNorm with
    its own rounding, so on CUDA the deployed model agrees to float tolerance (TF32 off)."""
    from reste.deploy.bench import _calibrated

    arch = {"name": name, "num_classes": 10, "in_channels": 3, "precision": "1w1a", "image_size": 32}
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    trained = _calibrated(reste.models.create(**arch), 3, 32, gen).eval()
    deployed = load(export(trained, tmp_path / "m.safetensors", architecture=arch), fuse=False)
    x = torch.randn(64, 3, 32, 32, generator=gen).cuda()
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            expected, actual = trained.cuda()(x), deployed.cuda()(x)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    diff = (actual - expected).abs().max().item()
    with capsys.disabled():
        print(f"\n{name} on CUDA: max logit difference deployed vs trained {diff:.2e}")
    assert diff < 1e-3 * expected.abs().max().item()


def test_export_is_atomic_and_honours_the_umask(tmp_path, monkeypatch):
    """A failed export leaves the previous file as it was; a new one gets the usual permissions."""
    import os

    import safetensors.torch

    path = export(_tiny("1w1a"), tmp_path / "m.safetensors")
    before = path.read_bytes()
    mask = os.umask(0o022)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        export(_tiny("1w1a"), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left


@pytest.mark.parametrize("weight_scale", ["layer_mean", "channel_mean"])
def test_deployed_binary_vit_is_bit_identical_to_the_trained_one(weight_scale, tmp_path):
    """A 1W/1A ViT: trained binary linears compute integer sums, then alpha, like the packed
    ones, so LayerNorm and attention see exactly the same values and the logits are equal."""
    arch = {
        "name": "vit_tiny",
        "num_classes": 10,
        "in_channels": 3,
        "precision": "1w1a",
        "image_size": 32,
        "weight_scale": weight_scale,
        "kwargs": {"patch_size": 8, "depth": 2},
    }
    torch.manual_seed(0)
    trained = reste.models.create(
        arch["name"],
        num_classes=10,
        in_channels=3,
        precision="1w1a",
        image_size=32,
        weight_scale=weight_scale,
        patch_size=8,
        depth=2,
    ).eval()
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = trained(x)
    deployed = load(export(trained, tmp_path / "vit.safetensors", architecture=arch))
    with torch.no_grad():
        assert torch.equal(deployed(x), expected)


def test_binary_linear_scaled_forward_keeps_value_and_gradient():
    """Integer sums first, then alpha: the same function (to rounding) with the same gradients."""
    torch.manual_seed(0)
    layer = BinaryLinear(64, 24, weight_scale="channel_mean")
    reste.set_params(layer, o=2.0)
    x = torch.randn(8, 64, requires_grad=True)
    y = layer(x)
    xr = x.detach().clone().requires_grad_()
    w = layer.weight.detach().clone().requires_grad_()
    reference = F.linear(layer.input_estimator(xr), layer.weight_alpha(w) * layer.weight_estimator(w), layer.bias)
    torch.testing.assert_close(y, reference, rtol=1e-6, atol=1e-6)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    reference.backward(upstream)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["resnet20", "resnet20_bireal"])
def test_summary_size_is_what_the_export_stores(name, tmp_path):
    """`reste summary`'s model size is the bytes of the tensors an export holds (the rest of
    the file is its header)."""
    from reste.deploy import read_tensors

    arch = {"name": name, "num_classes": 10, "in_channels": 3, "precision": "1w1a", "image_size": 32}
    model = reste.models.create(**arch).eval()
    path = export(model, tmp_path / "m.safetensors", architecture=arch)
    stored = sum(t.numel() * t.element_size() for t in read_tensors(path).values())
    assert summary(model, (3, 32, 32)).memory_bytes == stored == 43824
    assert 0 < path.stat().st_size - stored < 1200  # the header


def test_output_buffers_are_reused_only_when_nothing_refers_to_them():
    from reste.deploy import packed as packed_mod

    if packed_mod._ext() is None or _loader._storage_use_count is None:
        pytest.skip("needs the compiled kernel and torch's storage use count")
    torch.manual_seed(0)
    layer = PackedBinaryConv2d.from_binary(BinaryConv2d(16, 16, 3, 1, 1, bias=False).eval())
    x = torch.randn(2, 16, 6, 6)
    first = layer(x)
    kept = first.clone()
    second = layer(2 * x)
    assert second.data_ptr() != first.data_ptr() and torch.equal(first, kept)  # held: not reused
    address = first.data_ptr()
    del first
    third = layer(x)
    assert third.data_ptr() == address  # dropped: reused
    for alias in (
        lambda t: t.detach(),
        lambda t: t.numpy(),
        lambda t: t[0],
        lambda t: t.permute(0, 2, 3, 1).view(-1),
        lambda t: t._base,
    ):
        held = alias(third)
        value = torch.as_tensor(held).clone()
        address = third.data_ptr()
        del third
        third = layer(3 * x)
        assert third.data_ptr() != address and torch.equal(torch.as_tensor(held), value)
        del held
    # a buffer made under inference_mode is not handed out outside it (in-place ops would fail)
    with torch.inference_mode():
        inside = layer(x)
        address = inside.data_ptr()
        del inside
    outside = layer(x)
    assert not outside.is_inference() and outside.data_ptr() != address
    torch.relu_(outside)
    previous = packed_mod.set_output_pool(0)
    try:
        assert not packed_mod._pool.buffers
        a = layer(x)
        address = a.data_ptr()
        del a
        b = layer(x)  # no pool: a fresh tensor (whatever address the allocator gives)
        assert not packed_mod._pool.buffers and torch.equal(b, layer.reference_forward(x))
    finally:
        packed_mod.set_output_pool(previous)


def test_bench_infer_writes_beside_the_measured_files_only_in_a_clone(tmp_path, monkeypatch):
    # an installed reste run from any folder must not create benchmarks/results/ there
    from reste.deploy.bench import default_results_folder

    monkeypatch.chdir(tmp_path)
    assert default_results_folder() == "."
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    assert default_results_folder() == "benchmarks/results"


def test_bench_infer_keeps_an_earlier_result_of_the_same_day(tmp_path, monkeypatch, capsys):
    """Two runs (a full one, then another) into the default folder: two files; a --quick smoke test
    has its own name, so it never takes a full result's place."""
    import argparse

    from reste.deploy import bench

    monkeypatch.chdir(tmp_path)
    machine = dict(bench.machine_info(), cpu="Some CPU", cpu_family_model="family 6 model 143")

    def fake_runs(isas, quick=False, **kwargs):
        return [{"machine": machine, "repeats": 1, "quick": quick, "conv": [], "e2e": [], "sizes": []}]

    monkeypatch.setattr(bench, "run_isas", fake_runs)
    args = argparse.Namespace(isa="auto", threads=None, repeats=1, quick=False, json=None)
    for quick in (False, False, True):
        assert bench.main(argparse.Namespace(**dict(vars(args), quick=quick))) == 0
    names = sorted(p.name for p in tmp_path.glob("infer_*.json"))
    assert len(names) == 3 and all(n.startswith("infer_some-cpu-family-6-model-143_") for n in names)
    assert sum("_run2" in n for n in names) == 1 and sum("_quick_" in n for n in names) == 1
    assert [json.loads((tmp_path / n).read_text())["quick"] for n in names if "_quick_" in n] == [True]
