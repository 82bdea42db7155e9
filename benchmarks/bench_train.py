"""Train-step speed and memory of binary networks against their float twins.

Command (the numbers in docs/benchmarks.md come from it)::

    python benchmarks/bench_train.py --out benchmarks/results/train_cpu.json
    python benchmarks/bench_train.py --device cuda --out benchmarks/results/train_cuda.json
    python benchmarks/bench_train.py --device cuda --models resnet20,vgg_small,resnet18:256 \
        --modes eager,compiled,reduce-overhead --triton on,off --out ...   # issue 17's targets
    python benchmarks/bench_train.py --device cpu --quick          # a smoke run of every code path

What it measures, in one process:

- train-step throughput (images/s: forward, cross-entropy, backward, SGD step) of
  binary ResNet-20 (1W/1A, ReSTE, o = 3) against the float ResNet-20 of the same
  architecture, batch 128 at 32x32x3, eager and with ``torch.compile``; the same for
  VGG-small; ``resnet18`` is the ImageNet ResNet-18 at 224x224, 1000 classes
  (``--models resnet18:256`` for batch 256; synthetic data). Binary and float steps alternate,
  round after round, and the ratio is the median of the per-round ratios, so machine noise
  (other processes, frequency changes) hits both sides alike. Modes: ``eager``, ``compiled``
  (``torch.compile`` of the step) and ``reduce-overhead`` (the same with CUDA graphs; CUDA
  only). ``--triton on,off`` repeats the eager rows with reste's Triton kernels (CUDA) on and
  off (compiled graphs trace the PyTorch formulas either way);
- the estimator alone: forward + backward of ReSTE against a bare clipped STE
  (sign forward, ``|z| <= 1`` mask backward, plain PyTorch) on 2M elements (per ``--triton``
  setting);
- memory: the bytes autograd saves for backward in one step (exact, counted with
  saved-tensor hooks over unique storages), the peak CUDA memory of one step
  (``torch.cuda.max_memory_allocated``) and the peak resident memory of a separate
  process running the steps (``--rss``, CPU only).

It prints a table and writes it as JSON, with issue 17's targets checked (``targets``: each
with the measured value, the bound and whether it is met; they are GPU targets, so they are
judged on CUDA only). ``--quick`` (batch 4, one round of one step, 200k estimator elements) only
checks that every path runs: its numbers mean nothing.
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

#: model -> (image size, classes): the CIFAR-shaped models and the ImageNet ResNet-18
SHAPES = {"resnet20": (32, 10), "vgg_small": (32, 10), "resnet18": (224, 1000)}
#: issue 17's GPU targets: (model, mode) -> the least binary/float throughput ratio at the batch given
THROUGHPUT_TARGETS = {
    ("resnet20", "eager", 128): 0.8,
    ("resnet20", "compiled", 128): 0.95,
    ("vgg_small", "eager", 128): 0.8,
    ("vgg_small", "compiled", 128): 0.95,
    ("resnet18", "eager", 256): 0.95,
}
PEAK_MEMORY_TARGET = 1.1  # binary / float peak CUDA memory, at most
ESTIMATOR_TARGET = 1.5  # ReSTE fwd+bwd / bare clipped STE, at most


def shape_of(name: str) -> tuple[int, int]:
    return SHAPES.get(name, (32, 10))


def make_model(name: str, precision: str, device: str, channels_last: bool):
    torch.manual_seed(0)
    size, classes = shape_of(name)
    model = reste.models.create(name, num_classes=classes, in_channels=3, precision=precision, image_size=size)
    if precision != "fp":
        reste.set_params(model, o=3.0)  # mid-training-like gradients, not the o = 1 identity
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.train()


class Stepper:
    """One model with its optimizer and a fixed batch; ``step()`` runs one training step."""

    def __init__(self, name, precision, device, batch, compile_, channels_last):
        """``compile_``: False (eager), True or "compiled" (``torch.compile``), or "reduce-overhead"."""
        self.model = make_model(name, precision, device, channels_last)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        size, classes = shape_of(name)
        self.x = torch.randn(batch, 3, size, size, generator=g).to(device)
        if channels_last:
            self.x = self.x.to(memory_format=torch.channels_last)
        self.y = torch.randint(0, classes, (batch,), generator=g).to(device)
        self.device = device
        self.fn = self._step
        self.graphs = compile_ == "reduce-overhead"
        if compile_:
            self.fn = torch.compile(self._step, mode="reduce-overhead" if self.graphs else None)

    def _step(self):
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        return loss

    def step(self) -> float:
        t0 = time.perf_counter()
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
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
    """ReSTE (o = 3) forward + backward against a bare clipped STE on ``n`` elements, with reste's
    kernels as currently switched (:func:`reste.ops.kernel_info`)."""

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
        "elements": n,
        "path": ops.kernel_info(device)["path"],
        "reste_ms": statistics.median(r) * 1e3,
        "clipped_ste_ms": statistics.median(c) * 1e3,
        "ratio": statistics.median(ratios),
    }


def check_targets(results: dict) -> list[dict]:
    """Issue 17's targets against the rows measured (CUDA only: they are GPU targets)."""
    if results["machine"]["device"] != "cuda":
        return []
    out = []
    for row in results["train_step"]:
        key = (row["model"], row["mode"], row["batch"])
        if key in THROUGHPUT_TARGETS and row.get("triton", True):
            bound = THROUGHPUT_TARGETS[key]
            out.append(
                {
                    "what": f"{row['model']} {row['mode']} batch {row['batch']} binary/float throughput",
                    "value": row["ratio"],
                    "at_least": bound,
                    "met": row["ratio"] >= bound,
                }
            )
        if "cuda_peak_ratio" in row and row.get("triton", True):
            out.append(
                {
                    "what": f"{row['model']} {row['mode']} batch {row['batch']} peak memory binary/float",
                    "value": row["cuda_peak_ratio"],
                    "at_most": PEAK_MEMORY_TARGET,
                    "met": row["cuda_peak_ratio"] <= PEAK_MEMORY_TARGET,
                }
            )
    for est in results["estimator"]:
        if est.get("triton", True):
            out.append(
                {
                    "what": f"estimator fwd+bwd {est['elements']} elements, ReSTE/bare clipped STE ({est['path']})",
                    "value": est["ratio"],
                    "at_most": ESTIMATOR_TARGET,
                    "met": est["ratio"] <= ESTIMATOR_TARGET,
                }
            )
    return out


