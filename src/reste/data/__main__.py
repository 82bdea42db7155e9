"""Stand-alone data command line: the same commands as ``reste download`` / ``reste datasets``,
run by the same entry point (one error line, exit codes, a closed pipe, Ctrl-C)::

    python -m reste.data download cifar10 --root ./data
    python -m reste.data datasets
"""

from __future__ import annotations

import sys

COMMANDS = ("download", "datasets")


def main(argv: list[str] | None = None) -> int:
    from ..cli import main as cli_main

    words = sys.argv[1:] if argv is None else list(argv)
    if not words or words[0] not in COMMANDS:
        if words and words[0] in ("-h", "--help"):
            print(__doc__)
            return 0
        got = words[0] if words else "none"
        print(
            f"usage: python -m reste.data {{{','.join(COMMANDS)}}} ...\n"
            f"python -m reste.data: error: give a command, one of {', '.join(COMMANDS)} (got {got})",
            file=sys.stderr,
        )
        return 2
    return cli_main(words if argv is not None else None)


if __name__ == "__main__":
    sys.exit(main())
