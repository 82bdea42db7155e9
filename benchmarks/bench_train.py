"""Train-step speed and memory of binary networks against their float twins.

Command (the numbers in docs/benchmarks.md come from it)::

    python benchmarks/bench_train.py --out benchmarks/results/train_cpu.json
    python benchmarks/bench_train.py --device cuda --out benchmarks/results/train_cuda.json

What it measures, in one process:

- train-step throughput (images/s: forward, cross-entropy, backward, SGD step) of
  binary ResNet-20 (1W/1A, ReSTE, o = 3) against the float ResNet-20 of the same
  architecture, batch 128 at 32x32x3, eager and with ``torch.compile``; the same for
  VGG-small. Binary and float steps alternate, round after round, and the ratio is
  the median of the per-round ratios, so machine noise (other processes, frequency
  changes) hits both sides alike;
- the estimator alone: forward + backward of ReSTE against a bare clipped STE
  (sign forward, ``|z| <= 1`` mask backward, plain PyTorch) on 2M elements;
- memory: the bytes autograd saves for backward in one step (exact, counted with
  saved-tensor hooks over unique storages), and the peak resident memory of a
  separate process running the steps (``--rss``, CPU only).

It prints a table and writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import reste
from reste import ops


def make_model(name: str, precision: str, device: str, channels_last: bool):
    torch.manual_seed(0)
    model = reste.models.create(name, num_classes=10, in_channels=3, precision=precision, image_size=32)
    if precision != "fp":
        reste.set_params(model, o=3.0)  # mid-training-like gradients, not the o = 1 identity
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.train()


class Stepper:
    """One model with its optimizer and a fixed batch; ``step()`` runs one training step."""

    def __init__(self, name, precision, device, batch, compile_, channels_last):
        self.model = make_model(name, precision, device, channels_last)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
        if channels_last:
            self.x = self.x.to(memory_format=torch.channels_last)
        self.y = torch.randint(0, 10, (batch,), generator=g).to(device)
        self.device = device
        self.fn = self._step
        if compile_:
            self.fn = torch.compile(self._step)

    def _step(self):
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        return loss

    def step(self) -> float:
        t0 = time.perf_counter()
        self.fn()
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def alternate(a: Stepper, b: Stepper, rounds: int, steps: int, warmup: int) -> dict:
    """Alternate a and b; return median images/s of each and the median per-round ratio a/b."""
    for _ in range(warmup):
        a.step()
        b.step()
    rates_a, rates_b, ratios = [], [], []
    batch = a.x.shape[0]
    for _ in range(rounds):
        ta = sum(a.step() for _ in range(steps))
        tb = sum(b.step() for _ in range(steps))
        rates_a.append(batch * steps / ta)
        rates_b.append(batch * steps / tb)
        ratios.append((batch * steps / ta) / (batch * steps / tb))
    return {
        "binary_img_s": statistics.median(rates_a),
        "float_img_s": statistics.median(rates_b),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }


def saved_bytes(stepper: Stepper) -> int:
    """Bytes of the unique storages autograd keeps for backward during one forward."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(stepper.model(stepper.x), stepper.y)
    loss.backward()
    stepper.opt.zero_grad(set_to_none=True)
    return sum(seen.values())


def rss_peak_mib(name, precision, batch, channels_last) -> float:
    """Peak RSS growth of a fresh process running 5 steps (CPU)."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import resource,sys,torch;sys.path.insert(0,{here!r});import bench_train as b;"
        f"s=b.Stepper({name!r},{precision!r},'cpu',{int(batch)},False,{channels_last!r});"
        "base=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        "[s.step() for _ in range(5)];"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss-base)/1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench_estimator(device: str, n: int = 2_000_000, rounds: int = 30) -> dict:
    class BareClippedSTE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z):
            ctx.save_for_backward(z)
            return torch.sign(z)

        @staticmethod
        def backward(ctx, g):
            (z,) = ctx.saved_tensors
            return g * (z.abs() <= 1)

    est = reste.estimator("reste", o=3.0).to(device)
    z = torch.randn(n, device=device, requires_grad=True)
    grad = torch.randn(n, device=device)

    def run(f):
        t0 = time.perf_counter()
        f(z).backward(grad)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(5):
        run(est)
        run(BareClippedSTE.apply)
    r, c = [], []
    for _ in range(rounds):
        r.append(run(est))
        c.append(run(BareClippedSTE.apply))
    ratios = [a / b for a, b in zip(r, c)]
    return {
        "reste_ms": statistics.median(r) * 1e3,
        "clipped_ste_ms": statistics.median(c) * 1e3,
        "ratio": statistics.median(ratios),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="steps per model per round")
    parser.add_argument("--models", default="resnet20,vgg_small")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--rss", action="store_true", help="also measure peak RSS in subprocesses (CPU)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    results = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": args.device,
            "kernels": ops.kernels_enabled(),
        },
        "command": "python benchmarks/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "train_step": [],
    }
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, compiled kernels: "
        f"{ops.kernels_enabled()}"
    )
    est = bench_estimator(args.device)
    results["estimator"] = est
    print(
        f"estimator fwd+bwd, 2M elements: ReSTE {est['reste_ms']:.2f} ms, bare clipped STE "
        f"{est['clipped_ste_ms']:.2f} ms, ratio {est['ratio']:.2f}x"
    )

    header = (
        f"{'model':<10} {'mode':<9} {'binary img/s':>12} {'float img/s':>12} {'ratio':>6} "
        f"{'(min-max)':>12} {'saved MiB b/f':>15}"
    )
    print(header)
    for name in args.models.split(","):
        for mode in args.modes.split(","):
            compiled = mode == "compiled"
            binary = Stepper(name, "1w1a", args.device, args.batch, compiled, args.channels_last)
            flt = Stepper(name, "fp", args.device, args.batch, compiled, args.channels_last)
            row = {"model": name, "mode": mode, "batch": args.batch, "channels_last": args.channels_last}
            row.update(alternate(binary, flt, args.rounds, args.steps, warmup=3 if compiled else 2))
            if not compiled:
                row["saved_mib_binary"] = saved_bytes(binary) / 2**20
                row["saved_mib_float"] = saved_bytes(flt) / 2**20
                row["saved_ratio"] = row["saved_mib_binary"] / row["saved_mib_float"]
                if args.rss and args.device == "cpu":
                    row["rss_peak_mib_binary"] = rss_peak_mib(name, "1w1a", args.batch, args.channels_last)
                    row["rss_peak_mib_float"] = rss_peak_mib(name, "fp", args.batch, args.channels_last)
            if args.device == "cuda":
                for label, s in (("binary", binary), ("float", flt)):
                    torch.cuda.reset_peak_memory_stats()
                    s.step()
                    row[f"cuda_peak_mib_{label}"] = torch.cuda.max_memory_allocated() / 2**20
            results["train_step"].append(row)
            saved = f"{row['saved_mib_binary']:.0f}/{row['saved_mib_float']:.0f}" if "saved_mib_binary" in row else "-"
            print(
                f"{name:<10} {mode:<9} {row['binary_img_s']:>12.1f} {row['float_img_s']:>12.1f} {row['ratio']:>6.3f} "
                f"{row['ratio_min']:>5.2f}-{row['ratio_max']:<5.2f} {saved:>15}",
                flush=True,
            )
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
