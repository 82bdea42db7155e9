"""Finding a data set on disk and reading it into uint8 numpy arrays.

Search order for the in-memory data sets (first complete hit wins):

* MNIST-likes: ``root/<name>``, ``root``, torchvision's ``root/<Folder>/raw``
  layout, then, only when no ``root`` was given, system folders (Debian's
  ``/usr/share/datasets/fashion-mnist`` for ``fashion_mnist``). A folder counts
  when it holds all four IDX files, each either ``.gz`` or uncompressed.
* CIFAR: in ``root/<name>`` then ``root``: the extracted folder
  (``cifar-10-batches-py/`` / ``cifar-100-python/``) if it holds every batch,
  else the official tarball, read in place without extracting.

What is read is checked against the catalog where that is cheap and certain: splits holding the
official sizes the other way round (swapped files) and a full MNIST-like training split whose mean
pixel is the other MNIST-like data set's (same file names) are :class:`CorruptDataError`.

``root`` defaults to the per-user data folder (``$RESTE_DATA``, else
``~/.cache/reste/data``). A ``root`` given explicitly is the only place looked
at: a data set missing there is an error naming it, never a silent fallback to
another copy.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import catalog
from .catalog import (
    CIFAR_SOURCES,
    IDX_ROLES,
    IDX_SOURCES,
    canonical_name,
    how_to_get,
    info,
    resolve_root,
)
from .download import download as download_dataset
from .errors import CorruptDataError, DatasetNotFoundError
from .formats import (
    check_labels,
    quick_check_idx,
    quick_check_pickle,
    quick_check_tar_gz,
    read_cifar_members_from_dir,
    read_cifar_members_from_tar,
    read_idx,
)

__all__ = ["DatasetArrays", "load_arrays", "locate", "quick_check"]

# torchvision stores the same IDX files under root/<Folder>/raw; accepting
# that layout lets users reuse data they already have.
_TORCHVISION_FOLDERS = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST"}


@dataclass
class DatasetArrays:
    """A whole in-memory data set: uint8 NCHW images and int64 labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str  # where it was read from, for logs


def _idx_candidates(name: str, root: Path, system: bool) -> list[Path]:
    candidates = [root / name, root]
    if name in _TORCHVISION_FOLDERS:
        candidates.append(root / _TORCHVISION_FOLDERS[name] / "raw")
    if system:  # only without an explicit root; looked up at call time so it can be patched
        candidates += list(catalog.SYSTEM_DIRS.get(name, []))
    return candidates


def _find_idx_files(name: str, folder: Path, roles=IDX_ROLES) -> tuple[dict[str, Path] | None, str]:
    """Return ({role: path}, "") if ``folder`` holds the files of ``roles`` (all four by default),
    else (None, why-not) for the error message."""
    if not folder.is_dir():
        return None, "no such folder"
    found, missing = {}, []
    for role in roles:
        gz_name = IDX_SOURCES[name].files[role][0]
        for candidate in (folder / gz_name, folder / gz_name[: -len(".gz")]):
            if candidate.is_file():
                found[role] = candidate
                break
        else:
            missing.append(gz_name)
    if missing:
        return None, "missing " + ", ".join(missing)
    return found, ""


def _cifar_candidates(name: str, root: Path, system: bool) -> list[Path]:
    return [root / name, root]


def _find_cifar(name: str, folder: Path, test_only: bool = False) -> tuple[tuple[str, Path] | None, str]:
    """("dir", path) for an extracted folder, ("tar", path) for the tarball,
    or (None, why-not)."""
    source = CIFAR_SOURCES[name]
    extracted = folder / source.folder
    members = source.test_members if test_only else source.train_members + source.test_members
    if extracted.is_dir() and all((extracted / m).is_file() for m in members):
        return ("dir", extracted), ""
    archive = folder / source.archive
    if archive.is_file():
        return ("tar", archive), ""
    if not folder.is_dir():
        return None, "no such folder"
    binary = [n for n in source.binary_names if (folder / n).exists()]
    if binary:
        return None, (
            f"found {', '.join(binary)}: CIFAR's binary version, which is not read; it reads the python "
            f"version, {source.archive} (or its {source.folder}/ folder), fetched by the commands below"
        )
    return None, f"no {source.folder}/ with all batches and no {source.archive}"


