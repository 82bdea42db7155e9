"""Chained packing (reste.deploy.fuse.fuse_chains): a binary conv whose output only the next binary
conv reads writes that conv's packed input from its epilogue; no float tensor in between.

Exactness is checked at two levels, on every kernel path this CPU has: the packed bytes the
epilogue writes equal, byte for byte, what the next conv's own pack_rows makes of the float output
(borders, "+1" padding, unused channel bits, its prologue map with NaN and zeros included), and
whole models give the same outputs chained, unchained and on the PyTorch reference path. The NEON
path runs the same byte comparison in tests/csrc/kernel_harness.c under qemu (test_kernels_neon.py).
"""

from __future__ import annotations

import copy
import itertools
import pickle

import pytest
import torch
from torch import nn

import reste
from deploy_helpers import binarized, disagreements_across_threads, forced_kernel_path
from reste.deploy import export, load
from reste.deploy import packed as packed_mod
from reste.deploy.fuse import fuse_chains, fuse_epilogues
from reste.deploy.packed import PackedBinaryConv2d, _ChainLink

HAS_EXT = packed_mod._ext() is not None
ISAS = packed_mod.kernel_info()["available"] if HAS_EXT else []
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="chaining belongs to the compiled kernel (not built here)")


@pytest.fixture(params=ISAS)
def isa(request):
    """Each kernel path this machine can run, forced for the test."""
    with forced_kernel_path(request.param) as name:
        yield name


@pytest.fixture(params=[1, 2])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _each_path_and_thread_count():
    """(path, threads) for every kernel path this machine runs, 1 and 2 threads, each forced in turn."""
    ext = packed_mod._ext()
    before, threads = ext.isa(), torch.get_num_threads()
    try:
        for name in ISAS:
            assert ext.select(name, "the test") == name
            for count in (1, 2):
                torch.set_num_threads(count)
                yield name, count
    finally:
        ext.select(before)
        torch.set_num_threads(threads)


@pytest.fixture
def count_chained(monkeypatch):
    """How many packed inputs the epilogues wrote (the placeholders' payloads made)."""
    made = []

    class Counting(packed_mod._PackedInput):
        __slots__ = ()

        def __init__(self, target, bits):
            made.append(target)
            super().__init__(target, bits)

    monkeypatch.setattr(packed_mod, "_PackedInput", Counting)
    return made


def _random_conv(cin, cout, stride, padding, input_padding, gen, bias=True) -> PackedBinaryConv2d:
    conv = PackedBinaryConv2d(cin, cout, 3, stride, padding, bias=bias, input_padding=input_padding, alpha_size=cout)
    conv.weight_bits.copy_(torch.randint(0, 256, conv.weight_bits.shape, generator=gen, dtype=torch.uint8))
    conv.alpha.copy_(torch.rand(cout, generator=gen) * 0.2 + 0.01)
    if bias:
        conv.bias.copy_(torch.randn(cout, generator=gen))
    return conv


def _packed_by_pack_rows(conv: PackedBinaryConv2d, floats: torch.Tensor) -> torch.Tensor:
    """``conv``'s own packing of ``floats`` (with its prologue map): what a chain must reproduce."""
    ext = packed_mod._ext()
    plan = conv._plan(tuple(floats.shape), conv._build_plan)
    xin = floats.contiguous(memory_format=torch.channels_last)
    bits = torch.full((plan["xbits"],), 0xA5, dtype=torch.uint8)
    ext.pack_rows(xin.data_ptr(), *plan["pack"], bits.data_ptr(), torch.get_num_threads(), *conv._prologue_args())
    return bits


