"""Every estimator's gradient against an independent NumPy reference, point by point.

The references below are written from the formulas of the facts sheet (section 1
and 6), in float64 NumPy with explicit branches, not with the library's code.
"""

import math

import numpy as np
import pytest
import torch

import reste
from reste import ops
from reste.estimators import binary_sign, binary_sign_torch


@pytest.fixture(params=["kernel", "torch"])
def code_path(request):
    """Run a test through the compiled CPU kernels and through the pure PyTorch formulas."""
    if request.param == "kernel" and not ops.kernels_built():
        pytest.skip("compiled kernels not built")
    previous = ops.set_kernels_enabled(request.param == "kernel")
    yield request.param
    ops.set_kernels_enabled(previous)


# ---------------------------------------------------------------- NumPy references


def np_reste(z, o, t=1.5, m=0.1):
    a = np.abs(z)
    g = np.zeros_like(z)
    mid = (a > m) & (a <= t)
    g[mid] = (1.0 / o) * a[mid] ** ((1.0 - o) / o)
    g[a <= m] = m ** (1.0 / o) / m
    return g


def np_clipped(z, clip=1.0):
    return (np.abs(z) <= clip).astype(np.float64)


def np_approx_sign(z):
    a = np.abs(z)
    return np.where(a <= 1.0, 2.0 - 2.0 * a, 0.0)


def np_swish_sign(z, beta=5.0):
    return beta * (2.0 - beta * z * np.tanh(beta * z / 2.0)) / (1.0 + np.cosh(beta * z))


def np_ede(z, r, tmin=1e-3, tmax=10.0):
    t = 10.0 ** (math.log10(tmin) + (math.log10(tmax) - math.log10(tmin)) * r)
    k = max(1.0 / t, 1.0)
    return k * t * (1.0 - np.tanh(t * z) ** 2)


def np_rbnn(z, r, activation=False):
    t = 10.0 ** (math.log10(1e-2) + (math.log10(10.0) - math.log10(1e-2)) * r)
    k = max(1.0 / t, 1.0)
    if activation:
        k, t = 1.0, max(t, 1.0)
    return k * np.maximum(0.0, math.sqrt(2.0) * t - t * t * np.abs(z))


def np_fda(z, n, w=0.1):
    total = np.zeros_like(z)
    for i in range(n + 1):  # the series itself, term by term
        total += np.cos((2 * i + 1) * w * z)
    return np.where(np.abs(z) <= 1.0, 4.0 * w / math.pi * total, 0.0)


def np_dsq(z, alpha=0.2):
    k = 0.5 * math.log(2.0 / alpha - 1.0)
    s = 1.0 / (1.0 - alpha)
    return np.where(np.abs(z) <= 1.0, s * k * (1.0 - np.tanh(k * z) ** 2), 0.0)


# ---------------------------------------------------------------- helpers

BOUNDARIES = [
    0.0,
    -0.0,
    0.1,
    -0.1,
    0.09999,
    0.10001,
    1.0,
    -1.0,
    0.99999,
    1.00001,
    1.5,
    -1.5,
    1.49999,
    1.50001,
    3.0,
    -7.0,
]


def points(seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.uniform(-2.5, 2.5, 2000), np.array(BOUNDARIES)])


def torch_grad(est, z_np, dtype=torch.float64):
    z = torch.tensor(z_np, dtype=dtype, requires_grad=True)
    y = est(z)
    upstream = torch.linspace(0.5, 1.5, z.numel(), dtype=dtype)  # non-uniform incoming gradient
    (y * upstream).sum().backward()
    return y.detach().numpy(), (z.grad / upstream).numpy()


def close(actual, expected, rtol=1e-9, atol=1e-9):
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("name", reste.estimators())
def test_forward_is_exactly_plus_minus_one(name, code_path):
    est = reste.estimator(name)
    z = torch.tensor(points(), dtype=torch.float32)
    y = est(z)
    assert set(torch.unique(y).tolist()) == {-1.0, 1.0}
    assert torch.equal(y, torch.where(z >= 0, 1.0, -1.0))
    assert est(torch.zeros(3)).tolist() == [1.0, 1.0, 1.0]
    assert est(torch.tensor([-0.0])).item() == 1.0


