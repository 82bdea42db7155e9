"""Downloading the official files, with md5 verification and safe extraction.

Guarantees:

* A download is streamed into a hidden temporary file next to its
  destination and only renamed into place (atomically, ``os.replace``) after
  its md5 matched. An interrupted or wrong download therefore never leaves a
  half-written file under the official name, and never replaces an existing
  file.
* A file that is already present with the right md5 is not fetched again.
* A data set already complete (IDX files with their md5s, CIFAR's extracted folder with every
  batch whole) is found without writing or locking anything: a read-only folder is fine.
* Otherwise downloads of one data set into one folder are serialised by an inter-process lock
  (``fcntl.flock`` on ``root/.<name>.lock``, a hidden file created once and kept), and what is
  present is checked again once the lock is held: several processes (every rank of a
  ``torchrun`` job) may call :func:`download` at once; one fetches, the others wait and find the
  data ready. Under that lock, ``.part`` files and staging folders of a killed download are
  removed once untouched for ``_STALE_AFTER_S`` (younger ones may be a live download's on
  another machine sharing the folder). Where no lock can be had (no ``fcntl`` on Windows, a
  read-only folder, NFS or Lustre without working flock) the download goes on without it and
  without that cleanup: each process writes its own temporary files and renames them atomically.
* Downloaded files get the mode a new file gets from the umask (``0o666 & ~umask``), like any
  file the user creates, not a temporary file's 0600.
* Tarballs are extracted member by member after checking that every member
  is a plain file or folder whose path stays inside the destination (no
  absolute paths, no ``..``, no links or devices).

The base URL can be overridden with the ``mirror`` argument or the
``RESTE_MIRROR`` environment variable (the file name is appended to it);
the tests use this to point at a local HTTP server.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import os
import secrets
import shutil
import tarfile
import tempfile
import time
import urllib.request
import warnings
import zlib
from pathlib import Path, PurePosixPath
from typing import IO, cast

from ..errors import UsageError
from .catalog import (
    CIFAR_SOURCES,
    IDX_SOURCES,
    MIRROR_ENV_VAR,
    CifarSource,
    canonical_name,
    how_to_get,
    resolve_root,
)
from .errors import CorruptDataError
from .formats import quick_check_pickle

try:
    import fcntl
except ImportError:  # Windows: no flock; concurrent downloads there are not serialised
    fcntl = None  # type: ignore[assignment]

__all__ = ["download", "download_file", "safe_extract", "md5_of_file", "check_mirror"]

_CHUNK = 1 << 20


def md5_of_file(path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _progress_bar(total, desc, enabled):
    # Imported lazily: tqdm is a dependency, but only downloads need it.
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled, leave=False)


def _new_part_file(dest: Path) -> tuple[int, Path]:
    """A new hidden ``.<name>.<random>.part`` file beside ``dest``, opened for writing. Created with
    mode 0o666 so the umask gives it a normal file's permissions (``mkstemp`` would make it 0600,
    and the rename would keep that)."""
    while True:
        tmp = dest.parent / f".{dest.name}.{secrets.token_hex(4)}.part"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue
        except FileNotFoundError:  # an unlocked concurrent download that failed removed the empty folder
            dest.parent.mkdir(parents=True, exist_ok=True)
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp


def download_file(url: str, dest, md5: str, *, progress: bool = True, timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest`` and check its md5; return ``dest``.

    If ``dest`` already exists with the expected md5 nothing is fetched. On a
    checksum mismatch the downloaded bytes are deleted, whatever was at
    ``dest`` before is left untouched, and :class:`CorruptDataError` is raised.
    A connection cut before the announced ``Content-Length`` is an :class:`OSError`
    saying so ("download interrupted"), not a checksum mismatch.
    """
    dest = Path(dest)
    if dest.is_file() and md5_of_file(dest) == md5:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_part_file(dest)
    try:
        digest = hashlib.md5()
        received = 0
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    length = response.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                    with _progress_bar(total, dest.name, progress) as bar:
                        for chunk in iter(lambda: response.read(_CHUNK), b""):
                            out.write(chunk)
                            digest.update(chunk)
                            received += len(chunk)
                            bar.update(len(chunk))
            except http.client.IncompleteRead as exc:  # some Python versions raise on a cut connection
                received += len(exc.partial)
                total = received + (exc.expected or 0)
            # URLError/HTTPError/timeouts are OSErrors; other protocol failures are HTTPExceptions.
            except (OSError, http.client.HTTPException) as exc:
                raise OSError(f"download of {url} failed: {exc}") from exc
            # Python 3.11's read() returns b"" on a connection cut mid-body instead of raising:
            # only the announced length tells a cut download from a complete one.
            if total is not None and received < total:
                raise OSError(
                    f"download of {url} interrupted: got {received:,} of {total:,} bytes (the connection "
                    f"closed early); run the command again (files already complete are kept)"
                )
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != md5:
            raise CorruptDataError(
                url,
                f"md5 mismatch (expected {md5}, got {actual}); the download was deleted and {dest} was not written",
                hint="Retry; if it persists the server or mirror serves different content.",
            )
        os.replace(tmp, dest)
    except BaseException:  # including KeyboardInterrupt: never leave .part files
        tmp.unlink(missing_ok=True)
        raise
    return dest