def locate(name: str, root=None, *, test_only: bool = False):
    """Find data set ``name``; return what the reader needs, or raise
    :class:`DatasetNotFoundError` listing every place searched.

    With ``root=None`` the per-user data folder and then the system folders are
    searched; with an explicit ``root`` only that folder (see the module docstring).
    ``test_only``: only the test split's files are needed (evaluation).
    """
    name = canonical_name(name)
    system = root is None
    root = resolve_root(root)
    if name in IDX_SOURCES:
        candidates = _idx_candidates
        roles = ("test_images", "test_labels") if test_only else IDX_ROLES

        def find(name, folder):
            return _find_idx_files(name, folder, roles)
    elif name in CIFAR_SOURCES:
        candidates = _cifar_candidates

        def find(name, folder):
            return _find_cifar(name, folder, test_only)
    else:
        raise ValueError(f"{name!r} is not an in-memory data set")
    searched = []
    for folder in candidates(name, root, system):
        hit, why = find(name, folder)
        if hit:
            return hit
        searched.append(f"{folder} ({why})")
    raise DatasetNotFoundError(name, searched, how_to_get(name, root, system))


def quick_check(name: str, found) -> None:
    """Cheap checks that the files :func:`locate` found are whole, reading a few bytes of each and
    decompressing nothing (for ``reste datasets``): IDX headers against the file sizes or gzip
    trailers, CIFAR batches ending as a pickle does, a tarball's size in whole tar blocks.
    :class:`CorruptDataError` naming the first damaged file; reading the data checks everything."""
    name = canonical_name(name)
    if name in IDX_SOURCES:
        size = info(name).image_size
        for role, path in found.items():
            if role.endswith("_images"):
                quick_check_idx(path, 3, (size, size))
            else:
                quick_check_idx(path, 1)
        return
    source = CIFAR_SOURCES[name]
    kind, path = found
    if kind == "dir":
        for member in (*source.train_members, *source.test_members):
            quick_check_pickle(path / member)
    else:
        quick_check_tar_gz(path)


def find_imagenet_root(root=None) -> Path:
    """The folder holding ``train/`` and ``val/``: ``root`` or ``root/imagenet``."""
    root = resolve_root(root)
    searched = []
    for candidate in (root, root / "imagenet"):
        if (candidate / "train").is_dir() and (candidate / "val").is_dir():
            return candidate
        searched.append(f"{candidate} (needs train/ and val/ class folders)")
    raise DatasetNotFoundError("imagenet", searched, how_to_get("imagenet", root))


def _read_idx_split(images_path: Path, labels_path: Path, meta) -> tuple[np.ndarray, np.ndarray]:
    size = meta.image_size
    # the image size is checked on the header, before the images are read
    images = read_idx(images_path, 3, item_shape=(size, size))
    labels = read_idx(
        labels_path, 1, max_bytes=len(images), limit_reason=f"one label per image of {images_path.name}"
    ).astype(np.int64)
    if len(images) != len(labels):
        raise CorruptDataError(labels_path, f"{len(labels)} labels for {len(images)} images in {images_path.name}")
    check_labels(labels, meta.num_classes, labels_path)
    return images[:, None], labels  # add the channel axis: N x 1 x H x W


#: how close (in mean pixel / 255) a full MNIST-like training split must be to the *other*
#: data set's mean to be taken for it; the two means (0.1307, 0.2860) are 0.15 apart
IDENTITY_TOLERANCE = 0.01


def _check_identity(name: str, images: np.ndarray, path: Path, official_count: int) -> None:
    """CorruptDataError when a split of the official size looks like the other MNIST-like data set
    (both use the same file names, so a copy of one passes for the other). Generated or partial
    sets (any other size) are not checked."""
    if len(images) != official_count:
        return
    mean = float(images.mean(dtype=np.float64)) / 255.0
    own = info(name).mean[0]
    for other in IDX_SOURCES:
        theirs = info(other).mean[0]
        if other != name and abs(mean - theirs) < IDENTITY_TOLERANCE and abs(mean - own) > IDENTITY_TOLERANCE:
            raise CorruptDataError(
                path,
                f"its {len(images):,} images have a mean pixel of {mean:.4f}, which is {other}'s ({theirs:.4f}), "
                f"not {name}'s ({own:.4f}): these look like the {other} files (both data sets use the same "
                f"file names)",
                hint=f"Point data.root (--root) at the folder that holds {name}, or use data.name={other} "
                f"(name={other!r}) to use these files as {other}.",
            )


