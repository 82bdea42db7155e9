"""nn.MultiheadAttention is binarized like any linear: reste.nn.MultiheadAttention equals it
exactly before binarization, and its projections follow binarize's rules afterwards."""

import copy
import warnings

import pytest
import torch
from torch import nn

import reste
from reste.nn import BinaryLinear, MultiheadAttention, binary_layers

E = 16


def _pairs(mha, *args, **kwargs):
    mha.eval()
    want = mha(*args, **kwargs)
    got = MultiheadAttention.from_torch(mha).eval()(*args, **kwargs)
    return list(zip(want, got))


CASES = {
    "self": ({}, {}),
    "self_no_weights": ({}, {"need_weights": False}),
    "per_head_weights": ({}, {"average_attn_weights": False}),
    "padding_mask": ({}, {"key_padding_mask": torch.tensor([[False] * 5, [False] * 3 + [True] * 2])}),
    "padding_mask_no_weights": (
        {},
        {"key_padding_mask": torch.tensor([[False] * 5, [False] * 3 + [True] * 2]), "need_weights": False},
    ),
    "causal": (
        {},
        {"attn_mask": nn.Transformer.generate_square_subsequent_mask(5), "is_causal": True, "need_weights": False},
    ),
    "bool_mask": ({}, {"attn_mask": torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)}),
    "bias_kv_zero_attn": ({"add_bias_kv": True, "add_zero_attn": True}, {}),
    "no_bias_seq_first": ({"bias": False, "batch_first": False}, {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_outputs_as_torch_self_attention(case):
    torch.manual_seed(0)
    ctor, call = CASES[case]
    mha = nn.MultiheadAttention(E, 4, **{"batch_first": True, **ctor})
    if ctor.get("add_bias_kv"):
        nn.init.normal_(mha.bias_k), nn.init.normal_(mha.bias_v)
    x = torch.randn(2, 5, E)
    for want, got in _pairs(mha, x, x, x, **call):
        assert (want is None) == (got is None)
        if want is not None:
            assert torch.equal(want, got)  # the same operations in the same order: bit-identical


def test_same_outputs_cross_attention_separate_dims_unbatched():
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(E, 2, kdim=6, vdim=10, add_bias_kv=True, add_zero_attn=True)
    q, k, v = torch.randn(5, 2, E), torch.randn(7, 2, 6), torch.randn(7, 2, 10)
    for want, got in _pairs(mha, q, k, v, key_padding_mask=torch.rand(2, 7) < 0.3):
        assert torch.equal(want, got)
    for want, got in _pairs(mha, q[:, 0], k[:, 0], v[:, 0]):  # unbatched [L, E]
        assert torch.equal(want, got)
    # packed weights, memory != query: PyTorch multiplies by row blocks, we slice the full product
    packed = nn.MultiheadAttention(E, 4, batch_first=True)
    x, mem = torch.randn(2, 5, E), torch.randn(2, 7, E)
    for want, got in _pairs(packed, x, mem, mem):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_fast_path_under_no_grad_agrees():
    """In eval mode without autograd PyTorch takes its fused kernel; ours stays on the module path."""
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(E, 4, batch_first=True).eval()
    x = torch.randn(3, 6, E)
    with torch.no_grad():
        want, _ = mha(x, x, x, need_weights=False)
        got, _ = MultiheadAttention.from_torch(mha)(x, x, x, need_weights=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_torch_state_dict_loads():
    torch.manual_seed(3)
    for kw in ({}, {"kdim": 6, "vdim": 10}):
        src, dst = nn.MultiheadAttention(E, 4, **kw), MultiheadAttention(E, 4, **kw)
        dst.load_state_dict(src.state_dict())  # strict: every key has its place
        x = torch.randn(5, 2, E)
        k, v = (torch.randn(7, 2, kw["kdim"]), torch.randn(7, 2, kw["vdim"])) if kw else (x, x)
        assert torch.equal(dst(x, k, v)[0], src.eval()(x, k, v)[0])


class Encoder(nn.Module):
    def __init__(self, layers=2):
        super().__init__()
        self.embed = nn.Linear(8, E)
        self.enc = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(E, 4, 32, dropout=0.0, batch_first=True), layers, enable_nested_tensor=True
        )
        self.head = nn.Linear(E, 3)

    def forward(self, x, key_padding_mask=None):
        return self.head(self.enc(self.embed(x), src_key_padding_mask=key_padding_mask).mean(1))


def test_binarize_converts_attention_and_matches_sign_weights():
    torch.manual_seed(4)
    float_model = Encoder().eval()
    model = reste.binarize(copy.deepcopy(float_model), activations=False)
    names = [n for n, _ in binary_layers(model)]
    assert names == [
        f"enc.layers.{i}.{p}"
        for i in range(2)
        for p in ("self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2")
    ]
    assert all(isinstance(m, BinaryLinear) for _, m in binary_layers(model))
    x = torch.randn(3, 5, 8)
    mask = torch.tensor([[False] * 5, [False] * 4 + [True], [False] * 2 + [True] * 3])
    ref = _signs_reference_float(float_model, model)
    previous = torch.backends.mha.get_fastpath_enabled()
    for kpm in (None, mask):
        with torch.no_grad():  # eval + no_grad: PyTorch's fused encoder path would bypass binary layers
            got = model(x, kpm)
            torch.backends.mha.set_fastpath_enabled(False)  # the reference: the path the model trains on
            try:
                want = ref(x, kpm)
            finally:
                torch.backends.mha.set_fastpath_enabled(previous)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert model.enc.use_nested_tensor is False


def _signs_reference_float(float_model, binary_model):
    """``float_model`` (torch's own attention) with each binarized weight replaced by alpha * sign(W)."""
    ref = copy.deepcopy(float_model)
    for name, layer in binary_layers(binary_model):
        w = layer.weight.detach()
        signs = w.abs().mean() * torch.where(w >= 0, 1.0, -1.0)
        parent, _, proj = name.rpartition(".")
        with torch.no_grad():
            if proj == "in_proj":
                ref.get_submodule(parent).in_proj_weight.copy_(signs)
            else:
                ref.get_submodule(name).weight.copy_(signs)
    return ref


def test_binary_attention_trains_every_projection():
    torch.manual_seed(5)
    model = reste.binarize(Encoder(layers=1), keep_defaults=False).train()
    loss = model(torch.randn(4, 5, 8)).square().mean()
    loss.backward()
    for name, layer in binary_layers(model):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0, name


def test_keep_rules_apply_to_attention():
    torch.manual_seed(6)
    whole = reste.binarize(Encoder(), keep=[nn.MultiheadAttention])
    assert isinstance(whole.enc.layers[0].self_attn, nn.MultiheadAttention)  # kept whole, untouched
    assert [n for n, _ in binary_layers(whole)] == [f"enc.layers.{i}.linear{j}" for i in range(2) for j in (1, 2)]
    by_name = reste.binarize(Encoder(), keep=["enc.layers.0.self_attn", "*.out_proj"])
    assert isinstance(by_name.enc.layers[0].self_attn, nn.MultiheadAttention)
    assert not isinstance(by_name.enc.layers[1].self_attn.out_proj, BinaryLinear)
    assert isinstance(by_name.enc.layers[1].self_attn.in_proj, BinaryLinear)
    assert "enc.layers.1.self_attn.in_proj" not in reste.nn.full_precision_layers(Encoder(), keep=["*.out_proj"])
    with pytest.raises(ValueError, match="in_proj"):
        reste.binarize(Encoder(), keep=["enc.layers.0.self_attn.inproj"])


def test_unconvertible_layers_are_named():
    class Net(Encoder):
        def __init__(self):
            super().__init__()
            self.mix = nn.Conv1d(E, E, 1)

    with pytest.warns(UserWarning, match=r"cannot convert 1 layer\(s\), which stay real: mix \(Conv1d\)"):
        reste.binarize(Net())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reste.binarize(Net(), keep=["mix"])  # named on purpose: no warning


@pytest.mark.parametrize("keep", [(), (nn.MultiheadAttention,)], ids=["all", "attention_kept_real"])
def test_export_and_load_into_float_architecture(keep, tmp_path):
    torch.manual_seed(7)
    model = reste.binarize(Encoder(), keep=list(keep)).eval()
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        want = model(x)
        path = reste.deploy.export(model, tmp_path / "enc.safetensors")
        # torch's attention is rebuilt to take the packed layers; with it kept real, the packed
        # feed-forward layers still keep torch's fused encoder kernel (which reads .weight) off
        deployed = reste.deploy.load(path, model=Encoder())
        assert torch.equal(deployed(x), want)


def test_reste_vit_binarizes_without_warnings_like_create():
    kw = dict(in_channels=1, image_size=12, patch_size=4, dim=24, depth=2, heads=3, mlp_dim=48)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left unconverted
        model = reste.binarize(reste.models.create("vit_tiny", precision="fp", **kw), keep=["patch_embed", "head"])
    want = [n for n, _ in binary_layers(reste.models.create("vit_tiny", precision="1w1a", **kw))]
    assert (
        [n for n, _ in binary_layers(model)]
        == want
        == [f"blocks.{i}.{p}" for i in range(2) for p in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    )


def test_fused_encoder_kernel_never_skips_binary_linears():
    """Attention kept whole, MLP binary: PyTorch's fused eval kernel would read linear1.weight
    (the latent floats) under no_grad; binarize turns that path off for touched layers."""
    torch.manual_seed(8)
    model = reste.binarize(Encoder(), keep=[nn.MultiheadAttention]).eval()
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        fast = model(x)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            slow = model(x)  # the module path, as in training
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    # the kept nn.MultiheadAttention may still take its own fused kernel: rounding apart only
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    model.enc.layers[0].activation_relu_or_gelu = 1  # as PyTorch set it: the fused kernel returns
    with torch.no_grad():
        assert (model(x) - slow).abs().max() > 1e-3  # computed with the latent float weights of linear1/2
