"""Hostile input and runs that go wrong (issue 15): bounded memory, one-line errors, no
false "good" checkpoint.

Every test feeds a real bad file, config or export, or makes a real run go wrong, and checks
what the user gets: one ``error: ...`` line naming the file or key (no traceback), the
documented exit code, and, for input that could expand, that the process stays under a
memory limit (``RLIMIT_AS``, set in the child) and answers quickly. docs/reliability.md lists
the cases and the measured limits.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

import data_fixtures as fx
from reste import cli
from reste.data import CorruptDataError
from reste.data.formats import read_idx
from reste.train.config import load_config

REPO = Path(__file__).resolve().parents[1]
#: address-space limit of the children that read hostile input: importing torch needs ~0.8 GiB
#: of address space, so 1.5 GiB leaves the program well under 1 GiB for the input
LIMIT = 1536 << 20
TINY = [
    "data.subset=256",
    "data.batch_size=64",
    "data.test_batch_size=256",
    "train.device=cpu",
    "train.threads=1",
    "model.kwargs={width: 0.25}",
    "analysis.indicators=false",
    "train.epochs=1",
]


def env(**extra) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RESTE_FAULT")}
    base.update(PYTHONPATH=str(REPO / "src"), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    base.update({k: str(v) for k, v in extra.items()})
    return base


def limited(args: list[str], limit: int = LIMIT, timeout: float = 60, cwd=None, **kw) -> tuple[int, str, str, float]:
    """``python -m reste ARGS`` (or ``python -c`` with args[0] == "-c") under an address-space
    limit: (exit code, stdout, stderr, seconds)."""

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    cmd = [sys.executable, *args] if args[0] == "-c" else [sys.executable, "-m", "reste", *args]
    start = time.monotonic()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=cap, env=env(), cwd=cwd, **kw
    )
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start


def assert_one_error(stderr: str, *fragments: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and "Warning" not in line]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert len(lines[0]) < 600, lines[0]
    return lines[0]


def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# ============================================================================ 1. input that expands
def laughs(levels: int = 9, fan: int = 10, indent: str = "    ") -> str:
    """A "billion laughs": each alias level repeats the previous one ``fan`` times (10**9 values)."""
    lines = [f"{indent}l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for k in range(1, levels):
        lines.append(f"{indent}l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * fan)}]")
    return "\n".join(lines)


@pytest.mark.parametrize("section", ["model:\n  kwargs:", "estimator:\n  params:"])
def test_yaml_alias_bomb_in_a_config_is_refused_quickly_under_a_memory_limit(tmp_path, section):
    config = tmp_path / "laughs.yaml"
    config.write_text(f"{section}\n{laughs()}\n")
    assert config.stat().st_size < 1000
    code, out, err, seconds = limited(["train", str(config), "--print-config"])
    assert code == 2, err[-2000:]
    assert_one_error(err, str(config), "expands to more than 10,000 values")
    assert seconds < 20


def test_yaml_alias_bomb_in_an_override_and_a_self_referencing_alias_are_refused(capsys):
    bomb = (
        "{a: &a [x, x, x, x, x, x, x, x, x, x], b: &b ["
        + ", ".join(["*a"] * 10)
        + "], c: &c ["
        + ", ".join(["*b"] * 10)
        + "], d: &d ["
        + ", ".join(["*c"] * 10)
        + "], e: ["
        + ", ".join(["*d"] * 10)
        + "]}"
    )
    code, _, err = run_cli(["train", f"model.kwargs={bomb}", "--print-config"], capsys)
    assert code == 2
    assert_one_error(err, "model.kwargs", "expands to more than 10,000 values")
    code, _, err = run_cli(["train", "estimator.params=&a [1, *a]", "--print-config"], capsys)
    assert code == 2
    assert_one_error(err, "estimator.params", "refers to a value that contains it")


def test_aliases_within_the_budget_still_work_and_large_valid_values_are_not_formatted(capsys):
    # merge keys and a few aliases are ordinary YAML
    cfg = load_config({"model": {"kwargs": {}}})
    assert cfg.model.kwargs == {}
    text = "base: &b {width: 0.5}\n"
    from reste.train.config import _load_yaml

    assert _load_yaml(text + "other: {<<: *b, depth: 2}") == {
        "base": {"width": 0.5},
        "other": {"width": 0.5, "depth": 2},
    }
    # 9,000 values: within the budget, and accepted without building a 9,000-value message
    big = "[" + ", ".join(["1"] * 9000) + "]"
    start = time.perf_counter()
    cfg = load_config(None, [f"estimator.params={{big: {big}}}"])
    assert len(cfg.estimator.params["big"]) == 9000 and time.perf_counter() - start < 5


@pytest.mark.parametrize("kind", ["yaml", "json"])
def test_config_nested_100000_deep_is_one_error_line(tmp_path, kind):
    config = tmp_path / f"deep.{kind}"
    depth = 100_000
    body = "[" * depth + "]" * depth if kind == "yaml" else '{"a": ' * depth + "1" + "}" * depth
    config.write_text(
        "model:\n  kwargs:\n    x: " + body + "\n" if kind == "yaml" else '{"model": {"kwargs": ' + body + "}}"
    )
    code, _, err, seconds = limited(["train", str(config), "--print-config"])
    assert code == 2
    assert_one_error(err, str(config), "nested more than 64 levels deep")
    assert seconds < 20


def zeros_gzip(header: bytes, payload: int) -> bytes:
    """A gzip file of ``header`` then ``payload`` zero bytes, built from repeated gzip members
    (readers decompress the members one after the other) so that a GiB costs ~1 MB and no time."""
    block = 16 << 20
    member = gzip.compress(b"\0" * block, compresslevel=9)
    count, rest = divmod(payload, block)
    return gzip.compress(header) + member * count + (gzip.compress(b"\0" * rest) if rest else b"")


def idx_header(*shape: int) -> bytes:
    return struct.pack(">I", 0x800 | len(shape)) + b"".join(struct.pack(">I", n) for n in shape)


def test_gzip_bomb_data_file_is_stopped_at_the_size_its_header_declares(tmp_path):
    folder = tmp_path / "mnist"
    fx.make_idx_dataset(folder, n_train=64, n_test=16)
    bomb = folder / "train-images-idx3-ubyte.gz"
    # declares 64 images of 28x28 (50 KB), then decompresses to 2 GiB of zeros
    bomb.write_bytes(zeros_gzip(idx_header(64, 28, 28), 2 << 30))
    assert bomb.stat().st_size < 5 << 20
    code, _, err, seconds = limited(
        [
            "train",
            "data.name=mnist",
            f"data.root={tmp_path}",
            "data.download=false",
            f"out.dir={tmp_path / 'runs'}",
            *TINY,
            "data.subset=64",
        ]
    )
    assert code == 1, err[-2000:]
    assert_one_error(err, str(bomb), "trailing bytes", "(64, 28, 28)")
    assert seconds < 30


@pytest.mark.parametrize(
    "shape, fragment",
    [
        ((2**22, 2**21, 2**21), "= 18,446,744,073,709,551,616 bytes"),  # 2**64: overflowed an int64 product to 0
        ((2**32 - 1, 28, 28), "more than 1,073,741,824"),
    ],
)
def test_idx_header_size_is_computed_exactly_and_bounded_before_allocating(tmp_path, shape, fragment):
    path = tmp_path / "images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_header(*shape)))
    with pytest.raises(CorruptDataError) as caught:
        read_idx(path, 3)
    assert fragment in str(caught.value) and str(path) in str(caught.value)
    # the image size is checked on the header too, before any pixel is read
    with pytest.raises(CorruptDataError, match=r"expected items of shape \(32, 32\), the header says"):
        read_idx(path, 3, item_shape=(32, 32))


def test_idx_header_declaring_4_gib_through_train_is_refused_under_a_memory_limit(tmp_path):
    folder = tmp_path / "mnist"
    fx.make_idx_dataset(folder, n_train=64, n_test=16)
    bomb = folder / "train-images-idx3-ubyte.gz"
    bomb.write_bytes(zeros_gzip(idx_header(2**32 - 1, 28, 28), 1 << 30))
    code, _, err, seconds = limited(
        [
            "train",
            "data.name=mnist",
            f"data.root={tmp_path}",
            "data.download=false",
            f"out.dir={tmp_path / 'runs'}",
            *TINY,
            "data.subset=64",
        ]
    )
    assert code == 1
    assert_one_error(err, str(bomb), "more than 1,073,741,824")
    assert seconds < 30


def test_cifar_tar_member_larger_than_any_batch_is_refused_before_reading(tmp_path):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    archive = folder / "cifar-10-python.tar.gz"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = 300 << 20  # zeros: a 300 MB "batch"

        class Zeros(io.RawIOBase):
            left = info.size

            def readable(self):
                return True

            def readinto(self, b):
                n = min(len(b), self.left)
                b[:n] = b"\0" * n
                self.left -= n
                return n

        tar.addfile(info, io.BufferedReader(Zeros()))
    archive.write_bytes(buf.getvalue())
    code, _, err, seconds = limited(
        [
            "train",
            "data.name=cifar10",
            f"data.root={tmp_path}",
            "data.download=false",
            f"out.dir={tmp_path / 'runs'}",
            *TINY,
        ],
        limit=1200 << 20,
    )
    assert code == 1, err[-2000:]
    assert_one_error(err, "data_batch_1", "more than a CIFAR batch holds")
    assert seconds < 30


# ============================================================================ 5. one line where a traceback was
def test_config_with_non_utf8_bytes_is_one_error_line(tmp_path, capsys):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("optim:\n  name: adam\n# caf\xe9\n".encode("latin-1"))
    code, _, err = run_cli(["train", str(config), "--print-config"], capsys)
    assert code == 2
    assert_one_error(err, str(config), "not UTF-8", "line 3")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("seed=1.0e+21", "seed=1e+21 is out of range"),
        ("seed=-1", "seed must be a whole number in [0, 2**63 - 1]"),
        ("train.threads=4096", "train.threads must be in 0..1024"),
        ("data.num_workers=100000", "data.num_workers must be <= 1024"),
        ("train.dist_timeout_s=1.0e+12", "train.dist_timeout_s must be 1 second to 7 days"),
        ("data.subset=1.0e+20", "data.subset=1e+20 is out of range"),
        ("data.subset=1000000", "data.subset=1000000 is larger than the fashion_mnist training set (60,000 images)"),
    ],
)
def test_out_of_range_numbers_are_refused_with_the_key(override, fragment, capsys):
    code, _, err = run_cli(["train", override, "--print-config"], capsys)
    assert code == 2
    assert_one_error(err, fragment)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ("{width: .inf}", "cannot convert float infinity to integer"),
        ("{width: 300}", "GiB of parameters and buffers"),
    ],
)
def test_model_kwargs_that_cannot_be_built_are_one_line_before_allocating(tmp_path, kwargs, fragment):
    code, _, err, seconds = limited(
        [
            "train",
            f"model.kwargs={kwargs}",
            f"out.dir={tmp_path}",
            *TINY[:5],
            "data.name=mnist",
            f"data.root={tmp_path}",
            "data.download=false",
        ]
    )
    # the model is checked before the data is looked for: exit 2, not "data set not found"
    assert code == 2, err[-2000:]
    assert_one_error(err, "model.kwargs", fragment)
    assert seconds < 30 and not list(tmp_path.iterdir())


# ============================================================================ 6. silently accepted
def test_empty_config_file_and_a_directory_as_config_are_refused(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    code, _, err = run_cli(["train", str(empty), "--print-config"], capsys)
    assert code == 2
    assert_one_error(err, str(empty), "is empty")
    code, _, err = run_cli(["train", str(tmp_path), "--print-config"], capsys)
    assert code == 2
    assert_one_error(err, str(tmp_path), "is a directory")


# ============================================================================ 2. exports that build before they check
def exported(tmp_path: Path, name: str = "resnet20", **kwargs) -> Path:
    from reste import models
    from reste.deploy import export

    arch = {
        "name": name,
        "num_classes": 10,
        "in_channels": 1,
        "precision": "1w1a",
        "estimator": "reste",
        "image_size": 28,
        "kwargs": dict(kwargs),
    }
    model = models.create(name, **{k: v for k, v in arch.items() if k not in ("name", "kwargs")}, **kwargs)
    path = tmp_path / f"{name}.safetensors"
    export(model, path, architecture=arch)
    return path


def rewrite(path: Path, out: Path, edit_graph=None, edit_blobs=None) -> Path:
    """A copy of an export with its graph description and/or blobs edited (the checksum left as it was)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, blobs = dict(f.metadata()), {k: f.get_tensor(k).clone() for k in f.keys()}
    graph = json.loads(meta["graph"])
    if edit_graph:
        edit_graph(graph)
    if edit_blobs:
        edit_blobs(blobs)
    save_file(blobs, str(out), metadata=dict(meta, graph=json.dumps(graph)))
    return out


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    return exported(tmp_path_factory.mktemp("export"), width=0.25)


