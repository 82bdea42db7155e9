"""Exceptions raised by :mod:`reste.data`.

Two failure modes deserve their own types because the fix differs:

* :class:`DatasetNotFoundError` -- nothing usable was found; the user has to
  fetch the data (the message says where we looked and how to get it).
* :class:`CorruptDataError` -- a file was found but is damaged (bad gzip,
  wrong magic number, truncated payload, wrong checksum ...); the user has to
  delete and re-fetch that particular file (the message names it).

They subclass the built-in exceptions that generic code would expect
(``FileNotFoundError`` and ``ValueError``) so ``except OSError`` style
handlers keep working, and :class:`reste.errors.ReSTEError` (exit code 1 on
the command line).
"""

from __future__ import annotations

from ..errors import ReSTEError

__all__ = ["DatasetNotFoundError", "CorruptDataError"]


class DatasetNotFoundError(ReSTEError, FileNotFoundError):
    """A data set could not be found in any of the places searched (exit code 1)."""

    def __init__(self, name: str, searched: list[str], how_to_get: list[str]):
        self.name = name
        self.searched = list(searched)
        self.how_to_get = list(how_to_get)
        lines = [f"data set {name!r} not found. Looked in:"]
        lines += [f"  - {place}" for place in self.searched]
        lines.append("To get it:")
        lines += [f"  {command}" for command in self.how_to_get]
        self.message = "\n".join(lines)
        # Don't pass (errno, strerror) to OSError: we want str(exc) to be the
        # whole multi-line message, not "[Errno ...]".
        super().__init__(self.message)

    def __str__(self) -> str:  # OSError.__str__ would only show args[0] anyway
        return self.message


class CorruptDataError(ReSTEError, ValueError):
    """A data file exists but is damaged, truncated or fails its checksum (exit code 1)."""

    DEFAULT_HINT = "Delete it and fetch it again (e.g. reste.data.download(...))."

    def __init__(self, path, reason: str, hint: str | None = None):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"corrupt data file {self.path}: {reason}. {hint or self.DEFAULT_HINT}")
