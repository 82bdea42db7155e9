"""Readers for the official on-disk formats: IDX (MNIST-likes) and the
CIFAR "python version" pickles.

Every reader validates what it reads and turns any damage into a
:class:`~reste.data.errors.CorruptDataError` that names the file, so a
truncated download never surfaces as an obscure numpy reshape error deep
inside training.

Security: CIFAR batches are pickles, and unpickling runs code chosen by the
file. :class:`RestrictedUnpickler` therefore resolves only the handful of
numpy/builtin callables needed to rebuild a uint8 array and refuses every
other global.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import IO, cast

import numpy as np

from .errors import CorruptDataError

__all__ = [
    "read_idx",
    "RestrictedUnpickler",
    "restricted_loads",
    "parse_cifar_batch",
    "read_cifar_members_from_dir",
    "read_cifar_members_from_tar",
    "quick_check_idx",
    "quick_check_pickle",
    "quick_check_tar_gz",
]

GZIP_MAGIC = b"\x1f\x8b"
IDX_UBYTE_TYPE = 0x08


# --------------------------------------------------------------------------
# IDX
# --------------------------------------------------------------------------


#: the most an IDX file may declare (the largest official one, Fashion-MNIST's training
#: images, is 47 MB); checked on the header, before anything is allocated or decompressed
MAX_IDX_BYTES = 1 << 30
_CHUNK = 1 << 20


def _open_maybe_gzipped(path: Path):
    """``(binary stream, is_gzip)``: gzip is detected by magic bytes, not by the file name, so
    renamed files still work. The stream decompresses as it is read, so a caller reads no more
    than it asks for (a gzip bomb is never expanded beyond that)."""
    try:
        fh = open(path, "rb")
    except OSError as exc:  # unreadable file: permissions, I/O error
        raise CorruptDataError(path, f"cannot read file ({exc})") from exc
    head = fh.read(2)
    if not head:  # say so: "bad gzip magic bytes" would send one looking for a format problem
        fh.close()
        raise CorruptDataError(path, "empty file (0 bytes)")
    if head != GZIP_MAGIC:
        if path.suffix == ".gz":
            fh.close()
            raise CorruptDataError(path, "not a gzip file (bad gzip magic bytes)")
        fh.seek(0)
        return fh, False
    fh.seek(0)
    return gzip.GzipFile(fileobj=fh, mode="rb"), True


def _read_exactly(path: Path, stream, out, what: str) -> int:
    """Fill ``out`` (a writable buffer) from ``stream``; the number of bytes read (less at end of data)."""
    view = memoryview(out).cast("B")
    done = 0
    try:
        while done < len(view):
            n = stream.readinto(view[done : done + _CHUNK])
            if not n:
                break
            done += n
    except EOFError as exc:
        raise CorruptDataError(path, "truncated gzip stream") from exc
    except (gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise CorruptDataError(path, f"bad gzip data ({exc})") from exc
    return done


def _read_idx_header(path: Path, stream, expected_ndim: int, item_shape, max_bytes: int, limit_reason: str):
    """``(shape, header length, payload bytes)`` from an IDX header, checked: magic number, item shape
    and the size it declares (a Python int, before anything is allocated)."""
    header_len = 4 + 4 * expected_ndim
    header = bytearray(header_len)
    got = _read_exactly(path, stream, header, "header")
    if got < 4:
        raise CorruptDataError(path, f"file too short for an IDX header ({got} bytes)")
    expected_magic = (IDX_UBYTE_TYPE << 8) | expected_ndim
    magic = int.from_bytes(header[:4], "big")
    if magic != expected_magic:
        raise CorruptDataError(path, f"wrong IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x}")
    if got < header_len:
        raise CorruptDataError(path, "truncated IDX header")
    shape = tuple(int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(expected_ndim))
    if item_shape is not None and shape[1:] != tuple(item_shape):
        raise CorruptDataError(path, f"expected items of shape {tuple(item_shape)}, the header says {shape[1:]}")
    expected_payload = math.prod(shape)  # a Python int: never overflows
    if expected_payload > max_bytes:
        raise CorruptDataError(
            path,
            f"header says shape {shape} = {expected_payload:,} bytes, more than "
            f"{max_bytes:,} ({limit_reason}); the file is damaged",
        )
    return shape, header_len, expected_payload


def read_idx(
    path,
    expected_ndim: int,
    *,
    item_shape: tuple | None = None,
    max_bytes: int = MAX_IDX_BYTES,
    limit_reason: str = "the most an IDX file of a data set may hold",
) -> np.ndarray:
    """Read an IDX file of unsigned bytes (``.gz`` or raw) into an array.

    The IDX header is: two zero bytes, a type code (0x08 = ubyte), the number
    of dimensions, then one big-endian uint32 per dimension. MNIST image files
    therefore start with magic 0x00000803 and label files with 0x00000801.

    The size the header declares is computed exactly (Python ints) and checked against
    ``max_bytes`` and ``item_shape`` (the dimensions after the first, e.g. ``(28, 28)``)
    before any allocation; the data is then read (decompressed) up to that size plus one
    byte, so no file makes this allocate more than ``max_bytes``.
    """
    path = Path(path)
    stream, zipped = _open_maybe_gzipped(path)
    with stream:
        shape, header_len, expected_payload = _read_idx_header(
            path, stream, expected_ndim, item_shape, max_bytes, limit_reason
        )
        if not zipped:  # the file's size tells at once
            payload = path.stat().st_size - header_len
            if payload != expected_payload:
                what = "truncated" if payload < expected_payload else "trailing bytes"
                raise CorruptDataError(
                    path,
                    f"{what}: header says shape {shape} = {expected_payload} bytes, file has {payload} payload bytes",
                )
        out = np.empty(expected_payload, dtype=np.uint8)
        payload = _read_exactly(path, stream, out, "data")
        if payload < expected_payload:
            raise CorruptDataError(
                path,
                f"truncated: header says shape {shape} = {expected_payload} bytes, file has {payload} payload bytes",
            )
        # one byte more: trailing data, and (gzip) the end of the stream with its CRC check
        if _read_exactly(path, stream, bytearray(1), "end"):
            raise CorruptDataError(
                path, f"trailing bytes: header says shape {shape} = {expected_payload} bytes, the file holds more"
            )
    return out.reshape(shape)


def _gzip_isize(path: Path) -> int:
    """The uncompressed size modulo 2**32 a gzip file's trailer records (its last 4 bytes)."""
    with open(path, "rb") as fh:
        fh.seek(-4, 2)
        return int.from_bytes(fh.read(4), "little")


