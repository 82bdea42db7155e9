"""Bit-packed binary inference against float PyTorch on this CPU (reste.deploy).

Command (the numbers in docs/deploy.md come from it; one JSON per kernel path this CPU
supports, named infer_<cpu>_<isa>_t<threads>_<date>.json, in benchmarks/results/)::

    python benchmarks/bench_infer.py --threads 1 --isa all

Same as ``reste bench-infer``. Each result names the CPU and the kernel path (portable,
avx2, avx512, neon; a forced one is labelled as such). It measures, with the same
number of threads on both sides:

- every binary 3x3 conv shape of VGG-small (128-512 channels, 32/16/8 pixels) and of
  ResNet-20 (16-64 channels, 32/16/8 pixels, the stride-2 transitions included): the
  packed XNOR-popcount layer against ``F.conv2d`` on float weights, batch 1 and 64;
- binary VGG-small and ResNet-20 end to end (``reste.deploy.load`` of an exported model,
  fused) against the same architecture in float, batch 1 and 64;
- exported file sizes against the float model's checkpoint (state_dict, and a training
  checkpoint with SGD momentum).

Float and binary samples alternate and the medians are reported, so noise from other
processes on a shared machine hits both alike. Prints markdown tables, writes JSON.
"""

from __future__ import annotations

import argparse
import sys

from reste.deploy import bench
from reste.deploy.commands import add_bench_arguments
from reste.errors import ReSTEError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser)
    try:
        return bench.main(parser.parse_args(argv))
    except ReSTEError as err:  # one line and the exit code, as `reste bench-infer` gives
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
