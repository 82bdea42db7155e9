"""Inference benchmark: bit-packed binary layers vs PyTorch float, same shapes, same threads.

``reste bench-infer`` / ``benchmarks/bench_infer.py`` run :func:`run` and print
:func:`format_report`. Three parts:

- ``conv``: one 3x3 convolution of each VGG-small and ResNet-20 shape, the packed
  binary layer against ``F.conv2d`` on float weights, batch 1 and 64;
- ``e2e``: whole binary VGG-small and ResNet-20 (``reste.deploy.load`` of an exported
  model, fused) against the same architecture in float, batch 1 and 64;
- ``sizes``: exported file vs the float model's checkpoint.

Float and binary samples alternate, round after round (each sample long enough to be
measured, >= ``min_sample_s``, after warm-up); reported are the median times and the
median of the per-round ratios, so noise from other processes hits both sides alike.
Float runs in NCHW or channels-last, whichever a first measurement finds faster, so the
baseline is the best PyTorch offers here. Binary outputs are checked against the
PyTorch reference before being timed.

Each result names the CPU (model name and the vector extensions it has) and the kernel
path that ran (``isa``, and ``why``: picked automatically or forced). ``run(isa=...)``
forces a path, ``isas="all"`` in :func:`run_isas` measures every path this CPU supports,
one result each: a forced path is not what this CPU would run by default (``best_isa``
says what would), and a forced ``avx2`` on an AVX-512 CPU is not an AVX2-only CPU (the
float side, for one, still uses AVX-512).
"""

from __future__ import annotations

import copy
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = [
    "VGG_SMALL_SHAPES",
    "RESNET20_SHAPES",
    "run",
    "run_isas",
    "format_report",
    "machine_info",
    "default_json_path",
    "isa_names",
    "check_arguments",
    "main",
]

#: (in_channels, out_channels, input size, stride) of the binary 3x3 convs of VGG-small on 32x32
VGG_SMALL_SHAPES = ((128, 128, 32, 1), (128, 256, 16, 1), (256, 256, 16, 1), (256, 512, 8, 1), (512, 512, 8, 1))
#: ... and of ResNet-20 (stage 1 at 32x32, the stride-2 transitions, stages 2 and 3)
RESNET20_SHAPES = ((16, 16, 32, 1), (16, 32, 32, 2), (32, 32, 16, 1), (32, 64, 16, 2), (64, 64, 8, 1))


def _cpu() -> tuple[str, list[str], str | None]:
    """(model name, the kernel-relevant flags it has, cpu family/model): :func:`reste._platform.cpu`."""
    from .._platform import cpu

    return cpu()


def machine_info() -> dict:
    """CPU, threads, kernel path and software versions the numbers were measured with."""
    from .. import __version__
    from .packed import kernel_info

    cpu, flags, family = _cpu()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    k = kernel_info()
    return {
        "cpu": cpu,
        "cpu_family_model": family,
        "cpu_flags": flags,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "reste": __version__,
        "kernel": k,
        "best_isa": k["available"][0] if k["available"] else None,
        # the float side's vector code: ATen's (ATEN_CPU_CAPABILITY can lower it) and oneDNN's
        # convolutions (ONEDNN_MAX_CPU_ISA can cap them), to emulate a CPU with less
        "float_isa": {
            "aten": torch.backends.cpu.get_cpu_capability(),
            "onednn_max": os.environ.get("ONEDNN_MAX_CPU_ISA") or "unrestricted",
        },
        "load_average_1min_at_start": round(load[0], 2) if load else None,
    }


