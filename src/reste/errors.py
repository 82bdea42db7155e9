"""Errors the command line reports as one line, ``error: <message>``, with their exit code.

Torch-free, so ``reste.cli`` can catch them without importing the library. A module raising
one of these needs no handler of its own in the command that calls it: ``reste.cli.main``
prints the message and returns ``exit_code`` (see its docstring for the convention).
"""

from __future__ import annotations

__all__ = ["ReSTEError", "UsageError"]


class ReSTEError(Exception):
    """An error whose message says what is wrong and what to do; exit code 1 (an input that is
    missing or unusable, or work that failed)."""

    exit_code = 1


class UsageError(ReSTEError):
    """A command line, configuration or environment setting that is wrong; exit code 2."""

    exit_code = 2