def quick_check_idx(path, expected_ndim: int, item_shape: tuple | None = None) -> None:
    """A cheap check that an IDX file is whole, without decompressing it: its header, and the size it
    declares against the file's size (raw) or the gzip trailer's record of the uncompressed size, which
    a truncated download does not have. :class:`CorruptDataError` when they disagree. (A gzip file of
    several members, as ``cat a.gz b.gz`` makes, would disagree too; no official one is.)"""
    path = Path(path)
    stream, zipped = _open_maybe_gzipped(path)
    try:
        with stream:
            shape, header_len, payload = _read_idx_header(
                path, stream, expected_ndim, item_shape, MAX_IDX_BYTES, "the most an IDX file of a data set may hold"
            )
        if zipped:
            recorded = _gzip_isize(path)
            if recorded != (header_len + payload) % (1 << 32):
                raise CorruptDataError(
                    path,
                    f"truncated or damaged gzip: its trailer records {recorded:,} uncompressed bytes, the IDX "
                    f"header of shape {shape} needs {header_len + payload:,}",
                )
        elif path.stat().st_size != header_len + payload:
            raise CorruptDataError(
                path, f"{path.stat().st_size:,} bytes, the IDX header of shape {shape} needs {header_len + payload:,}"
            )
    except OSError as exc:
        raise CorruptDataError(path, f"cannot read file ({exc})") from exc


