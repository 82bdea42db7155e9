"""ONNX and TorchScript interoperability: torch.onnx.export of binarized models with both
exporters, reste's own ONNX export (folded ±1 constants, explicit sign(0) = +1, dynamic
batch) checked against the trained model with onnxruntime, and a clear jit.script error."""

import copy
import sys
import warnings
from importlib.util import find_spec

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import reste

HAS_ORT = find_spec("onnxruntime") is not None and find_spec("onnx") is not None
HAS_DYNAMO = HAS_ORT and find_spec("onnxscript") is not None
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="needs onnx and onnxruntime: pip install 'reste[onnx]'")
needs_dynamo = pytest.mark.skipif(
    not HAS_DYNAMO, reason="the dynamo exporter needs onnxscript: pip install 'reste[onnx]'"
)


def _trained(model, shape, passes=3):
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            model(torch.randn(8, *shape))
    return model.eval()


def _tiny_resnet(precision="1w1a"):
    torch.manual_seed(0)
    model = reste.models.create("resnet20", num_classes=10, in_channels=1, precision=precision, image_size=12, width=8)
    return _trained(model, (1, 12, 12))


def _tiny_vit():
    torch.manual_seed(1)
    return reste.models.create(
        "vit_tiny",
        num_classes=10,
        in_channels=1,
        precision="1w1a",
        image_size=12,
        patch_size=4,
        dim=24,
        depth=2,
        heads=3,
        mlp_dim=48,
    ).eval()


