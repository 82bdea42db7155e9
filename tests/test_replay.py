"""reste.deploy.capture: a deployed model's forward replayed per input shape as one generated function.

The capture must compute exactly what the model computes: every test compares it with the model
itself (whose packed layers are checked against the PyTorch reference in test_deploy*.py), on
every kernel path this CPU has, NCHW and channels-last, batch 1 and more.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import reste
from deploy_helpers import binarized, disagreements_across_threads, forced_kernel_path
from reste.deploy import CaptureError, capture, export, load
from reste.deploy import packed as packed_mod
from reste.deploy import replay as replay_mod
from reste.deploy.packed import PackedBinaryConv2d, PackedBinaryLinear

HAS_EXT = packed_mod._ext() is not None
ISAS = packed_mod.kernel_info()["available"] if HAS_EXT else []
pytestmark = pytest.mark.skipif(not HAS_EXT, reason="a capture replays the compiled kernel (not built here)")

ARCHS = {
    "resnet20": {"width": 0.25, "image_size": 8},
    "resnet20_bireal": {"width": 0.25, "image_size": 8},
    "vgg_small": {"width": 0.1875, "image_size": 16},
    "vit_tiny": {"image_size": 8, "patch_size": 4, "dim": 24, "depth": 2, "heads": 2, "mlp_dim": 48},
}


def _deployed(name: str, tmp_path, precision: str = "1w1a", fuse: bool = True, seed: int = 0) -> nn.Module:
    """A registry model with trained-looking BatchNorms (far from fresh ones), exported and loaded."""
    arch = {"name": name, "num_classes": 10, "in_channels": 3, "precision": precision, **ARCHS[name]}
    torch.manual_seed(seed)
    model = binarized(reste.models.create(**arch), seed=seed, size=arch["image_size"], binarize=False)
    path = export(model, tmp_path / f"{name}-{precision}-{seed}.safetensors", architecture=arch)
    return load(path, fuse=fuse)


def _inputs(name: str, batch: int, seed: int = 0) -> list[torch.Tensor]:
    size = ARCHS[name]["image_size"]
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    x[0, :, :2] = 0.0  # exact zeros: sign(0) = +1 decides some bits
    return [x, x.contiguous(memory_format=torch.channels_last)]


def _deployed_custom(cls, tmp_path, seed: int = 0) -> nn.Module:
    """A model of ``cls`` with every layer binary but ``stem``, exported and loaded into a fresh ``cls()``."""
    torch.manual_seed(seed)
    trained = reste.binarize(cls(), keep=("stem",), keep_defaults=False).eval()
    return load(export(trained, tmp_path / f"{cls.__name__}-{seed}.safetensors"), model=cls())


@pytest.mark.parametrize("name", ["resnet20", "vgg_small", "vit_tiny"])
def test_capture_equals_the_model_bit_for_bit(name, tmp_path):
    model = _deployed(name, tmp_path)
    fast = capture(model)
    for batch in (1, 3):
        for x in _inputs(name, batch, seed=batch):
            with torch.no_grad():
                want = model(x)
            got = fast(x)
            assert torch.equal(got, want), (name, batch, x.is_contiguous())
            assert not got.requires_grad
    assert len(fast.captures) == 4  # two batch sizes, two layouts


@pytest.mark.parametrize(
    "name, convs, linears, chains",
    [("resnet20", 18, 0, 9), ("vgg_small", 5, 0, 2), ("resnet20_bireal", 18, 0, 0), ("vit_tiny", 0, 8, 0)],
)
def test_every_packed_layer_becomes_direct_kernel_calls(name, convs, linears, chains, tmp_path, monkeypatch):
    """No packed layer's forward runs in a replay; chains where a conv's output feeds only the next conv
    (Bi-Real's conv1 also feeds an add, so none). The ViT's binary layers are all linear (4 per block)."""
    model = _deployed(name, tmp_path)
    x = _inputs(name, 1)[0]
    fast = capture(model, x)
    (summary,) = fast.captures.values()
    assert summary["fixed_buffer_bytes"] > 0
    assert dict(summary, fixed_buffer_bytes=0) == {
        "packed_convs": convs,
        "packed_linears": linears,
        "kernel_steps": convs + linears,
        "chained": chains,
        "fixed_buffer_bytes": 0,
    }
    source = fast.source(x)
    assert source.count("_conv") == convs + linears and source.count("_pack") == convs + linears - chains
    calls = []
    for cls in (PackedBinaryConv2d, PackedBinaryLinear):
        monkeypatch.setattr(cls, "forward", _counted(cls.forward, calls))
    with torch.no_grad():
        want = model(x)
    assert len(calls) == convs + linears
    assert torch.equal(fast(x), want)
    assert len(calls) == convs + linears  # the replay called none of them


def _counted(forward, calls: list):
    def counted(self, *args, **kwargs):
        calls.append(self)
        return forward(self, *args, **kwargs)

    return counted


def test_every_kernel_path_and_thread_count(tmp_path):
    model = _deployed("resnet20", tmp_path)
    xs = _inputs("resnet20", 2, seed=5)
    before = torch.get_num_threads()
    try:
        for isa in ISAS:
            with forced_kernel_path(isa):
                fast = capture(model)  # captured on this path; the kernel picks the path per call
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    for x in xs:
                        with torch.no_grad():
                            assert torch.equal(fast(x), model(x)), (isa, threads)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "name, precision, fuse",
    [("resnet20", "1w1a", False), ("resnet20", "1w32a", True), pytest.param("resnet20_bireal", "1w1a", True)],
)
def test_unfused_real_input_and_bireal_models(name, precision, fuse, tmp_path):
    """Unfused BatchNorms run as modules between kernel calls; 1W/32A convs (no kernel) as their
    own forward; Bi-Real's shortcut around every conv as residuals the kernel adds."""
    model = _deployed(name, tmp_path, precision=precision, fuse=fuse)
    fast = capture(model)
    for x in _inputs(name, 2, seed=7):
        with torch.no_grad():
            assert torch.equal(fast(x), model(x))
    steps = next(iter(fast.captures.values()))["kernel_steps"]
    assert steps == (0 if precision == "1w32a" else 18)


class EndsInABinaryConv(nn.Module):
    """A model whose output is a packed conv's own output (a fixed buffer of the capture)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.conv = nn.Conv2d(16, 24, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv(self.bn(self.stem(x)))


def test_outputs_are_the_callers_not_the_next_calls(tmp_path):
    model = _deployed_custom(EndsInABinaryConv, tmp_path)
    fast = capture(model)
    x1, x2 = torch.randn(1, 3, 6, 6), torch.randn(1, 3, 6, 6)
    y1 = fast(x1)
    y2 = fast(x2)
    with torch.no_grad():
        assert torch.equal(y1, model(x1)) and torch.equal(y2, model(x2))
    assert y1.untyped_storage().data_ptr() != y2.untyped_storage().data_ptr()


def test_each_input_key_is_captured_once_and_the_oldest_goes(tmp_path):
    model = _deployed("resnet20", tmp_path)
    fast = capture(model, max_shapes=2)
    a, b, c = (torch.randn(n, 3, 8, 8) for n in (1, 2, 3))
    for x in (a, a, b):
        fast(x)
    assert [k[0] for k in fast.captures] == [(1, 3, 8, 8), (2, 3, 8, 8)]
    fast(c)
    assert [k[0] for k in fast.captures] == [(2, 3, 8, 8), (3, 3, 8, 8)]
    # a strided input of a captured shape runs the model itself (its strides can change the arithmetic)
    strided = torch.randn(3, 3, 8, 16)[..., ::2]
    with torch.no_grad():
        assert torch.equal(fast(strided), model(strided))
    assert [k[0] for k in fast.captures] == [(2, 3, 8, 8), (3, 3, 8, 8)]
    with pytest.raises(ValueError, match="max_shapes must be at least 1"):
        capture(model, max_shapes=0)


def test_refusals_name_the_fix(tmp_path):
    model = _deployed("resnet20", tmp_path)
    x = torch.randn(1, 3, 8, 8)
    model.train()
    with pytest.raises(CaptureError, match=r"call model.eval\(\) before capturing"):
        capture(model, x)
    with pytest.raises(CaptureError, match=r"call model.eval\(\) before capturing"):
        capture(model)  # without an example too: its first call would run the model in training mode
    model.eval()
    handle = model.stages[0][0].conv1.register_forward_hook(lambda *a: None)
    with pytest.raises(CaptureError, match="module 'stages.0.0.conv1' has a forward hook"):
        capture(model, x)
    handle.remove()
    fast = capture(model, x)
    expected = fast(x)

    # a hook registered after the capture: the model itself runs (and the hook with it), until removed
    seen = []
    for register in ("register_forward_pre_hook", "register_forward_hook"):
        handle = getattr(model.stages[1][0].conv2, register)(lambda module, *args: seen.append(args[0][0].shape))
        assert torch.equal(fast(x), expected) and seen == [(1, 8, 4, 4)]
        handle.remove()
        seen.clear()
        assert torch.equal(fast(x), expected) and seen == []
    assert len(fast.captures) == 1

    class ValueBranch(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(CaptureError, match="torch.fx could not trace its forward"):
        capture(ValueBranch().eval(), x)

    class Scaled(nn.Module):  # later arguments keep their defaults
        def forward(self, x, scale=2.0, shift=None):
            return x * scale if shift is None else x * scale + shift

    assert torch.equal(capture(Scaled().eval())(x), x * 2.0)
    with pytest.raises(TypeError, match="takes one tensor"):
        capture(model)([x])


def test_without_the_kernel_every_node_runs_as_in_the_model(tmp_path, monkeypatch):
    model = _deployed("resnet20", tmp_path)
    x = torch.randn(2, 3, 8, 8)
    monkeypatch.setattr(replay_mod, "_ext", lambda: None)
    fast = capture(model, x)
    assert next(iter(fast.captures.values()))["kernel_steps"] == 0
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))


def test_the_models_own_input_errors_pass_through(tmp_path):
    model = _deployed("vgg_small", tmp_path)
    with pytest.raises(ValueError, match="vgg_small was built for 16x16 inputs but got 8x8"):
        capture(model, torch.randn(1, 3, 8, 8))


def test_inputs_that_need_grad_run_the_model(tmp_path):
    model = _deployed("resnet20", tmp_path)
    fast = capture(model)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    y = fast(x)
    assert y.requires_grad and not fast.captures
    y.sum().backward()
    assert x.grad is not None
    with torch.no_grad():
        assert torch.equal(y.detach(), model(x))


def test_in_place_changes_are_captured_again_and_replacements_need_reset(tmp_path):
    # unfused: a fused model's state_dict lacks the BatchNorms its kernels apply
    model = _deployed("resnet20", tmp_path, fuse=False)
    other = _deployed("resnet20", tmp_path, seed=1, fuse=False)
    fast = capture(model)
    x = torch.randn(2, 3, 8, 8)
    before = fast(x)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, PackedBinaryConv2d):
                m.weight_bits.bitwise_not_()
        changed = model(x)
    assert not torch.equal(changed, before)
    assert torch.equal(fast(x), changed)  # an in-place change is noticed: captured again
    model.load_state_dict(other.state_dict())  # loads in place too
    with torch.no_grad():
        assert torch.equal(fast(x), other(x))
    # a replaced buffer is not noticed (the capture points into its own copies) until reset
    for m in model.modules():
        if isinstance(m, PackedBinaryConv2d):
            m.weight_bits = m.weight_bits.bitwise_not()  # a new tensor, not an in-place change
    with torch.no_grad():
        replaced = model(x)
    assert torch.equal(fast(x), other(x)) and not torch.equal(replaced, other(x))
    fast.reset()
    assert torch.equal(fast(x), replaced)
    # the wrapper's own load_state_dict and .to() reset it
    fast.load_state_dict(other.state_dict(prefix="model."))
    with torch.no_grad():
        assert torch.equal(fast(x), other(x))
    fast.to(torch.float32)
    assert not fast.captures


def test_copies_and_pickles_capture_afresh(tmp_path):
    model = _deployed("resnet20", tmp_path)
    fast = capture(model, torch.randn(1, 3, 8, 8))
    x = torch.randn(1, 3, 8, 8)
    want = fast(x)
    for twin in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        assert not twin.captures
        assert torch.equal(twin(x), want)
        assert len(twin.captures) == 1


def test_concurrent_calls_stay_exact(tmp_path):
    model = _deployed("resnet20", tmp_path)
    fast = capture(model)
    xs = [torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with torch.no_grad():
        want = [model(x) for x in xs]
    fast(xs[0])  # the shape is captured; the threads race on its fixed buffers
    assert disagreements_across_threads(fast, xs, want, rounds=20) == []


def test_bench_infer_measures_both_models_captured():
    from reste.deploy import bench

    e2e, _ = bench.bench_models(names=("resnet20",), batches=(1,), repeats=1, min_sample_s=0.001)
    (row,) = e2e
    c = row["captured"]
    assert c["exact"] is True
    assert c["float_layout"] in ("nchw", "channels_last") and c["binary_layout"] in ("nchw", "channels_last")
    assert min(c["speedup"], c["float_gain"], c["binary_gain"], c["float_ms"], c["binary_ms"]) > 0
    report = bench.format_report({"machine": bench.machine_info(), "repeats": 1, "conv": [], "e2e": e2e, "sizes": []})
    assert "Both models captured" in report
    assert f"| resnet20 | 1 | {c['float_ms']:.2f} ({c['float_layout']}) |" in report


class Tokens(nn.Module):
    """Binary linear layers on a transposed (non-contiguous) view, the last one the model's output."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 2, stride=2)
        self.norm = nn.LayerNorm(24)
        self.fc1 = nn.Linear(24, 40)
        self.fc2 = nn.Linear(40, 16)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)  # [N, tokens, 24], not contiguous
        return self.fc2(self.fc1(t.transpose(1, 2).transpose(1, 2)) * 0.5)