def quick_check_pickle(path) -> None:
    """A cheap check that a CIFAR batch file is whole: every pickle ends with the STOP opcode ``.``,
    which a truncated file lacks."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            if fh.seek(0, 2) == 0:
                raise CorruptDataError(path, "empty file (0 bytes)")
            fh.seek(-1, 2)
            last = fh.read(1)
    except OSError as exc:
        raise CorruptDataError(path, f"cannot read file ({exc})") from exc
    if last != pickle.STOP:
        raise CorruptDataError(path, "truncated pickle (it does not end with the pickle STOP opcode)")


def quick_check_tar_gz(path) -> None:
    """A cheap check that a ``.tar.gz`` is whole: gzip magic bytes, and an uncompressed size (the gzip
    trailer's record) that is a whole number of 512-byte tar blocks; a truncated file's last bytes are
    compressed data, which passes that 1 time in 512."""
    path = Path(path)
    stream, zipped = _open_maybe_gzipped(path)
    stream.close()
    try:
        recorded = _gzip_isize(path) if zipped else None
    except OSError as exc:
        raise CorruptDataError(path, f"cannot read file ({exc})") from exc
    if recorded is None:
        raise CorruptDataError(path, "not a gzip file (bad gzip magic bytes)")
    if recorded % 512:
        raise CorruptDataError(
            path, f"truncated or damaged: its gzip trailer records {recorded:,} bytes, not whole 512-byte tar blocks"
        )


# --------------------------------------------------------------------------
# CIFAR pickles
# --------------------------------------------------------------------------


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else.

    The official CIFAR batches are Python 2 pickles of a dict whose values
    are strings, lists of ints and one ``numpy.ndarray``; an ndarray pickles
    as ``_reconstruct(ndarray, ...)`` plus a ``dtype``. Those are the only
    callables allowed here. (``_codecs.encode`` appears when Python 3 writes
    ``bytes`` with protocol < 3; ``_frombuffer`` when numpy uses protocol 5;
    ``scalar`` for numpy scalars. All are pure constructors.)
    """

    ALLOWED_GLOBALS = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED_GLOBALS:
            raise _ForbiddenGlobal(f"forbidden global {module}.{name}")
        return super().find_class(module, name)


def restricted_loads(data: bytes, source) -> object:
    """Unpickle ``data`` (read from ``source``, used in error messages).

    ``encoding="bytes"`` is what the official CIFAR instructions use for the
    Python 2 pickles: their str keys come back as ``bytes`` (``b"data"``).
    """
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _ForbiddenGlobal as exc:
        raise CorruptDataError(source, f"refusing to unpickle: {exc}") from None
    except (EOFError, pickle.UnpicklingError) as exc:
        # A cut-off file ends with EOFError or "pickle data was truncated",
        # depending on where the cut falls.
        if isinstance(exc, EOFError) or "truncated" in str(exc):
            raise CorruptDataError(source, "truncated pickle") from exc
        raise CorruptDataError(source, f"not a valid pickle ({exc})") from exc
    except Exception as exc:  # any other decode failure of untrusted bytes
        raise CorruptDataError(source, f"not a valid pickle ({type(exc).__name__}: {exc})") from exc


def _lookup(batch: dict, key: bytes):
    """CIFAR dict keys are bytes for the official files; accept str keys too
    (files re-pickled by Python 3 code)."""
    if key in batch:
        return batch[key]
    return batch.get(key.decode())


def check_labels(labels: np.ndarray, num_classes: int, source) -> None:
    """CorruptDataError naming ``source`` unless every label is in ``[0, num_classes)``."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise CorruptDataError(source, f"labels outside [0, {num_classes}): min {labels.min()}, max {labels.max()}")


def parse_cifar_batch(
    data: bytes, source, label_key: bytes, num_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decode one CIFAR batch pickle into ``(images uint8 N x 3 x 32 x 32,
    labels int64 N)``, validating the structure (and, given ``num_classes``, the labels' range,
    so an error names this batch, not only its folder or archive)."""
    batch = restricted_loads(data, source)
    if not isinstance(batch, dict):
        raise CorruptDataError(source, f"expected a pickled dict, got {type(batch).__name__}")
    pixels = _lookup(batch, b"data")
    labels = _lookup(batch, label_key)
    if pixels is None or labels is None:
        raise CorruptDataError(source, f"missing b'data' or {label_key!r} entry")
    if (
        not isinstance(pixels, np.ndarray)
        or pixels.dtype != np.uint8
        or pixels.ndim != 2
        or pixels.shape[1] != 3 * 32 * 32
    ):
        shape = getattr(pixels, "shape", None)
        dtype = getattr(pixels, "dtype", type(pixels).__name__)
        raise CorruptDataError(source, f"b'data' must be uint8 N x 3072, got {dtype} {shape}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise CorruptDataError(source, f"labels are not integers ({exc})") from exc
    if labels.ndim != 1 or len(labels) != len(pixels):
        raise CorruptDataError(source, f"{len(pixels)} images but labels of shape {labels.shape}")
    if num_classes is not None:
        check_labels(labels, num_classes, source)
    # Rows are stored channel-major (1024 R, 1024 G, 1024 B), i.e. CHW.
    return pixels.reshape(-1, 3, 32, 32), labels


#: the largest CIFAR batch file is CIFAR-100's ``train`` (50,000 images, 158 MB); checked on the
#: file's or the tar member's declared size before it is read
MAX_CIFAR_BATCH_BYTES = 256 << 20


def _check_batch_size(source, size: int) -> None:
    if size > MAX_CIFAR_BATCH_BYTES:
        raise CorruptDataError(
            source,
            f"{size:,} bytes, more than a CIFAR batch holds (at most "
            f"{MAX_CIFAR_BATCH_BYTES:,}); the file is damaged or not a CIFAR batch",
        )


def read_cifar_members_from_dir(folder: Path, members, label_key: bytes, num_classes: int | None = None):
    """Read and concatenate the named batch files from an extracted folder."""
    images, labels = [], []
    for member in members:
        path = folder / member
        try:
            _check_batch_size(path, path.stat().st_size)
            data = path.read_bytes()
        except OSError as exc:
            raise CorruptDataError(path, f"cannot read file ({exc})") from exc
        x, y = parse_cifar_batch(data, path, label_key, num_classes)
        images.append(x)
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def read_cifar_members_from_tar(
    archive: Path, folder: str, member_groups, label_key: bytes, num_classes: int | None = None
):
    """Read batches straight out of the official tarball, without extracting.

    ``member_groups`` is a list of lists of member names (e.g. [train, test]);
    one list of ``(images, labels)`` pairs is returned per group. The archive
    is streamed once (gzip has no random access). Nothing is written to disk,
    so hostile member paths cannot escape anywhere.
    """
    wanted = {f"{folder}/{m}": (g, m) for g, group in enumerate(member_groups) for m in group}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = member.name
                while name.startswith("./"):  # a tarball repacked with `tar -C DIR .`: ./cifar-10-batches-py/...
                    name = name[2:]
                if name in wanted and member.isfile():
                    _check_batch_size(f"{archive}::{name}", member.size)  # the tar header's size, before reading
                    found[name] = cast(IO[bytes], tar.extractfile(member)).read()  # a regular file: a stream
                    if len(found) == len(wanted):
                        break
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise CorruptDataError(archive, f"unreadable or truncated tar.gz ({exc})") from exc
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise CorruptDataError(archive, f"archive lacks member(s) {', '.join(missing)}")
    results = []
    for group in member_groups:
        parts = [
            parse_cifar_batch(found[f"{folder}/{m}"], f"{archive}::{folder}/{m}", label_key, num_classes) for m in group
        ]
        results.append((np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])))
    return results
