"""Peak memory (max RSS) of `reste` fed hostile input, against the same command on good input.

Run: python benchmarks/hostile_memory.py  (writes its files under a temporary folder; docs/reliability.md
quotes the numbers). Each case runs in a child process; the peak is the child's ru_maxrss.
"""

import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import data_fixtures as fx  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")


def peak(args: list[str]) -> tuple[int, float, float]:
    """(exit code, peak RSS in MiB, seconds) of `python -m reste ARGS`."""
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "reste", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc.stderr.close()
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024, time.monotonic() - start


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    laughs = "\n".join(
        ["    l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
        + [f"    l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * 10)}]" for k in range(1, 9)]
    )
    (tmp / "laughs.yaml").write_text(f"model:\n  kwargs:\n{laughs}\n")
    (tmp / "good.yaml").write_text("model:\n  kwargs: {width: 0.5}\n")
    fx.make_idx_dataset(tmp / "data" / "mnist", n_train=64, n_test=16)
    good_data = [
        "data.name=mnist",
        f"data.root={tmp / 'data'}",
        "data.download=false",
        "train.device=cpu",
        "train.threads=1",
        "data.subset=64",
        "data.batch_size=64",
        "train.epochs=1",
        "model.kwargs={width: 0.25}",
        "analysis.indicators=false",
    ]
    block = gzip.compress(b"\0" * (16 << 20), compresslevel=9)
    (tmp / "bomb" / "mnist").mkdir(parents=True)
    for f in (tmp / "data" / "mnist").iterdir():
        (tmp / "bomb" / "mnist" / f.name).write_bytes(f.read_bytes())
    header = bytes.fromhex("00000803") + (64).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (tmp / "bomb" / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header) + block * 256)  # 4 GiB
    bomb_data = [a.replace(str(tmp / "data"), str(tmp / "bomb")) for a in good_data]

    from safetensors import safe_open
    from safetensors.torch import save_file

    from reste import models
    from reste.deploy import export

    arch = {
        "name": "resnet20",
        "num_classes": 10,
        "in_channels": 1,
        "precision": "1w1a",
        "estimator": "reste",
        "image_size": 28,
        "kwargs": {"width": 0.25},
    }
    good = tmp / "good.safetensors"
    export(
        models.create("resnet20", num_classes=10, in_channels=1, precision="1w1a", image_size=28, width=0.25),
        good,
        architecture=arch,
    )
    with safe_open(str(good), framework="pt") as f:
        meta, blobs = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    bad = {}
    for label, change in (
        ("width 300", {"kwargs": {"width": 300}}),
        ("num_classes 1e9", {"num_classes": 10**9}),
        ("vit_tiny image_size 1e5", {"name": "vit_tiny", "image_size": 10**5, "kwargs": {}}),
    ):
        graph = json.loads(meta["graph"])
        graph["architecture"].update(change)
        bad[label] = tmp / f"{label.replace(' ', '_')}.safetensors"
        save_file(blobs, str(bad[label]), metadata=dict(meta, graph=json.dumps(graph)))

    cases = [
        ("config, good (--print-config)", ["train", str(tmp / "good.yaml"), "--print-config"]),
        ("config, billion laughs 10^9 values (--print-config)", ["train", str(tmp / "laughs.yaml"), "--print-config"]),
        ("train set-up, good 64-image IDX (1 epoch)", ["train", *good_data, f"out.dir={tmp / 'runs'}", "--quiet"]),
        (
            "train, gzip bomb: 64-image header, 4 GiB of zeros",
            ["train", *bomb_data, f"out.dir={tmp / 'runs'}", "--quiet"],
        ),
        ("summary, good export", ["summary", str(good)]),
        *[(f"summary, export edited to {label}", ["summary", str(path)]) for label, path in bad.items()],
    ]
    for label, args in cases:
        code, mib, seconds = peak(args)
        print(f"| {label} | {code} | {mib:.0f} MiB | {seconds:.1f} s |")


if __name__ == "__main__":
    main()