def test_packed_linears_on_strided_inputs_and_as_the_output(tmp_path):
    model = _deployed_custom(Tokens, tmp_path, seed=3)
    fast = capture(model)
    x1, x2 = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)
    y1 = fast(x1)
    y2 = fast(x2)
    with torch.no_grad():
        assert torch.equal(y1, model(x1)) and torch.equal(y2, model(x2))  # y1 was not overwritten
    (summary,) = fast.captures.values()
    assert summary["packed_linears"] == summary["kernel_steps"] == 2


# ----------------------------------------------------------------------------- what the review found
def test_a_capture_owns_every_tensor_it_points_into(tmp_path):
    """share_memory_() (and torch.multiprocessing) moves a module's memory in place; an in-place load
    changes it: the capture's addresses point into copies of its own, so it stays a whole snapshot."""
    model = _deployed("resnet20", tmp_path)
    fast = capture(model)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
    assert torch.equal(fast(x), want)
    conv = next(m for m in model.modules() if isinstance(m, PackedBinaryConv2d))
    before = conv.alpha.data_ptr(), conv.post_scale.data_ptr()
    model.share_memory()
    assert before != (conv.alpha.data_ptr(), conv.post_scale.data_ptr())  # the memory moved
    junk = [torch.full((n,), 1e30) for n in range(1, 2000)]  # reuse what was freed
    assert all(torch.equal(fast(x), want) for _ in range(3))
    del junk


