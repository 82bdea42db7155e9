"""Stand-alone data command line (same commands as ``reste download`` /
``reste datasets``)::

    python -m reste.data download cifar10 --root ./data
    python -m reste.data datasets
"""

from __future__ import annotations

import argparse
import sys

from ..errors import ReSTEError
from .commands import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reste.data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ReSTEError as err:  # as reste.cli.main: one line, the documented exit code
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