def parse_models(text: str, batch: int) -> list[tuple[str, int]]:
    """``"resnet20,resnet18:256"`` -> ``[("resnet20", batch), ("resnet18", 256)]``."""
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, b = item.partition(":")
        out.append((name, int(b) if b else batch))
    return out


def bench_pair(name, batch, mode, args) -> dict:
    """One row: binary against float ``name`` at ``batch`` in ``mode``, with reste's kernels as switched."""
    compiled = mode != "eager"
    compile_arg = mode if mode == "reduce-overhead" else compiled
    binary = Stepper(name, "1w1a", args.device, batch, compile_arg, args.channels_last)
    flt = Stepper(name, "fp", args.device, batch, compile_arg, args.channels_last)
    row = {"model": name, "mode": mode, "batch": batch, "channels_last": args.channels_last}
    if args.device == "cuda":
        row["triton"] = ops.triton_enabled()
        row["path"] = ops.kernel_info("cuda")["path"]
    t0 = time.perf_counter()
    binary.step()
    row["first_step_s_binary"] = time.perf_counter() - t0  # compilation included when compiled
    t0 = time.perf_counter()
    flt.step()
    row["first_step_s_float"] = time.perf_counter() - t0
    warmup = 0 if args.quick else (2 if compiled else 1)
    row.update(alternate(binary, flt, args.rounds, args.steps, warmup=warmup))
    if not compiled:
        row["saved_mib_binary"] = saved_bytes(binary) / 2**20
        row["saved_mib_float"] = saved_bytes(flt) / 2**20
        row["saved_ratio"] = row["saved_mib_binary"] / row["saved_mib_float"]
        if args.rss and args.device == "cpu":
            row["rss_peak_mib_binary"] = rss_peak_mib(name, "1w1a", batch, args.channels_last)
            row["rss_peak_mib_float"] = rss_peak_mib(name, "fp", batch, args.channels_last)
    if args.device == "cuda":
        for label, stepper in (("binary", binary), ("float", flt)):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            stepper.step()
            row[f"cuda_peak_mib_{label}"] = torch.cuda.max_memory_allocated() / 2**20
        row["cuda_peak_ratio"] = row["cuda_peak_mib_binary"] / row["cuda_peak_mib_float"]
    del binary, flt
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=128, help="batch of the models given without :BATCH")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="steps per model per round")
    parser.add_argument(
        "--models",
        default="resnet20,vgg_small",
        help="comma-separated, NAME or NAME:BATCH (resnet18:256 is ImageNet's)",
    )
    parser.add_argument("--modes", default="eager,compiled", help="eager, compiled, reduce-overhead (CUDA graphs)")
    parser.add_argument(
        "--triton",
        default="on",
        help="on, off or on,off: reste's Triton kernels (CUDA) for the eager rows and the estimator",
    )
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--rss", action="store_true", help="also measure peak RSS in subprocesses (CPU)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: batch 4, 1 round of 1 step (numbers meaningless)"
    )
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = parse_models(args.models, args.batch)
    triton_settings = [part.strip() == "on" for part in args.triton.split(",") if part.strip()]
    if args.quick:
        args.rounds, args.steps = 1, 1
        models = [(name, 4) for name, _ in models]
    if "reduce-overhead" in args.modes.split(",") and args.device != "cuda":
        parser.error("--modes reduce-overhead needs --device cuda (CUDA graphs)")

    info = ops.kernel_info(args.device)
    results = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
            "kernels": ops.kernels_enabled(),
            "kernel_path": info["path"],
            "kernel_info": info,
            "date": time.strftime("%Y-%m-%d"),
        },
        "quick": args.quick,
        "command": "python benchmarks/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "train_step": [],
        "estimator": [],
    }
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}: {info['why']}"
        + (" (QUICK smoke run: the numbers mean nothing)" if args.quick else "")
    )
    previous = ops.triton_enabled()
    for triton_on in triton_settings:
        if args.device == "cuda":
            ops.set_triton_enabled(triton_on)
        est = bench_estimator(args.device, n=200_000 if args.quick else 2_000_000, rounds=3 if args.quick else 30)
        est["triton"] = ops.triton_enabled() if args.device == "cuda" else None
        results["estimator"].append(est)
        print(
            f"estimator fwd+bwd, {est['elements']:,} elements ({est['path']}): ReSTE {est['reste_ms']:.3f} ms, "
            f"bare clipped STE {est['clipped_ste_ms']:.3f} ms, ratio {est['ratio']:.2f}x"
        )
        if args.device != "cuda":
            break  # the Triton setting changes nothing off CUDA

    header = (
        f"{'model':<10} {'batch':>5} {'mode':<15} {'kernels':<7} {'binary img/s':>12} {'float img/s':>12} "
        f"{'ratio':>6} {'(min-max)':>12} {'1st step s b/f':>15} {'saved MiB b/f':>14} {'peak MiB b/f':>14}"
    )
    print(header)
    for name, batch in models:
        for mode in args.modes.split(","):
            for triton_on in triton_settings if mode == "eager" else triton_settings[:1]:
                if args.device == "cuda":
                    ops.set_triton_enabled(triton_on if mode == "eager" else previous)
                row = bench_pair(name, batch, mode, args)
                results["train_step"].append(row)
                saved = (
                    f"{row['saved_mib_binary']:.0f}/{row['saved_mib_float']:.0f}" if "saved_mib_binary" in row else "-"
                )
                peak = (
                    f"{row['cuda_peak_mib_binary']:.0f}/{row['cuda_peak_mib_float']:.0f}"
                    if "cuda_peak_mib_binary" in row
                    else "-"
                )
                first = f"{row['first_step_s_binary']:.1f}/{row['first_step_s_float']:.1f}"
                kernels = row.get("path", info["path"]) if mode == "eager" else "traced"
                print(
                    f"{name:<10} {batch:>5} {mode:<15} {kernels:<7} {row['binary_img_s']:>12.1f} "
                    f"{row['float_img_s']:>12.1f} {row['ratio']:>6.3f} "
                    f"{row['ratio_min']:>5.2f}-{row['ratio_max']:<5.2f} "
                    f"{first:>15} {saved:>14} {peak:>14}",
                    flush=True,
                )
    if args.device == "cuda":
        ops.set_triton_enabled(previous)
    results["targets"] = check_targets(results)
    for target in results["targets"]:
        bound = f">= {target['at_least']}" if "at_least" in target else f"<= {target['at_most']}"
        print(f"target {target['what']}: {target['value']:.3f} ({bound}) {'met' if target['met'] else 'NOT met'}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