def test_capturing_a_new_key_holds_other_threads_replays(tmp_path):
    """torch.fx patches nn.Module for the whole process while it traces: replays and fallbacks of
    captured models in other threads wait for it instead of being traced into."""
    import threading

    model = _deployed("resnet20", tmp_path)
    fast = capture(model, torch.randn(1, 3, 8, 8))
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
    errors, wrong, stop = [], [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                if not torch.equal(fast(x), want):
                    wrong.append(1)
            except Exception as err:  # noqa: BLE001 - any error in a serving thread fails the test
                errors.append(repr(err))

    workers = [threading.Thread(target=serve) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        for batch in range(2, 8):  # new keys, each traced while the workers replay
            y = fast(torch.randn(batch, 3, 8, 8))
            assert y.shape == (batch, 10)
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert errors == [] and wrong == []
    assert len(fast.captures) == 7


def test_a_capture_made_in_inference_mode_runs_outside_it(tmp_path):
    model = _deployed("resnet20", tmp_path, fuse=False)  # unfused: in-place ReLUs on the conv outputs
    x = torch.randn(1, 3, 8, 8)
    with torch.inference_mode():
        fast = capture(model, x)
        inside = fast(x)
    with torch.no_grad():
        assert torch.equal(fast(x), model(x)) and torch.equal(inside, model(x))


class MeanOfPositives(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Identity()  # the shape is read through it

    def forward(self, x):
        positive = self.drop(x[x > 0])  # a shape the values decide
        return positive.sum() / len(positive)


class InPlaceMetadata(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv(self.stem(x))
        y.transpose_(2, 3)  # legal in eager, where y is a fresh tensor each call
        return y.flatten(1)


def test_shapes_the_values_decide_and_in_place_metadata_changes(tmp_path):
    fast = capture(MeanOfPositives().eval())
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(1, 3, 8, 8, generator=gen)
        assert torch.equal(fast(x), MeanOfPositives()(x))  # another count of positives runs the model
    model = _deployed_custom(InPlaceMetadata, tmp_path)
    fast = capture(model)
    x = torch.randn(1, 3, 8, 6)
    with torch.no_grad():
        want = model(x)
    assert all(torch.equal(fast(x), want) for _ in range(3))


def test_constants_output_types_and_a_forward_that_changes_its_input():
    from collections import OrderedDict, namedtuple

    Pair = namedtuple("Pair", "first second")

    class Constants(nn.Module):
        def __init__(self):
            super().__init__()
            self.mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)  # a plain attribute, not a buffer

        def forward(self, x):
            y = (x - self.mean) + torch.arange(x.shape[-1])
            return Pair(y, y), OrderedDict(total=y.sum())

    class ChangesItsInput(nn.Module):
        def forward(self, x):
            x.mul_(2)
            return x + 1

    model = Constants().eval()
    attributes = set(vars(model))
    fast = capture(model)
    x = torch.randn(1, 3, 4, 4)
    (pair, totals), (want_pair, want_totals) = fast(x), model(x)
    assert type(pair) is Pair and type(totals) is OrderedDict
    assert torch.equal(pair.first, want_pair.first) and pair.first is pair.second
    assert torch.equal(totals["total"], want_totals["total"])
    assert set(vars(model)) == attributes  # fx's constants are not left on the model
    x = torch.randn(1, 3, 4, 4)
    want = ChangesItsInput()(x.clone())
    assert torch.equal(capture(ChangesItsInput().eval())(x), want)


def test_autocast_training_mode_and_a_busy_key_run_the_model(tmp_path):
    model = _deployed("resnet20", tmp_path)
    fast = capture(model)
    x = torch.randn(2, 3, 8, 8)
    fast(x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(fast(x), model(x))
    float_model = reste.models.create(
        name="resnet20", num_classes=10, in_channels=3, precision="fp", width=0.25, image_size=8
    ).eval()
    fast = capture(float_model)
    y = fast(x)
    (program,) = fast._programs.values()
    with program.lock:  # another thread is replaying this key: the model runs, as inference too
        busy = fast(x)
    assert torch.equal(busy, y) and not busy.requires_grad
    fast.train()
    with torch.no_grad():
        assert torch.equal(fast(x), float_model(x))  # batch statistics, as the model in training mode


# ----------------------------------------------------------------------------- what the second review found
class MadeInForward(nn.Module):
    """Tensors the forward creates from constants and fills in place (fx turns them into constants)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        logits = self.fc(x)
        mask = torch.zeros(x.shape[0], 4).scatter_(1, logits.argmax(1, keepdim=True), 1.0)
        out = torch.zeros(x.shape[0], 8)
        out[:, :4] = logits * mask
        parts = out.chunk(2, dim=1)
        return out, len(parts)


def test_tensors_the_forward_creates_are_new_each_call():
    torch.manual_seed(0)
    model = MadeInForward().eval()
    fast = capture(model)
    outputs = []
    for _ in range(4):
        x = torch.randn(2, 12)
        got, want = fast(x), model(x)
        assert torch.equal(got[0], want[0]) and got[1] == want[1] == 2
        outputs.append((got[0], got[0].clone()))
    assert all(torch.equal(a, b) for a, b in outputs)  # no later call changed an earlier output


class ShapeBetweenConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.a = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.b = nn.Conv2d(16, 16, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.a(self.stem(x))
        _, channels, _, _ = y.shape  # read between two packed convs, which still chain
        assert channels == 16
        return self.b(y).mean((2, 3))


def test_a_shape_read_between_chained_convs(tmp_path):
    model = _deployed_custom(ShapeBetweenConvs, tmp_path)
    fast = capture(model)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))
    assert next(iter(fast.captures.values()))["chained"] == 1


def test_refused_forwards_and_nested_captures():
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

        def forward(self, x):
            self.calls += 1  # a replay would not count
            return x * 2

    class Resizes(nn.Module):
        def forward(self, x):
            y = x * 2
            y.resize_(y.numel())
            return y

    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(CaptureError, match=r"its forward changes its own tensors \(calls;"):
        capture(Counting().eval(), x)
    train_bn = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    train_bn[1].train()  # under an eval-mode root
    with pytest.raises(CaptureError, match=r"1.num_batches_tracked; a BatchNorm in training mode"):
        capture(train_bn, x)
    with pytest.raises(CaptureError, match="calls resize_"):
        capture(Resizes().eval(), x)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = capture(nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval())
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            with torch.no_grad():
                features = self.backbone(x.detach())
            return self.head(features)

    torch.manual_seed(0)
    outer = Outer().eval()
    v = torch.randn(3, 8)
    assert torch.equal(capture(outer)(v), outer(v).detach())  # a captured model inside runs as itself
    fresh = capture(Outer().eval())
    y = fresh(torch.randn(5, 8, requires_grad=True))  # the model holds the gate; the inner capture must not wait
    assert y.requires_grad


def test_strided_inputs_and_dict_outputs_run_exactly():
    from collections import defaultdict

    class Split(nn.Module):
        def forward(self, x):
            out = defaultdict(list)
            out["sum"] = x.sum(1)
            return out

    fast = capture(Split().eval())
    strided = torch.randn(2, 3, 8, 16)[..., ::2]
    got = fast(strided)
    assert type(got) is defaultdict and got.default_factory is list
    assert torch.equal(got["sum"], strided.sum(1)) and not fast.captures  # a strided input runs the model
    contiguous = strided.contiguous()
    assert torch.equal(fast(contiguous)["sum"], contiguous.sum(1)) and len(fast.captures) == 1