def test_binary_sign_matches_definition(code_path):
    z = torch.tensor([-float("inf"), -3.0, -1e-30, 0.0, 1e-30, 2.0, float("inf")])
    assert binary_sign(z).tolist() == [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0]


# ---------------------------------------------------------------- ReSTE


@pytest.mark.parametrize("o", [1.0, 1.152, 2.0, 3.0, 4.0, 10.0, 50.0])
def test_reste_gradient_matches_numpy(o, code_path):
    z = points()
    _, g = torch_grad(reste.estimator("reste", o=o), z)
    # o is a float32 buffer, so an o like 1.152 is rounded in its 8th digit
    close(g, np_reste(z, float(np.float32(o))), rtol=1e-9, atol=1e-12)


def test_reste_reference_values_at_o3(code_path):
    est = reste.estimator("reste", o=3.0)
    _, g = torch_grad(est, np.array([0.0, 0.05, 0.1, 0.1000001, 1.0, 1.5, 1.5000001]))
    np.testing.assert_allclose(g[:3], 0.1 ** (1 / 3) / 0.1, rtol=1e-12)  # 4.64
    assert g[0] == pytest.approx(4.6416, abs=1e-4)
    assert g[3] == pytest.approx(1.5472, abs=1e-3)
    assert g[4] == pytest.approx(1 / 3, rel=1e-12)
    assert g[5] == pytest.approx(0.2544, abs=1e-4)
    assert g[6] == 0.0


def test_reste_o1_is_identity_clipped_at_1_5():
    z = points()
    _, g = torch_grad(reste.estimator("reste", o=1.0), z)
    close(g, (np.abs(z) <= 1.5).astype(np.float64))


def test_reste_custom_t_and_m():
    z = points(1)
    _, g = torch_grad(reste.estimator("reste", o=2.5, t=1.2, m=0.2), z)
    close(g, np_reste(z, 2.5, t=1.2, m=0.2))


def test_reste_float32_matches_numpy_to_float_precision(code_path):
    z = points(2)
    _, g = torch_grad(reste.estimator("reste", o=3.0), z.astype(np.float32), dtype=torch.float32)
    # compare in float32 semantics: m and t are rounded to float32 like the data they meet
    ref = np_reste(z.astype(np.float32).astype(np.float64), 3.0, t=float(np.float32(1.5)), m=float(np.float32(0.1)))
    np.testing.assert_allclose(g, ref, rtol=2e-6, atol=1e-6)


def test_reste_rejects_bad_parameters():
    with pytest.raises(ValueError, match="o >= 1"):
        reste.estimator("reste", o=0.5)
    with pytest.raises(ValueError, match="0 < m < t"):
        reste.estimator("reste", m=2.0)
    est = reste.estimator("reste")
    with pytest.raises(ValueError, match="o >= 1"):
        reste.set_params(torch.nn.Sequential(est), o=0.9)
    # NaN fails every comparison, so `o < 1` alone let it through and every gradient became NaN
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite o >= 1"):
            reste.estimator("reste", o=bad)
        with pytest.raises(ValueError, match="finite o >= 1"):
            reste.set_params(torch.nn.Sequential(est), o=bad)
    assert float(est.o) == 1.0  # refused values leave the buffer as it was


# ---------------------------------------------------------------- baselines


def test_ste_and_clipped_ste():
    z = points()
    _, g = torch_grad(reste.estimator("ste"), z)
    close(g, np.ones_like(z))
    _, g = torch_grad(reste.estimator("clipped_ste"), z)
    close(g, np_clipped(z))
    _, g = torch_grad(reste.estimator("clipped_ste", clip=0.5), z)
    close(g, np_clipped(z, 0.5))


def test_approx_sign():
    z = points()
    _, g = torch_grad(reste.estimator("approx_sign"), z)
    close(g, np_approx_sign(z))


