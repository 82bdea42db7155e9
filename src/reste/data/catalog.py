"""What each data set is, where it comes from and where it is looked for.

Everything that is a *fact about a data set* (shape, class count,
normalisation statistics, augmentation recipe, official file names,
download URLs and md5 sums) lives here, so the readers, the downloader and
the loaders share one source of truth.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UsageError, did_you_mean

__all__ = [
    "DatasetInfo",
    "IdxSource",
    "CifarSource",
    "names",
    "info",
    "default_root",
    "resolve_root",
    "EmptyRootError",
    "download_command",
    "SYSTEM_DIRS",
    "IDX_SOURCES",
    "CIFAR_SOURCES",
    "how_to_get",
]


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a data set.

    Supports both attribute access (``info.num_classes``) and mapping access
    (``info["num_classes"]``) so callers may treat it as a dict.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_size: int
    test_size: int
    # Training augmentation of the recipe: random crop after zero padding by
    # ``crop_padding`` pixels (0 disables it) and random horizontal flips.
    crop_padding: int = 0
    horizontal_flip: bool = False
    in_memory: bool = True

    def __getitem__(self, key: str):
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def keys(self):
        return self.to_dict().keys()

    def to_dict(self) -> dict:
        return asdict(self)


_INFOS: dict[str, DatasetInfo] = {
    info_.name: info_
    for info_ in (
        # Fashion-MNIST statistics measured on its 60k training images.
        # Flips are label-preserving for clothes, so the recipe uses them.
        DatasetInfo(
            "fashion_mnist", 10, 1, 28, (0.2860,), (0.3530,), 60000, 10000, crop_padding=2, horizontal_flip=True
        ),
        # Digits are not flip-invariant (a mirrored 2 is not a 2): crop only.
        DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,), 60000, 10000, crop_padding=2, horizontal_flip=False),
        # The CIFAR-10 std below is the value of the common BNN recipes (IR-Net's code base); the exact
        # per-pixel std would be (0.2470, 0.2435, 0.2616). ReSTE's reference code normalises CIFAR-10
        # with ImageNet's statistics instead (dataset/load_data.py); docs/configs.md lists the difference.
        DatasetInfo(
            "cifar10",
            10,
            3,
            32,
            (0.4914, 0.4822, 0.4465),
            (0.2023, 0.1994, 0.2010),
            50000,
            10000,
            crop_padding=4,
            horizontal_flip=True,
        ),
        DatasetInfo(
            "cifar100",
            100,
            3,
            32,
            (0.5071, 0.4865, 0.4409),
            (0.2673, 0.2564, 0.2762),
            50000,
            10000,
            crop_padding=4,
            horizontal_flip=True,
        ),
        # ImageNet augmentation (RandomResizedCrop + flip) is described in
        # reste.data.imagenet, not by crop_padding.
        DatasetInfo(
            "imagenet",
            1000,
            3,
            224,
            (0.485, 0.456, 0.406),
            (0.229, 0.224, 0.225),
            1281167,
            50000,
            crop_padding=0,
            horizontal_flip=True,
            in_memory=False,
        ),
    )
}


def names() -> list[str]:
    """Names accepted by :func:`info`, :func:`create_loaders` and :func:`download`."""
    return list(_INFOS)


def info(name: str) -> DatasetInfo:
    """Return the :class:`DatasetInfo` of data set ``name``."""
    try:
        return _INFOS[canonical_name(name)]
    except KeyError:
        raise ValueError(
            f"unknown data set {name!r}; known: {', '.join(_INFOS)}.{did_you_mean(name, _INFOS)}"
        ) from None


def canonical_name(name: str) -> str:
    """Accept harmless spelling variants ("Fashion-MNIST", "CIFAR10")."""
    return name.strip().lower().replace("-", "_")


# --------------------------------------------------------------------------
# Official files
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class IdxSource:
    """The four official IDX files of an MNIST-like data set."""

    base_url: str
    # role -> (official file name, md5 of the official .gz file)
    files: dict[str, tuple[str, str]] = field(default_factory=dict)


IDX_ROLES = ("train_images", "train_labels", "test_images", "test_labels")

IDX_SOURCES: dict[str, IdxSource] = {
    "fashion_mnist": IdxSource(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        {
            "train_images": ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            "train_labels": ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
            "test_images": ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
            "test_labels": ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
        },
    ),
    "mnist": IdxSource(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        {
            "train_images": ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            "train_labels": ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
            "test_images": ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            "test_labels": ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
        },
    ),
}


@dataclass(frozen=True)
class CifarSource:
    """The official "python version" tarball of a CIFAR data set."""

    base_url: str
    archive: str
    md5: str
    folder: str  # top-level folder inside the tarball
    train_members: tuple[str, ...]
    test_members: tuple[str, ...]
    meta_member: str
    label_key: bytes
    # the binary version's folder and tarball: not read, but named when found instead
    binary_names: tuple[str, ...] = ()


CIFAR_SOURCES: dict[str, CifarSource] = {
    "cifar10": CifarSource(
        "https://www.cs.toronto.edu/~kriz/",
        "cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        b"labels",
        ("cifar-10-batches-bin", "cifar-10-binary.tar.gz"),
    ),
    "cifar100": CifarSource(
        "https://www.cs.toronto.edu/~kriz/",
        "cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python",
        ("train",),
        ("test",),
        "meta",
        b"fine_labels",
        ("cifar-100-binary", "cifar-100-binary.tar.gz"),
    ),
}


# --------------------------------------------------------------------------
# Where data sets are looked for
# --------------------------------------------------------------------------

# Folders installed by operating-system packages, searched after the user's
# root. Debian's ``dataset-fashion-mnist`` ships the four official .gz files
# (re-compressed, so their md5 differs from upstream; the decompressed
# content is identical and we never md5-check files we did not download).
# A module-level dict so tests can monkeypatch it.
SYSTEM_DIRS: dict[str, list[Path]] = {
    "fashion_mnist": [Path("/usr/share/datasets/fashion-mnist")],
}

ROOT_ENV_VAR = "RESTE_DATA"
MIRROR_ENV_VAR = "RESTE_MIRROR"


def default_root() -> Path:
    """The per-user data folder: ``$RESTE_DATA`` if set, else ``$XDG_CACHE_HOME/reste/data``
    (``~/.cache/reste/data``). Data sets downloaded without an explicit root go there."""
    if os.environ.get(ROOT_ENV_VAR):
        return Path(os.environ[ROOT_ENV_VAR]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "reste" / "data"


class EmptyRootError(UsageError, ValueError):
    """An empty data folder (``root=""``, ``--root ""``: an unset shell variable, say), which would
    silently mean the current directory; a usage error (exit code 2)."""


def resolve_root(root, what: str = "root") -> Path:
    """``root`` as a Path (``~`` expanded), or the per-user folder for ``None``; an empty string is an
    :class:`EmptyRootError` naming ``what`` (the argument or option it came from)."""
    if root is None:
        return default_root()
    if isinstance(root, (str, bytes)) and not root:
        # as $RESTE_DATA="" means unset, not the current directory; refused rather than guessed
        raise EmptyRootError(
            f"{what} is empty ({what}=''; an unset shell variable?); give a data folder, or leave {what} "
            f"out for the default ({default_root()})"
        )
    return Path(os.fsdecode(root)).expanduser()


def download_command(name: str, root) -> str:
    """The ``reste download`` command that fetches ``name`` into ``root`` (``None``: the default
    folder), quoted for a shell."""
    return f"reste download {name}" + (f" --root {shlex.quote(str(root))}" if root is not None else "")


def _writable(folder: Path) -> bool:
    """Whether ``folder``, or its nearest existing parent (a download creates the rest), takes new files."""
    folder = Path(folder).expanduser().absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return os.access(folder, os.W_OK | os.X_OK)


def how_to_get(name: str, root: Path, system: bool = True) -> list[str]:
    """Commands that fetch data set ``name`` into ``root``, for error messages; ``system``:
    whether the system folders were searched too (no explicit root)."""
    name = canonical_name(name)
    if name == "imagenet":
        return [
            "ImageNet cannot be downloaded automatically (it needs registration at https://image-net.org/).",
            f"Put ILSVRC-2012 in the class-folder layout {root}/train/<wnid>/*.JPEG and "
            f"{root}/val/<wnid>/*.JPEG (or {root}/imagenet/train/...).",
        ]
    # quoted for a shell (a root with a space or a quote); json.dumps spells a valid Python str literal
    code = f"import reste.data; reste.data.download({json.dumps(name)}, root={json.dumps(str(root))})"
    commands = [
        f"python -c {shlex.quote(code)}",
        f"{download_command(name, root)}   (or: python -m reste download ...)",
        "or pass download=True to reste.data.create_loaders(...) (data.download=true in a config)",
    ]
    if not _writable(root):  # e.g. a read-only home: the commands above would fail there
        commands.insert(0, f"{root} is not writable: set RESTE_DATA=DIR (or data.root=DIR) to a writable folder")
    if name == "fashion_mnist" and system:
        commands.append("or, on Debian/Ubuntu: apt-get install dataset-fashion-mnist")
    elif name in SYSTEM_DIRS and not system:
        commands.append(
            f"or leave the data folder unset (data.root) to use {default_root()} and "
            f"{', '.join(str(p) for p in SYSTEM_DIRS[name])}"
        )
    return commands


def test_image_count(subset: int | None, test_subset: int | None) -> int | None:
    """How many test images a run evaluates on: ``test_subset`` when set, else ``subset // 5``
    (at least 1) with a training subset, else None (all of them)."""
    if test_subset is not None:
        return int(test_subset)
    if subset is not None:
        return max(1, int(subset) // 5)
    return None