def _check_not_swapped(name: str, train_count: int | None, test_count: int, where: str, how_to_fix: str) -> None:
    """CorruptDataError when the splits hold the official sizes the other way round (the test files
    hold as many images as the official training split, and the training files, when read, as many
    as the official test split). Small or generated sets match neither and pass."""
    meta = info(name)
    if meta.train_size == meta.test_size or test_count != meta.train_size:
        return
    if train_count is not None and train_count != meta.test_size:
        return
    held = f"the test files hold {test_count:,} images" + (
        f" and the training files {train_count:,}" if train_count is not None else ""
    )
    raise CorruptDataError(
        where,
        f"{held}: {name}'s official sizes the other way round ({meta.train_size:,} training, "
        f"{meta.test_size:,} test images), so the train and test files look swapped",
        hint=how_to_fix,
    )


def load_arrays(
    name: str,
    root=None,
    *,
    download: bool | None = None,
    mirror: str | None = None,
    progress: bool = True,
    test_only: bool = False,
) -> DatasetArrays:
    """Read the whole train and test split of an in-memory data set.

    ``download``: ``None`` (the default) downloads a missing data set into the
    per-user data folder when no ``root`` was given, and never into an explicit
    ``root``; ``True`` downloads into ``root/<name>`` (or the per-user folder);
    ``False`` never downloads. Downloads are announced on stderr and md5-checked
    (see :func:`reste.data.download`); if one fails (offline, say), the error lists
    every place searched, the failure and how to get the files.
    """
    name = canonical_name(name)
    meta = info(name)
    if download is None:
        download = root is None
    try:
        found = locate(name, root, test_only=test_only)
    except DatasetNotFoundError as missing:
        if not download:
            raise
        target = resolve_root(root) / name
        print(
            f"{name} was not found; downloading the official files into {target} (md5-checked) ...",
            file=sys.stderr,
            flush=True,
        )
        try:
            download_dataset(name, root if root is not None else resolve_root(None), mirror=mirror, progress=progress)
        except OSError as exc:  # offline, refused, timed out: keep the full "where we looked" message
            raise DatasetNotFoundError(
                name, missing.searched + [f"download into {target} failed: {exc}"], missing.how_to_get
            ) from exc
        found = locate(name, target.parent, test_only=test_only)
        print(f"{name} is ready in {target}", file=sys.stderr, flush=True)

    # test_only: the training split is left empty (evaluation reads the test images only)
    channels = meta.in_channels
    no_train = (np.empty((0, channels, meta.image_size, meta.image_size), dtype=np.uint8), np.empty(0, dtype=np.int64))
    if name in IDX_SOURCES:
        train = no_train if test_only else _read_idx_split(found["train_images"], found["train_labels"], meta)
        test = _read_idx_split(found["test_images"], found["test_labels"], meta)
        files = IDX_SOURCES[name].files
        _check_not_swapped(
            name,
            None if test_only else len(train[0]),
            len(test[0]),
            str(found["test_images"].parent),
            f"Give them back their names: the {meta.train_size:,} training images and labels are "
            f"{files['train_images'][0]} and {files['train_labels'][0]}, the {meta.test_size:,} test ones "
            f"{files['test_images'][0]} and {files['test_labels'][0]}.",
        )
        if test_only:
            _check_identity(name, test[0], found["test_images"], meta.test_size)
        else:
            _check_identity(name, train[0], found["train_images"], meta.train_size)
        return DatasetArrays(train[0], train[1], test[0], test[1], source=str(found["test_images"].parent))

    source = CIFAR_SOURCES[name]
    kind, path = found
    if kind == "dir":
        label_key, classes = source.label_key, meta.num_classes
        train = no_train if test_only else read_cifar_members_from_dir(path, source.train_members, label_key, classes)
        test = read_cifar_members_from_dir(path, source.test_members, label_key, classes)
    elif test_only:
        train, (test,) = (
            no_train,
            read_cifar_members_from_tar(path, source.folder, [source.test_members], source.label_key, meta.num_classes),
        )
    else:
        train, test = read_cifar_members_from_tar(
            path, source.folder, [source.train_members, source.test_members], source.label_key, meta.num_classes
        )
    _check_not_swapped(
        name,
        None if test_only else len(train[0]),
        len(test[0]),
        str(path),
        f"The training batches are {', '.join(source.train_members)} and the test batch "
        f"{', '.join(source.test_members)}: give them back their names, or fetch the data again "
        f"(reste download {name}).",
    )
    return DatasetArrays(train[0], train[1], test[0], test[1], source=str(path))
