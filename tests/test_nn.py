"""Binary layers and model conversion."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reste
from reste.nn import BinaryConv2d, BinaryLayer, BinaryLinear


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 16, 1, stride=2, bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 16),
        nn.Linear(16, 10),
    )


def test_binary_conv_computes_alpha_sign_w_on_sign_x():
    torch.manual_seed(0)
    layer = BinaryConv2d(4, 6, 3, padding=1, bias=False)
    x = torch.randn(2, 4, 5, 5)
    alpha = layer.weight.abs().mean()
    expected = F.conv2d(torch.where(x >= 0, 1.0, -1.0), alpha * torch.where(layer.weight >= 0, 1.0, -1.0), padding=1)
    torch.testing.assert_close(layer(x), expected)


def test_channel_mean_and_no_scale():
    torch.manual_seed(0)
    layer = BinaryLinear(5, 3, bias=False, weight_scale="channel_mean", input_estimator=None)
    x = torch.randn(4, 5)
    alpha = layer.weight.abs().mean(dim=1, keepdim=True)
    torch.testing.assert_close(layer(x), x @ (alpha * torch.sign(layer.weight)).t())
    raw = BinaryLinear(5, 3, bias=False, weight_scale="none", input_estimator=None)
    assert set(raw.quantized_weight().unique().tolist()) <= {-1.0, 1.0}


@pytest.mark.parametrize("pad,value", [("+1", 1.0), ("-1", -1.0)])
def test_binary_padding_is_truly_binary(pad, value):
    torch.manual_seed(0)
    layer = BinaryConv2d(2, 3, 3, padding=1, bias=False, input_padding=pad, weight_scale="none")
    x = torch.randn(1, 2, 4, 4)
    xb = F.pad(torch.where(x >= 0, 1.0, -1.0), (1, 1, 1, 1), value=value)
    expected = F.conv2d(xb, torch.where(layer.weight >= 0, 1.0, -1.0))
    torch.testing.assert_close(layer(x), expected)
    # every output is then an integer of the same parity as the number of taps (18)
    assert torch.all((layer(x) - 18) % 2 == 0)


def test_dorefa_weights_forward_and_identity_gradient():
    torch.manual_seed(0)
    layer = BinaryLinear(6, 4, bias=False, weight_estimator="dorefa", input_estimator=None)
    w = layer.quantized_weight()
    torch.testing.assert_close(w, layer.weight.abs().mean() * torch.sign(layer.weight))
    w.sum().backward()
    torch.testing.assert_close(layer.weight.grad, torch.ones_like(layer.weight))


def test_layer_gradient_reaches_latent_weights_through_alpha():
    torch.manual_seed(0)
    layer = BinaryLinear(3, 2, bias=False, weight_estimator="ste", input_estimator=None)
    x = torch.randn(4, 3)
    layer(x).sum().backward()
    w = layer.weight.detach().clone().requires_grad_(True)
    (x @ (w.abs().mean() * (torch.sign(w) + (w - w.detach()))).t()).sum().backward()  # STE by hand
    torch.testing.assert_close(layer.weight.grad, w.grad)


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="weight_scale"):
        BinaryConv2d(2, 2, 3, weight_scale="max")
    with pytest.raises(ValueError, match="input_padding"):
        BinaryConv2d(2, 2, 3, input_padding="1")
    with pytest.raises(ValueError, match="unknown estimator"):
        BinaryConv2d(2, 2, 3, weight_estimator="resteX")


def test_binarize_keeps_first_and_last_and_preserves_shapes_and_params():
    model = small_cnn()
    x = torch.randn(2, 3, 8, 8)
    out_float = model(x)
    n_params = sum(p.numel() for p in model.parameters())
    weight_ids = [id(p) for p in model.parameters()]
    reste.binarize(model)
    assert type(model[0]) is nn.Conv2d and type(model[10]) is nn.Linear
    assert (
        isinstance(model[3], BinaryConv2d) and isinstance(model[6], BinaryConv2d) and isinstance(model[9], BinaryLinear)
    )
    assert model(x).shape == out_float.shape
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert [id(p) for p in model.parameters()] == weight_ids  # weights shared, optimizers stay valid


def test_binarize_keep_rules_pointwise_patterns_and_types():
    model = reste.binarize(small_cnn(), keep=("first", "last", "pointwise"))
    assert type(model[6]) is nn.Conv2d
    model = reste.binarize(small_cnn(), keep=("3",), keep_defaults=False)
    assert type(model[3]) is nn.Conv2d and isinstance(model[0], BinaryConv2d)
    model = reste.binarize(small_cnn(), keep=(nn.Linear,))
    assert type(model[9]) is nn.Linear and isinstance(model[3], BinaryConv2d)
    assert reste.nn.full_precision_layers(small_cnn(), keep=("first", "last", "pointwise")) == ["0", "6", "10"]


def _real(model):
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, BinaryLayer)
    ]


def test_binarize_keep_adds_to_the_defaults_and_keep_defaults_false_replaces_them():
    assert reste.nn.DEFAULT_KEEP == ("first", "last")
    assert _real(reste.binarize(small_cnn())) == ["0", "10"]
    # the case: "pointwise" used to replace ("first", "last"); it now adds to them
    assert _real(reste.binarize(small_cnn(), keep="pointwise")) == ["0", "6", "10"]
    assert _real(reste.binarize(small_cnn(), keep=["9"])) == ["0", "9", "10"]
    assert _real(reste.binarize(small_cnn(), keep="pointwise", keep_defaults=False)) == ["6"]
    assert _real(reste.binarize(small_cnn(), keep_defaults=False)) == []  # every layer binary
    assert reste.nn.full_precision_layers(small_cnn(), "pointwise") == ["0", "6", "10"]
    assert reste.nn.full_precision_layers(small_cnn(), "pointwise", keep_defaults=False) == ["6"]


@pytest.mark.parametrize(
    "keep,suggestion", [("frist", "'first'"), (["first", "last", "fc_1"], None), ("*.downsampel.*", None)]
)
def test_binarize_keep_entry_matching_nothing_is_an_error_with_close_names(keep, suggestion):
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(3, 8, 3))
    model.add_module("fc1", nn.Linear(8, 8))
    model.add_module("fc2", nn.Linear(8, 2))
    before = repr(model)
    with pytest.raises(ValueError, match="matches no Conv2d/Linear layer") as info:
        reste.binarize(model, keep=keep)
    message = str(info.value)
    bad = keep if isinstance(keep, str) else keep[-1]
    assert repr(bad) in message and "conv, fc1, fc2" in message  # the valid names are listed
    if bad == "fc_1":
        assert "Did you mean 'fc1'" in message
    if suggestion:
        assert f"Did you mean {suggestion}" in message
    assert repr(model) == before  # nothing was converted
    with pytest.raises(ValueError, match="'frist'"):
        reste.nn.full_precision_layers(model, "frist")


def test_binarize_keep_none_is_refused_and_tokens_and_types_may_match_nothing():
    with pytest.raises(TypeError, match="keep_defaults=False"):
        reste.binarize(small_cnn(), keep=None)
    with pytest.raises(TypeError, match="keep entries"):
        reste.binarize(small_cnn(), keep=(int,))
    mlp = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    assert _real(reste.binarize(mlp, keep=("pointwise", nn.Conv2d))) == ["0", "2"]  # categories, not names


def test_binarize_logs_the_layers_made_binary_and_those_kept(caplog):
    with caplog.at_level(logging.INFO, logger="reste.nn.convert"):
        model = reste.binarize(small_cnn(), keep="pointwise")
    line = next(r.getMessage() for r in caplog.records if r.name == "reste.nn.convert")
    assert line == "binarize: 2 layer(s) made binary: 3, 9; kept real: 0, 6, 10"
    assert [n for n, _ in reste.nn.binary_layers(model)] == ["3", "9"]


@pytest.mark.parametrize("again", [{}, {"keep_defaults": False}, {"estimator": "ste"}, {"activations": False}], ids=str)
def test_binarize_twice_is_a_no_op_and_says_so(again):
    model = reste.binarize(small_cnn(), keep="pointwise")  # layers 6 and 10 kept real on purpose
    before = copy.deepcopy(model.state_dict())
    reprs = repr(model)
    with pytest.warns(UserWarning, match="already binarized .2 binary layer.s., e.g. 3.; it is left unchanged"):
        assert reste.binarize(model, **again) is model
    assert repr(model) == reprs
    assert before.keys() == model.state_dict().keys()


def test_binarize_swaps_a_shared_layer_under_every_name_and_keeps_it_shared():
    torch.manual_seed(0)
    shared = nn.Linear(16, 16)
    model = nn.Sequential(nn.Linear(8, 16), shared, shared, shared, nn.Linear(16, 2))
    x = torch.randn(4, 8)
    reste.binarize(model)
    assert [type(m).__name__ for m in model] == ["Linear", "BinaryLinear", "BinaryLinear", "BinaryLinear", "Linear"]
    assert model[1] is model[2] is model[3] and model[1].weight is shared.weight
    # every use computes with sign(W): three binary layers in a row, not one
    h = model[0](x)
    for _ in range(3):
        h = F.linear(
            torch.where(h < 0, -1.0, 1.0),
            shared.weight.abs().mean() * torch.where(shared.weight < 0, -1.0, 1.0),
            shared.bias,
        )
    torch.testing.assert_close(model(x), model[4](h))
    # a keep pattern on any of its names keeps it real under all of them
    again = nn.Sequential(nn.Linear(8, 16), shared, shared, nn.Linear(16, 2))
    assert reste.nn.full_precision_layers(again, keep=["2"]) == ["0", "1", "3"]
    with pytest.warns(UserWarning, match="no layer binary"):
        assert [type(m).__name__ for m in reste.binarize(again, keep=["2"])] == ["Linear"] * 4


def test_binarize_rebuilds_a_shared_attention_module_once():
    mha = nn.MultiheadAttention(16, 2)

    class TwoUses(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.a, self.b, self.out = nn.Linear(4, 16), mha, mha, nn.Linear(16, 2)

        def forward(self, x):
            x = self.inp(x)
            x = self.a(x, x, x)[0]
            return self.out(self.b(x, x, x)[0])

    model = reste.binarize(TwoUses())
    assert model.a is model.b and isinstance(model.a.in_proj, BinaryLinear)
    model(torch.randn(3, 2, 4)).sum().backward()


def test_binarize_that_fails_on_a_layer_names_it_and_changes_nothing():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(8, 2, 1),
    )
    with pytest.raises(ValueError, match=r"layer '2' .*padding_mode.*The model is unchanged.*keep=\['2'\]"):
        reste.binarize(model, input_padding="+1")
    assert [type(m) for m in model] == [nn.Conv2d] * 4  # layer 1 was not swapped before layer 2 failed
    # an option of every layer is refused as such, not blamed on the first layer it reaches
    with pytest.raises(ValueError, match=r"^unknown estimator 'nope'"):
        reste.binarize(model, estimator="nope")
    assert _real(reste.binarize(model, input_padding="+1", keep=["2"])) == ["0", "2", "3"]


def test_binarize_that_makes_nothing_binary_warns_why():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 3, 3, 3))

        def forward(self, x):
            return F.conv2d(x, self.w)

    with pytest.warns(UserWarning, match="no layer binary: it has no nn.Conv2d or nn.Linear module .*F.conv2d"):
        reste.binarize(Functional())
    with pytest.warns(UserWarning, match=r"none of its 2 Conv2d/Linear layer\(s\) was converted \(kept real: 0, 1;"):
        reste.binarize(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))


def test_binarize_1w32a_and_estimator_choice():
    model = reste.binarize(small_cnn(), estimator="ede", activations=False)
    assert model[3].input_estimator is None and model[3].weight_estimator.name == "ede"
    model = reste.binarize(small_cnn(), estimator="rbnn")
    assert model[3].input_estimator.activation and not model[3].weight_estimator.activation
    model = reste.binarize(small_cnn(), estimator_params={"o": 2.0})
    assert float(model[3].weight_estimator.o) == 2.0


def test_binarize_works_on_a_transformer_nobody_wrote_for_it():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    model = nn.Sequential(nn.Linear(8, 16), layer, nn.Linear(16, 4))
    x = torch.randn(2, 5, 8)
    shape = model(x).shape
    reste.binarize(model, activations=False)
    # nn.MultiheadAttention keeps its packed in-projection as a raw parameter; its out_proj is an
    # nn.Linear subclass (NonDynamicallyQuantizableLinear) and is left alone, like the MLP is not
    assert isinstance(model[1].linear1, BinaryLinear) and isinstance(model[1].linear2, BinaryLinear)
    assert model(x).shape == shape
    model(x).sum().backward()
    assert model[1].linear1.weight.grad is not None


def test_binarize_rejects_non_modules_and_bad_keep():
    with pytest.raises(TypeError, match="nn.Module"):
        reste.binarize("resnet")
    with pytest.raises(TypeError, match="keep entries"):
        reste.binarize(small_cnn(), keep=(3,))
    with pytest.raises(TypeError, match="keep entries .* got 3"):
        reste.binarize(small_cnn(), keep=3)  # not iterable: the same message, not "int is not iterable"


def _assert_same_outputs_and_gradients(layer, reference, x):
    results = []
    for mod in (layer, reference):
        xi = x.clone().requires_grad_(True)
        out = mod(xi)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append((out.detach(), xi.grad, mod.weight.grad, mod.bias.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _unfused_copy(layer):
    """The same layer computing through the plain estimator + conv ops (no fusion)."""
    other = copy.deepcopy(layer)
    other.input_estimator.recompute_sign_in_backward = False
    return other


@pytest.mark.parametrize("estimator", ["reste", "ede", "approx_sign", "ste"])
@pytest.mark.parametrize("padding,input_padding,stride", [(1, "zero", 1), (1, "+1", 2), (1, "-1", 1), (0, "zero", 2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_binary_conv_equals_unfused(estimator, padding, input_padding, stride, channels_last):
    torch.manual_seed(0)
    layer = BinaryConv2d(
        4,
        6,
        3,
        stride=stride,
        padding=padding,
        bias=True,
        weight_estimator=estimator,
        input_estimator=estimator,
        input_padding=input_padding,
        estimator_params=None,
    )
    reference = _unfused_copy(layer)
    x = torch.randn(3, 4, 7, 7)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    _assert_same_outputs_and_gradients(layer, reference, x)


@pytest.mark.parametrize("estimator", ["reste", "rbnn"])
def test_fused_binary_linear_equals_unfused(estimator):
    torch.manual_seed(0)
    layer = BinaryLinear(5, 3, weight_estimator=estimator, input_estimator=estimator)
    reference = _unfused_copy(layer)
    x = torch.randn(2, 4, 5)
    _assert_same_outputs_and_gradients(layer, reference, x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("scale", ["layer_mean", "channel_mean"])
def test_binary_conv_on_cuda_matches_cpu(scale):
    """A 1W/1A conv (fused input path, weight estimator, scale) on CUDA against the CPU."""
    torch.manual_seed(0)
    cpu = BinaryConv2d(8, 16, 3, padding=1, bias=False, weight_scale=scale)
    reste.set_params(cpu, o=3.0)
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(4, 8, 10, 10)
    upstream = torch.randn(4, 16, 10, 10)
    xc, xg = x.clone().requires_grad_(), x.cuda().requires_grad_()
    expected = cpu(xc)
    expected.backward(upstream)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # TF32 convolutions would round alpha and the gradients
    try:
        out = gpu(xg)
        out.backward(upstream.cuda())
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    torch.testing.assert_close(out.detach().cpu(), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xg.grad.cpu(), xc.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gpu.weight.grad.cpu(), cpu.weight.grad, rtol=1e-4, atol=1e-4)


def test_epoch_flip_ratio_counts_flips_since_the_previous_epoch_end_whatever_was_sampled_between():
    # the metrics row's flip ratio must not depend on analysis.every_steps (a neutral option)
    from reste.nn.indicators import IndicatorTracker

    model = nn.Sequential(BinaryLinear(50, 40), nn.ReLU(), BinaryLinear(40, 10))
    tracker = IndicatorTracker(model, o_end=3.0)
    assert tracker.measure(epoch_end=True)["epoch_flip_ratio"] is None  # nothing to compare with yet
    first, second = model[0].weight, model[2].weight
    with torch.no_grad():
        first.view(-1)[:6] *= -1
    assert "epoch_flip_ratio" not in tracker.measure()  # a step sample in between
    with torch.no_grad():
        first.view(-1)[:2] *= -1  # 2 of the 6 flip back: 4 differ from the epoch end
        second.view(-1)[:3] *= -1
    values = tracker.measure(epoch_end=True)
    numel = first.numel() + second.numel()
    assert values["flip_ratio"] == pytest.approx(5 / numel)  # since the step sample: 2 + 3
    assert values["epoch_flip_ratio"] == pytest.approx(7 / numel)  # since the epoch end: 4 + 3
    # a resumed tracker keeps both references
    twin = IndicatorTracker(model, o_end=3.0)
    twin.load_state_dict(tracker.state_dict())
    with torch.no_grad():
        second.view(-1)[:1] *= -1
    assert twin.measure(epoch_end=True)["epoch_flip_ratio"] == pytest.approx(1 / numel)