# ----------------------------------------------------------------------------- the packed bytes
@needs_ext
@pytest.mark.parametrize(
    "cin, cmid, cout, stride", [(16, 24, 16, 1), (24, 40, 24, 2), (40, 13, 8, 1), (8, 17, 33, 2), (3, 128, 16, 1)]
)
@pytest.mark.parametrize("prologue", [None, "fma", "mul_add"])
def test_chained_bytes_equal_the_next_convs_own_packing(cin, cmid, cout, stride, prologue, isa, threads):
    for next_padding in ("zero", "+1", "-1", "none"):
        _check_chained_bytes(cin, cmid, cout, stride, next_padding, prologue)


@needs_ext
def test_chained_bytes_with_two_openmp_threads_at_work(isa):
    """Big enough that the kernel really splits the work over 2 threads (below ~100k units per
    thread it stays on one): the threads write different bytes of the same rows."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check_chained_bytes(64, 40, 24, 1, "+1", "fma", size=(32, 32), batches=(2,))
    finally:
        torch.set_num_threads(before)


def _check_chained_bytes(cin, cmid, cout, stride, next_padding, prologue, size=(7, 9), batches=(1, 3)):
    gen = torch.Generator().manual_seed(cin * 1000 + cmid + stride)
    first = _random_conv(cin, cmid, stride, 1, "zero", gen)
    # the first conv's epilogue: ReLU, then an affine map with an inf scale (0 * inf = NaN) and zeros
    scale, shift = torch.randn(cmid, generator=gen), torch.randn(cmid, generator=gen)
    scale[0], shift[1], scale[2], shift[2] = float("inf"), 0.0, 0.0, -0.0
    first.fuse_epilogue(True, nn.BatchNorm2d(cmid).eval(), scale, shift, kernel_fma=True)
    second = _random_conv(
        cmid, cout, 1, 0 if next_padding == "none" else 1, "zero" if next_padding == "none" else next_padding, gen
    )
    if prologue is not None:
        pre_scale, pre_shift = torch.randn(cmid, generator=gen), torch.randn(cmid, generator=gen)
        pre_scale[3 % cmid], pre_shift[4 % cmid] = 0.0, -0.0
        second.fuse_prologue(True, nn.BatchNorm2d(cmid).eval(), pre_scale, pre_shift, prologue == "fma")
    first._chain = _ChainLink(second, ())
    for batch in batches:
        x = torch.randn(batch, cin, *size, generator=gen)
        x[0, :, 2] = 0.0  # exact zeros in, so ReLU(0) and the maps' shifts decide some signs
        with torch.no_grad():
            floats = first(x)
            token = first(x, chained=True)
            payload = getattr(token, packed_mod._PACKED_ATTR)
            assert payload.target is second and token.shape == floats.shape and token.isnan().all()
            assert torch.equal(payload.bits, _packed_by_pack_rows(second, floats))
            assert torch.equal(second(token), second(floats))


@needs_ext
def test_chained_bytes_with_a_residual_added_in_the_epilogue(isa, threads):
    gen = torch.Generator().manual_seed(5)
    first, second = _random_conv(24, 40, 1, 1, "zero", gen), _random_conv(40, 24, 1, 1, "+1", gen)
    first._chain = _ChainLink(second, ())
    x = torch.randn(2, 24, 6, 5, generator=gen)
    residual = torch.randn(2, 40, 6, 5, generator=gen).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        floats = first(x, residual)
        token = first(x, residual, chained=True)
        assert torch.equal(getattr(token, packed_mod._PACKED_ATTR).bits, _packed_by_pack_rows(second, floats))
        # a residual the kernel cannot add (NCHW, broadcast): floats, as without chained
        nchw = residual.contiguous()
        assert torch.equal(first(x, nchw, chained=True), floats)
        assert torch.equal(first(x, residual[:1], chained=True), first(x) + residual[:1])


@needs_ext
def test_three_convs_in_a_row_pass_packed_inputs_twice(isa):
    gen = torch.Generator().manual_seed(7)
    a, b, c = (
        _random_conv(16, 24, 1, 1, "zero", gen),
        _random_conv(24, 40, 2, 1, "-1", gen),
        _random_conv(40, 8, 1, 1, "+1", gen),
    )
    a._chain, b._chain = _ChainLink(b, ()), _ChainLink(c, ())
    x = torch.randn(2, 16, 9, 8, generator=gen)
    with torch.no_grad():
        middle = b(a(x, chained=True), chained=True)  # b reads a's bits and writes c's
        assert getattr(middle, packed_mod._PACKED_ATTR).target is c
        assert torch.equal(c(middle), c(b(a(x))))


@needs_ext
def test_a_placeholder_is_refused_by_any_other_conv():
    gen = torch.Generator().manual_seed(6)
    first, second, other = (_random_conv(16, 16, 1, 1, "zero", gen) for _ in range(3))
    first._chain = _ChainLink(second, ())
    with torch.no_grad():
        token = first(torch.randn(1, 16, 5, 5, generator=gen), chained=True)
        with pytest.raises(RuntimeError, match="only the conv that reste.deploy.fuse.fuse_chains linked"):
            other(token)
        # without the flag (a direct call) and without a link, floats as always
        x = torch.randn(1, 16, 5, 5, generator=gen)
        assert not hasattr(first(x), packed_mod._PACKED_ATTR)
        assert not hasattr(other(x, chained=True), packed_mod._PACKED_ATTR)


# ----------------------------------------------------------------------------- whole models
class Chain(nn.Module):
    """Binary units conv -> ReLU -> BN with no pooling between (each conv's output only feeds the
    next), then a pool, one more unit and a real head."""

    def __init__(self, widths=(24, 40, 24), stride=2, input_padding="zero"):
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        units = []
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            s = stride if i == 0 else 1
            units += [nn.Conv2d(cin, cout, 3, s, 1, bias=False), nn.ReLU(), nn.BatchNorm2d(cout)]
        self.body = nn.Sequential(*units)
        self.pool = nn.MaxPool2d(2)
        self.last = nn.Sequential(nn.Conv2d(widths[-1], 16, 3, padding=1, bias=False), nn.ReLU(), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 10)
        self.input_padding = input_padding

    def forward(self, x):
        return self.head(self.last(self.pool(self.body(self.stem(x)))).mean((2, 3)))


def _three_ways(path, model=None, unfused=True):
    """(chained, unchained, unfused or None) deployed models of one file."""

    def fresh():
        return copy.deepcopy(model) if model is not None else None

    chained = load(path, model=fresh())
    unchained = load(path, model=fresh(), fuse=False)
    fuse_epilogues(unchained, chains=False)
    return chained, unchained, load(path, model=fresh(), fuse=False) if unfused else None


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The PyTorch reference path of every packed layer (inputs that need grad keep the kernel out)."""
    with torch.enable_grad():
        return model(x.clone().requires_grad_(True)).detach()


