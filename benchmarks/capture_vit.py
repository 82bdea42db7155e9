"""Capture on the binary ViTs (reste.deploy.capture), whose binary layers are all linear.

Command (the ViT numbers in docs/deploy.md, "Capture: batch-1 latency", come from it)::

    python benchmarks/capture_vit.py --threads 1 --json benchmarks/results/capture_vit_<cpu>_<isa>_t1_<date>.json

For two ViTs (the Fashion-MNIST seed ViT of configs/fashion_mnist/seed_vit.yaml, and ViT-tiny on
CIFAR-sized 32x32 inputs with 4x4 patches; random weights, 1W/1A, exported and loaded like
``reste bench-infer``) and batches 1 and 64: the float model and the deployed binary one, each
eager and captured, timed in the same rounds (``reste.deploy.bench``'s interleaved sampling,
so noise hits all four alike); ratios are medians of the per-round ratios. The captured outputs
are checked to be ``torch.equal`` to the eager ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from reste import models
from reste.deploy import bench, capture, export, load

VITS = {
    "seed_vit (Fashion-MNIST, 28x28, patch 7, dim 96, depth 4)": dict(
        name="vit_tiny", image_size=28, in_channels=1, patch_size=7, dim=96, depth=4, heads=3, mlp_dim=192
    ),
    "vit_tiny (32x32, patch 4, dim 192, depth 12)": dict(name="vit_tiny", image_size=32, in_channels=3, patch_size=4),
}


@torch.no_grad()
def run(batches=(1, 64), repeats=7, min_sample_s=0.2) -> list[dict]:
    rows = []
    for label, arch in VITS.items():
        arch = {"num_classes": 10, "precision": "1w1a", **arch}
        torch.manual_seed(0)
        trained = models.create(**arch).eval()
        float_model = models.create(**dict(arch, precision="fp")).eval()
        with tempfile.TemporaryDirectory() as tmp:
            deployed = load(export(trained, Path(tmp) / "vit.safetensors", architecture=arch))
        for b in batches:
            x = torch.randn(b, arch["in_channels"], arch["image_size"], arch["image_size"])
            cap_float, cap_bin = capture(float_model, x), capture(deployed, x)
            exact = bool(torch.equal(cap_bin(x), deployed(x)) and torch.equal(cap_float(x), float_model(x)))
            tf, tb, tcf, tcb = bench._interleaved(
                [lambda m=m: m(x) for m in (float_model, deployed, cap_float, cap_bin)], repeats, min_sample_s
            )
            rows.append(
                {
                    "model": label,
                    "batch": b,
                    "float_ms": 1e3 * statistics.median(tf),
                    "binary_ms": 1e3 * statistics.median(tb),
                    "captured_float_ms": 1e3 * statistics.median(tcf),
                    "captured_binary_ms": 1e3 * statistics.median(tcb),
                    "eager_speedup": bench._ratio(tf, tb),
                    "captured_speedup": bench._ratio(tcf, tcb),
                    "binary_gain": bench._ratio(tb, tcb),
                    "exact": exact,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, help="write the machine and the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = bench.machine_info()
    rows = run(repeats=args.repeats)
    print(
        f"CPU: {machine['cpu']} ({machine.get('cpu_family_model')}), kernel {machine['kernel']['isa']}, "
        f"{args.threads} thread(s), medians of {args.repeats} interleaved rounds"
    )
    print(
        "| model | batch | float ms | binary ms | speedup | captured float ms | captured binary ms | speedup | "
        "binary gain | exact |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['batch']} | {r['float_ms']:.2f} | {r['binary_ms']:.2f} | {r['eager_speedup']:.2f}x | "
            f"{r['captured_float_ms']:.2f} | {r['captured_binary_ms']:.2f} | {r['captured_speedup']:.2f}x | "
            f"{r['binary_gain']:.2f}x | {'yes' if r['exact'] else 'NO'} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"machine": machine, "threads": args.threads, "repeats": args.repeats, "rows": rows}, indent=1)
        )
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