@pytest.mark.parametrize("beta", [1.0, 5.0, 10.0])
def test_swish_sign(beta):
    z = points()
    _, g = torch_grad(reste.estimator("swish_sign", beta=beta), z)
    close(g, np_swish_sign(z, beta), rtol=1e-9, atol=1e-12)


def test_swish_sign_is_finite_far_out():
    _, g = torch_grad(reste.estimator("swish_sign", beta=5.0), np.array([-100.0, 100.0, 40.0]), dtype=torch.float32)
    assert np.all(np.isfinite(g)) and np.all(np.abs(g) < 1e-6)


@pytest.mark.parametrize("r", [0.0, 0.3, 0.5, 1.0])
def test_ede_follows_progress(r):
    est = reste.estimator("ede")
    est.set_progress(r)
    z = points()
    _, g = torch_grad(est, z)
    close(g, np_ede(z, r), rtol=1e-6, atol=1e-9)  # t, k are float32 buffers


@pytest.mark.parametrize("r", [0.0, 0.4, 2 / 3, 1.0])
@pytest.mark.parametrize("activation", [False, True])
def test_rbnn_weights_and_activations(r, activation):
    est = reste.estimator("rbnn", activation=activation)
    est.set_progress(r)
    z = points()
    _, g = torch_grad(est, z)
    close(g, np_rbnn(z, r, activation), rtol=1e-6, atol=1e-6)


def test_rbnn_for_inputs_switches_to_activation_rule():
    est = reste.estimator("rbnn").for_inputs()
    assert est.activation
    assert float(est.k) == 1.0 and float(est.t) == 1.0  # t = max(0.01, 1)


def test_rbnn_activation_rule_holds_when_set_params_sets_t_or_k():
    model = reste.binarize(torch.nn.Sequential(torch.nn.Linear(4, 4)), estimator="rbnn", keep_defaults=False)
    weights, inputs = model[0].weight_estimator, model[0].input_estimator
    reste.set_params(model, t=0.5, k=3.0)
    assert (float(weights.t), float(weights.k)) == (0.5, 3.0)
    assert (float(inputs.t), float(inputs.k)) == (1.0, 1.0)  # k = 1, t = max(t, 1)
    reste.set_params(model, t=4.0)
    assert float(inputs.t) == 4.0


@pytest.mark.parametrize("name", reste.estimators())
def test_gradient_at_infinite_inputs_is_the_rule_s_limit_not_nan(name, code_path):
    est = reste.estimator(name).double()
    _, g = torch_grad(est, np.array([-np.inf, np.inf, 0.5]))
    # STE passes every gradient; every other rule vanishes far from 0 (SwishSign's to ~1e-32)
    np.testing.assert_allclose(g[:2], [1.0, 1.0] if name == "ste" else [0.0, 0.0], rtol=0, atol=1e-30)
    assert np.isfinite(g[2])