def _member_is_safe(member: tarfile.TarInfo) -> bool:
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or member.name.startswith(("/", "\\")):
        return False
    return member.isfile() or member.isdir()


def safe_extract(archive, dest) -> None:
    """Extract a ``.tar.gz`` into ``dest`` refusing anything that could write
    outside it (path traversal, absolute paths, symlinks/hardlinks, devices).

    Extraction goes to a temporary folder inside ``dest`` first and each
    top-level entry is then moved into place, so an interrupted extraction
    never leaves a half-filled data folder under its final name.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    dest_resolved = dest.resolve()
    staging = Path(tempfile.mkdtemp(dir=dest, prefix=".extract-"))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar:
                    target = (staging / member.name).resolve()
                    if not _member_is_safe(member) or not target.is_relative_to(staging.resolve()):
                        raise CorruptDataError(
                            archive, f"refusing unsafe tar member {member.name!r} (type {member.type!r})"
                        )
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    # a regular file here (links and devices are refused above): extractfile gives its stream
                    with cast(IO[bytes], tar.extractfile(member)) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out, _CHUNK)
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise CorruptDataError(archive, f"unreadable or truncated tar.gz ({exc})") from exc
        for entry in staging.iterdir():
            final = dest_resolved / entry.name
            if final.is_dir() and not final.is_symlink():
                shutil.rmtree(final)
            elif final.exists() or final.is_symlink():
                final.unlink()
            os.replace(entry, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _base_url(default: str, mirror: str | None) -> str:
    base = mirror or os.environ.get(MIRROR_ENV_VAR) or default
    return base if base.endswith("/") else base + "/"


def check_mirror(mirror: str | None, what: str = "mirror") -> None:
    """Refuse a mirror that is not a base URL (:class:`reste.errors.UsageError`, exit code 2), naming
    ``what`` (``--mirror``, ``$RESTE_MIRROR``) and the accepted forms; ``None`` or empty: nothing to check."""
    if not mirror:
        return
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(mirror)
    except ValueError:  # e.g. an unbalanced '[' in the host
        parts = None
    ok = parts is not None and (
        (parts.scheme in ("http", "https") and bool(parts.netloc)) or (parts.scheme == "file" and bool(parts.path))
    )
    if ok:
        return
    hint = ""
    if Path(mirror).expanduser().is_dir():
        hint = f" (for this local folder: {Path(mirror).expanduser().resolve().as_uri()}/)"
    raise UsageError(
        f"{what} {mirror!r} is not a base URL; give http://HOST/PATH/, https://HOST/PATH/ or "
        f"file:///ABSOLUTE/FOLDER/{hint} (the official file names are appended to it)"
    )


class NotDownloadableError(UsageError, ValueError):
    """A data set that cannot be downloaded (ImageNet: registration needed); the message says how to
    get it. A usage error (exit code 2)."""


# errno values meaning "this folder cannot hold or take a lock" (a read-only mount, a folder of
# someone else's, a file system without flock: Lustre without -o flock, NFS without lockd): the
# download then goes ahead without the lock, as it did before there was one
_NO_LOCK_ERRNOS = frozenset(
    getattr(errno, code)
    for code in ("EROFS", "EACCES", "EPERM", "ENOLCK", "ENOSYS", "EOPNOTSUPP", "ENOTSUP", "EINVAL", "EBADF")
    if hasattr(errno, code)
)
# a .part file or staging folder untouched for this long belongs to no running download (a live
# one writes every chunk of at most 1 MiB); younger ones may be another machine's, on a shared
# file system whose flock does not reach across machines
_STALE_AFTER_S = 10 * 60
_warned_unlocked: set[Path] = set()


def _warn_unlocked(root: Path, name: str, exc: OSError) -> None:
    if root in _warned_unlocked:
        return
    _warned_unlocked.add(root)
    warnings.warn(
        f"cannot lock {root / f'.{name}.lock'} ({exc.strerror or exc}): concurrent downloads into {root} are "
        f"not coordinated (each still writes its own temporary file and renames it into place)",
        UserWarning,
        stacklevel=2,
    )


@contextlib.contextmanager
def _lock(root: Path, name: str, target: Path):
    """Hold an exclusive inter-process lock (``flock``) on ``root/.<name>.lock`` for the ``with``
    block; yields whether it is held.

    The lock file is created once and never deleted: deleting a lock file is unsafe (a process
    waiting on the deleted file would hold "the lock" beside one that locks a new file; NFS may
    even hand out the deleted file from a cached lookup). Where the lock cannot be had, a
    read-only folder or a file system without flock (the errnos in ``_NO_LOCK_ERRNOS``), it
    warns once per folder (not when ``target`` cannot be written either: the download fails
    then, saying so) and yields False; without ``fcntl`` (Windows) it yields False silently.
    """
    if fcntl is None:
        yield False
        return
    path = root / f".{name}.lock"
    fd = None
    try:
        fd = _open_lock_file(path)
    except OSError as exc:
        if exc.errno not in _NO_LOCK_ERRNOS:
            raise
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM) or (
            target.is_dir() and os.access(target, os.W_OK | os.X_OK)
        ):
            _warn_unlocked(root, name, exc)
    if fd is None:  # yielded outside the except clause: the body's errors are not chained to this one
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in _NO_LOCK_ERRNOS:
                raise
            _warn_unlocked(root, name, exc)
            locked = False
        else:
            locked = True
        yield locked
    finally:
        os.close(fd)  # releases the flock


def _open_lock_file(path: Path) -> int:
    for _ in range(3):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:  # the folder was removed by another (unlocked) failing download
            continue
        except OSError as exc:
            # an existing lock file of someone else's (0644 under umask 022): a local flock needs
            # no write access (NFS does, for an exclusive lock: flock then fails with EBADF)
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or not path.is_file():
                raise
            return os.open(path, os.O_RDONLY)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)


def _newest_mtime(path: Path) -> float:
    """The latest modification time of ``path`` and, for a folder, of anything inside it."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for folder, dirs, files in os.walk(path):
            for entry in (*dirs, *files):
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(folder, entry)).st_mtime)
    return newest


