"""Stand-alone data command line (same commands as ``reste download`` /
``reste datasets``)::

    python -m reste.data download cifar10 --root ./data
    python -m reste.data datasets
"""

from __future__ import annotations

import argparse
import sys

from .commands import register


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reste.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
