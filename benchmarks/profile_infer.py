"""Where the time of a deployed binary model goes: per-module times, end to end (reste.deploy).

Command (the profiles in docs/deploy.md come from it)::

    python benchmarks/profile_infer.py --threads 1 --isa avx2 --json benchmarks/results/profile_avx2.json

For each model (ResNet-20, VGG-small; random weights, calibrated BatchNorms, exported and
loaded like ``reste bench-infer``) and batch (64, 1), in channels-last: the float model's
time, then the deployed model's time at three fusion levels, run alternately in one
process (medians of ``--repeats`` rounds, the order reversed every other round, so load
from other processes hits all alike):

- ``epilogues``: what ``reste.deploy.load`` did before this profile was written (ReLU and
  BatchNorm fused into the conv that precedes them, nothing else);
- ``unchained``: also a BatchNorm into the packing of the binary conv that follows it, and
  residual adds into the conv's output;
- ``all``: everything ``reste.deploy.load`` fuses now: also chains, where a binary conv's
  kernel writes the next binary conv's packed input bits instead of a float output
  (:func:`reste.deploy.fuse.fuse_chains`).

``unchained`` and ``all`` are the same model instance, its chain links removed and put back
between calls: two instances of one model differ by up to ~9% per layer on a shared VM
(where their buffers land), more than chaining changes.

Then hooked passes (``--repeats`` of them, the median per row) attribute the time of
``epilogues`` and ``unchained`` to module types (the packed convs, split into packing the
input and the kernel) and to "outside modules": the arithmetic in the models' own
``forward`` (the residual adds). A hook on a chained conv turns its chain off, so ``all``
has no breakdown. Hooks add a little time of their own; the unhooked totals are the ones
to compare.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from reste import _ext as _loader
from reste import models
from reste.deploy import bench, packed
from reste.deploy.export import export, load
from reste.deploy.fuse import fuse_epilogues


def _deployed(name: str, gen) -> tuple[dict, torch.nn.Module]:
    arch = {"name": name, "num_classes": 10, "in_channels": 3, "precision": "1w1a", "image_size": 32}
    torch.manual_seed(0)
    trained = bench._calibrated(models.create(**arch), 3, 32, gen)
    float_model = bench._calibrated(models.create(**dict(arch, precision="fp")), 3, 32, gen)
    with tempfile.TemporaryDirectory() as tmp:
        path = export(trained, Path(tmp) / f"{name}.safetensors", architecture=arch)
        epilogues = load(path, fuse=False)
        fuse_epilogues(epilogues, residual_adds=False, prologues=False, chains=False)
        fused = load(path)
    cl = torch.channels_last
    epilogues, fused = epilogues.to(memory_format=cl), fused.to(memory_format=cl)
    variants = {"epilogues": epilogues, "unchained": _Chains(fused, False), "all": _Chains(fused, True)}
    return variants, float_model.to(memory_format=cl)


class _Chains(torch.nn.Module):
    """A deployed model run with its chains (fuse_chains' links) on or off."""

    def __init__(self, model: torch.nn.Module, on: bool):
        super().__init__()
        self.model, self.on = model, on
        self.links = {m: m._chain for m in model.modules() if getattr(m, "_chain", None) is not None}

    def forward(self, x):
        for m, link in self.links.items():
            m._chain = link if self.on else None
        return self.model(x)


def _split_kernel_calls():
    """Wrap the extension's pack_rows and conv to add up their time (seconds) per call kind."""
    ext = packed._ext()
    spent = collections.Counter()

    class Timed:
        def __getattr__(self, attr):
            fn = getattr(ext, attr)
            if attr not in ("pack_rows", "conv"):
                return fn

            def timed(*args):
                start = time.perf_counter()
                fn(*args)
                spent[attr] += time.perf_counter() - start

            return timed

    return Timed(), spent


def _hooked_pass(model: torch.nn.Module, x: torch.Tensor, rounds: int) -> dict:
    """Milliseconds per forward by leaf-module type, the kernel parts, and outside modules."""
    per_type: collections.Counter[str] = collections.Counter()
    starts = []
    hooks = []
    for _, module in model.named_modules():
        if next(module.children(), None) is not None:
            continue
        kind = type(module).__name__

        def pre(m, inputs):
            starts.append(time.perf_counter())

        def post(m, inputs, output, kind=kind):
            per_type[kind] += time.perf_counter() - starts.pop()

        hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    timed, spent = _split_kernel_calls()
    real_ext = packed._ext()
    try:
        _loader.BITOPS.module = timed
        with torch.no_grad():
            model(x)
            per_type.clear()
            spent.clear()
            start = time.perf_counter()
            for _ in range(rounds):
                model(x)
            total = (time.perf_counter() - start) / rounds
    finally:
        _loader.BITOPS.module = real_ext
        for h in hooks:
            h.remove()
    out = {"total_hooked_ms": 1e3 * total}
    for kind, sec in per_type.most_common():
        out[kind] = 1e3 * sec / rounds
    if "PackedBinaryConv2d" in out:
        out["  of which packing"] = 1e3 * spent["pack_rows"] / rounds
        out["  of which kernel"] = 1e3 * spent["conv"] / rounds
    out["outside modules"] = out["total_hooked_ms"] - sum(1e3 * s / rounds for s in per_type.values())
    return out


def _hooked(model: torch.nn.Module, x: torch.Tensor, passes: int, rounds: int) -> dict:
    """Per row, the median over ``passes`` hooked passes (a busy machine disturbs single passes)."""
    runs = [_hooked_pass(model, x, rounds) for _ in range(passes)]
    return {key: statistics.median(r.get(key, 0.0) for r in runs) for key in runs[0]}


def profile(names=("resnet20", "vgg_small"), batches=(64, 1), repeats=7) -> dict:
    gen = torch.Generator().manual_seed(0)
    result = {"machine": bench.machine_info(), "repeats": repeats, "models": []}
    for name in names:
        variants, float_model = _deployed(name, gen)
        for batch in batches:
            x = torch.randn(batch, 3, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last)
            runs = {"float": float_model, **variants}
            times: dict[str, list[float]] = {k: [] for k in runs}
            n = 1 if batch > 1 else 20
            with torch.no_grad():
                for fn in runs.values():
                    fn(x)
                for r in range(repeats):
                    for k, fn in list(runs.items())[:: 1 if r % 2 == 0 else -1]:
                        start = time.perf_counter()
                        for _ in range(n):
                            fn(x)
                        times[k].append((time.perf_counter() - start) / n)
            med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            result["models"].append(
                {
                    "model": name,
                    "batch": batch,
                    "median_ms": med,
                    "speedup": {k: med["float"] / med[k] for k in variants},
                    "breakdown_ms": {k: _hooked(variants[k], x, repeats, n) for k in ("epilogues", "unchained")},
                }
            )
    return result


def format_profile(result: dict) -> str:
    m = result["machine"]
    k = m["kernel"]
    lines = [
        f"CPU: {m['cpu']} ({m.get('cpu_family_model')}); kernel path {k['isa']} ({k['why']}); "
        f"{m['torch_threads']} thread(s); load average {m['load_average_1min_at_start']} at start"
    ]
    for r in result["models"]:
        med = r["median_ms"]
        lines += [
            "",
            f"{r['model']}, batch {r['batch']}: float {med['float']:.2f} ms; binary "
            + ", ".join(f"{v} {med[v]:.2f} ms ({r['speedup'][v]:.2f}x)" for v in r["speedup"]),
            "",
            "| ms per forward (hooked) | " + " | ".join(r["breakdown_ms"]) + " |",
            "|---|" + "---:|" * len(r["breakdown_ms"]),
        ]
        rows = list(dict.fromkeys(key for b in r["breakdown_ms"].values() for key in b))
        for row in rows:
            lines.append(
                f"| {row.strip()} | "
                + " | ".join(f"{b[row]:.2f}" if row in b else "-" for b in r["breakdown_ms"].values())
                + " |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch and kernel threads (default 1)")
    parser.add_argument("--isa", default="auto", help="kernel path: auto, portable, avx2, avx512, neon (default auto)")
    parser.add_argument("--repeats", type=int, default=7, help="alternating rounds; medians (default 7)")
    parser.add_argument("--json", help="also write the result as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ext = packed._ext()
    if args.isa != "auto":
        ext.select(args.isa, f"profile_infer.py --isa {args.isa}")
    result = profile(repeats=args.repeats)
    print(format_profile(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