@needs_ext
@pytest.mark.parametrize("input_padding", ["zero", "+1", "-1"])
def test_chain_model_is_bit_identical_chained_unchained_and_reference(input_padding, tmp_path, count_chained):
    trained = binarized(Chain(), input_padding, seed=3)
    path = export(trained, tmp_path / "chain.safetensors")
    chained, unchained, plain = _three_ways(path, model=Chain())
    assert plain is not None
    assert [c._chain is not None for c in chained.body.children() if isinstance(c, PackedBinaryConv2d)] == [True, False]
    assert "chained=True" in chained.body.code.replace(" ", "")
    for (_, _), batch in itertools.product(_each_path_and_thread_count(), (1, 4)):
        x = torch.randn(batch, 3, 12, 12)
        x[0, :, :3] = 0.0
        with torch.no_grad():
            before = len(count_chained)
            want = unchained(x)
            assert len(count_chained) == before  # nothing chained without fuse_chains
            got = chained(x)
            assert len(count_chained) == before + 1  # body.0 wrote body.3's packed input
            assert torch.equal(got, want)
            assert torch.equal(chained(x.contiguous(memory_format=torch.channels_last)), want)
            assert torch.equal(plain(x), want)
        assert torch.equal(_reference(chained, x), want)


@needs_ext
@pytest.mark.parametrize("width", [0.1875, 0.3125])  # 24-24-48-48-96-96 and 40-40-80-80-160-160 channels
def test_vgg_small_chains_its_unpooled_pairs_bit_exactly(width, tmp_path, count_chained):
    arch = {"name": "vgg_small", "num_classes": 10, "in_channels": 3, "precision": "1w1a", "image_size": 16}
    arch["width"] = width
    trained = binarized(reste.models.create(**arch), seed=4, size=16, binarize=False)
    path = export(trained, tmp_path / "vgg.safetensors", architecture=arch)
    chained, unchained, _ = _three_ways(path, unfused=False)
    assert chained.features.conv2._chain.target is chained.features.conv3
    assert chained.features.conv4._chain.target is chained.features.conv5
    # before a pool (conv1, conv3, conv5) nothing is chained
    assert all(getattr(chained.features, f"conv{i}")._chain is None for i in (1, 3, 5))
    x = torch.randn(3, 3, 16, 16)
    for _ in _each_path_and_thread_count():
        with torch.no_grad():
            want = unchained(x)
            before = len(count_chained)
            assert torch.equal(chained(x), want)
            assert len(count_chained) == before + 2
        assert torch.equal(_reference(chained, x), want)