class Encoder(nn.Module):
    """torch's own attention (nn.TransformerEncoderLayer), binarized by reste."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(12, 16)
        self.enc = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False
        )
        self.head = nn.Linear(16, 5)

    def forward(self, x):  # x: [N, 1, 12, 12] seen as 12 tokens of 12 features
        return self.head(self.enc(self.embed(x.flatten(1, 2))).mean(1))


def _ort(path, x):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


MODELS = {
    "resnet20": _tiny_resnet,
    "vit": _tiny_vit,
    "torch_attention": lambda: (torch.manual_seed(2), reste.binarize(Encoder()).eval())[1],
}


@needs_ort
@pytest.mark.parametrize("name", sorted(MODELS))
def test_torch_onnx_export_torchscript_exporter(name, tmp_path):
    """The custom autograd functions need no symbolic: the exporter traces their forward ops;
    the compiled sign kernel steps aside while a tracer runs (it used to fail on aten::size)."""
    model, x = MODELS[name](), torch.randn(3, 1, 12, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # PyTorch deprecates this exporter
        torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=False)
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(_ort(tmp_path / "m.onnx", x), want, rtol=1e-4, atol=1e-4)


@needs_dynamo
def test_torch_onnx_export_dynamo_exporter(tmp_path):
    model, x = _tiny_resnet(), torch.randn(3, 1, 12, 12)
    torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=True)
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(_ort(tmp_path / "m.onnx", x), want, rtol=1e-4, atol=1e-4)


def test_jit_script_says_to_trace_or_export_and_trace_works():
    model, x = _tiny_resnet(), torch.randn(2, 1, 12, 12)
    with pytest.raises(
        RuntimeError, match=r"torch.jit.script cannot compile reste's Binary.*torch.jit.trace.*--format onnx"
    ):
        torch.jit.script(model)
    with (
        torch.no_grad()
    ):  # the inference path: plain ops (with autograd on, the fused Functions trace differently per call)
        traced = torch.jit.trace(model, x)
        assert torch.equal(traced(x), model(x))


@needs_ort
@pytest.mark.parametrize(
    "name, exporter",
    [  # one model through the slower dynamo exporter is enough
        ("resnet20", "torchscript"),
        ("vit", "torchscript"),
        ("torch_attention", "torchscript"),
        pytest.param("resnet20", "dynamo", marks=needs_dynamo),
    ],
)
def test_export_onnx_matches_trained_model_at_other_batch_sizes(name, exporter, tmp_path):
    from reste.deploy.onnx import export_onnx

    model = MODELS[name]()
    path = export_onnx(model, tmp_path / "m.onnx", (1, 12, 12), exporter=exporter)
    for batch in (1, 7):  # exported with batch 2: the batch dimension is dynamic
        # inputs of their own (they were drawn from the global generator: whether one landed an activation
        # within rounding of 0 depended on the tests that ran before)
        x = torch.randn(batch, 1, 12, 12, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = model(x)
        got = _ort(path, x)
        # onnxruntime's real layers round differently from PyTorch's: an activation within ~1e-7 of 0 in
        # front of a binary layer may take the other sign and move that sample's logits (docs/deploy.md,
        # Interoperability: 3 of 1000 test images). Every other sample agrees to float rounding
        agree = ((got - want).abs().amax(dim=1) <= 2e-6).sum().item()
        assert agree >= batch - (batch > 1), (got - want).abs().amax(dim=1)


@needs_ort
def test_onnx_graph_holds_pm1_constants_and_explicit_sign(tmp_path):
    import onnx
    from onnx import numpy_helper

    from reste.deploy.onnx import export_onnx

    model = _tiny_resnet()
    graph = onnx.load(str(export_onnx(model, tmp_path / "m.onnx", (1, 12, 12), exporter="torchscript"))).graph
    ops = {n.op_type for n in graph.node}
    assert {"Less", "Where", "Conv"} <= ops and "Sign" not in ops  # sign(0) = +1 spelled out, not ONNX Sign (0 -> 0)
    conv_weights = {n.input[1] for n in graph.node if n.op_type == "Conv"}
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    binary = [values[w] for w in conv_weights if w in values and np.isin(values[w], (-1.0, 1.0)).all()]
    assert len(binary) == len(list(reste.nn.binary_layers(model)))  # every binary conv: ±1 constants
    assert not any("weight_estimator" in i.name for i in graph.initializer)  # no latent weights, no estimator state


def _fake_run(tmp_path):
    from reste.train.config import config_from_dict, config_to_dict

    cfg = config_to_dict(
        config_from_dict(
            {
                "model": {"name": "resnet20", "precision": "1w1a", "kwargs": {"width": 8}},
                "data": {"name": "fashion_mnist", "root": str(tmp_path / "no-data")},
            }
        )
    )
    torch.manual_seed(8)
    model = _trained(
        reste.models.create("resnet20", num_classes=10, in_channels=1, precision="1w1a", image_size=28, width=8),
        (1, 28, 28),
    )
    run = tmp_path / "run-20250101-000000"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    torch.save({"model": model.state_dict(), "config": cfg, "epoch": 3}, run / "checkpoints" / "last.pt")
    return run, model


@needs_ort
def test_cli_export_onnx_checks_with_onnxruntime(tmp_path, capsys):
    from reste.cli import main
    from reste.deploy.onnx import read_onnx_metadata

    run, model = _fake_run(tmp_path)
    out = tmp_path / "m.onnx"
    code = main(
        ["export", str(run), "--checkpoint", "last", "--format", "onnx", "--exporter", "torchscript", "--out", str(out)]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "onnxruntime on 8 random inputs" in printed.out and "random inputs only" in printed.out  # no data set here
    meta = read_onnx_metadata(out)
    assert meta["reste.verification"]["passed"] and meta["reste.verification"]["random_max_abs_logit_diff"] < 1e-5
    assert meta["reste.source"]["epoch"] == 3 and meta["reste.architecture"]["name"] == "resnet20"
    assert meta["reste.data"]["input_shape"] == [1, 28, 28]
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(_ort(out, x), model(x), rtol=0, atol=2e-6)


@needs_ort
def test_cli_export_onnx_without_onnxruntime_warns_and_keeps_the_file(tmp_path, capsys, monkeypatch):
    from reste.cli import main

    run, _ = _fake_run(tmp_path)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    out = tmp_path / "m.onnx"
    assert (
        main(
            [
                "export",
                str(run),
                "--checkpoint",
                "last",
                "--format",
                "onnx",
                "--exporter",
                "torchscript",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "onnxruntime is not installed" in capsys.readouterr().err and out.is_file()


def test_export_onnx_without_onnx_names_the_extra(tmp_path, monkeypatch):
    from reste.deploy.onnx import export_onnx

    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(reste.deploy.ExportError, match=r"reste\[onnx\]"):
        export_onnx(copy.deepcopy(_tiny_resnet()), tmp_path / "m.onnx", (1, 12, 12))


@needs_ort
def test_cli_export_onnx_is_renamed_into_place_only_after_its_check(tmp_path, capsys, monkeypatch):
    """An interrupt during the onnxruntime check leaves a previous file as it was and no temporary file;
    --out ending in .onnx selects the format; the size printed is the final file's (metadata included)."""
    from reste.cli import main
    from reste.deploy import onnx as onnx_mod

    run, _ = _fake_run(tmp_path)
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "m.onnx"
    out.write_bytes(b"a previous export")
    argv = ["export", str(run), "--checkpoint", "last", "--exporter", "torchscript", "--out", str(out)]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(onnx_mod, "check_onnx", interrupted)
        assert main(argv) == 130
        nested = tmp_path / "new" / "deeper" / "m.onnx"
        assert main([*argv[:-1], str(nested)]) == 130
        assert not (tmp_path / "new").exists()  # nor the folders made for it
    assert out.read_bytes() == b"a previous export" and [p.name for p in folder.iterdir()] == ["m.onnx"]
    capsys.readouterr()
    assert main(argv) == 0  # no --format: the extension says onnx
    printed = capsys.readouterr().out
    assert f"(ONNX, torchscript exporter, {out.stat().st_size:,} bytes;" in printed
    assert onnx_mod.read_onnx_metadata(out)["reste.verification"]["passed"]
    assert [p.name for p in folder.iterdir()] == ["m.onnx"]