def _set_arch(**changes):
    def edit(graph):
        graph["architecture"].update(changes)

    return edit


def _set_kwargs(**changes):
    def edit(graph):
        graph["architecture"]["kwargs"].update(changes)

    return edit


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (_set_kwargs(width=300), "too big to build"),  # 90 GiB of weights
        (_set_kwargs(width=2), "layout fingerprint differs"),  # fits, but is not what the file holds
        (_set_arch(num_classes=10**9), "too big to build"),  # a 64 GB classifier
        (_set_arch(name="vit_tiny", image_size=10**5, kwargs={}), "too big to build"),  # 30 GB of position embeddings
        (_set_kwargs(width=float("inf")), "cannot rebuild the recorded architecture"),
    ],
)
def test_export_with_an_absurd_architecture_is_refused_before_building_it(small_export, tmp_path, edit, fragment):
    bad = rewrite(small_export, tmp_path / "bad.safetensors", edit_graph=edit)
    code, _, err, seconds = limited(["summary", str(bad)])
    assert code == 1, err[-2000:]
    assert_one_error(err, str(bad), fragment)
    assert seconds < 30
    if "too big" in fragment:  # eval reads the file through the same checks (once is enough: ~3 s a child)
        code, _, err, seconds = limited(["eval", str(bad), "--data", "mnist", "--root", str(tmp_path)])
        assert code in (1, 2), err[-2000:]  # 1e9 classes are not mnist's 10: exit 2 before the file is read
        assert_one_error(err, str(bad))
        assert seconds < 30


