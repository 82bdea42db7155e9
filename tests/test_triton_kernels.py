"""The Triton kernels of ``reste._triton`` against the PyTorch formulas, point by point, on the CPU.

Triton's interpreter (``TRITON_INTERPRET=1``, read when a kernel is defined) runs the kernels on
CPU tensors with NumPy. It is set in a child process only (this file run as a script), so the
rest of the test session keeps the real Triton: the child loads the inputs written here, runs
every kernel (directly and through ``reste.ops``' dispatch, with the CPU added to the Triton
devices and the C kernels off) and writes the outputs back; the references are the PyTorch
formulas computed here with the C kernels off.

Exactness: the sign and the piecewise-linear rules (STE, clipped STE, ApproxSign, RBNN) give
the same bits; the rules built on ``exp``/``log``/``sin``/``tanh`` agree within a few float32
ulps of the gradient's scale (NumPy's and PyTorch's transcendental functions differ in the
last bit); the weight scale is a sum in another order.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reste
from reste import ops
from reste.nn.layers import BinaryConv2d, BinaryLinear

HERE = Path(__file__).resolve()
N = 5003  # not a multiple of the kernels' block (1024)
#: estimator -> constructor parameters and progress, chosen so every branch of each rule is hit
ESTIMATORS = {
    "ste": ({}, None),
    "reste": ({"o": 3.0}, None),
    "clipped_ste": ({"clip": 1.0}, None),
    "approx_sign": ({}, None),
    "swish_sign": ({"beta": 5.0}, None),
    "ede": ({}, 0.7),
    "rbnn": ({}, 0.4),
    "fda": ({}, 0.5),
}
EXACT = {"ste", "clipped_ste", "approx_sign", "rbnn"}
#: (layer, weight_scale, estimator): a conv with a row shorter than a block, a linear whose rows
#: span several blocks, and the per-layer scale (one row for the whole tensor)
WEIGHT_CASES = [
    ("conv", "channel_mean", "reste"),
    ("conv", "layer_mean", "reste"),
    ("linear", "channel_mean", "ede"),
    ("linear", "layer_mean", "clipped_ste"),
    ("conv", "channel_mean", "ste"),
    ("linear1", "channel_mean", "rbnn"),  # rows of one weight (on a GPU Triton makes K = 1 a constant)
]


def make_estimator(name: str):
    params, progress = ESTIMATORS[name]
    est = reste.estimator(name, **params)
    if progress is not None:
        est.set_progress(progress)
    return est


def make_layer(kind: str, scale: str, est: str):
    torch.manual_seed(3)
    if kind == "conv":
        layer = BinaryConv2d(5, 7, 3, padding=1, weight_estimator=est, input_estimator=None, weight_scale=scale)
    elif kind == "linear1":
        layer = BinaryLinear(1, 4, weight_estimator=est, input_estimator=None, weight_scale=scale)
    else:
        layer = BinaryLinear(2500, 3, weight_estimator=est, input_estimator=None, weight_scale=scale)
    with torch.no_grad():
        layer.weight[0, :3].zero_()  # sign(0) = +1 and d|w|/dw = 0 at 0
        if kind == "conv":
            layer.weight[1, 0, 0, 0] = -0.0
    return layer


def make_inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N, generator=g) * 1.5
    special = [0.0, -0.0, 0.1, -0.1, 1.5, -1.5, 1.0, -1.0, 0.5, float("nan"), float("inf"), -float("inf"), 1e-30]
    z[: len(special)] = torch.tensor(special)
    grad = torch.randn(N, generator=g)
    grad[len(special) : len(special) + 2] = 0.0
    layer_grads = {}
    for kind, scale, est in WEIGHT_CASES:
        layer = make_layer(kind, scale, est)
        layer_grads[(kind, scale, est)] = torch.randn(layer.weight.shape, generator=g)
    return {"z": z, "grad": grad, "layer_grads": layer_grads}


# ----------------------------------------------------------------------------- the child process
def child(inputs_path: str, outputs_path: str) -> None:
    """Run every kernel under Triton's interpreter; the parent compares."""
    os.environ["TRITON_INTERPRET"] = "1"  # before reste._triton defines its kernels
    from reste import _triton

    assert _triton.AVAILABLE, _triton.REASON
    ops.set_kernels_enabled(False)
    ops._TRITON_DEVICES = ("cuda", "cpu")
    data = torch.load(inputs_path)
    z, grad = data["z"], data["grad"]
    out: dict = {"sign": {}, "rule": {}, "dispatch": {}, "weights": {}, "calls": {}}
    out["sign"]["float32"] = _triton.sign(z)
    out["sign"]["float64"] = _triton.sign(z.double())
    out["sign"]["bfloat16"] = _triton.sign(z.bfloat16())
    out["sign"]["dispatch"] = ops.sign(z)
    out["sign"]["channels_last"] = ops.sign(z[:4800].reshape(2, 6, 20, 20).to(memory_format=torch.channels_last))
    calls = {"rule": 0, "weight": 0}
    direct_rule, direct_weight = _triton.rule_backward, _triton.binarize_weight

    def counted_rule(*args):
        calls["rule"] += 1
        return direct_rule(*args)

    def counted_weight(*args):
        calls["weight"] += 1
        return direct_weight(*args)

    _triton.rule_backward, _triton.binarize_weight = counted_rule, counted_weight
    for name in ESTIMATORS:
        est = make_estimator(name)
        rule = est.kernel_rule()
        rid, p0, p1, c0, c1 = ops._rule_args(rule, z)
        out["rule"][name] = direct_rule(z, grad, rid, p0, p1, c0, c1)
        out["dispatch"][name] = est.surrogate_grad(z, grad.clone())
    out["calls"]["rule"] = calls["rule"]
    for case in WEIGHT_CASES:
        layer = make_layer(*case)
        wq = layer.quantized_weight()
        wq.backward(data["layer_grads"][case])
        out["weights"][case] = (wq.detach(), layer.weight.grad)
    out["calls"]["weight"] = calls["weight"]
    # switched off: the formulas run, the kernels are not called
    ops.set_triton_enabled(False)
    before = dict(calls)
    out["off"] = make_estimator("reste").surrogate_grad(z, grad)
    out["calls"]["off"] = calls["rule"] - before["rule"]
    ops.set_triton_enabled(True)
    _triton.rule_backward, _triton.binarize_weight = direct_rule, direct_weight  # (a traced call may not count)
    out["compile"] = compile_checks(z, grad)
    torch.save(out, outputs_path)