def _remove_leftovers(name: str, target: Path) -> None:
    """Delete the ``.part`` files and extraction staging folders a killed download of ``name`` left
    in ``target``: only those untouched for ``_STALE_AFTER_S``. Called with the data set's lock
    held, so no download on this machine owns them; the age spares those of a download on another
    machine sharing the folder where flock does not reach across machines."""
    if not target.is_dir():
        return
    if name in IDX_SOURCES:
        files = [file_name for file_name, _ in IDX_SOURCES[name].files.values()]
    else:
        files = [CIFAR_SOURCES[name].archive]
    leftovers = [part for file_name in files for part in target.glob(f".{file_name}.*.part")]
    leftovers += [staging for staging in target.glob(".extract-*") if staging.is_dir() and not staging.is_symlink()]
    too_old = time.time() - _STALE_AFTER_S
    for leftover in leftovers:
        try:  # best effort: a leftover that vanished or cannot be removed is no reason to fail
            if _newest_mtime(leftover) >= too_old:
                continue
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        except OSError:
            continue


def download(name: str, root=None, *, mirror: str | None = None, progress: bool = True) -> Path:
    """Download data set ``name`` into ``root/<name>`` and return that folder.

    * ``fashion_mnist`` / ``mnist``: the four official IDX ``.gz`` files.
    * ``cifar10`` / ``cifar100``: the official python-version tarball, which
      is kept and safely extracted next to it; when the extracted folder already
      holds every batch, each ending as a whole pickle does, nothing is fetched or extracted.
    * ``imagenet``: cannot be downloaded (registration needed): :class:`NotDownloadableError`.

    ``root`` defaults to the per-user data folder (``$RESTE_DATA``, else
    ``~/.cache/reste/data``); ``mirror`` (or ``$RESTE_MIRROR``) replaces the
    official base URL: ``http(s)://HOST/PATH/`` or ``file:///FOLDER/`` (anything else:
    :class:`reste.errors.UsageError`). Every file is md5 checked; see :func:`download_file` for
    what happens on a mismatch. A failed download leaves no data set folder it created.

    A data set already complete is checked without writing anything (a read-only folder is fine).
    Otherwise several processes may call this at once (every rank of a distributed job): they
    take turns on an flock on ``root/.<name>.lock`` (a hidden file, kept), and the ones that
    wait find the data ready. Where flock does not work (Windows, a read-only folder, NFS or
    Lustre without working flock; a warning says so) each process still downloads into its
    own temporary files and renames them into place atomically.
    """
    name = canonical_name(name)
    check_mirror(mirror, "mirror")
    if not mirror:
        check_mirror(os.environ.get(MIRROR_ENV_VAR), f"${MIRROR_ENV_VAR}")
    root = resolve_root(root)
    target = root / name
    if name == "imagenet":
        raise NotDownloadableError("\n".join(how_to_get(name, root)))
    if name not in IDX_SOURCES and name not in CIFAR_SOURCES:
        raise ValueError(f"unknown data set {name!r}")
    if _complete(name, target):  # nothing to write: no lock needed (the folder may be read-only)
        return target
    created = [p for p in [target, *target.parents] if not p.exists()]
    try:
        with _lock(root, name, target) as locked:
            try:
                if locked:
                    _remove_leftovers(name, target)
                # what is present is checked again here, under the lock: a process that waited
                # for another one's download finds the files there and fetches nothing
                return _download_into(name, target, mirror, progress)
            except BaseException:
                if target in created:  # inside the lock: another process may be about to use it
                    _remove_empty(target)
                raise
    except BaseException:
        # the folders above: only those this call made, only if empty (the lock file stays in root)
        for folder in created:
            if folder != target and not _remove_empty(folder):
                break
        raise