def _median_time(fn, repeats: int, min_sample_s: float) -> float:
    """Median seconds per call over ``repeats`` samples of ``n`` calls each (n sized by a warm-up)."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-6)
    n = max(1, int(min_sample_s / once))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - start) / n)
    return statistics.median(samples)


def _faster(options: dict, min_sample_s: float):
    """(name, fn) of the fastest of ``options`` (name -> fn), by a short median."""
    times = {name: _median_time(fn, 3, min_sample_s / 2) for name, fn in options.items()}
    name = min(times, key=lambda n: times[n])
    return name, options[name]


def _interleaved(fns, repeats: int, min_sample_s: float) -> list[list[float]]:
    """Seconds per call of each of ``fns``, sampled in turn: ``repeats`` rounds, each timing every
    function once (``n`` calls, sized by a warm-up), so noise hits all of them alike."""
    counts = []
    for fn in fns:
        fn()
        start = time.perf_counter()
        fn()
        counts.append(max(1, int(min_sample_s / max(time.perf_counter() - start, 1e-6))))
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, n, out in zip(fns, counts, times):
            start = time.perf_counter()
            for _ in range(n):
                fn()
            out.append((time.perf_counter() - start) / n)
    return times


def _ratio(numerator: list[float], denominator: list[float]) -> float:
    """The median of the per-round ratios (each round's samples were taken side by side)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def _paired(fn_float, fn_binary, repeats: int, min_sample_s: float) -> tuple[float, float, float]:
    """Alternating samples: (median float s, median binary s, median per-round float/binary ratio)."""
    tf, tb = _interleaved((fn_float, fn_binary), repeats, min_sample_s)
    return statistics.median(tf), statistics.median(tb), _ratio(tf, tb)


@torch.no_grad()
def bench_conv(shapes, batches=(1, 64), repeats=7, min_sample_s=0.05, seed=0) -> list[dict]:
    """Packed binary 3x3 conv vs float ``F.conv2d`` for each ``(cin, cout, size, stride)``."""
    from ..nn import BinaryConv2d
    from .packed import PackedBinaryConv2d

    gen = torch.Generator().manual_seed(seed)
    rows = []
    for cin, cout, size, stride in shapes:
        trained = BinaryConv2d(cin, cout, 3, stride, 1, bias=False).eval()
        layer = PackedBinaryConv2d.from_binary(trained)
        w = torch.randn(cout, cin, 3, 3, generator=gen)
        w_cl = w.contiguous(memory_format=torch.channels_last)
        for batch in batches:
            x = torch.randn(batch, cin, size, size, generator=gen)
            x_cl = x.contiguous(memory_format=torch.channels_last)
            out = layer(x_cl)
            exact = torch.equal(out, layer.reference_forward(x_cl))
            layout, run_float = _faster(
                {
                    "nchw": lambda: F.conv2d(x, w, None, stride, 1),
                    "channels_last": lambda: F.conv2d(x_cl, w_cl, None, stride, 1),
                },
                min_sample_s,
            )
            t_float, t_bin, ratio = _paired(run_float, lambda: layer(x_cl), repeats, min_sample_s)
            out_size = out.shape[-1]
            macs = batch * cout * out_size * out_size * cin * 9
            rows.append(
                {
                    "shape": f"{cin}->{cout} {size}x{size}" + (f" /{stride}" if stride > 1 else ""),
                    "cin": cin,
                    "cout": cout,
                    "size": size,
                    "stride": stride,
                    "batch": batch,
                    "float_ms": 1e3 * t_float,
                    "float_layout": layout,
                    "binary_ms": 1e3 * t_bin,
                    "speedup": ratio,
                    "exact": exact,
                    "float_gmacs": macs / t_float / 1e9,
                    "binary_gmacs": macs / t_bin / 1e9,
                }
            )
    return rows


def _calibrated(model: torch.nn.Module, in_channels: int, size: int, gen) -> torch.nn.Module:
    # a few train-mode passes give the batch norms realistic statistics
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(32, in_channels, size, size, generator=gen))
    return model.eval()