@pytest.mark.parametrize("o", [1.0, 3.0])
def test_reste_gradient_at_nan_is_nan_on_both_code_paths(o, code_path):
    # the C kernel is built with -ffast-math, which assumes no NaN: it turned NaN into |z| <= m's
    # finite 4.64 (o = 3), so a NaN weight trained on unnoticed; float32 takes the kernel
    est = reste.estimator("reste", o=o)
    _, g = torch_grad(est, np.array([np.nan, -np.nan, 0.5, 0.05, 2.0] * 7), dtype=torch.float32)
    assert np.isnan(g[0::5]).all() and np.isnan(g[1::5]).all()
    close(g[2:5], np_reste(np.array([0.5, 0.05, 2.0]), o), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ede_gradient_in_half_precision_does_not_cancel_to_zero(dtype):
    est = reste.estimator("ede")
    est.set_progress(1.0)  # t = 10, k = 1: tanh(t z) is within bfloat16's last bit of 1 from |z| ~ 0.35
    z = np.array([0.3, 0.35, 0.4, 0.5])
    x = torch.tensor(z).to(dtype).requires_grad_(True)
    est(x).backward(torch.ones_like(x))
    zq = x.detach().double().numpy()  # the inputs as the half type holds them
    g = x.grad.double().numpy()
    expected = 10.0 * (1.0 - np.tanh(10.0 * zq) ** 2)
    np.testing.assert_allclose(g, expected, rtol=2e-2)  # one rounding of the result to the half type


@pytest.mark.parametrize("n", [0, 9, 13, 18])
def test_fda_closed_form_equals_series(n):
    est = reste.estimator("fda")
    est.set_param("n", n)
    z = points()
    _, g = torch_grad(est, z)
    close(g, np_fda(z, n), rtol=1e-9, atol=1e-9)


def test_fda_n_grows_from_9_to_18_each_for_an_equal_share_of_training():
    est = reste.estimator("fda")
    seen = []
    for step in range(100):  # what a 100-step run's scheduler sets: progress step / 100, never 1
        est.set_progress(step / 100)
        seen.append(int(est.n))
    assert seen == [n for n in range(9, 19) for _ in range(10)]
    est.set_progress(1.0)
    assert int(est.n) == 18


@pytest.mark.parametrize("alpha", [0.05, 0.2, 0.6])
def test_dsq_gradient(alpha):
    est = reste.estimator("dsq", alpha=alpha).double()
    z = points()
    _, g = torch_grad(est, z)
    close(g, np_dsq(z, float(np.float32(alpha))), rtol=1e-9, atol=1e-9)  # alpha was created in float32


def test_dsq_alpha_gradient_matches_finite_difference_of_soft_function():
    alpha = 0.3
    z = np.random.default_rng(3).uniform(-1.5, 1.5, 50)
    up = np.random.default_rng(4).normal(size=50)

    def soft_loss(a):  # sum(up * phi(z)) over |z| <= 1, phi = s tanh(kz)
        k = 0.5 * math.log(2.0 / a - 1.0)
        return float(np.sum(np.where(np.abs(z) <= 1, up * np.tanh(k * z) / np.tanh(k), 0.0)))

    eps = 1e-6
    expected = (soft_loss(alpha + eps) - soft_loss(alpha - eps)) / (2 * eps)
    est = reste.estimator("dsq", alpha=alpha).double()
    zt = torch.tensor(z, requires_grad=True)
    (est(zt) * torch.tensor(up)).sum().backward()
    assert float(est.alpha.grad) == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- registry and state


def test_registry_lists_all_names_and_suggests():
    assert set(reste.estimators()) >= {
        "reste",
        "ste",
        "clipped_ste",
        "approx_sign",
        "swish_sign",
        "ede",
        "rbnn",
        "fda",
        "dsq",
    }
    with pytest.raises(ValueError, match="Did you mean 'reste'"):
        reste.estimator("rest")
    with pytest.raises(ValueError, match="Did you mean 'reste'"):
        reste.estimator("ReSTE")  # case-insensitive suggestions
    with pytest.raises(ValueError, match="Did you mean 'ste'"):
        reste.estimator("STE")
    with pytest.raises(TypeError, match="estimator 'reste'"):
        reste.estimator("reste", q=2)


@pytest.mark.parametrize(
    "name,key,value", [("reste", "o", 2.5), ("ede", "t", 0.37), ("rbnn", "k", 3.0), ("fda", "n", 14.0)]
)
def test_scheduled_parameters_live_in_state_dict(name, key, value):
    model = torch.nn.Sequential(reste.estimator(name))
    model[0].set_param(key, value)
    state = model.state_dict()
    assert f"0.{key}" in state and float(state[f"0.{key}"]) == pytest.approx(value)
    fresh = torch.nn.Sequential(reste.estimator(name))
    assert float(getattr(fresh[0], key)) != pytest.approx(value)
    fresh.load_state_dict(state)
    assert float(getattr(fresh[0], key)) == pytest.approx(value)


def test_binary_layer_state_dict_round_trip_restores_o():
    layer = reste.nn.BinaryConv2d(4, 4, 3, padding=1, bias=False)
    reste.set_params(torch.nn.Sequential(layer), o=2.75)
    other = reste.nn.BinaryConv2d(4, 4, 3, padding=1, bias=False)
    other.load_state_dict(layer.state_dict())
    assert float(other.weight_estimator.o) == 2.75 and float(other.input_estimator.o) == 2.75


def test_set_params_rejects_unknown_parameter():
    model = torch.nn.Sequential(reste.estimator("ste"))
    with pytest.raises(ValueError, match="no estimator"):
        reste.set_params(model, o=2.0)


# ---------------------------------------------------------------- no host syncs in any backward


def test_estimator_code_has_no_host_sync_or_mask_indexing():
    """No backward may synchronise with the host or index with a boolean mask."""
    import inspect
    import re

    import reste.estimators as E

    assert inspect.ismodule(E)  # (until reste.estimators became a callable module, this read the function alone)
    src = inspect.getsource(E).replace(E.__doc__ or "", "")  # the module docstring names what is banned
    for pattern in (
        r"\.item\(\)",
        r"math\.pow\(",
        r"\.nonzero\(",
        r"masked_select",
        r"\.tolist\(\)",
        r"\[[a-z_]*mask[a-z_]*\]",
    ):
        assert not re.search(pattern, src), pattern


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device-sync detection needs CUDA")
@pytest.mark.parametrize("name", reste.estimators())
def test_backward_does_not_sync_on_cuda(name):
    est = reste.estimator(name).cuda()
    z = torch.randn(1000, device="cuda", requires_grad=True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        est(z).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------- the other code paths


@pytest.mark.parametrize("o", [1.0, 3.0])
def test_inplace_rule_equals_out_of_place(o, code_path):
    est = reste.estimator("reste", o=o)
    z = torch.tensor(points(5), dtype=torch.float32)
    grad = torch.linspace(-2, 2, z.numel())
    expected = est.surrogate_grad(z, grad.clone())
    buffer = grad.clone()
    out = est.surrogate_grad_(z, buffer)
    torch.testing.assert_close(out, expected)
    ref = np_reste(z.double().numpy(), o, t=float(np.float32(1.5)), m=float(np.float32(0.1))) * grad.double().numpy()
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=2e-6, atol=1e-6)


def test_kernel_handles_channels_last_and_rejects_mixed_layouts(monkeypatch):
    if not ops.kernels_built():
        pytest.skip("compiled kernels not built")
    monkeypatch.setattr(ops, "_ENABLED", True)  # also under RESTE_NO_EXT=1
    z = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    assert torch.equal(ops._sign_kernel(z), binary_sign_torch(z))
    assert ops._reste_backward_kernel(z, torch.randn(2, 3, 4, 5), torch.tensor(3.0), 1.5, 0.1) is None  # strides differ


def _compiled_grad(name, z_np, **params):
    est = reste.estimator(name, **params)
    z = torch.tensor(z_np, dtype=torch.float32, requires_grad=True)
    upstream = torch.linspace(0.5, 1.5, z.numel())
    f = torch.compile(lambda v: (est(v) * upstream).sum(), fullgraph=True, dynamic=False)
    f(z).backward()
    return (z.grad / upstream).double().numpy()


def test_compiled_reste_gradient_matches_numpy():
    """The torch.compile path (inductor's fused kernel of the PyTorch formula)."""
    z = points(7).astype(np.float32)
    g = _compiled_grad("reste", z, o=3.0)
    ref = np_reste(z.astype(np.float64), 3.0, t=float(np.float32(1.5)), m=float(np.float32(0.1)))
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,ref", [("clipped_ste", np_clipped), ("approx_sign", np_approx_sign), ("swish_sign", np_swish_sign)]
)
def test_compiled_baselines_match_numpy(name, ref):
    z = points(8).astype(np.float32)
    np.testing.assert_allclose(_compiled_grad(name, z), ref(z.astype(np.float64)), rtol=1e-5, atol=1e-5)
