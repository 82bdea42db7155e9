"""The ``reste`` command line: ``reste <command> ...`` (also ``python -m reste``).

Each area of the library registers its own sub-commands from a ``commands``
module (``reste.train.commands``, ``reste.analysis.commands``, ...), so this
file only assembles them. Heavy imports happen inside the commands, keeping
``reste --help`` fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: modules that provide ``register(subparsers)``; each adds its sub-commands
COMMAND_MODULES = (
    "reste.train.commands",
    "reste.analysis.commands",
    "reste.deploy.commands",
    "reste.data.commands",
)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="reste",
        description="Train, analyse and ship binary neural networks with the Rectified Straight-Through Estimator.",
    )
    parser.add_argument("--version", action="version", version=f"reste {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # that area has no commands (yet); others still work
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
