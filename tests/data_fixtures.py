"""Writers for tiny data sets in the *exact* official on-disk formats, used by
tests/test_data.py (no network, milliseconds to generate).

* IDX: big-endian header with magic 0x00000803 (images) / 0x00000801
  (labels), optionally gzipped, under the official file names.
* CIFAR: Python-2-style protocol-2 pickles (str values written as BINSTRING
  opcodes, exactly as cPickle did, so ``encoding="bytes"`` turns them into
  bytes keys) inside the official folder / tarball member names.
* Class folders of small JPEGs written with Pillow.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def idx_bytes(array: np.ndarray) -> bytes:
    """Serialise a uint8 array as IDX: 0x00 0x00 0x08 ndim, dims (>u4), data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    data = idx_bytes(array)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def make_idx_dataset(folder: Path, n_train=64, n_test=16, *, compress=True, seed=0, size=28):
    """Write the four IDX files into ``folder``; return the arrays written.

    Pixel values are in 1..255 (never 0) so that tests can tell padding
    (exactly 0) from image content.
    """
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(1, 256, (n_train, size, size), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(1, 256, (n_test, size, size), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for role, file_name in IDX_FILES.items():
        name = file_name if compress else file_name[: -len(".gz")]
        write_idx(folder / name, arrays[role], compress=compress)
    return arrays


def write_constant_idx_dataset(folder: Path, n_train: int, n_test: int, value: int = 0) -> None:
    """The four IDX files (uncompressed: quick to write at the official sizes) of images whose
    every pixel is ``value``, so their mean pixel is ``value / 255``; labels cycle through 0..9."""
    for role, count in (("train", n_train), ("test", n_test)):
        images, labels = IDX_FILES[f"{role}_images"], IDX_FILES[f"{role}_labels"]
        write_idx(folder / images[: -len(".gz")], np.full((count, 28, 28), value, np.uint8), compress=False)
        write_idx(folder / labels[: -len(".gz")], np.arange(count, dtype=np.uint8) % 10, compress=False)


class Py2StylePickler(pickle._Pickler):
    """Pure-Python pickler that writes ``bytes`` and ``str`` the way Python 2's
    cPickle wrote ``str`` (SHORT_BINSTRING / BINSTRING), and numpy globals
    under their historical ``numpy.core`` module, i.e. the format of the
    official CIFAR batches."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_string(self, obj):
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_string
    dispatch[str] = save_py2_string

    def save_global(self, obj, name=None):
        module = obj.__module__ if name is None else pickle.whichmodule(obj, name)
        name = name or obj.__qualname__
        module = module.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + module.encode() + b"\n" + name.encode() + b"\n")
        self.memoize(obj)

    dispatch[type] = save_global


def py2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    Py2StylePickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def cifar_batch(images: np.ndarray, labels, label_key: bytes, batch_label: bytes) -> bytes:
    """One official-style batch: images N x 3 x 32 x 32 -> b"data" N x 3072."""
    return py2_pickle(
        {
            b"batch_label": batch_label,
            label_key: [int(v) for v in labels],
            b"data": np.ascontiguousarray(images.reshape(len(images), -1), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
        }
    )


CIFAR_LAYOUT = {
    "cifar10": dict(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        meta="batches.meta",
        label_key=b"labels",
        classes=10,
    ),
    "cifar100": dict(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        train=["train"],
        test=["test"],
        meta="meta",
        label_key=b"fine_labels",
        classes=100,
    ),
}


def cifar_members(name: str, per_batch=8, n_test=10, seed=0):
    """``({member name: bytes}, arrays)`` of a tiny CIFAR data set."""
    layout = CIFAR_LAYOUT[name]
    rng = np.random.default_rng(seed)
    members, train_x, train_y = {}, [], []
    for member in layout["train"]:
        x = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, layout["classes"], per_batch)
        members[member] = cifar_batch(x, y, layout["label_key"], member.encode())
        train_x.append(x)
        train_y.append(y)
    test_x = rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8)
    test_y = rng.integers(0, layout["classes"], n_test)
    members[layout["test"][0]] = cifar_batch(test_x, test_y, layout["label_key"], b"testing batch 1 of 1")
    members[layout["meta"]] = py2_pickle({b"label_names": [f"class{i}".encode() for i in range(layout["classes"])]})
    arrays = dict(
        train_images=np.concatenate(train_x),
        train_labels=np.concatenate(train_y),
        test_images=test_x,
        test_labels=test_y,
    )
    return members, arrays


def write_cifar_folder(root: Path, name: str, **kwargs):
    layout = CIFAR_LAYOUT[name]
    members, arrays = cifar_members(name, **kwargs)
    folder = root / layout["folder"]
    folder.mkdir(parents=True, exist_ok=True)
    for member, data in members.items():
        (folder / member).write_bytes(data)
    return arrays


def tar_gz_bytes(entries: dict[str, bytes]) -> bytes:
    """A .tar.gz holding regular files ``{member path: content}`` (plus their
    folder entries, as the official tarballs have)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        folders = sorted({str(Path(p).parent) for p in entries if str(Path(p).parent) != "."})
        for folder in folders:
            info = tarfile.TarInfo(folder)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for path, data in entries.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_cifar_tarball(directory: Path, name: str, **kwargs):
    layout = CIFAR_LAYOUT[name]
    members, arrays = cifar_members(name, **kwargs)
    data = tar_gz_bytes({f"{layout['folder']}/{m}": b for m, b in members.items()})
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / layout["archive"]
    path.write_bytes(data)
    return path, arrays


def write_image_folders(
    root: Path, classes=("n01440764", "n01443537", "n01484850"), per_class=3, val_per_class=2, seed=0
):
    """ImageNet layout of small JPEGs of varied sizes and solid-ish colours."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for _label, wnid in enumerate(classes):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                width, height = int(rng.integers(40, 90)), int(rng.integers(40, 90))
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG", quality=90)
    return list(classes)