def compile_checks(z: torch.Tensor, grad: torch.Tensor) -> dict:
    """torch.compile over the registered ops (traced with RESTE_TRITON=compile's setting), whole
    graph (``fullgraph=True``: a graph break is an error); the value against eager mode.

    Under the interpreter the ops are opaque custom ops (``reste._triton.INTERPRETED``): this checks
    Dynamo's capture of the layers' autograd functions and the ops' schemas and shapes, forward
    and backward, not inductor's lowering of the Triton kernels themselves (that needs a GPU)."""
    import torch._dynamo

    ops._TRITON_IN_COMPILE = True
    est = make_estimator("reste")
    layer = make_layer("conv", "channel_mean", "reste")

    def step(x: torch.Tensor) -> torch.Tensor:
        return (est(x * 1.0) * 2.0).sum() + layer.quantized_weight().square().sum()

    results = {}
    for backend in ("eager", "aot_eager", "inductor"):
        torch._dynamo.reset()
        x = z[:4800].reshape(2, 6, 20, 20).nan_to_num().requires_grad_(True)
        try:
            loss = torch.compile(step, backend=backend, fullgraph=True)(x)
            loss.backward()
            results[backend] = ("ok", loss.detach(), x.grad.clone(), layer.weight.grad.clone())
        except Exception as err:  # reported by the parent
            results[backend] = ("error", f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
        layer.weight.grad = None
    x = z[:4800].reshape(2, 6, 20, 20).nan_to_num().requires_grad_(True)
    loss = step(x)
    loss.backward()
    results["eager_mode"] = ("ok", loss.detach(), x.grad.clone(), layer.weight.grad.clone())
    return results


# ----------------------------------------------------------------------------- the parent's checks
@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    pytest.importorskip("triton")
    folder = tmp_path_factory.mktemp("triton")
    inputs = make_inputs()
    torch.save(inputs, folder / "in.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("RESTE_NO_EXT", None)
    env.pop("RESTE_TRITON", None)
    proc = subprocess.run(
        [sys.executable, str(HERE), str(folder / "in.pt"), str(folder / "out.pt")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return inputs, torch.load(folder / "out.pt")


@pytest.fixture
def formulas():
    """The PyTorch formulas (no C kernels) for the references."""
    previous = ops.set_kernels_enabled(False)
    yield
    ops.set_kernels_enabled(previous)


def assert_close_bits(actual: torch.Tensor, expected: torch.Tensor, exact: bool, scale_ulps: float = 8.0):
    """Same bits (NaN where NaN), or within ``scale_ulps`` float32 ulps of the largest magnitude."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan), "NaN in different places"
    a, e = actual[~nan], expected[~nan]
    if exact:
        assert torch.equal(a, e), f"{(a != e).sum().item()} values differ, first at {(a != e).nonzero()[:3].tolist()}"
        # -0.0 == 0.0 in equal(); the signs of zero must agree too
        assert torch.equal(torch.signbit(a), torch.signbit(e))
    else:
        finite = e.isfinite()
        assert torch.equal(a[~finite], e[~finite])
        tol = scale_ulps * torch.finfo(torch.float32).eps * e[finite].abs().max()
        worst = (a[finite] - e[finite]).abs().max()
        assert worst <= tol, f"largest difference {worst.item():.3g} > {tol.item():.3g}"


def test_sign_is_bit_exact_in_every_dtype(interpreted):
    inputs, out = interpreted
    z = inputs["z"]
    for dtype in ("float32", "float64", "bfloat16"):
        expected = ops.sign_torch(z.to(getattr(torch, dtype)))
        assert torch.equal(out["sign"][dtype], expected), dtype
        assert out["sign"][dtype].dtype == getattr(torch, dtype)
    assert set(out["sign"]["float32"][:13].tolist()) <= {-1.0, 1.0}
    # 0, -0 and NaN are +1; -inf is -1
    assert out["sign"]["float32"][[0, 1, 9, 11]].tolist() == [1.0, 1.0, 1.0, -1.0]
    assert torch.equal(out["sign"]["dispatch"], ops.sign_torch(z))
    cl = out["sign"]["channels_last"]
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cl, ops.sign_torch(z[:4800].reshape(2, 6, 20, 20)))


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_rule_kernel_matches_the_formula(interpreted, formulas, name):
    inputs, out = interpreted
    z, grad = inputs["z"], inputs["grad"]
    expected = make_estimator(name).surrogate_grad(z, grad.clone())
    if name == "reste":  # the formula itself, not the C kernel (switched off by `formulas` anyway)
        assert_close_bits(expected, ops.reste_grad(z, torch.tensor(3.0), 1.5, 0.1) * grad, exact=True)
    assert_close_bits(out["rule"][name], expected, exact=name in EXACT)
    assert_close_bits(out["dispatch"][name], expected, exact=name in EXACT)


def test_reste_rule_boundaries(interpreted):
    """|z| = m and |z| = t belong to the inner branch; beyond t the gradient is 0; NaN stays NaN."""
    inputs, out = interpreted
    z, grad, got = inputs["z"], inputs["grad"], out["rule"]["reste"]
    secant = 0.1 ** (1 / 3) / 0.1  # m^(1/o) / m
    for i in (0, 1, 2, 3, 12):  # 0, -0, +-m, 1e-30
        assert got[i].item() == pytest.approx(secant * grad[i].item(), rel=1e-6)
    for i in (4, 5):  # |z| = t: (1/o) t^((1-o)/o)
        assert got[i].item() == pytest.approx((1 / 3) * 1.5 ** (-2 / 3) * grad[i].item(), rel=1e-6)
    assert got[10].item() == 0.0 and got[11].item() == 0.0  # +-inf: beyond t
    assert math.isnan(got[9].item())
    assert (got[z.abs() > 1.5] == 0).all()


def test_dispatch_ran_the_kernels_and_the_switch_turns_them_off(interpreted, formulas):
    inputs, out = interpreted
    # every estimator but STE (whose backward returns the gradient untouched) and ReSTE
    # (reached through ops.reste_backward) went through the counted entry point
    assert out["calls"]["rule"] == len(ESTIMATORS) - 1
    assert out["calls"]["weight"] == len(WEIGHT_CASES)
    assert out["calls"]["off"] == 0
    expected = make_estimator("reste").surrogate_grad(inputs["z"], inputs["grad"])
    assert_close_bits(out["off"], expected, exact=True)
    # with the kernels on, the ReSTE values differ from the formula's in the last bits: the kernel did run
    assert not torch.equal(out["dispatch"]["reste"].nan_to_num(), expected.nan_to_num())


@pytest.mark.parametrize("case", WEIGHT_CASES, ids=["-".join(c) for c in WEIGHT_CASES])
def test_weight_binarization_forward_and_backward(interpreted, formulas, case):
    inputs, out = interpreted
    wq, dw = out["weights"][case]
    layer = make_layer(*case)
    expected = layer.weight_alpha(layer.weight) * layer.weight_estimator(layer.weight)
    expected.backward(inputs["layer_grads"][case])
    assert_close_bits(wq, expected.detach(), exact=False, scale_ulps=4)
    # the signs exactly (sign(0) = +1), one alpha per row
    assert torch.equal(torch.signbit(wq), torch.signbit(expected.detach()))
    rows = wq.reshape(wq.shape[0], -1).abs()
    if case[1] == "layer_mean":
        assert (rows == rows[0, 0]).all()
    else:
        assert (rows == rows[:, :1]).all()
    assert_close_bits(dw, layer.weight.grad, exact=False, scale_ulps=16)


def test_torch_compile_traces_the_ops_without_graph_breaks(interpreted):
    _, out = interpreted
    results = out["compile"]
    _, loss, grad_x, grad_w = results["eager_mode"]
    for backend in ("eager", "aot_eager", "inductor"):
        status, *values = results[backend]
        assert status == "ok", (backend, values)
        got_loss, got_x, got_w = values
        if backend != "inductor":  # the same ops in the same order
            assert torch.equal(got_loss, loss) and torch.equal(got_x, grad_x)
        torch.testing.assert_close(got_loss, loss, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(got_x, grad_x, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_w, grad_w, rtol=1e-6, atol=1e-6)


def test_cpu_never_imports_triton_and_kernel_info_says_which_path():
    code = (
        "import sys, torch, reste\n"
        "from reste import ops\n"
        "m = reste.models.create('resnet20', precision='1w1a', num_classes=10, in_channels=3, image_size=32)\n"
        "m(torch.randn(2, 3, 32, 32)).sum().backward()\n"
        "info = ops.kernel_info('cpu')\n"
        "print('reste._triton' in sys.modules, 'triton' in sys.modules, info['path'], info['triton']['enabled'])\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("RESTE_NO_EXT", None)
    env.pop("RESTE_TRITON", None)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    imported_module, imported_triton, path, enabled = run.stdout.split()
    assert (imported_module, imported_triton) == ("False", "False")
    assert path == ("c" if ops.kernels_built() else "torch")
    assert enabled == "True"
    env["RESTE_TRITON"] = "0"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.stdout.split()[3] == "False"


def test_kernel_info_on_a_triton_device_without_triton(monkeypatch):
    import reste._triton as module

    monkeypatch.setattr(module, "AVAILABLE", False)
    monkeypatch.setattr(module, "REASON", "triton is not importable (test); pip install triton")
    monkeypatch.setattr(ops, "_triton_module", module)
    monkeypatch.setattr(ops, "_TRITON_DEVICES", ("cuda", "meta"))
    monkeypatch.setattr(ops, "_TRITON_OFF_BY_ENV", None)
    monkeypatch.setattr(ops, "_TRITON_ENABLED", True)
    info = ops.kernel_info("meta")
    assert info["path"] == "torch" and "pip install triton" in info["why"]
    with pytest.warns(RuntimeWarning, match="need triton"):
        ops.set_triton_enabled(True)
    assert not ops.triton_enabled()
    # and a meta tensor (a Triton device here) takes the formula
    assert (
        ops.rule_backward(ops.KernelRule("ste"), torch.empty(3, device="meta"), torch.empty(3, device="meta")) is None
    )


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2])
