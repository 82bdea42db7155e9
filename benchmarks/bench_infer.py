"""Bit-packed binary inference against float PyTorch on this CPU (reste.deploy).

Command (the numbers in docs/deploy.md come from it)::

    python benchmarks/bench_infer.py --json benchmarks/results/infer_cpu.json

Same as ``reste bench-infer``. It measures, with the same number of threads on both
sides:

- every binary 3x3 conv shape of VGG-small (128-512 channels, 32/16/8 pixels) and of
  ResNet-20 (16-64 channels, 32/16/8 pixels, the stride-2 transitions included): the
  packed XNOR-popcount layer against ``F.conv2d`` on float weights, batch 1 and 64;
- binary VGG-small and ResNet-20 end to end (``reste.deploy.load`` of an exported model,
  kernel epilogues fused) against the same architecture in float, batch 64;
- exported file sizes against the float model's checkpoint (state_dict, and a training
  checkpoint with SGD momentum).

Float and binary samples alternate and the medians are reported, so noise from other
processes on a shared machine hits both alike. Prints markdown tables, writes JSON.
"""

from __future__ import annotations

import argparse

from reste.deploy.bench import format_report, run, save


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch and kernel threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=7, help="alternating samples per measurement (default 7)")
    parser.add_argument("--quick", action="store_true", help="one shape per family and ResNet-20 only")
    parser.add_argument("--json", default="bench_infer.json", help="where to write the results (default bench_infer.json)")
    args = parser.parse_args(argv)
    result = run(threads=args.threads, repeats=args.repeats, quick=args.quick)
    print(format_report(result))
    print(f"\nwrote {save(result, args.json)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
