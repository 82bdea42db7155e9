"""``reste download`` and ``reste datasets``: the data sub-commands of the
``reste`` command line (registered by :mod:`reste.cli`; also available
stand-alone as ``python -m reste.data``)."""

from __future__ import annotations

import argparse

from ..errors import UsageError, did_you_mean
from .catalog import canonical_name, download_command, names

__all__ = ["register", "run_download", "run_datasets", "download_command"]

DOWNLOAD_EPILOG = """\
examples:
  reste download fashion_mnist                 # into $RESTE_DATA or ~/.cache/reste/data
  reste download cifar10 --root ./data
  RESTE_MIRROR=http://host/mnist/ reste download mnist

Files are md5-checked; a wrong download is deleted and never replaces an
existing file; a failed download leaves no data set folder behind. A data set
already complete is left as it is (a read-only folder is fine); a damaged
extracted CIFAR batch is extracted again. Several processes may download one
data set into one folder at once: they take turns on an flock on a hidden lock
file, ROOT/.NAME.lock (kept), so one fetches and the others find it ready. That
works on local file systems, and on NFS/Lustre only where flock works across
clients; without it (a warning says so) each process still downloads into its own
temporary file and renames it into place atomically.
NAME may be spelled as data.name accepts it (CIFAR10, Fashion-MNIST).
Without --root, training finds what is downloaded here by itself. Fashion-MNIST
is also found in /usr/share/datasets/fashion-mnist (Debian: apt-get install
dataset-fashion-mnist).
ImageNet cannot be downloaded.
"""


def register(subparsers) -> None:
    """Add the ``download`` and ``datasets`` sub-commands."""
    download = subparsers.add_parser(
        "download",
        help="download and verify a data set into ROOT/NAME",
        description="Download the official files of a data set, check their md5 and unpack them.",
        epilog=DOWNLOAD_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    download.add_argument(
        "name", type=_dataset_name, metavar="NAME", help=", ".join(names()) + " (CIFAR10, Fashion-MNIST... too)"
    )
    download.add_argument("--root", default=None, help="data folder (default: $RESTE_DATA or ~/.cache/reste/data)")
    download.add_argument(
        "--mirror",
        default=None,
        help="base URL replacing the official one: http(s)://HOST/PATH/ or file:///FOLDER/ ($RESTE_MIRROR)",
    )
    download.add_argument("--quiet", action="store_true", help="no progress bar")
    download.set_defaults(func=run_download)

    datasets = subparsers.add_parser(
        "datasets",
        help="list the known data sets, their shapes and which are present here",
        description="List the known data sets and, for each, where it was found (without --root: the per-user "
        "data folder, then system folders), 'damaged: ...' when a quick check of its files (sizes, gzip "
        "trailers, no decompression) fails, or 'not present'.",
    )
    datasets.add_argument("--root", default=None, help="look only in this data folder")
    datasets.set_defaults(func=run_datasets)


def _dataset_name(word: str) -> str:
    """The catalog name of ``word`` (spelling variants as the API accepts them: ``CIFAR10``,
    ``Fashion-MNIST``); an unknown one is an argparse error listing the names and the closest."""
    name = canonical_name(word)
    if name not in names():
        raise argparse.ArgumentTypeError(
            f"unknown data set {word!r}; known: {', '.join(names())}.{did_you_mean(name, names())}"
        )
    return name


def _check_root(root) -> None:
    if root == "":  # `--root "$UNSET"`: would silently mean the current directory
        raise UsageError(
            "--root is empty (an unset shell variable?); give a data folder, or leave --root out for the "
            "default ($RESTE_DATA or ~/.cache/reste/data)"
        )


def run_download(args) -> int:
    from ..errors import ReSTEError
    from .download import check_mirror, download

    _check_root(args.root)
    check_mirror(args.mirror, "--mirror")  # before anything is created; exit 2 naming the option
    try:
        folder = download(args.name, args.root, mirror=args.mirror, progress=not args.quiet)
    except ReSTEError:  # DatasetNotFoundError / CorruptDataError (exit 1), ImageNet's NotDownloadableError (exit 2)
        raise
    except (OSError, ValueError) as exc:  # the download failed
        raise ReSTEError(str(exc)) from None
    print(f"{args.name} is ready in {folder}")
    return 0


def _where(name: str, root) -> str:
    """The folder data set ``name`` is read from, 'damaged: ...' when a cheap check of its files
    fails (see :func:`reste.data.arrays.quick_check`), or 'not present'."""
    from .arrays import locate, quick_check
    from .errors import CorruptDataError, DatasetNotFoundError

    if name == "imagenet":
        from .arrays import find_imagenet_root

        try:
            return str(find_imagenet_root(root))
        except (OSError, ValueError):
            return "not present (needs a manual download, see docs/data.md)"
    try:
        hit = locate(name, root)
        quick_check(name, hit)
    except DatasetNotFoundError:
        return f"not present ({download_command(name, root)})"
    except CorruptDataError as exc:
        return f"damaged: {exc}"
    path = hit[1] if isinstance(hit, tuple) else hit["train_images"].parent
    return str(path)


def run_datasets(args) -> int:
    from .catalog import info

    _check_root(args.root)
    for name in names():
        meta = info(name)
        shape = f"{meta.in_channels}x{meta.image_size}x{meta.image_size}"
        print(
            f"{name:14s} {meta.num_classes:5d} classes  {shape:10s} "
            f"{meta.train_size:>9,d} train / {meta.test_size:>6,d} test   {_where(name, args.root)}"
        )
    return 0