def _file_size(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getbuffer().nbytes


@torch.no_grad()
def bench_models(
    names=("vgg_small", "resnet20"), batch=64, repeats=7, min_sample_s=0.2, seed=0, batches=None
) -> tuple[list[dict], list[dict]]:
    """End-to-end binary (exported + loaded) vs float models, and file sizes."""
    from .. import models
    from .export import export, load
    from .fuse import fuse_chains
    from .replay import capture

    gen = torch.Generator().manual_seed(seed)
    e2e, sizes = [], []
    for name in names:
        arch = {"name": name, "num_classes": 10, "in_channels": 3, "precision": "1w1a", "image_size": 32}
        torch.manual_seed(seed)
        trained = _calibrated(models.create(**arch), 3, 32, gen)
        float_model = _calibrated(models.create(**dict(arch, precision="fp")), 3, 32, gen)
        with tempfile.TemporaryDirectory() as tmp:
            path = export(trained, Path(tmp) / f"{name}.safetensors", architecture=arch)
            exported_bytes = path.stat().st_size
            deployed = load(path)
        # (Module.to's memory_format is missing from torch's stubs)
        float_cl = copy.deepcopy(float_model).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        deployed_cl = copy.deepcopy(deployed).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        fuse_chains(deployed_cl)  # a copy drops the chain links (see fuse_chains): the same model as `deployed`
        for b in batches or (batch,):
            x = torch.randn(b, 3, 32, 32, generator=gen)
            x_cl = x.contiguous(memory_format=torch.channels_last)
            max_diff = (deployed(x) - trained(x)).abs().max().item()
            layout, run_float = _faster(
                {"nchw": lambda: float_model(x), "channels_last": lambda: float_cl(x_cl)}, min_sample_s
            )
            bin_layout, run_bin = _faster(
                {"nchw": lambda: deployed(x), "channels_last": lambda: deployed_cl(x_cl)}, min_sample_s
            )
            # both sides also captured (reste.deploy.capture: no per-module Python), each in its faster
            # layout: the channels-last option captures the channels-last copy, as the eager side runs it
            cap_float, cap_float_cl = capture(float_model), capture(float_cl)
            cap_bin, cap_bin_cl = capture(deployed), capture(deployed_cl)
            cf_layout, run_cf = _faster(
                {"nchw": lambda: cap_float(x), "channels_last": lambda: cap_float_cl(x_cl)}, min_sample_s
            )
            cb_layout, run_cb = _faster(
                {"nchw": lambda: cap_bin(x), "channels_last": lambda: cap_bin_cl(x_cl)}, min_sample_s
            )
            # all four in each round: every ratio below compares samples taken side by side
            tf, tb, tcf, tcb = _interleaved((run_float, run_bin, run_cf, run_cb), repeats, min_sample_s)
            t_float, t_bin, ratio = statistics.median(tf), statistics.median(tb), _ratio(tf, tb)
            captured = {
                "float_ms": 1e3 * statistics.median(tcf),
                "float_layout": cf_layout,
                "binary_ms": 1e3 * statistics.median(tcb),
                "binary_layout": cb_layout,
                "speedup": _ratio(tcf, tcb),
                "binary_gain": _ratio(tb, tcb),
                "float_gain": _ratio(tf, tcf),
                "exact": bool(
                    torch.equal(cap_bin(x), deployed(x))
                    and torch.equal(cap_float(x), float_model(x))
                    and torch.equal(cap_bin_cl(x_cl), deployed_cl(x_cl))
                    and torch.equal(cap_float_cl(x_cl), float_cl(x_cl))
                ),
            }
            e2e.append(
                {
                    "model": name,
                    "batch": b,
                    "float_ms": 1e3 * t_float,
                    "float_layout": layout,
                    "binary_ms": 1e3 * t_bin,
                    "binary_layout": bin_layout,
                    "speedup": ratio,
                    "max_abs_logit_diff": max_diff,
                    "float_images_per_s": b / t_float,
                    "binary_images_per_s": b / t_bin,
                    "captured": captured,
                }
            )
        sd = float_model.state_dict()
        opt = torch.optim.SGD(float_model.parameters(), lr=0.1, momentum=0.9)
        for p in float_model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()  # creates the momentum buffers a training checkpoint carries
        state_bytes = _file_size(sd)
        train_bytes = _file_size({"model": sd, "optimizer": opt.state_dict()})
        sizes.append(
            {
                "model": name,
                "exported_bytes": exported_bytes,
                "float_state_dict_bytes": state_bytes,
                "float_train_checkpoint_bytes": train_bytes,
                "ratio_state_dict": state_bytes / exported_bytes,
                "ratio_train_checkpoint": train_bytes / exported_bytes,
            }
        )
    return e2e, sizes


def run(
    threads: int | None = None,
    repeats: int = 7,
    batches=(1, 64),
    e2e_batches=(1, 64),
    quick: bool = False,
    models=("vgg_small", "resnet20"),
    isa: str | None = None,
) -> dict:
    """All three parts; ``quick`` measures one shape per family and ResNet-20 only (a smoke test).
    ``isa`` forces a kernel path for the run (the previous one is restored after)."""
    from .packed import _ext

    if repeats < 1 or (threads is not None and threads < 1):
        raise ValueError(f"repeats and threads must be >= 1, got repeats={repeats}, threads={threads}")
    if threads:
        torch.set_num_threads(threads)
    ext = _ext()  # first: a RESTE_DEPLOY_ISA this CPU lacks is refused (KernelPathError) before any work
    ext = ext if isa else None
    before = ext.isa() if ext is not None else None
    if isa and ext is None:
        raise RuntimeError(f"cannot force the {isa!r} kernel path: the compiled extension is not available")
    try:
        if ext is not None:
            ext.select(isa, f"reste bench-infer --isa {isa}")
        info = machine_info()
        vgg, res = (VGG_SMALL_SHAPES[-1:], RESNET20_SHAPES[:1]) if quick else (VGG_SMALL_SHAPES, RESNET20_SHAPES)
        sample = 0.01 if quick else 0.05
        result: dict = {"machine": info, "repeats": repeats, "quick": quick}
        result["conv"] = [dict(r, family="vgg_small") for r in bench_conv(vgg, batches, repeats, sample)]
        result["conv"] += [dict(r, family="resnet20") for r in bench_conv(res, batches, repeats, sample)]
        result["e2e"], result["sizes"] = bench_models(
            ("resnet20",) if quick else models,
            repeats=repeats,
            min_sample_s=0.02 if quick else 0.2,
            batches=e2e_batches,
        )
    finally:
        if ext is not None:
            ext.select(before, "restored after reste bench-infer")
    return result


def run_isas(isas: str = "auto", **kwargs) -> list[dict]:
    """:func:`run` once per kernel path: ``"auto"`` (what this CPU runs by default), one name,
    a comma-separated list, or ``"all"`` (every path this CPU supports, best first); a path this CPU
    cannot run is refused before anything runs (:func:`isa_names`)."""
    names = isa_names(isas)
    return [run(**kwargs)] if names is None else [run(isa=name, **kwargs) for name in names]


def default_results_folder() -> str:
    """``benchmarks/results`` where it exists (run from a clone of reste, beside the measured files),
    else the current folder: an installed reste does not create a benchmarks tree wherever it runs."""
    return "benchmarks/results" if Path("benchmarks/results").is_dir() else "."


def default_json_path(result: dict, folder="benchmarks/results") -> Path:
    """``folder/infer_<cpu>_<isa>[_float<max>]_t<threads>[_quick]_<date>.json``: the file names the CPU
    (with its family and model where /proc/cpuinfo gives them: one model name, such as ``AMD EPYC`` in
    a VM, covers several generations), the kernel path, where ``ONEDNN_MAX_CPU_ISA`` capped the float
    side, that cap, and a ``--quick`` smoke test as one."""
    m = result["machine"]
    cpu = m["cpu"] + (" " + m["cpu_family_model"] if m.get("cpu_family_model") else "")
    cpu = "".join(c if c.isalnum() else "-" for c in cpu.lower()).strip("-")
    while "--" in cpu:
        cpu = cpu.replace("--", "-")
    isa = m["kernel"]["isa"] or "reference"
    capped = (m.get("float_isa") or {}).get("onednn_max", "unrestricted")
    if capped != "unrestricted":
        isa += "_float" + "".join(c for c in capped.lower() if c.isalnum())
    quick = "_quick" if result.get("quick") else ""
    return Path(folder) / f"infer_{cpu}_{isa}_t{m['torch_threads']}{quick}_{time.strftime('%Y-%m-%d')}.json"


#: the kernel path names ``--isa`` takes besides auto and all (``generic``: the portable path's former name)
KNOWN_ISAS = ("portable", "avx2", "avx512", "neon")


def isa_names(isas: str) -> list[str] | None:
    """The kernel paths ``--isa`` asks for (None: auto, this CPU's default), checked against the ones
    this CPU supports before anything runs; a name it cannot run is a usage error naming --isa."""
    from ..errors import UsageError, did_you_mean
    from .packed import _ext, kernel_info

    text = (isas or "").strip()
    if text == "auto":
        return None
    _ext()  # a RESTE_DEPLOY_ISA this CPU lacks: KernelPathError, which names the variable
    info = kernel_info()
    supported = info["available"]
    if not info["extension"]:
        raise UsageError(
            f"--isa {text}: no kernel path can be chosen here, the compiled XNOR-popcount extension is not "
            f"available ({info['reason']}); use --isa auto (the PyTorch reference)"
        )
    if text == "all":
        return list(supported)
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError(f"--isa is empty; give auto, all or names among {', '.join(KNOWN_ISAS)}")
    for name in names:
        path = "portable" if name == "generic" else name
        if name == "auto" or path in supported:
            continue
        if path in KNOWN_ISAS:
            raise UsageError(
                f"--isa {name}: this CPU cannot run the {name} kernel path; the paths it supports are "
                f"{', '.join(supported)} (or give --isa auto or all)"
            )
        raise UsageError(
            f"--isa {name}: no kernel path of that name (known names: auto, all, {', '.join(KNOWN_ISAS)})."
            f"{did_you_mean(name, KNOWN_ISAS)} This CPU supports {', '.join(supported)}"
        )
    return names


def check_arguments(args) -> None:
    """Refuse numeric options that cannot be right before anything runs (a usage error, exit 2)."""
    from ..errors import UsageError

    for option, value in (("--repeats", args.repeats), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise UsageError(f"{option} must be >= 1, got {value}")


def main(args) -> int:
    """``reste bench-infer`` and ``benchmarks/bench_infer.py``: run, print, write one JSON per path."""
    check_arguments(args)
    results = run_isas(args.isa, threads=args.threads, repeats=args.repeats, quick=args.quick)
    for i, result in enumerate(results):
        print(("\n" if i else "") + format_report(result))
        if args.json == "-":
            continue
        named = not (args.json is None or args.json.endswith("/") or Path(args.json).is_dir())
        if not named:  # a name of our making: never overwrite an earlier run's file
            path = default_json_path(result, args.json or default_results_folder())
        else:  # a file name; with several paths, each file gets its path's name added
            path = Path(args.json)
            if len(results) > 1:
                path = path.with_name(f"{path.stem}_{result['machine']['kernel']['isa']}{path.suffix}")
        print(f"\nwrote {save(result, path, keep_existing=not named)}")
    return 0


def _float_side(machine: dict, forced: bool) -> str:
    """Which vector code the float side ran; for a forced lower kernel path, how to lower it too."""
    fi = machine.get("float_isa") or {}
    line = f"float side: ATen {fi.get('aten', '?')}, oneDNN {fi.get('onednn_max', '?')}"
    if forced and machine["kernel"]["isa"] == "avx2" and fi.get("onednn_max") == "unrestricted":
        line += (
            " (this CPU's best float code; to compare as on a CPU with only AVX2, run with "
            "ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2)"
        )
    return line


def format_report(result: dict) -> str:
    """Markdown tables of a :func:`run` result."""
    m = result["machine"]
    k = m["kernel"]
    kernel = (
        f"{k['isa']}{' + OpenMP' if k['openmp'] else ''} ({k.get('why')})"
        if k["extension"]
        else f"PyTorch reference ({k['reason']})"
    )
    forced = k["extension"] and k["isa"] != m.get("best_isa")
    cpu = m["cpu"] + (f" ({m['cpu_family_model']})" if m.get("cpu_family_model") else "")
    lines = [
        f"CPU: {cpu}; flags: {' '.join(m.get('cpu_flags') or []) or 'unknown'}",
        f"kernel path: {kernel}"
        + (
            f"; NOT this CPU's default path ({m['best_isa']}): the numbers show the {k['isa']} "
            "kernel on this CPU, not a CPU that only has it"
            if forced
            else ""
        ),
        _float_side(m, forced),
        f"{m['logical_cpus']} logical CPUs, torch {m['torch']} with {m['torch_threads']} threads, load average "
        f"{m['load_average_1min_at_start']} at start; medians of {result['repeats']} alternating float/binary samples "
        "(speedup = median per-round ratio)",
        "",
    ]
    if k["extension"] and k["isa"] == "portable" and not forced:
        lines.insert(
            2,
            "WARNING: only the portable kernel runs on this CPU (no AVX2, AVX-512 or NEON path): "
            "binary models may be slower than float here",
        )
    lines += [
        "| family | conv 3x3 | batch | float ms | binary ms | speedup | exact |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in result["conv"]:
        lines.append(
            f"| {r['family']} | {r['shape']} | {r['batch']} | {r['float_ms']:.3f} ({r['float_layout']}) | "
            f"{r['binary_ms']:.3f} | {r['speedup']:.1f}x | {'yes' if r['exact'] else 'NO'} |"
        )
    lines += [
        "",
        "| model (1W/1A) | batch | float ms | binary ms | speedup | max logit diff |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["e2e"]:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['float_ms']:.1f} ({r['float_layout']}) | "
            f"{r['binary_ms']:.1f} ({r['binary_layout']}) | {r['speedup']:.2f}x | {r['max_abs_logit_diff']:.2e} |"
        )
    captured = [r for r in result["e2e"] if "captured" in r]
    if captured:
        lines += [
            "",
            "Both models captured (reste.deploy.capture: each forward replayed without per-module Python), timed in "
            "the same rounds as the table above (gain = eager time / captured time):",
            "",
            "| model (1W/1A) | batch | float ms | binary ms | speedup | gain: float / binary | same outputs |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in captured:
            c = r["captured"]
            lines.append(
                f"| {r['model']} | {r['batch']} | {c['float_ms']:.2f} ({c['float_layout']}) | "
                f"{c['binary_ms']:.2f} ({c['binary_layout']}) | {c['speedup']:.2f}x | "
                f"{c['float_gain']:.2f}x / {c['binary_gain']:.2f}x | {'yes' if c['exact'] else 'NO'} |"
            )
    lines += [
        "",
        "| model | exported | float state_dict | ratio | float training checkpoint (SGD momentum) | ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["sizes"]:
        lines.append(
            f"| {r['model']} | {r['exported_bytes']:,} B | {r['float_state_dict_bytes']:,} B | "
            f"{r['ratio_state_dict']:.1f}x | "
            f"{r['float_train_checkpoint_bytes']:,} B | {r['ratio_train_checkpoint']:.1f}x |"
        )
    return "\n".join(lines)


def save(result: dict, path, keep_existing: bool = False) -> Path:
    """Write ``result`` as JSON to ``path``; with ``keep_existing``, a file already there (an
    earlier run of the same day) is kept and this one goes to ``<stem>_run2.json``, ``_run3``..."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2)
    if not keep_existing:
        path.write_text(text)
        return path
    stem, n = path.stem, 2
    while True:
        try:  # claimed by creating it ("x"): two runs finishing together never pick the same name
            with open(path, "x") as f:
                f.write(text)
            return path
        except FileExistsError:
            path, n = path.with_name(f"{stem}_run{n}{path.suffix}"), n + 1