@pytest.mark.parametrize(
    "option, value, fragment",
    [
        ("inputs", "real", "inputs 'real' (the architecture has 'binary')"),
        ("input_padding", "+1", "input_padding '+1' (the architecture has 'zero')"),
        ("alpha", "channel", "alpha 'channel' (the architecture has 'layer')"),
    ],
)
def test_export_with_an_edited_layer_option_is_refused(small_export, tmp_path, option, value, fragment):
    from reste.deploy import ExportError, load

    def edit(graph):
        layer = sorted(graph["binary_layers"])[0]
        graph["binary_layers"][layer][option] = value

    bad = rewrite(small_export, tmp_path / "bad.safetensors", edit_graph=edit)
    with pytest.raises(
        ExportError, match="recorded with " + fragment.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")
    ):
        load(bad)


def test_export_with_edited_weights_or_graph_fails_its_checksum_unless_verify_is_off(small_export, tmp_path):
    from reste.deploy import ExportError, load

    def flip(blobs):
        blobs["uint8"][100] ^= 0xFF  # eight binary weights change sign

    bad = rewrite(small_export, tmp_path / "bits.safetensors", edit_blobs=flip)
    with pytest.raises(ExportError, match="content checksum differs"):
        load(bad)
    model = load(bad, verify=False)  # the opt-out loads it as it is
    good = load(small_export)
    x = torch.randn(8, 1, 28, 28)
    assert not torch.equal(model(x), good(x))  # the edit changes the computation: that is why it is checked

    def edit_source(graph):
        graph["source"] = {"run": "elsewhere"}

    with pytest.raises(ExportError, match="content checksum differs"):
        load(rewrite(small_export, tmp_path / "graph.safetensors", edit_graph=edit_source))