@needs_ext
@pytest.mark.parametrize(
    "name, chains",
    [("resnet20", 9), pytest.param("resnet20_bireal", 0, marks=pytest.mark.slow)],  # bireal: conv1 also feeds an add
)
def test_resnet_blocks_chain_conv1_to_conv2_but_not_bireal_ones(name, chains, tmp_path):
    arch = {"name": name, "num_classes": 10, "in_channels": 3, "precision": "1w1a", "image_size": 8, "width": 0.25}
    trained = binarized(reste.models.create(**arch), seed=5, size=8, binarize=False)
    path = export(trained, tmp_path / f"{name}.safetensors", architecture=arch)
    chained, unchained, _ = _three_ways(path, unfused=False)
    links = [m for m in chained.modules() if isinstance(m, PackedBinaryConv2d) and m._chain is not None]
    assert len(links) == chains
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(chained(x), unchained(x))


# ----------------------------------------------------------------------------- what must not chain
class Refused(nn.Module):
    """Binary convs whose outputs are needed as floats, each in its own way."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.a1, self.b1 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.a2, self.b2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.a3, self.b3 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.a4, self.b4 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(3, 1, 1)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.a1(x)
        x = self.b1(y) + y  # two consumers: the next conv and an add
        x = self.b2(self.pool(self.a2(x)))  # a pool between
        y = self.a3(x)
        x = self.b3(y + y)  # an add between
        y = self.a4(x)
        x = self.b4(y) * y.mean()  # the value also feeds a function
        return self.head(x.mean((2, 3)))


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Refused()

    def forward(self, x):
        return self.inner(x)


@needs_ext
def test_unsafe_pairs_are_not_chained(tmp_path):
    trained = binarized(Wrapped(), seed=6, size=8)
    path = export(trained, tmp_path / "refused.safetensors")
    chained, unchained, _ = _three_ways(path, model=Wrapped(), unfused=False)
    inner = chained.inner
    # every a -> b pair is refused; the chains there are: b1 (its "+ y" fused as a residual) -> a2,
    # b2 -> a3 and b3 -> a4, each the sole consumer
    assert [n for n in ("a1", "a2", "a3", "a4", "b4") if getattr(inner, n)._chain is not None] == []
    assert [getattr(inner, b)._chain.target is getattr(inner, a) for b, a in (("b1", "a2"), ("b2", "a3"), ("b3", "a4"))]
    assert fuse_chains(chained) == ["inner.b1 -> inner.a2", "inner.b2 -> inner.a3", "inner.b3 -> inner.a4"]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(chained(x), unchained(x))


@needs_ext
def test_a_conv_called_twice_or_a_root_level_pair_is_not_chained():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = PackedBinaryConv2d(8, 8, 3, padding=1), PackedBinaryConv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return self.b(self.a(x)) + self.b(x)  # b is called twice

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.twice = Twice()
            self.a, self.b = PackedBinaryConv2d(8, 8, 3, padding=1), PackedBinaryConv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return self.b(self.a(self.twice(x)))  # the root's own children: the root is never replaced

    model = Outer().eval()
    assert fuse_chains(model) == []
    assert model.twice.a._chain is None and model.a._chain is None


@needs_ext
def test_a_hook_on_the_way_sees_floats(tmp_path, count_chained):
    trained = binarized(Chain(), seed=7)
    path = export(trained, tmp_path / "hook.safetensors")
    chained, unchained, _ = _three_ways(path, model=Chain(), unfused=False)
    seen = []
    handle = getattr(chained.body, "1").register_forward_hook(lambda m, i, o: seen.append(o))  # the absorbed ReLU
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        before = len(count_chained)
        assert torch.equal(chained(x), unchained(x))
        assert len(count_chained) == before and not seen[0].isnan().any()
        handle.remove()
        assert torch.equal(chained(x), unchained(x)) and len(count_chained) == before + 1


@needs_ext
def test_copies_run_unchained_and_can_be_chained_again(tmp_path, count_chained):
    trained = binarized(Chain(), seed=8)
    path = export(trained, tmp_path / "copy.safetensors")
    chained, unchained, _ = _three_ways(path, model=Chain(), unfused=False)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        want = unchained(x)
        assert torch.equal(chained(x), want)
        for other in (copy.deepcopy(chained), pickle.loads(pickle.dumps(chained))):
            assert getattr(other.body, "0")._chain is None
            before = len(count_chained)
            assert torch.equal(other(x), want) and len(count_chained) == before
            assert fuse_chains(other) == ["body.0 -> body.3"]
            assert torch.equal(other(x), want) and len(count_chained) == before + 1


@needs_ext
def test_chained_model_is_race_free_across_python_threads(tmp_path):
    trained = binarized(Chain(), seed=9)
    path = export(trained, tmp_path / "threads.safetensors")
    chained, unchained, _ = _three_ways(path, model=Chain(), unfused=False)
    xs = [torch.randn(2, 3, 12, 12) for _ in range(4)]
    with torch.no_grad():
        want = [unchained(x) for x in xs]
    assert not disagreements_across_threads(chained, xs, want, rounds=20)


def test_without_the_extension_nothing_is_chained_and_outputs_stay_exact(monkeypatch, tmp_path):
    from reste import _ext as _loader

    trained = binarized(Chain(), seed=10)
    path = export(trained, tmp_path / "noext.safetensors")
    x = torch.randn(2, 3, 12, 12)

    def last_unit(model):  # the binary units' output, before the float mean and head
        return _reference(nn.Sequential(model.stem, model.body, model.pool, model.last), x)

    # the same unfused model on the reference path, in this process with the extension
    reference = load(path, model=Chain(), fuse=False)
    want, want_logits = last_unit(reference), _reference(reference, x)
    monkeypatch.setenv(packed_mod.NO_EXTENSION_ENV, "1")
    monkeypatch.setattr(_loader, "BITOPS", _loader.BITOPS.fresh())
    monkeypatch.setattr(packed_mod, "_warned", True)
    model = load(path, model=Chain())
    assert fuse_chains(model) == [] and getattr(model.body, "0")._chain is None
    assert torch.equal(last_unit(model), want)
    # the reference path writes another memory layout with the extension than without, so the float
    # mean over H, W may sum in another order: the logits agree to rounding
    torch.testing.assert_close(_reference(model, x), want_logits, atol=1e-6, rtol=0)
    with torch.no_grad():
        assert torch.allclose(model(x), want_logits, atol=1e-5, rtol=0)
