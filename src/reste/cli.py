"""The ``reste`` command line: ``reste <command> ...`` (also ``python -m reste``).

Each area of the library registers its own sub-commands from a ``commands``
module (``reste.train.commands``, ``reste.analysis.commands``, ...), so this
file only assembles them. Only the module of the command being run is imported:
``reste --help``, ``--version`` and ``reste datasets`` start without loading torch.

Exit codes, the same for every command: 0 success; 1 an input that is missing or
unusable (a checkpoint, run directory, exported file or data set) or work that failed
(a run diverged, a download or a check failed, the disk is full); 2 a command line or
configuration that is wrong (an unknown option or key, an invalid value); 130 / 143
interrupted by SIGINT / SIGTERM; 141 (128 + SIGPIPE) the reader of the output went away
(``reste datasets | head -1``): the command stops quietly, as a Unix tool killed by SIGPIPE.

An unknown option or extra word is reported with the usage of the sub-command it was given
to (``reste train --reusme`` shows ``reste train``'s usage and suggests ``--resume``).

One convention gives these codes: every error the library raises for a user's input or failed
work derives from ``reste.errors.ReSTEError`` (exit 1) or ``reste.errors.UsageError`` (exit 2; a
config, command line or environment setting to fix), keeping its Python base too (``ValueError``,
``FileNotFoundError``, ``RuntimeError``...). Commands do not catch them: :func:`main` prints
``error: <message>`` (``error [rank N]: ...`` on the other processes of a distributed run) and
returns the class's ``exit_code``; an interrupted training run (``TrainingInterrupted``) prints
its resume command instead and returns 128 + the signal number.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import warnings

from .errors import ReSTEError

#: command -> (module whose ``register(subparsers)`` adds it, the one-line help of ``reste --help``;
#: tests check that it is the help the module registers)
COMMANDS = {
    "train": ("reste.train.commands", "train a binary network (default: binary ResNet-20 + ReSTE on Fashion-MNIST)"),
    "eval": ("reste.train.commands", "evaluate a trained run, a checkpoint or an exported 1-bit model on a test set"),
    "sweep": ("reste.analysis.commands", "run a grid of training runs (cartesian product), resumable"),
    "report": (
        "reste.analysis.commands",
        "tables and figures (seed Tables 1-3, Figures 1-3) from run or sweep directories",
    ),
    "summary": ("reste.deploy.commands", "per-layer parameters by bit width, memory and MACs of a model"),
    "export": ("reste.deploy.commands", "write a trained run's model with 1-bit packed weights (safetensors)"),
    "bench-infer": ("reste.deploy.commands", "time packed binary layers and models against float PyTorch on this CPU"),
    "download": ("reste.data.commands", "download and verify a data set into ROOT/NAME"),
    "datasets": ("reste.data.commands", "list the known data sets, their shapes and which are present here"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; the sub-commands of ``command``'s module are complete, the others are listed
    by name and help only (``None``: all complete, as the tests and the docs generator use)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="reste",
        description="Train, analyse and ship binary neural networks with the Rectified Straight-Through Estimator.",
        epilog="exit codes: 0 success, 1 a missing or unusable input or failed work, 2 a wrong command line or "
        "configuration, 130 / 143 interrupted, 141 the output pipe was closed",
    )
    parser.add_argument("--version", action="version", version=f"reste {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = (
        {module for module, _ in COMMANDS.values()}
        if command is None
        else ({COMMANDS[command][0]} if command in COMMANDS else set())
    )
    registered = set()
    for name, (module, help_text) in COMMANDS.items():
        if module in wanted and module not in registered:
            importlib.import_module(module).register(sub)
            registered.add(module)
        elif module not in wanted:
            sub.add_parser(name, help=help_text)  # a placeholder for the listing
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The first argument that is not an option: the sub-command, if any."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg
    return None


def _subparser(parser: argparse.ArgumentParser, name: str | None) -> argparse.ArgumentParser | None:
    """The parser of sub-command ``name`` (None when there is none by that name)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name) if name else None
    return None


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, except that words the sub-command does not know are reported
    by that sub-command's parser (its usage, not the top-level one) with the closest option."""
    import difflib

    args, extras = parser.parse_known_args(argv)
    if not extras:
        return args
    target = _subparser(parser, getattr(args, "command", None)) or parser
    message = f"unrecognized arguments: {' '.join(extras)}."
    known = [o[2:] for o in target._option_string_actions if o.startswith("--")]
    for word in extras:
        if word.startswith("--"):  # compared without the dashes, which every option shares
            close = difflib.get_close_matches(word[2:].partition("=")[0].lower(), known, n=1, cutoff=0.6)
            if close:
                message += f" Did you mean '--{close[0]}'?"
                break
    target.error(message)  # prints the usage and the message, exits 2
    raise AssertionError("argparse.error returned")  # pragma: no cover


