"""Trained binary convs and their packed exports compute bit-identical outputs.

Without autograd a BinaryConv2d sums sign(x)·sign(W) exactly before scaling by alpha, as packed
inference does; before, its float conv of sign(x) with alpha·sign(W) rounded differently (about
1e-6), and activations that close to 0 took the other sign in the next layer.
"""

from __future__ import annotations

import copy

import pytest
import torch

import reste
from reste.deploy import export, load
from reste.deploy.packed import PackedBinaryConv2d
from reste.nn import BinaryConv2d


@pytest.mark.parametrize("scale", ["layer_mean", "channel_mean", "none"])
@pytest.mark.parametrize("pad", ["zero", "+1", "-1"])
@pytest.mark.parametrize("bias", [False, True])
def test_binary_conv_without_grad_equals_its_packed_twin(scale, pad, bias):
    torch.manual_seed(0)
    conv = BinaryConv2d(16, 24, 3, stride=2, padding=1, bias=bias, weight_scale=scale, input_padding=pad).eval()
    if bias:
        torch.nn.init.normal_(conv.bias)
    x = torch.randn(3, 16, 11, 9) * 1e-3
    packed = PackedBinaryConv2d.from_binary(conv)
    with torch.no_grad():
        exact = conv(x)
        assert torch.equal(exact, packed(x)) and torch.equal(exact, packed.reference_forward(x))
    # the training forward sums exactly too (it rounded alpha·sign(W) products, about 1e-7 apart)
    assert torch.equal(conv(x.requires_grad_()), exact)


@pytest.mark.parametrize("estimator", ["reste", "ste", "dsq"])  # dsq keeps its own backward (its alpha trains)
@pytest.mark.parametrize("weights", [None, "dorefa"])
def test_the_training_forward_equals_the_exact_one_for_every_estimator(estimator, weights):
    # DSQ's layers took a plain conv of alpha * sign(W): 0 of 312 sums of exactly 0 stayed 0; DoReFa's
    # straight-through weights read alpha back 1.2e-7 off the packed layer's
    torch.manual_seed(0)
    extra = {} if weights is None else {"weight_estimator": weights}
    conv = BinaryConv2d(8, 12, 3, padding=1, bias=True, input_estimator=estimator, **extra).eval()
    linear = reste.nn.BinaryLinear(72, 10, input_estimator=estimator, **extra).eval()
    x = torch.randn(4, 8, 7, 7)
    v = torch.randn(5, 72)
    with torch.no_grad():
        exact_conv, exact_linear = conv(x), linear(v)
    assert (exact_conv == conv.bias.reshape(-1, 1, 1)).sum() > 0  # sums of exactly 0 are there to check
    x.requires_grad_()
    out = conv(x)
    assert torch.equal(out, exact_conv) and torch.equal(linear(v.requires_grad_()), exact_linear)
    out.square().sum().backward()  # and it still trains: the estimator's backward reaches x and W
    assert x.grad.abs().sum() > 0 and conv.weight.grad.abs().sum() > 0


def test_training_gradients_through_a_relu_after_a_binary_conv_do_not_depend_on_rounding():
    # 1,000s of a binary conv's outputs are integer sums of exactly 0; the training forward gave them as
    # about +-1e-8, so a ReLU after it passed the gradient of about half of them, a different half in
    # float64 or channels_last: the stem's gradient moved by 43% (float64) and 46% (channels_last)
    torch.manual_seed(0)
    model = reste.binarize(
        torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.BatchNorm2d(8),
            torch.nn.Conv2d(8, 8, 3, padding=1, bias=False),
            torch.nn.ReLU(),
            torch.nn.BatchNorm2d(8),
            torch.nn.Flatten(),
            torch.nn.Linear(8 * 8 * 8, 10),
        )
    )
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        zeros = (model[:3](x) == 0).sum().item()
    assert zeros > 100  # the case at hand: many sums of exactly 0

    def stem_grad(m, inputs):
        m.zero_grad()
        out = m[:3](inputs)
        assert (out == 0).sum().item() == zeros  # exact zeros with autograd on too
        m(inputs).double().pow(2).sum().backward()
        return m[0].weight.grad.double()

    reference = stem_grad(model, x)
    for other, inputs in (
        (copy.deepcopy(model).double(), x.double()),
        (copy.deepcopy(model).to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)),
    ):
        grad = stem_grad(other, inputs)
        assert ((grad - reference).norm() / reference.norm()).item() < 1e-5


def _stats(model, channels, size):
    """BatchNorm statistics from a few training-mode batches, then eval."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, channels, size, size))
    return model.eval()


def _outputs(model, names):
    seen = {}
    for name in names:
        model.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(name, o.detach().clone())
        )
    return seen


@pytest.mark.parametrize("name", ["resnet20", "resnet20_bireal", "vgg_small"])
def test_every_binary_conv_of_an_exported_model_is_bit_identical(name, tmp_path):
    torch.manual_seed(1)
    arch = {"name": name, "num_classes": 10, "in_channels": 1, "precision": "1w1a", "image_size": 16, "width": 0.5}
    model = _stats(reste.models.create(**arch), 1, 16)
    deployed = load(export(model, tmp_path / "m.safetensors", architecture=arch), fuse=False)
    convs = [n for n, m in model.named_modules() if isinstance(m, BinaryConv2d)]
    trained, packed = _outputs(model, convs), _outputs(deployed, convs)
    x = torch.randn(32, 1, 16, 16)
    with torch.no_grad():
        want, got = model(x), deployed(x)
    assert len(trained) == len(packed) == len(convs) >= 5
    for conv in convs:  # so every binary layer downstream sees the same signs
        assert torch.equal(packed[conv], trained[conv]), conv
    # the float head after the last binary layer may sum in another order (channels-last pooling)
    assert torch.allclose(got, want, rtol=0, atol=1e-6) and torch.equal(got.argmax(1), want.argmax(1))