def test_export_without_a_checksum_loads_with_a_warning(small_export, tmp_path):
    from reste.deploy import load

    old = rewrite(small_export, tmp_path / "old.safetensors", edit_graph=lambda g: g.pop("checksum"))
    with pytest.warns(UserWarning, match="has no content checksum"):
        model = load(old)
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(model(x), load(small_export)(x))


def test_export_graph_nested_deeply_is_one_error_line(small_export, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(small_export), framework="pt") as f:
        meta, blobs = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    bad = tmp_path / "deep.safetensors"
    save_file(blobs, str(bad), metadata=dict(meta, graph="[" * 100_000 + "]" * 100_000))
    code, _, err, _ = limited(["summary", str(bad)])
    assert code == 1
    assert_one_error(err, str(bad), "no readable graph description")


# ============================================================================ 4. no false "good" checkpoint
#: 512 synthetic MNIST-format images (see data_fixture) in batches of 64: 8 steps an epoch
RUN = [
    "data.name=mnist",
    "data.download=false",
    "data.subset=512",
    "data.batch_size=64",
    "data.test_batch_size=256",
    "train.device=cpu",
    "train.threads=1",
    "model.kwargs={width: 0.25}",
    "analysis.indicators=false",
]


@pytest.fixture(scope="module", autouse=True)
def data_fixture(tmp_path_factory):
    """The runs of this file read a generated MNIST (official IDX format) from $RESTE_DATA, for
    this process and the children it starts: no download, no system data set needed."""
    root = tmp_path_factory.mktemp("reste-data")
    fx.make_idx_dataset(root / "mnist", n_train=512, n_test=128)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RESTE_DATA", str(root))
        yield root