def _quiet_stdout() -> None:
    """After the reader of stdout went away: send the rest to /dev/null, so that the interpreter's
    final flush does not print a second BrokenPipeError."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # a replaced sys.stdout (tests) has no real descriptor
        pass


def _output_closed() -> bool:
    """Whether the reader of stdout or stderr went away: a pipe whose read end is closed polls
    POLLERR on its write end. A broken pipe elsewhere (a subprocess, a socket) is not that."""
    import select

    if not hasattr(select, "poll"):  # Windows: no poll; take the pipe to be the output
        return True
    for stream in (sys.stdout, sys.stderr):
        try:
            poller = select.poll()
            poller.register(stream.fileno(), select.POLLOUT)
            if any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0)):
                return True
        except (OSError, ValueError, AttributeError):  # a replaced stream (tests) has no real descriptor
            continue
    return False


def _short_warning(message, category, filename, lineno, line=None) -> str:
    # users see "Warning: ...", not the library's source file and line
    return f"{category.__name__}: {message}\n"


class Interrupted(KeyboardInterrupt):
    """SIGTERM outside a training loop (imports, set-up, eval, export): unwinds like Ctrl-C, so
    ``finally`` blocks clean up (a run folder claimed during set-up is removed), then exits 143."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def _exit_now(code: int) -> None:
    """Leave without the interpreter's shutdown. The command has cleaned up (its ``finally``
    blocks ran). A second Ctrl-C that landed while the interpreter shut down after torch still
    killed the process by SIGINT (exit -2 instead of 130, 1 run in 6-12 of a double Ctrl-C
    during set-up, although SIGINT was set to be ignored); leaving here, 0 in 20."""
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _error_line(message: str) -> None:
    """``message`` and its newline in one write: sys.stderr writes through, so ``print`` made two
    system calls, and the error lines of a distributed run's ranks ran into each other on one line."""
    try:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed stderr: the exit code still says it
        pass


def main(argv: list[str] | None = None) -> int:
    as_program = argv is None  # the console script or python -m reste, not a caller in Python
    argv = sys.argv[1:] if argv is None else list(argv)
    warnings.formatwarning = _short_warning
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if main_thread else None
    try:
        parser = build_parser(_command_of(argv) or "")  # "": no command module imported
        args = _parse(parser, argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except ReSTEError as err:  # raised anywhere below a command: one line, the documented code
        message = err.cli_message(os.environ.get("RANK", "0"))
        if message is not None:
            _error_line(message)
        return err.exit_code
    except BrokenPipeError as err:
        if not _output_closed():  # a pipe to something else broke: work that failed
            print(f"error: a pipe closed while writing to it ({err}); the command stopped", file=sys.stderr, flush=True)
            return 1
        _quiet_stdout()  # `reste datasets | head -1`: the reader has all it wanted; no traceback
        return 128 + int(getattr(signal, "SIGPIPE", 13))
    except KeyboardInterrupt as err:
        if main_thread:  # we are leaving: a second Ctrl-C must not turn the exit into a traceback
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"\ninterrupted by {signal.Signals(signum).name}", file=sys.stderr, flush=True)
        if main_thread and as_program:
            _exit_now(128 + int(signum))
        if main_thread and not as_program:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        return 128 + int(signum)
    finally:
        if main_thread and not as_program:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