def _remove_empty(folder: Path) -> bool:
    try:
        folder.rmdir()
    except OSError:
        return False
    return True


def _complete(name: str, target: Path) -> bool:
    """Whether ``target`` already holds data set ``name`` as a download leaves it: the IDX files
    with their official md5s, or CIFAR's extracted folder (:func:`_cifar_extracted`)."""
    if name in IDX_SOURCES:
        try:
            return all(
                (target / file_name).is_file() and md5_of_file(target / file_name) == md5
                for file_name, md5 in IDX_SOURCES[name].files.values()
            )
        except OSError:
            return False
    return _cifar_extracted(CIFAR_SOURCES[name], target)


def _cifar_extracted(source: CifarSource, target: Path) -> bool:
    """Whether ``target`` holds the extracted folder with every batch, each passing the quick check
    of ``reste datasets`` (ends as a pickle does: a truncated batch fails it). Extraction moves the
    folder into place whole, so this is false only for a folder damaged since."""
    folder = target / source.folder
    if not (folder / source.meta_member).is_file():
        return False
    try:
        for member in (*source.train_members, *source.test_members):
            quick_check_pickle(folder / member)
    except CorruptDataError:
        return False
    return True


def _download_into(name: str, target: Path, mirror: str | None, progress: bool) -> Path:
    if name in IDX_SOURCES:
        idx = IDX_SOURCES[name]
        base = _base_url(idx.base_url, mirror)
        for file_name, md5 in idx.files.values():
            download_file(base + file_name, target / file_name, md5, progress=progress)
        return target
    if name in CIFAR_SOURCES:
        source = CIFAR_SOURCES[name]
        # a whole extracted folder is never extracted again (others may be reading it); a damaged
        # one is extracted again from the tarball (fetched again only if it is not intact)
        if _cifar_extracted(source, target):
            return target
        archive = download_file(
            _base_url(source.base_url, mirror) + source.archive,
            target / source.archive,
            source.md5,
            progress=progress,
        )
        safe_extract(archive, target)
        return target
    raise AssertionError(name)  # download() checked the name