def finite_checkpoints(run: Path) -> dict:
    """{checkpoint file: whether every weight and buffer in it is finite}."""
    from reste.train.checkpoint import load_checkpoint

    return {
        p.name: all(
            bool(torch.isfinite(v).all()) for v in load_checkpoint(p)["model"].values() if v.is_floating_point()
        )
        for p in sorted((run / "checkpoints").glob("*.pt"))
    }


def test_an_update_that_makes_the_weights_infinite_is_never_checkpointed(tmp_path, capsys):
    # sgd at lr 3e38: the first update overflows the weights, the loss before it was finite
    code, _, err = run_cli(
        [
            "train",
            *RUN,
            "optim.name=sgd",
            "optim.lr=3e38",
            "train.checkpoint_every_steps=1",
            "train.epochs=2",
            f"out.dir={tmp_path}",
            "out.name=run",
            "--quiet",
        ],
        capsys,
    )
    assert code == 1
    assert_one_error(err, "non-finite", "stem.conv.weight", "without writing checkpoints/last.pt")
    assert all(finite_checkpoints(tmp_path / "run").values())


def test_mostly_skipped_epoch_fails_and_a_skipped_batch_leaves_no_batchnorm_trace(tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(
        [
            "train",
            *RUN,
            "optim.name=sgd",
            "optim.lr=3e38",
            "train.nonfinite=skip",
            "train.epochs=1",
            f"out.dir={tmp_path}",
            "out.name=skip",
            "--quiet",
        ],
        capsys,
    )
    assert code == 1
    assert_one_error(err, "epoch 1 skipped 7 of 8 batches", "the run is diverging")
    assert all(finite_checkpoints(tmp_path / "skip").values())

    # one batch of infinite pixels: its loss is NaN and it is skipped, and the BatchNorm statistics
    # its forward pass updated are put back, so the run ends normally with a finite model
    from reste import data as rdata

    real = rdata.create_loaders

    class Poisoned:
        def __init__(self, loader):
            self.loader = loader

        def __getattr__(self, name):
            return getattr(self.loader, name)

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            for i, (images, labels) in enumerate(self.loader):
                yield (torch.full_like(images, float("inf")) if i == 3 else images), labels

    def poisoned(*args, **kwargs):
        train, test = real(*args, **kwargs)
        return Poisoned(train), test

    monkeypatch.setattr(rdata, "create_loaders", poisoned)
    code, _, err = run_cli(
        ["train", *RUN, "train.nonfinite=skip", "train.epochs=1", f"out.dir={tmp_path}", "out.name=one", "--quiet"],
        capsys,
    )
    assert code == 0, err
    assert json.loads((tmp_path / "one" / "metrics.jsonl").read_text())["skipped_batches"] == 1
    assert finite_checkpoints(tmp_path / "one") == {"best.pt": True, "last.pt": True}


def test_a_diverged_but_finite_run_warns(tmp_path, capsys):
    with pytest.warns(
        UserWarning, match=r"train loss .* times that of guessing .* the run has diverged; lower optim.lr"
    ):
        code, _, err = run_cli(
            [
                "train",
                *RUN,
                "optim.name=adam",
                "optim.lr=1e9",
                "train.epochs=1",
                f"out.dir={tmp_path}",
                "out.name=adam",
                "--quiet",
            ],
            capsys,
        )
    assert code == 0


def test_eval_export_and_resume_of_a_checkpoint_with_infinite_weights_are_errors(tmp_path, capsys):
    from reste.train import trainer as T
    from reste.train.checkpoint import load_checkpoint, save_checkpoint

    fx.make_idx_dataset(tmp_path / "data" / "mnist", n_train=128, n_test=32)
    T.train(
        overrides=[
            *RUN,
            "data.subset=128",
            "data.name=mnist",
            f"data.root={tmp_path / 'data'}",
            "train.epochs=1",
            f"out.dir={tmp_path}",
            "out.name=run",
        ],
        progress=False,
    )
    for which in ("best", "last"):
        path = tmp_path / "run" / "checkpoints" / f"{which}.pt"
        state = load_checkpoint(path)
        state["model"]["stem.bn.running_var"][0] = float("inf")
        save_checkpoint(state, path)
    run = str(tmp_path / "run")
    for argv in (["eval", run], ["export", run, "--no-verify"], ["train", "--resume", run, "train.epochs=2"]):
        code, _, err = run_cli(argv, capsys)
        assert code == 1, (argv, err)
        assert_one_error(err, "non-finite", "stem.bn.running_var")


# ============================================================================ 3. kills during set-up
def reste_popen(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "reste", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
        **kw,
    )


def wait_for(condition, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


@pytest.mark.parametrize(
    "left",
    [
        {".lock"},
        {".lock", "config.yaml", "checkpoints/", "histograms/", "tb/events.out"},
        # analysis.every_steps wrote step rows of the first epoch: no checkpoint holds them (they blocked it)
        {".lock", "config.yaml", "checkpoints/", "histograms/", "indicators.jsonl"},
    ],
)
@pytest.mark.parametrize("command", ["same", "resume", "force"])
def test_a_set_up_killed_before_its_first_checkpoint_is_no_dead_end(tmp_path, capsys, left, command):
    run = tmp_path / "run"
    run.mkdir()
    for item in left:  # what a SIGKILL between claiming the folder and the first checkpoint leaves
        if item.endswith("/"):
            (run / item).mkdir()
        else:
            (run / item).parent.mkdir(exist_ok=True)
            (run / item).write_text(f"{os.getpid() + 10**6}\n" if item == ".lock" else "")
    if "config.yaml" in left:
        from reste.train.config import config_to_yaml

        (run / "config.yaml").write_text(
            config_to_yaml(load_config(None, [*RUN, "train.epochs=1", f"out.dir={tmp_path}", "out.name=run"]))
        )
    argv = {
        "same": ["train", *RUN, "train.epochs=1", f"out.dir={tmp_path}", "out.name=run", "--quiet"],
        "force": ["train", *RUN, "train.epochs=1", f"out.dir={tmp_path}", "out.name=run", "--force", "--quiet"],
        "resume": ["train", "--resume", str(run), "--quiet"],
    }[command]
    code, out, err = run_cli(argv, capsys)
    if command == "resume" and "config.yaml" not in left:  # nothing says what the run was: the error says what to do
        assert code == 1
        assert_one_error(err, f"cannot resume {run}", "run the command that started it again (it reuses the folder)")
        return
    assert code == 0, err
    assert (run / "checkpoints" / "last.pt").is_file() and json.loads((run / "summary.json").read_text())["complete"]


# Timing-dependent: the signals must land in the short window between claiming the folder and the
# first training step; in 2 of about 9 clean-clone CI runs they did not (exit 0: the tiny run finished
# first; exit -2, since fixed in cli). Kept in the slow suite until set-up can be held open on purpose.
@pytest.mark.slow
def test_sigterm_and_a_double_ctrl_c_during_set_up_exit_cleanly_and_remove_the_folder(tmp_path):
    for signals, code in (([signal.SIGTERM], 143), ([signal.SIGINT, signal.SIGINT], 130)):
        run = tmp_path / f"run{code}"
        proc = reste_popen("train", *RUN, "train.epochs=1", f"out.dir={tmp_path}", f"out.name={run.name}", "--quiet")
        wait_for(lambda: (run / ".lock").is_file(), proc)  # set-up has claimed the folder, training has not started
        for sig in signals:
            proc.send_signal(sig)
            time.sleep(0.02)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == code, err
        assert (
            "Traceback" not in err
            and err.strip().splitlines()[-1] == f"interrupted by {signal.Signals(signals[0]).name}"
        )
        assert not run.exists()  # nothing was trained: no folder left to trip over


def test_simultaneous_force_runs_one_wins_the_others_say_why(tmp_path, capsys):
    assert (
        cli.main(["train", *RUN, "data.subset=128", "train.epochs=1", f"out.dir={tmp_path}", "out.name=run", "--quiet"])
        == 0
    )
    procs = [
        reste_popen(
            "train",
            *RUN,
            "data.subset=128",
            "train.epochs=1",
            f"out.dir={tmp_path}",
            "out.name=run",
            "--force",
            "--quiet",
        )
        for _ in range(3)
    ]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sum(code == 0 for code, _ in results) >= 1, results
    for code, err in results:
        assert "Traceback" not in err
        if code:
            assert code == 2
            line = assert_one_error(err)
            assert "is in use by another process" in line or "was just created by another run" in line, line
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["complete"]


def test_a_real_sigkill_during_set_up_then_the_same_command_finishes_the_run(tmp_path):
    run = tmp_path / "run"
    args = ["train", *RUN, "train.epochs=1", f"out.dir={tmp_path}", "out.name=run", "--quiet"]
    proc = reste_popen(*args)
    wait_for(lambda: (run / ".lock").is_file(), proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert run.is_dir() and not (run / "checkpoints" / "last.pt").exists()
    again = subprocess.run(
        [sys.executable, "-m", "reste", *args], capture_output=True, text=True, env=env(), timeout=120
    )
    assert again.returncode == 0, again.stderr
    assert f"note: reusing {run}" in again.stderr and (run / "checkpoints" / "last.pt").is_file()


# ============================================================================ 5. full disk: one line naming the file
def file_size_capped(limit: int):
    def cap():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return cap


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from reste.train import trainer as T

    tmp = tmp_path_factory.mktemp("tiny")
    fx.make_idx_dataset(tmp / "data" / "mnist", n_train=128, n_test=32)
    T.train(
        overrides=[
            *RUN,
            "data.subset=128",
            "data.name=mnist",
            f"data.root={tmp / 'data'}",
            "train.epochs=1",
            f"out.dir={tmp}",
            "out.name=run",
        ],
        progress=False,
    )
    return tmp / "run"


def test_training_onto_a_full_disk_names_the_file_and_leaves_no_temporary_file(tmp_path):
    fx.make_idx_dataset(tmp_path / "data" / "mnist", n_train=128, n_test=32)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "reste",
            "train",
            *RUN,
            "data.subset=128",
            "data.name=mnist",
            f"data.root={tmp_path / 'data'}",
            "train.epochs=1",
            f"out.dir={tmp_path}",
            "out.name=run",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env(),
        timeout=120,
        preexec_fn=file_size_capped(20_000),
    )
    assert proc.returncode == 1
    assert_one_error(
        proc.stderr,
        f"cannot write {tmp_path / 'run' / 'checkpoints' / 'best.pt'}: File too large",
        "files written before it are intact",
    )
    assert not [p.name for p in (tmp_path / "run").rglob("*.tmp")]


def test_run_files_written_onto_a_full_disk_name_the_file_and_leave_no_temporary_file(tmp_path):
    code = (
        "import sys; from pathlib import Path; from reste.train.trainer import RunWriter\n"
        "w = RunWriter(Path(sys.argv[1]), None, True)\n"
        "try:\n"
        "    w.write_metrics([{'epoch': i, 'train_loss': 0.5} for i in range(1000)])\n"
        "except OSError as err:\n"
        "    print(err.filename, err.strerror)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env(),
        timeout=60,
        preexec_fn=file_size_capped(4096),
    )
    assert proc.stdout.strip() == f"{tmp_path / 'metrics.jsonl'} File too large", proc.stderr
    assert not list(tmp_path.glob(".*.tmp"))


def test_export_onto_a_full_disk_is_one_line_with_exit_1(tiny_run, tmp_path):
    out = tmp_path / "model.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "reste", "export", str(tiny_run), "--out", str(out), "--no-verify"],
        capture_output=True,
        text=True,
        env=env(),
        timeout=120,
        preexec_fn=file_size_capped(1000),
    )
    assert proc.returncode == 1
    assert_one_error(proc.stderr, f"cannot write {out}: File too large", "nothing was written")
    assert not list(tmp_path.iterdir())


def test_resume_with_an_edited_non_utf8_config_is_one_line(tiny_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "config.yaml").write_bytes((run / "config.yaml").read_bytes() + b"# \xff\xfe\n")
    code, _, err = run_cli(["train", "--resume", str(run), "train.epochs=2", "--quiet"], capsys)
    assert code == 2
    assert_one_error(err, f"config file {run / 'config.yaml'} is not UTF-8")


# ============================================================================ 6. eval reads only the test set
@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_eval_needs_only_the_test_files(tmp_path, capsys, name):
    from reste.train import trainer as T

    root = tmp_path / "data"
    if name == "mnist":
        fx.make_idx_dataset(root / "mnist", n_train=128, n_test=32)
    else:
        fx.write_cifar_folder(root, "cifar10", per_batch=26, n_test=32)
    T.train(
        overrides=[
            *RUN,
            "data.subset=128",
            f"data.name={name}",
            f"data.root={root}",
            "train.epochs=1",
            f"out.dir={tmp_path}",
            "out.name=run",
        ],
        progress=False,
    )
    gone = [p for p in root.rglob("*") if p.is_file() and ("train" in p.name or "data_batch" in p.name)]
    assert len(gone) == (2 if name == "mnist" else 5)
    for path in gone:  # the training files are gone: eval must not need them
        path.unlink()
    code, out, err = run_cli(["eval", str(tmp_path / "run"), "--full", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["count"] == 32


def test_summary_of_a_config_or_model_too_big_to_build_is_refused_before_allocating(tmp_path):
    config = tmp_path / "wide.yaml"
    config.write_text("model:\n  kwargs: {width: 300}\n")
    code, _, err, seconds = limited(["summary", str(config)])
    assert code == 2, err[-2000:]
    assert_one_error(err, "model.kwargs={'width': 300}", "GiB of parameters and buffers")
    code, _, err, seconds = limited(["summary", "vit_tiny", "--input-size", "3", "100000", "100000"])
    assert code == 2, err[-2000:]
    assert_one_error(err, "vit_tiny with --input-size 3 100000 100000", "GiB of parameters and buffers")
    assert seconds < 30
