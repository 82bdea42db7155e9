"""Errors the command line reports as one line, ``error: <message>``, with their exit code.

Torch-free, so ``reste.cli`` can catch them without importing the library. A module raising
one of these needs no handler of its own in the command that calls it: ``reste.cli.main``
prints the message and returns ``exit_code`` (see its docstring for the convention).
"""

from __future__ import annotations

__all__ = ["ReSTEError", "UsageError", "ConfigError", "short_repr", "did_you_mean"]


class ReSTEError(Exception):
    """An error whose message says what is wrong and what to do; exit code 1 (an input that is
    missing or unusable, or work that failed)."""

    exit_code = 1

    def cli_message(self, rank: str = "0") -> str | None:
        """What ``reste.cli.main`` prints for this error on process ``rank`` (the ``RANK`` of a
        distributed run; "0" or "" otherwise), ``None`` for nothing: ``error: <message>``, with the
        rank named on the other processes of a distributed run."""
        return f"error: {self}" if rank in ("0", "") else f"error [rank {rank}]: {self}"


class UsageError(ReSTEError):
    """A command line, configuration or environment setting that is wrong; exit code 2."""

    exit_code = 2


class ConfigError(UsageError, ValueError):
    """A configuration problem; the message names the key and the fix (exit code 2).

    Defined here, below every layer, so that ``reste.models`` can raise it for a model that cannot
    be built from its configuration; ``reste.train.config`` re-exports it (its usual import path).
    A ``ValueError`` too, for callers in Python that catch that.
    """


def short_repr(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, built without expanding huge nested values
    (for quoting a configuration value in an error message)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxdict, r.maxlist, r.maxtuple, r.maxset = 3, 6, 6, 6, 6
    r.maxstring, r.maxother, r.maxlong = limit, limit, 40
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def did_you_mean(name: object, known, cutoff: float = 0.6) -> str:
    """`` Did you mean 'x'?`` for the known name closest to ``name``, or ``""`` when none is close.

    Case-insensitive (``"ReSTE"`` finds ``"reste"``, ``"STE"`` finds ``"ste"``); a value that is
    not a short string gets no suggestion rather than a slow comparison."""
    import difflib

    if not isinstance(name, str) or len(name) > 100:
        return ""
    by_lower: dict[str, str] = {}
    for k in known:
        by_lower.setdefault(str(k).lower(), str(k))
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=cutoff)
    return f" Did you mean {by_lower[close[0]]!r}?" if close else ""
