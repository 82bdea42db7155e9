"""Tests of reste.data: formats, search, errors, loaders, augmentation,
sharding, downloads (from a local HTTP server) and the ImageNet folder loader.

All data is generated on the fly in the exact official formats by
tests/data_fixtures.py; nothing touches the network. The real Fashion-MNIST
test runs when Debian's dataset-fashion-mnist package is installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import gzip
import hashlib
import http.server
import importlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import data_fixtures as fx  # noqa: E402
import reste.data as data  # noqa: E402
from reste.data import catalog  # noqa: E402
from reste.data.augment import random_crop  # noqa: E402
from reste.data.download import safe_extract  # noqa: E402
from reste.data.loaders import InMemoryLoader  # noqa: E402

# the module (reste.data.download is the function, which the package re-exports under that name)
download_module = importlib.import_module("reste.data.download")

REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch, tmp_path):
    """No system folders, no env overrides, no proxies: tests see only what
    they create."""
    monkeypatch.setattr(catalog, "SYSTEM_DIRS", {})
    for var in ("RESTE_DATA", "RESTE_MIRROR", "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    # the per-user data folder of these tests; an unintended download fails at once (port 9 is closed)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    monkeypatch.setenv("RESTE_MIRROR", "http://127.0.0.1:9/")


def normalized(images_uint8: np.ndarray, name: str) -> torch.Tensor:
    meta = data.info(name)
    x = torch.from_numpy(images_uint8).float() / 255.0
    mean = torch.tensor(meta.mean).view(1, -1, 1, 1)
    std = torch.tensor(meta.std).view(1, -1, 1, 1)
    return (x - mean) / std


def to_uint8(batch: torch.Tensor, name: str) -> torch.Tensor:
    """Undo the normalisation (exact after rounding)."""
    meta = data.info(name)
    mean = torch.tensor(meta.mean).view(1, -1, 1, 1)
    std = torch.tensor(meta.std).view(1, -1, 1, 1)
    return ((batch * std + mean) * 255.0).round().to(torch.uint8)


def collect(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


# --------------------------------------------------------------------------
# catalog
# --------------------------------------------------------------------------


def test_names_and_info():
    assert data.names() == ["fashion_mnist", "mnist", "cifar10", "cifar100", "imagenet"]
    expected = {
        "fashion_mnist": (10, 1, 28),
        "mnist": (10, 1, 28),
        "cifar10": (10, 3, 32),
        "cifar100": (100, 3, 32),
        "imagenet": (1000, 3, 224),
    }
    for name, (classes, channels, size) in expected.items():
        meta = data.info(name)
        assert (meta.num_classes, meta.in_channels, meta.image_size) == (classes, channels, size)
        assert meta["num_classes"] == classes  # mapping access works too
        assert len(meta.mean) == len(meta.std) == channels
    assert data.info("Fashion-MNIST").name == "fashion_mnist"
    with pytest.raises(ValueError, match="unknown data set"):
        data.info("svhn")
    with pytest.raises(ValueError, match="Did you mean 'fashion_mnist'"):
        data.info("fashon_mnist")


# --------------------------------------------------------------------------
# IDX data sets
# --------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["root/name", "root", "torchvision"])
def test_idx_loader_shapes_normalisation_and_labels(tmp_path, layout):
    folder = {
        "root/name": tmp_path / "fashion_mnist",
        "root": tmp_path,
        "torchvision": tmp_path / "FashionMNIST" / "raw",
    }[layout]
    arrays = fx.make_idx_dataset(folder, n_train=64, n_test=20)
    train, test = data.create_loaders("fashion_mnist", root=tmp_path, batch_size=16, test_batch_size=8)
    assert (len(train), len(test)) == (4, 3)
    assert (train.dataset_size, test.dataset_size) == (64, 20)
    assert (train.num_samples, test.num_samples) == (64, 20)

    images, labels = next(iter(train))
    assert images.shape == (16, 1, 28, 28) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and images.device.type == "cpu"

    # Test loader: file order, no augmentation, exact normalisation.
    test_images, test_labels = collect(test)
    expected = normalized(arrays["test_images"][:, None], "fashion_mnist")
    torch.testing.assert_close(test_images, expected, rtol=0, atol=1e-5)
    assert torch.equal(test_labels, torch.from_numpy(arrays["test_labels"].astype(np.int64)))


def test_uncompressed_idx_and_mnist_without_flips(tmp_path):
    arrays = fx.make_idx_dataset(tmp_path / "mnist", n_train=32, n_test=10, compress=False)
    train, _ = data.create_loaders("mnist", root=tmp_path, batch_size=32)
    images, labels = next(iter(train))
    originals = torch.from_numpy(arrays["train_images"][:, None])
    padded = torch.nn.functional.pad(originals, (2, 2, 2, 2))
    # labels are not unique, so match each output to any original window:
    # every output must be an *unflipped* crop of some original image.
    crops = to_uint8(images, "mnist")
    windows = padded.unfold(2, 28, 1).unfold(3, 28, 1).reshape(-1, 28 * 28)  # every unflipped crop
    matches = (crops.reshape(len(crops), 1, -1) == windows.unsqueeze(0)).all(-1)
    assert matches.any(1).all()


def test_subset_is_first_images_and_deterministic(tmp_path):
    arrays = fx.make_idx_dataset(tmp_path / "fashion_mnist", n_train=64, n_test=20)
    train, test = data.create_loaders("fashion_mnist", root=tmp_path, batch_size=8, subset=30, augment=False)
    assert (train.dataset_size, test.dataset_size) == (30, 6)
    assert torch.equal(test.labels, torch.from_numpy(arrays["test_labels"][:6].astype(np.int64)))
    images, _ = collect(train)
    # Shuffled, but a permutation of exactly the first 30 training images.
    got = sorted(map(bytes, to_uint8(images, "fashion_mnist").numpy().reshape(len(images), -1)))
    want = sorted(map(bytes, arrays["train_images"][:30].reshape(30, -1)))
    assert len(got) == 24 and set(got) <= set(want)  # drop_last: 3 batches of 8


def test_test_subset_sets_the_number_of_test_images_with_or_without_a_training_subset(tmp_path):
    arrays = fx.make_idx_dataset(tmp_path / "fashion_mnist", n_train=64, n_test=20)
    want = torch.from_numpy(arrays["test_labels"].astype(np.int64))
    for subset, test_subset, counts in (
        (30, 15, (30, 15)),
        (None, 7, (64, 7)),
        (30, None, (30, 6)),
        (None, None, (64, 20)),
    ):
        train, test = data.create_loaders(
            "fashion_mnist", root=tmp_path, batch_size=8, subset=subset, test_subset=test_subset, augment=False
        )
        assert (train.dataset_size, test.dataset_size) == counts
        assert torch.equal(test.labels, want[: counts[1]])  # always the first ones
    with pytest.raises(ValueError, match="test_subset must be a positive number"):
        data.create_loaders("fashion_mnist", root=tmp_path, test_subset=0)
    assert data.test_image_count(10, None) == 2 and data.test_image_count(3, None) == 1
    assert data.test_image_count(None, None) is None and data.test_image_count(3, 9) == 9


def test_drop_last_never_drops_the_only_batch(tmp_path):
    fx.make_idx_dataset(tmp_path, n_train=20, n_test=5)
    train, _ = data.create_loaders("fashion_mnist", root=tmp_path, batch_size=128)
    assert len(train) == 1 and train.num_samples == 20
    assert next(iter(train))[0].shape[0] == 20
    train, _ = data.create_loaders("fashion_mnist", root=tmp_path, batch_size=8)
    assert len(train) == 2 and train.num_samples == 16
    train, _ = data.create_loaders("fashion_mnist", root=tmp_path, batch_size=8, drop_last=False)
    assert len(train) == 3 and [len(x) for x, _ in train] == [8, 8, 4]


# --------------------------------------------------------------------------
# determinism, epochs, resume
# --------------------------------------------------------------------------


def test_same_seed_same_batches_and_epochs_differ(tmp_path):
    fx.make_idx_dataset(tmp_path, n_train=64, n_test=8)
    make = functools.partial(data.create_loaders, "fashion_mnist", root=tmp_path, batch_size=16)
    first, second = make(seed=3)[0], make(seed=3)[0]
    epoch0 = collect(first)
    assert all(torch.equal(a, b) for a, b in zip(epoch0, collect(second)))
    assert all(torch.equal(a, b) for a, b in zip(epoch0, collect(first)))  # re-iterating repeats

    first.set_epoch(1)
    epoch1 = collect(first)
    assert not torch.equal(epoch0[1], epoch1[1])  # reshuffled
    second.set_epoch(1)
    assert all(torch.equal(a, b) for a, b in zip(epoch1, collect(second)))
    first.set_epoch(0)
    assert all(torch.equal(a, b) for a, b in zip(epoch0, collect(first)))

    other_seed = collect(make(seed=4)[0])
    assert not torch.equal(epoch0[0], other_seed[0])


def test_augmentation_differs_across_epochs_for_same_order(tmp_path):
    # Without shuffling effects: one image repeated, so only augmentation varies.
    images = torch.full((64, 1, 28, 28), 200, dtype=torch.uint8)
    images[:, :, 10:18, 4:9] = 50  # asymmetric pattern: flips and shifts are visible
    loader = InMemoryLoader(
        images,
        torch.zeros(64, dtype=torch.long),
        batch_size=64,
        mean=(0.5,),
        std=(0.5,),
        shuffle=True,
        crop_padding=2,
        horizontal_flip=True,
        seed=0,
    )
    epoch0 = next(iter(loader))[0]
    loader.set_epoch(1)
    epoch1 = next(iter(loader))[0]
    assert not torch.equal(epoch0, epoch1)
    assert len({bytes(x.numpy()) for x in epoch0}) > 10  # many distinct augmentations


def test_resume_mid_epoch_matches_full_epoch(tmp_path):
    fx.make_idx_dataset(tmp_path, n_train=80, n_test=8)
    train, _ = data.create_loaders("fashion_mnist", root=tmp_path, batch_size=16, seed=1)
    train.set_epoch(5)
    full = list(train)
    train.set_epoch(5, start_batch=3)
    resumed = list(train)
    assert len(train) == 5 and len(resumed) == 2
    for (xa, ya), (xb, yb) in zip(full[3:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# --------------------------------------------------------------------------
# augmentation semantics
# --------------------------------------------------------------------------


def _identity_loader(images, **kwargs):
    """Labels are image indices, so outputs can be matched to their source."""
    return InMemoryLoader(images, torch.arange(len(images)), mean=(0.0,), std=(1 / 255.0,), **kwargs)


def test_a_cuda_loader_without_cuda_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    images = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="device='cuda' but CUDA is not available.*use device='cpu'"):
        _identity_loader(images, batch_size=2, device="cuda")


def test_random_crop_is_a_real_padded_crop():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (400, 1, 12, 12), dtype=torch.uint8, generator=generator)
    loader = _identity_loader(images, batch_size=100, shuffle=True, crop_padding=2, seed=7)
    shifts = set()
    for batch, index in loader:
        crops = batch.round().to(torch.uint8)  # mean 0, std 1/255: batch == uint8 values
        for crop, i in zip(crops, index):
            source = images[i]
            match = None
            for dy in range(5):
                for dx in range(5):
                    padded = torch.nn.functional.pad(source, (2, 2, 2, 2))
                    if torch.equal(padded[:, dy : dy + 12, dx : dx + 12], crop):
                        match = (dy - 2, dx - 2)
            assert match is not None, "output is not a crop of its source image"
            shifts.add(match)
            # Source pixels are >= 1, so zeros are exactly the padding band.
            dy, dx = match
            zero_rows = (crop == 0).all(dim=2).sum().item()
            zero_cols = (crop == 0).all(dim=1).sum().item()
            assert (zero_rows, zero_cols) == (abs(dy), abs(dx))
    assert shifts == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}  # all 25 used


def test_horizontal_flip_is_a_real_flip():
    images = torch.randint(1, 256, (200, 3, 8, 8), dtype=torch.uint8)
    loader = InMemoryLoader(
        images,
        torch.arange(200),
        batch_size=50,
        mean=(0, 0, 0),
        std=(1 / 255,) * 3,
        shuffle=False,
        horizontal_flip=True,
        seed=0,
    )
    flipped = 0
    for batch, index in loader:
        out = batch.round().to(torch.uint8)
        for image, i in zip(out, index):
            if torch.equal(image, images[i]):
                continue
            assert torch.equal(image, images[i].flip(-1))
            flipped += 1
    assert 60 < flipped < 140  # about half


def test_random_crop_matches_reference_offsets():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4) + 1
    offsets = torch.tensor([[0, 0], [2, 1]])
    out = random_crop(images, 1, offsets)
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    assert torch.equal(out[0], padded[0, :, 0:4, 0:4])
    assert torch.equal(out[1], padded[1, :, 2:6, 1:5])


# --------------------------------------------------------------------------
# sharding
# --------------------------------------------------------------------------


@pytest.mark.parametrize("n_train", [64, 63])
def test_sharding_gives_disjoint_equal_slices(tmp_path, n_train):
    images = torch.randint(0, 256, (n_train, 1, 4, 4), dtype=torch.uint8)
    shards = []
    for rank in range(2):
        loader = _identity_loader(images, batch_size=8, shuffle=True, seed=5, rank=rank, world_size=2, drop_last=False)
        loader.set_epoch(2)
        shards.append(collect(loader)[1])
    a, b = (set(s.tolist()) for s in shards)
    assert len(shards[0]) == len(shards[1]) == n_train // 2
    assert not a & b
    assert len(a | b) == n_train - n_train % 2  # covering (one left over when odd)

    single = _identity_loader(images, batch_size=8, shuffle=True, seed=5, drop_last=False)
    single.set_epoch(2)
    # Same permutation on all ranks: rank slices are consecutive pieces of it.
    assert torch.equal(torch.cat(shards), collect(single)[1][: 2 * (n_train // 2)])


def test_test_set_sharding_is_opt_in(tmp_path):
    fx.make_idx_dataset(tmp_path, n_train=32, n_test=11)
    _, test0 = data.create_loaders("fashion_mnist", root=tmp_path, batch_size=4, rank=0, world_size=2)
    assert test0.dataset_size == test0.num_samples == 11  # every rank evaluates everything
    sizes, seen = [], []
    for rank in range(2):
        _, test = data.create_loaders(
            "fashion_mnist", root=tmp_path, batch_size=4, rank=rank, world_size=2, shard_test=True
        )
        sizes.append(test.num_samples)
        seen.append(collect(test)[0])
    assert sizes == [6, 5]
    assert torch.equal(torch.cat(seen), collect(test0)[0])
    with pytest.raises(ValueError, match="rank"):
        data.create_loaders("fashion_mnist", root=tmp_path, rank=2, world_size=2)


# --------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------


def test_cifar10_extracted_folder(tmp_path):
    arrays = fx.write_cifar_folder(tmp_path / "cifar10", "cifar10", per_batch=8, n_test=10)
    train, test = data.create_loaders("cifar10", root=tmp_path, batch_size=8, augment=False)
    assert train.dataset_size == 40 and test.dataset_size == 10
    x, y = collect(test)
    assert x.shape == (10, 3, 32, 32)
    torch.testing.assert_close(x, normalized(arrays["test_images"], "cifar10"), rtol=0, atol=1e-5)
    assert torch.equal(y, torch.from_numpy(arrays["test_labels"]).long())
    loaded = data.load_arrays("cifar10", tmp_path)
    assert np.array_equal(loaded.train_images, arrays["train_images"])  # batches 1..5 in order


def test_cifar100_read_from_official_tarball(tmp_path):
    _, arrays = fx.write_cifar_tarball(tmp_path, "cifar100", per_batch=12, n_test=5)
    loaded = data.load_arrays("cifar100", tmp_path)
    assert np.array_equal(loaded.train_images, arrays["train_images"])
    assert np.array_equal(loaded.train_labels, arrays["train_labels"])  # fine_labels
    assert np.array_equal(loaded.test_images, arrays["test_images"])
    train, _ = data.create_loaders("cifar100", root=tmp_path, batch_size=4)
    images, _ = next(iter(train))
    assert images.shape == (4, 3, 32, 32)


def test_cifar_channel_layout_is_rgb_planes(tmp_path):
    image = np.zeros((1, 3, 32, 32), dtype=np.uint8)
    image[0, 0], image[0, 1], image[0, 2] = 10, 20, 30  # R, G, B planes
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for member in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / member).write_bytes(fx.cifar_batch(image, [3], b"labels", b"x"))
    loaded = data.load_arrays("cifar10", tmp_path)
    # raw row = 1024 R bytes, 1024 G, 1024 B  ->  channel 0 is R
    assert loaded.train_images[0, :, 0, 0].tolist() == [10, 20, 30]


def test_restricted_unpickler_refuses_arbitrary_globals(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    evil = pickle.dumps({b"data": Exploit(), b"labels": []}, protocol=2)
    for member in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / member).write_bytes(evil)
    with pytest.raises(data.CorruptDataError, match="forbidden global"):
        data.load_arrays("cifar10", tmp_path)
    assert not marker.exists()


# --------------------------------------------------------------------------
# errors: missing and corrupt data
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100"])
def test_missing_dataset_error_says_where_and_how(tmp_path, monkeypatch, name):
    monkeypatch.setattr(catalog, "SYSTEM_DIRS", {"fashion_mnist": [tmp_path / "usr-share"]})
    with pytest.raises(data.DatasetNotFoundError) as caught:
        data.create_loaders(name, root=tmp_path)
    error = caught.value
    assert isinstance(error, FileNotFoundError)
    text = str(error)
    assert repr(name) in text
    assert str(tmp_path / name) in text and f"{tmp_path} (" in text
    assert f'reste.data.download("{name}"' in text and f"reste download {name} --root {tmp_path}" in text
    assert f"{tmp_path / 'usr-share'} (" not in text  # an explicit root is the only place looked at
    if name == "fashion_mnist":
        assert (
            "apt-get install" not in text
            and f"leave the data folder unset (data.root) to use {data.default_root()}" in text
        )


def test_the_commands_to_get_a_data_set_are_quoted_for_the_shell(tmp_path):
    # was: --root /x/my d'ata unquoted: the shell splits it at the space and stops at the quote
    import ast
    import shlex

    root = tmp_path / "my d'ata"
    with pytest.raises(data.DatasetNotFoundError) as caught:
        data.load_arrays("mnist", root)
    python, reste = caught.value.how_to_get[:2]
    words = shlex.split(python)
    assert words[:2] == ["python", "-c"] and len(words) == 3
    call = ast.parse(words[2]).body[1].value
    assert ast.literal_eval(call.args[0]) == "mnist" and ast.literal_eval(call.keywords[0].value) == str(root)
    assert shlex.split(reste.partition("   (or:")[0]) == ["reste", "download", "mnist", "--root", str(root)]


def test_an_empty_root_is_an_error_not_the_current_folder(tmp_path, monkeypatch, capsys):
    # was: root="" / --root "" (an unset shell variable) silently meant the current folder
    from reste.cli import main

    monkeypatch.chdir(tmp_path)
    fx.make_idx_dataset(tmp_path / "mnist", n_train=8, n_test=2)  # what "" used to find
    for call in (
        lambda: data.load_arrays("mnist", ""),
        lambda: data.download("mnist", ""),
        lambda: data.locate("mnist", ""),
    ):
        with pytest.raises(
            ValueError, match=r"root is empty \(root=''; an unset shell variable\?\); give a data folder"
        ):
            call()
    for command in ("download", "datasets"):
        argv = [command, "mnist", "--root", ""] if command == "download" else [command, "--root", ""]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --root is empty") and "leave --root out for the default" in err


def test_download_accepts_the_spellings_the_api_accepts_and_suggests_a_close_name(
    tmp_path, monkeypatch, http_server, capsys
):
    # was: argparse "invalid choice: 'Fashion-MNIST'" while data.name=Fashion-MNIST and the API accept it
    from reste.cli import main

    url, _ = _serve_tiny_idx(monkeypatch, http_server, "fashion_mnist")
    root = tmp_path / "root"
    assert main(["download", "Fashion-MNIST", "--root", str(root), "--mirror", url, "--quiet"]) == 0
    assert capsys.readouterr().out == f"fashion_mnist is ready in {root / 'fashion_mnist'}\n"
    with pytest.raises(SystemExit) as caught:
        main(["download", "fashon", "--root", str(root)])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "unknown data set 'fashon'; known: fashion_mnist, mnist, cifar10, cifar100, imagenet." in err
    assert "Did you mean 'fashion_mnist'?" in err and "usage: reste download" in err
    with pytest.raises(SystemExit):
        main(["download", "--help"])
    assert "fashion_mnist, mnist, cifar10, cifar100, imagenet" in capsys.readouterr().out


def test_explicit_root_never_falls_back_to_the_system_copy(tmp_path, monkeypatch):
    system = tmp_path / "usr-share"
    fx.make_idx_dataset(system, n_train=16, n_test=4)
    monkeypatch.setattr(catalog, "SYSTEM_DIRS", {"fashion_mnist": [system]})
    train, _ = data.create_loaders("fashion_mnist", batch_size=4)  # no root: the system copy is found
    assert train.source == str(system)
    for root in (tmp_path / "nonexistent", tmp_path / "half"):
        if root.name == "half":  # a folder that lacks one file
            fx.make_idx_dataset(root / "fashion_mnist", n_train=16, n_test=4)
            (root / "fashion_mnist" / "t10k-images-idx3-ubyte.gz").unlink()
        with pytest.raises(data.DatasetNotFoundError) as caught:
            data.create_loaders("fashion_mnist", root=root, batch_size=4)
        assert str(root / "fashion_mnist") in str(caught.value) and f"{system} (" not in str(caught.value)
        assert not (root / "fashion_mnist" / "train-images-idx3-ubyte.gz").exists() or root.name == "half"


def test_missing_default_data_is_downloaded_into_the_user_cache(tmp_path, monkeypatch, http_server, capsys):
    served, url, requests = http_server
    arrays = fx.make_idx_dataset(served, n_train=24, n_test=6)
    _pin_md5s(monkeypatch, "fashion_mnist", served)
    monkeypatch.setenv("RESTE_MIRROR", url)
    train, test = data.create_loaders("fashion_mnist", batch_size=8)  # no root, download left to its default
    cache = tmp_path / "user-cache" / "reste" / "data" / "fashion_mnist"
    assert train.source == str(cache) and (train.dataset_size, test.dataset_size) == (24, 6)
    assert sorted(p.name for p in cache.iterdir()) == sorted(fx.IDX_FILES.values())
    assert np.array_equal(data.load_arrays("fashion_mnist").test_images[:, 0], arrays["test_images"])
    err = capsys.readouterr().err
    assert f"downloading the official files into {cache} (md5-checked)" in err and f"is ready in {cache}" in err
    assert len(requests) == 4
    data.create_loaders("fashion_mnist", batch_size=8)
    assert len(requests) == 4  # found in the cache: nothing fetched again


def test_offline_default_download_fails_with_where_and_how(tmp_path, capsys):
    with pytest.raises(data.DatasetNotFoundError) as caught:  # RESTE_MIRROR points at a closed port
        data.create_loaders("fashion_mnist", batch_size=8)
    text = str(caught.value)
    cache = tmp_path / "user-cache" / "reste" / "data"
    assert str(cache / "fashion_mnist") + " (no such folder)" in text
    assert f"download into {cache / 'fashion_mnist'} failed" in text and "apt-get install dataset-fashion-mnist" in text
    # the failed download left no data set folder behind; the data folder keeps only its hidden lock file
    assert [p.name for p in cache.iterdir()] == [".fashion_mnist.lock"]
    with pytest.raises(data.DatasetNotFoundError) as caught:  # download=False: no attempt
        data.create_loaders("fashion_mnist", batch_size=8, download=False)
    assert "failed" not in str(caught.value)


def test_partial_idx_folder_names_missing_files(tmp_path):
    fx.make_idx_dataset(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DatasetNotFoundError, match="missing t10k-labels-idx1-ubyte.gz"):
        data.load_arrays("mnist", tmp_path)


def test_default_root_from_environment(tmp_path, monkeypatch):
    fx.make_idx_dataset(tmp_path / "mnist", n_train=16, n_test=4)
    monkeypatch.setenv("RESTE_DATA", str(tmp_path))
    train, _ = data.create_loaders("mnist", batch_size=4)
    assert train.dataset_size == 16
    monkeypatch.delenv("RESTE_DATA")
    assert data.default_root() == tmp_path / "user-cache" / "reste" / "data"  # $XDG_CACHE_HOME/reste/data
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data.default_root() == Path.home() / ".cache" / "reste" / "data"


def _corrupt(path: Path, how: str):
    raw = gzip.decompress(path.read_bytes())
    if how == "not gzip":
        path.write_bytes(b"this is not gzip data at all")
    elif how == "truncated gzip":
        compressed = path.read_bytes()
        path.write_bytes(compressed[: len(compressed) // 2])
    elif how == "wrong magic":
        path.write_bytes(gzip.compress(b"\x00\x00\x08\x02" + raw[4:]))
    elif how == "truncated payload":
        path.write_bytes(gzip.compress(raw[:-100]))
    elif how == "trailing bytes":
        path.write_bytes(gzip.compress(raw + b"\x00" * 7))
    elif how == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize(
    "how, message",
    [
        ("not gzip", "not a gzip file"),
        ("truncated gzip", "truncated gzip"),
        ("wrong magic", "wrong IDX magic number 0x00000802, expected 0x00000803"),
        ("truncated payload", "truncated: header says shape"),
        ("trailing bytes", "trailing bytes"),
        ("empty", "empty file (0 bytes)"),  # was: "not a gzip file (bad gzip magic bytes)"
    ],
)
def test_corrupt_idx_files_are_reported_by_name(tmp_path, how, message):
    fx.make_idx_dataset(tmp_path / "mnist")
    target = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    _corrupt(target, how)
    with pytest.raises(data.CorruptDataError) as caught:
        data.create_loaders("mnist", root=tmp_path)
    assert isinstance(caught.value, ValueError)
    assert str(target) in str(caught.value) and message in str(caught.value)


def test_label_count_mismatch_and_bad_labels(tmp_path):
    fx.make_idx_dataset(tmp_path / "mnist", n_train=32)
    labels = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
    fx.write_idx(labels, np.zeros(31, dtype=np.uint8))
    with pytest.raises(data.CorruptDataError, match="31 labels for 32 images"):
        data.load_arrays("mnist", tmp_path)
    fx.write_idx(labels, np.full(32, 12, dtype=np.uint8))
    with pytest.raises(data.CorruptDataError, match=r"labels outside \[0, 10\)"):
        data.load_arrays("mnist", tmp_path)


def test_the_other_mnist_like_data_set_under_the_same_file_names_is_refused(tmp_path):
    # was: a folder of Fashion-MNIST files trained "mnist" silently (the IDX file names are the same)
    fashion_like = round(0.2860 * 255)  # every pixel: the mean pixel of Fashion-MNIST's training images
    fx.write_constant_idx_dataset(tmp_path / "mnist", 60000, 16, value=fashion_like)
    with pytest.raises(data.CorruptDataError) as caught:
        data.load_arrays("mnist", tmp_path)
    text = str(caught.value)
    assert str(tmp_path / "mnist" / "train-images-idx3-ubyte") in text
    assert "which is fashion_mnist's (0.2860), not mnist's (0.1307)" in text
    assert "Point data.root (--root) at the folder that holds mnist, or use data.name=fashion_mnist" in text
    fx.write_constant_idx_dataset(tmp_path / "fashion_mnist", 60000, 16, value=round(0.1307 * 255))
    with pytest.raises(data.CorruptDataError, match="which is mnist's .*, not fashion_mnist's"):
        data.load_arrays("fashion_mnist", tmp_path)
    assert len(data.load_arrays("mnist", tmp_path / "fashion_mnist").train_images) == 60000  # its own mean: read


@pytest.mark.parametrize("test_only", [False, True])
def test_swapped_train_and_test_files_are_refused(tmp_path, test_only):
    # was: 10,000 training and 60,000 test images were read silently
    fx.write_constant_idx_dataset(tmp_path / "mnist", 10000, 60000, value=33)
    with pytest.raises(data.CorruptDataError) as caught:
        data.load_arrays("mnist", tmp_path, test_only=test_only)
    text = str(caught.value)
    assert "the test files hold 60,000 images" in text and "look swapped" in text
    assert ("the training files 10,000" in text) != test_only
    assert "the 60,000 training images and labels are train-images-idx3-ubyte.gz" in text


def test_swapped_cifar_batches_are_refused(tmp_path):
    # CIFAR-100's two batches swapped: 10,000 training images, 50,000 test images
    members, _ = fx.cifar_members("cifar100")
    members["train"] = fx.cifar_batch(np.zeros((10000, 3, 32, 32), np.uint8), [0] * 10000, b"fine_labels", b"train")
    members["test"] = fx.cifar_batch(np.zeros((50000, 3, 32, 32), np.uint8), [0] * 50000, b"fine_labels", b"test")
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for member, content in members.items():
        (folder / member).write_bytes(content)
    with pytest.raises(
        data.CorruptDataError,
        match="50,000 images and the training files 10,000.*look swapped.*The training batches are train",
    ):
        data.load_arrays("cifar100", tmp_path)


def test_sizes_that_are_merely_small_or_equal_are_not_taken_for_swapped_files(tmp_path):
    fx.write_constant_idx_dataset(tmp_path / "mnist", 10000, 10000, value=33)
    assert len(data.load_arrays("mnist", tmp_path).test_images) == 10000


def test_a_cifar_label_out_of_range_names_its_batch_file(tmp_path):
    # was: the folder or archive alone ("cifar-10-batches-py: labels outside [0, 10)")
    members, _ = fx.cifar_members("cifar10")
    x = np.zeros((8, 3, 32, 32), dtype=np.uint8)
    members["data_batch_2"] = fx.cifar_batch(x, np.full(8, 10), b"labels", b"data_batch_2")
    folder = tmp_path / "dir" / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for member, content in members.items():
        (folder / member).write_bytes(content)
    with pytest.raises(data.CorruptDataError, match=r"data_batch_2: labels outside \[0, 10\): min 10, max 10"):
        data.load_arrays("cifar10", tmp_path / "dir")
    archive = tmp_path / "tar" / "cifar10" / "cifar-10-python.tar.gz"
    archive.parent.mkdir(parents=True)
    archive.write_bytes(fx.tar_gz_bytes({f"cifar-10-batches-py/{m}": b for m, b in members.items()}))
    with pytest.raises(data.CorruptDataError, match=r"::cifar-10-batches-py/data_batch_2: labels outside"):
        data.load_arrays("cifar10", tmp_path / "tar")


def test_truncated_cifar_pickle_and_tarball(tmp_path):
    fx.write_cifar_folder(tmp_path / "a", "cifar10")
    batch = tmp_path / "a" / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:500])
    with pytest.raises(data.CorruptDataError, match="data_batch_3: truncated pickle"):
        data.load_arrays("cifar10", tmp_path / "a")

    archive, _ = fx.write_cifar_tarball(tmp_path / "b", "cifar10")
    archive.write_bytes(archive.read_bytes()[:-2000])
    with pytest.raises(data.CorruptDataError) as caught:
        data.load_arrays("cifar10", tmp_path / "b")
    assert str(archive) in str(caught.value)


def test_datasets_lists_damaged_files_as_damaged_not_present(tmp_path, capsys):
    # was: the "damaged:" branch could not run (locate only checks names): a truncated download was
    # listed as present
    from reste.cli import main

    fx.make_idx_dataset(tmp_path / "mnist", n_train=16, n_test=4)
    fx.make_idx_dataset(tmp_path / "fashion_mnist", n_train=16, n_test=4, compress=False)
    fx.write_cifar_folder(tmp_path / "cifar10", "cifar10")
    archive, _ = fx.write_cifar_tarball(tmp_path / "cifar100", "cifar100")
    assert main(["datasets", "--root", str(tmp_path)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert all(lines[name].endswith(str(tmp_path / name)) for name in ("mnist", "fashion_mnist"))
    assert lines["cifar10"].endswith(str(tmp_path / "cifar10" / "cifar-10-batches-py")) and lines["cifar100"].endswith(
        str(archive)
    )

    images = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:-100])  # a cut download
    labels = tmp_path / "fashion_mnist" / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-1])
    batch = tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:-10])
    archive.write_bytes(archive.read_bytes()[:-2000])
    assert main(["datasets", "--root", str(tmp_path)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert f"damaged: corrupt data file {images}: truncated or damaged gzip" in lines["mnist"]
    assert (
        f"damaged: corrupt data file {labels}: 11 bytes, the IDX header of shape (4,) needs 12"
        in lines["fashion_mnist"]
    )
    assert f"damaged: corrupt data file {batch}: truncated pickle" in lines["cifar10"]
    assert f"damaged: corrupt data file {archive}: truncated or damaged" in lines["cifar100"]
    # what the quick check says is what reading says
    for name, path in (("mnist", images), ("fashion_mnist", labels), ("cifar10", batch), ("cifar100", archive)):
        with pytest.raises(data.CorruptDataError, match=str(path)):
            data.load_arrays(name, tmp_path)


def test_a_cifar_tarball_with_dot_slash_member_names_is_read(tmp_path):
    # was: "archive lacks member(s)" for a tarball repacked with `tar -C DIR -czf x.tar.gz .`
    members, arrays = fx.cifar_members("cifar10")
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(fx.tar_gz_bytes({f"./cifar-10-batches-py/{m}": b for m, b in members.items()}))
    loaded = data.load_arrays("cifar10", tmp_path)
    assert np.array_equal(loaded.train_images, arrays["train_images"])
    assert np.array_equal(loaded.test_labels, arrays["test_labels"])


def test_wrong_cifar_shapes_are_corrupt_not_reshape_errors(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    bad = fx.py2_pickle({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    for member in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / member).write_bytes(bad)
    with pytest.raises(data.CorruptDataError, match="N x 3072"):
        data.load_arrays("cifar10", tmp_path)


# --------------------------------------------------------------------------
# downloads from a local HTTP server
# --------------------------------------------------------------------------


@contextlib.contextmanager
def _serving(handler):
    """Run ``handler`` (a BaseHTTPRequestHandler class) on 127.0.0.1:<ephemeral>; yields the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def http_server(tmp_path):
    """Serve tmp_path/"served" on 127.0.0.1:<ephemeral>; yields (folder, base URL, request log).
    ``requests.delay`` (seconds, default 0) holds every answer back, so that concurrent clients overlap."""
    served = tmp_path / "served"
    served.mkdir()

    class Log(list):
        delay = 0.0

    requests = Log()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            if requests.delay:
                time.sleep(requests.delay)
            super().do_GET()

        def log_message(self, *args):  # keep test output clean
            pass

    with _serving(Handler) as url:
        yield served, url, requests


def _pin_md5s(monkeypatch, name: str, folder: Path):
    """Make the served fixture files the 'official' ones by md5."""
    source = catalog.IDX_SOURCES[name]
    files = {
        role: (file_name, hashlib.md5((folder / file_name).read_bytes()).hexdigest())
        for role, (file_name, _) in source.files.items()
    }
    monkeypatch.setitem(catalog.IDX_SOURCES, name, catalog.IdxSource(source.base_url, files))


def _serve_tiny_idx(monkeypatch, http_server, name="mnist"):
    """Serve a tiny IDX data set (8 training, 2 test images) on the local server, its md5s pinned
    in the catalog; returns ``(mirror url, requests served)``."""
    served, url, requests = http_server
    fx.make_idx_dataset(served, n_train=8, n_test=2)
    _pin_md5s(monkeypatch, name, served)
    return url, requests


def _pin_cifar_md5(monkeypatch, name: str, archive: Path) -> str:
    """Make the served tarball the 'official' one by md5; return that md5."""
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(catalog.CIFAR_SOURCES, name, dataclasses.replace(catalog.CIFAR_SOURCES[name], md5=md5))
    return md5


def test_download_idx_with_right_checksums(tmp_path, monkeypatch, http_server):
    served, url, requests = http_server
    arrays = fx.make_idx_dataset(served, n_train=24, n_test=6)
    _pin_md5s(monkeypatch, "mnist", served)
    root = tmp_path / "root"
    folder = data.download("mnist", root, mirror=url)  # with the tqdm progress bar
    assert folder == root / "mnist"
    assert sorted(p.name for p in folder.iterdir()) == sorted(fx.IDX_FILES.values())  # no .part left
    assert len(requests) == 4
    data.download("mnist", root, mirror=url, progress=False)
    assert len(requests) == 4  # verified files are not fetched again
    loaded = data.load_arrays("mnist", root)
    assert np.array_equal(loaded.train_images[:, 0], arrays["train_images"])


def test_create_loaders_download_true_uses_env_mirror(tmp_path, monkeypatch, http_server):
    served, url, _ = http_server
    fx.make_idx_dataset(served, n_train=24, n_test=6)
    _pin_md5s(monkeypatch, "fashion_mnist", served)
    monkeypatch.setenv("RESTE_MIRROR", url)
    with pytest.raises(data.DatasetNotFoundError):
        data.create_loaders("fashion_mnist", root=tmp_path / "root")
    train, test = data.create_loaders("fashion_mnist", root=tmp_path / "root", download=True, batch_size=8)
    assert (train.dataset_size, test.dataset_size) == (24, 6)


def test_download_with_wrong_checksum_leaves_nothing_and_keeps_good_file(tmp_path, http_server):
    served, url, _ = http_server
    fx.make_idx_dataset(served)  # served files do not have the official md5s
    root = tmp_path / "root"
    with pytest.raises(data.CorruptDataError, match="md5 mismatch") as caught:
        data.download("mnist", root, mirror=url, progress=False)
    assert "train-images-idx3-ubyte.gz" in str(caught.value)
    # no partial or bad file left behind, nor the data set folder made for them; the hidden lock file stays
    assert [p.name for p in root.iterdir()] == [".mnist.lock"]

    (root / "mnist").mkdir(parents=True)
    existing = root / "mnist" / "train-images-idx3-ubyte.gz"
    existing.write_bytes(b"previously downloaded content")
    with pytest.raises(data.CorruptDataError):
        data.download("mnist", root, mirror=url, progress=False)
    assert existing.read_bytes() == b"previously downloaded content"
    assert [p.name for p in (root / "mnist").iterdir()] == [existing.name]


def test_download_failure_is_clear_and_leaves_nothing(tmp_path, http_server):
    _, url, _ = http_server  # serves an empty folder: 404
    with pytest.raises(OSError, match="download of .*train-images-idx3-ubyte.gz failed"):
        data.download("mnist", tmp_path, mirror=url, progress=False)
    assert not (tmp_path / "mnist").exists()  # no empty folder left behind


def test_download_cifar_tarball_and_extract(tmp_path, monkeypatch, http_server):
    served, url, _ = http_server
    archive, arrays = fx.write_cifar_tarball(served, "cifar10", per_batch=4, n_test=3)
    _pin_cifar_md5(monkeypatch, "cifar10", archive)
    root = tmp_path / "root"
    exit_code = __import__("reste.data.__main__", fromlist=["main"]).main(
        ["download", "cifar10", "--root", str(root), "--mirror", url, "--quiet"]
    )
    assert exit_code == 0
    extracted = root / "cifar10" / "cifar-10-batches-py"
    assert sorted(p.name for p in extracted.iterdir()) == sorted(
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    )
    assert data.locate("cifar10", root) == ("dir", extracted)
    loaded = data.load_arrays("cifar10", root)
    assert np.array_equal(loaded.test_images, arrays["test_images"])


_CONCURRENT_DOWNLOAD = """
import dataclasses, sys
from reste.data import catalog, download
root, url, md5 = sys.argv[1:4]
catalog.CIFAR_SOURCES["cifar10"] = dataclasses.replace(catalog.CIFAR_SOURCES["cifar10"], md5=md5)
print("ready", flush=True)
sys.stdin.readline()  # every process starts downloading on the same word
download("cifar10", root, mirror=url, progress=False)
"""


def test_concurrent_first_downloads_into_one_folder_fetch_once_and_all_succeed(tmp_path, monkeypatch, http_server):
    # was: every process fetched and extracted, replacing (rmtree + os.replace) the folder the
    # others were extracting or reading: CorruptDataError / ENOENT at random
    served, url, requests = http_server
    archive, arrays = fx.write_cifar_tarball(served, "cifar10", per_batch=4, n_test=3)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    requests.delay = 0.3  # an answer takes a while: the processes' downloads overlap
    root = tmp_path / "root"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src")]))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONCURRENT_DOWNLOAD, str(root), url, md5],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(4)
    ]
    try:
        for proc in procs:
            assert proc.stdout.readline() == "ready\n"
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            proc.kill() if proc.poll() is None else None
    assert [proc.returncode for proc in procs] == [0] * 4, [err for _, err in results]
    assert len(requests) == 1  # one process fetched; the others waited and found it ready
    assert sorted(p.name for p in root.iterdir()) == [".cifar10.lock", "cifar10"]  # the lock file is kept
    assert sorted(p.name for p in (root / "cifar10").iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    assert np.array_equal(data.load_arrays("cifar10", root).test_images, arrays["test_images"])


def test_downloaded_files_get_the_mode_of_a_new_file(tmp_path, monkeypatch, http_server):
    # was: 0600, the mode of the temporary file they were written to
    url, _ = _serve_tiny_idx(monkeypatch, http_server)
    for umask, expected in ((0o022, 0o644), (0o002, 0o664)):
        previous = os.umask(umask)
        try:
            folder = data.download("mnist", tmp_path / oct(umask), mirror=url, progress=False)
        finally:
            os.umask(previous)
        assert {oct(p.stat().st_mode & 0o777) for p in folder.iterdir()} == {oct(expected)}


def test_a_connection_cut_mid_download_says_interrupted_not_md5_mismatch(tmp_path):
    body = bytes(range(256)) * 400

    class HalfBody(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])  # then the connection closes
            self.close_connection = True

        def log_message(self, *args):
            pass

    dest = tmp_path / "root" / "file.gz"
    with _serving(HalfBody) as url:
        with pytest.raises(OSError) as caught:
            data.download_file(url + "file.gz", dest, hashlib.md5(body).hexdigest(), progress=False)
    message = str(caught.value)
    assert (
        f"interrupted: got {len(body) // 2:,} of {len(body):,} bytes" in message and "run the command again" in message
    )
    assert not isinstance(caught.value, data.CorruptDataError) and "md5" not in message
    assert list(dest.parent.iterdir()) == []  # no .part left


def _age(path: Path, seconds: float) -> None:
    """Set the mtime of ``path`` and everything inside it ``seconds`` in the past."""
    when = time.time() - seconds
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(item, (when, when))


def _leftovers(folder: Path, tag: str) -> list[Path]:
    """A .part file of the download of mnist's training images and a CIFAR staging folder in ``folder``."""
    (folder / f".extract-{tag}" / "cifar-10-batches-py").mkdir(parents=True)
    part = folder / f".train-images-idx3-ubyte.gz.{tag}.part"
    part.write_bytes(b"half a download")
    return [part, folder / f".extract-{tag}"]


def test_a_killed_download_s_stale_part_files_are_removed_by_the_next_one(tmp_path, monkeypatch, http_server):
    # was: a SIGKILLed download's randomly named .part file stayed forever
    url, _ = _serve_tiny_idx(monkeypatch, http_server)
    folder = tmp_path / "root" / "mnist"
    folder.mkdir(parents=True)
    stale = _leftovers(folder, "k1ll3d")
    stale.append(folder / ".t10k-labels-idx1-ubyte.gz.a1b2c3d4.part")
    stale[-1].write_bytes(b"half a download")
    for leftover in stale:
        _age(leftover, 3600)
    (folder / "notes.part").write_text("not ours")  # a file of the user's: kept
    _age(folder / "notes.part", 3600)
    data.download("mnist", tmp_path / "root", mirror=url, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*fx.IDX_FILES.values(), "notes.part"])


def test_a_recent_part_file_may_be_a_live_download_elsewhere_and_is_kept(tmp_path, monkeypatch, http_server):
    # was: deleted under the lock, though a download on another NFS client (where flock does not
    # reach across machines) may be writing it: that download then failed with FileNotFoundError
    url, _ = _serve_tiny_idx(monkeypatch, http_server)
    folder = tmp_path / "root" / "mnist"
    folder.mkdir(parents=True)
    live = _leftovers(folder, "l1ve0000")
    stale = _leftovers(folder, "0ld00000")
    for leftover in stale:
        _age(leftover, 3600)
    _age(live[1], 3600)  # a staging folder counts as live while anything in it is recent
    os.utime(live[1] / "cifar-10-batches-py")
    data.download("mnist", tmp_path / "root", mirror=url, progress=False)
    assert all(leftover.exists() for leftover in live) and not any(leftover.exists() for leftover in stale)


def test_without_a_lock_nothing_of_another_download_is_removed(tmp_path, monkeypatch, http_server):
    # was: with no lock (no fcntl on Windows) the cleanup still ran, deleting the .part file and
    # staging folder of a concurrent download, which then failed with FileNotFoundError
    url, _ = _serve_tiny_idx(monkeypatch, http_server)
    monkeypatch.setattr(download_module, "fcntl", None)
    folder = tmp_path / "root" / "mnist"
    folder.mkdir(parents=True)
    others = _leftovers(folder, "0th3r000")
    for leftover in others:
        _age(leftover, 3600)  # even old ones: without the lock nothing says they are not in use
    data.download("mnist", tmp_path / "root", mirror=url, progress=False)
    assert all(leftover.exists() for leftover in others)
    assert not (tmp_path / "root" / ".mnist.lock").exists()


def _unwritable(monkeypatch, folder: Path, err: int = errno.EROFS) -> None:
    """Make creating or writing anything under ``folder`` fail with ``err``, as on a read-only mount
    (the tests run as root, which chmod does not stop); reading still works."""
    real_open, real_mkdir = os.open, os.mkdir
    folder = folder.absolute()

    def inside(path) -> bool:
        return Path(os.fsdecode(path)).absolute().is_relative_to(folder)

    def fake_open(path, flags, *args, **kwargs):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(err, os.strerror(err), os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if inside(path):
            raise OSError(err, os.strerror(err), os.fsdecode(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


def test_a_complete_data_set_in_a_read_only_folder_is_found_without_a_lock(tmp_path, monkeypatch, http_server):
    # was: OSError [Errno 30] Read-only file system: '.../.mnist.lock' (the lock was taken first)
    served, url, requests = http_server
    fx.make_idx_dataset(served, n_train=8, n_test=2)
    _pin_md5s(monkeypatch, "mnist", served)
    archive, _ = fx.write_cifar_tarball(served, "cifar10", per_batch=4, n_test=3)
    _pin_cifar_md5(monkeypatch, "cifar10", archive)
    root = tmp_path / "root"
    for name in ("mnist", "cifar10"):
        data.download(name, root, mirror=url, progress=False)
    for lock in root.glob(".*.lock"):
        lock.unlink()  # as when the data set was put there by other means
    fetched = len(requests)
    _unwritable(monkeypatch, root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert data.download("mnist", root, mirror=url, progress=False) == root / "mnist"
        assert data.download("cifar10", root, mirror=url, progress=False) == root / "cifar10"
    assert len(requests) == fetched and sorted(p.name for p in root.iterdir()) == ["cifar10", "mnist"]


def test_a_read_only_folder_without_the_data_fails_saying_it_cannot_write(tmp_path, monkeypatch, http_server):
    url, requests = _serve_tiny_idx(monkeypatch, http_server)
    monkeypatch.setattr(download_module, "_warned_unlocked", set())
    root = tmp_path / "ro"
    root.mkdir()
    _unwritable(monkeypatch, root)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != root and real_access(path, mode))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning about the lock: the error says what is wrong
        with pytest.raises(OSError) as caught:
            data.download("mnist", root, mirror=url, progress=False)
        assert caught.value.errno == errno.EROFS and ".lock" not in str(caught.value)
        assert str(root / "mnist") in str(caught.value)
        with pytest.raises(data.DatasetNotFoundError) as caught:
            data.load_arrays("mnist", root, download=True, mirror=url, progress=False)
    message = str(caught.value)
    assert f"download into {root / 'mnist'} failed: [Errno 30] Read-only file system" in message
    assert f"{root} is not writable: set RESTE_DATA=DIR" in message and ".lock" not in message
    assert requests == []


@pytest.mark.parametrize("code", ["ENOLCK", "EOPNOTSUPP", "ENOSYS", "EINVAL"])
def test_a_file_system_without_flock_downloads_unlocked_with_one_warning(tmp_path, monkeypatch, http_server, code):
    # was: flock's ENOLCK (Lustre without -o flock, NFS without lockd) failed every download at once
    url, requests = _serve_tiny_idx(monkeypatch, http_server)
    monkeypatch.setattr(download_module, "_warned_unlocked", set())
    err = getattr(errno, code)

    def no_flock(fd, operation):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(download_module.fcntl, "flock", no_flock)
    root = tmp_path / "root"
    folder = root / "mnist"
    folder.mkdir(parents=True)
    others = _leftovers(folder, "0th3r000")
    for leftover in others:
        _age(leftover, 3600)
    with pytest.warns(UserWarning) as caught:
        assert data.download("mnist", root, mirror=url, progress=False) == folder
    assert len(caught) == 1
    assert f"concurrent downloads into {root} are not coordinated" in str(caught[0].message)
    assert all(leftover.exists() for leftover in others)  # no cleanup without the lock
    assert len(requests) == 4 and data.load_arrays("mnist", root).train_images.shape[0] == 8
    (folder / fx.IDX_FILES["test_labels"]).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per folder
        data.download("mnist", root, mirror=url, progress=False)
    assert len(requests) == 5


def test_a_lock_file_that_cannot_be_opened_for_writing_is_locked_read_only(tmp_path, monkeypatch, http_server):
    # was: OSError EACCES for a lock file created by another user of a shared data folder (0644)
    url, _ = _serve_tiny_idx(monkeypatch, http_server)
    root = tmp_path / "root"
    root.mkdir()
    lock = root / ".mnist.lock"
    lock.touch()
    real_open = os.open
    opened = []

    def fake_open(path, flags, *args, **kwargs):
        if Path(os.fsdecode(path)) == lock:
            opened.append(flags)
            if flags & os.O_RDWR:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert data.download("mnist", root, mirror=url, progress=False) == root / "mnist"
    assert opened[-1] == os.O_RDONLY


def test_a_damaged_extracted_cifar_batch_is_repaired_by_downloading_again(tmp_path, monkeypatch, http_server, capsys):
    # was: the extracted folder counted as present when its files existed: the download did nothing
    from reste.cli import main

    served, url, requests = http_server
    archive, arrays = fx.write_cifar_tarball(served, "cifar10", per_batch=4, n_test=3)
    _pin_cifar_md5(monkeypatch, "cifar10", archive)
    root = tmp_path / "root"
    data.download("cifar10", root, mirror=url, progress=False)
    batch = root / "cifar10" / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])
    assert main(["datasets", "--root", str(root)]) == 0
    assert f"damaged: corrupt data file {batch}" in capsys.readouterr().out
    assert main(["download", "cifar10", "--root", str(root), "--mirror", url, "--quiet"]) == 0
    assert len(requests) == 1  # extracted again from the intact tarball, not fetched again
    assert main(["datasets", "--root", str(root)]) == 0
    assert "damaged:" not in capsys.readouterr().out
    assert np.array_equal(data.load_arrays("cifar10", root).train_images, arrays["train_images"])


def test_the_stand_alone_data_command_is_the_cli_s(tmp_path, capsys):
    """python -m reste.data runs `reste download` / `reste datasets` through reste.cli.main, so it
    has the same one-line errors and exit codes; other words: exit 2."""
    from reste.data.__main__ import main

    assert main(["datasets", "--root", str(tmp_path)]) == 0
    assert "not present" in capsys.readouterr().out
    assert main(["download", "mnist", "--root", str(tmp_path), "--mirror", "notaurl"]) == 2
    assert capsys.readouterr().err.startswith("error: --mirror")
    assert main(["train"]) == 2 and "give a command, one of download, datasets (got train)" in capsys.readouterr().err
    # its closed-pipe exit: tests/test_cli.py::test_a_closed_output_pipe_ends_the_command_quietly


@pytest.mark.parametrize("member", ["../escape.txt", "/tmp/absolute.txt", "link"])
def test_safe_extract_refuses_path_traversal(tmp_path, member):
    archive = tmp_path / "evil.tar.gz"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo(member)
        if member == "link":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    archive.write_bytes(buffer.getvalue())
    dest = tmp_path / "dest"
    with pytest.raises(data.CorruptDataError, match="refusing unsafe tar member"):
        safe_extract(archive, dest)
    assert not (tmp_path / "escape.txt").exists() and list(dest.iterdir()) == []


# --------------------------------------------------------------------------
# ImageNet-style folders
# --------------------------------------------------------------------------


def test_imagenet_folder_loader(tmp_path):
    pytest.importorskip("PIL")
    classes = fx.write_image_folders(tmp_path / "imagenet", per_class=3, val_per_class=2)
    train, val = data.create_loaders("imagenet", root=tmp_path, batch_size=4, test_batch_size=5, seed=1)
    assert (train.dataset_size, val.dataset_size) == (9, 6)
    assert (len(train), len(val)) == (2, 2) and train.classes == classes and val.classes == classes
    assert train.folder == tmp_path / "imagenet" / "train"  # named in the trainer's class-count message
    images, labels = next(iter(train))
    assert images.shape == (4, 3, 224, 224) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= {0, 1, 2}
    val_images, val_labels = collect(val)
    assert val_images.shape == (6, 3, 224, 224)
    assert val_labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert -2.2 < val_images.min() and val_images.max() < 2.7  # normalised range
    _, some = data.create_loaders("imagenet", root=tmp_path, batch_size=4, test_batch_size=5, test_subset=3)
    assert some.dataset_size == 3 and collect(some)[1].tolist() == [0, 1, 2]  # evenly spaced: classes mixed

    # Deterministic: same epoch -> same batches, whatever the worker count.
    train.set_epoch(3)
    epoch3 = collect(train)
    again, _ = data.create_loaders("imagenet", root=tmp_path, batch_size=4, seed=1, num_workers=2)
    again.set_epoch(3)
    assert all(torch.equal(a, b) for a, b in zip(epoch3, collect(again)))
    train.set_epoch(4)
    assert not torch.equal(epoch3[0], collect(train)[0])


def test_imagenet_hidden_folders_and_files_are_not_classes_or_images(tmp_path):
    # was: .ipynb_checkpoints/ became class 0 (shifting every label) and ._x.JPEG files became samples
    pytest.importorskip("PIL")
    classes = fx.write_image_folders(tmp_path, per_class=2, val_per_class=1)
    for split in ("train", "val"):
        image = tmp_path / split / classes[0] / f"{classes[0]}_0.JPEG"
        (tmp_path / split / ".ipynb_checkpoints").mkdir()
        (tmp_path / split / ".ipynb_checkpoints" / image.name).write_bytes(image.read_bytes())
        (image.parent / f"._{image.name}").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS metadata
    train, val = data.create_loaders("imagenet", root=tmp_path, batch_size=2, test_batch_size=3)
    assert train.classes == classes and (train.dataset_size, val.dataset_size) == (6, 3)
    assert collect(val)[1].tolist() == [0, 1, 2]


def test_imagenet_flat_val_folder_says_it_is_not_read_and_how_to_sort_it(tmp_path):
    pytest.importorskip("PIL")
    fx.write_image_folders(tmp_path, per_class=1, val_per_class=2)
    val = tmp_path / "val"
    for number, image in enumerate(sorted(val.glob("*/*.JPEG")), 1):  # ILSVRC's val/ as distributed
        image.rename(val / f"ILSVRC2012_val_{number:08d}.JPEG")
    for folder in val.iterdir():
        if folder.is_dir():
            folder.rmdir()
    with pytest.raises(data.DatasetNotFoundError) as caught:
        data.create_loaders("imagenet", root=tmp_path, batch_size=2)
    text = str(caught.value)
    assert f"{val} (6 images directly in it and no class folders: a flat layout, which is not read)" in text
    assert f"Sort the images into class folders {val}/<wnid>/*.JPEG" in text
    assert "ILSVRC2012_validation_ground_truth.txt" in text and "valprep.sh" in text


@pytest.mark.parametrize(
    "name, binary",
    [
        ("cifar10", "cifar-10-batches-bin"),
        ("cifar10", "cifar-10-binary.tar.gz"),
        ("cifar100", "cifar-100-binary"),
        ("cifar100", "cifar-100-binary.tar.gz"),
    ],
)
def test_cifar_binary_version_says_it_is_not_read_and_names_the_python_version(tmp_path, name, binary):
    # was: the generic "no cifar-10-batches-py/ with all batches and no cifar-10-python.tar.gz"
    path = tmp_path / name / binary
    if binary.endswith(".tar.gz"):
        path.parent.mkdir()
        path.write_bytes(fx.tar_gz_bytes({"cifar-10-batches-bin/data_batch_1.bin": b"\x00" * 3073}))
    else:
        path.mkdir(parents=True)
    with pytest.raises(data.DatasetNotFoundError) as caught:
        data.load_arrays(name, tmp_path)
    archive = catalog.CIFAR_SOURCES[name].archive
    text = str(caught.value)
    assert f"{tmp_path / name} (found {binary}: CIFAR's binary version, which is not read" in text
    assert f"it reads the python version, {archive}" in text and f"reste download {name}" in text


def test_imagenet_missing_and_without_pillow(tmp_path, monkeypatch):
    pytest.importorskip("PIL")
    with pytest.raises(data.DatasetNotFoundError, match="image-net.org"):
        data.create_loaders("imagenet", root=tmp_path)
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `from PIL import Image` fail
    with pytest.raises(ImportError, match=r"pip install 'reste\[imagenet\]'"):
        data.create_loaders("imagenet", root=tmp_path)


def test_import_needs_neither_torchvision_nor_pillow():
    code = (
        "import sys; sys.modules['PIL'] = None; sys.modules['torchvision'] = None\n"
        "import reste.data, reste.data.imagenet\n"
        "assert reste.data.info('imagenet').image_size == 224\n"
    )
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH")])
        ),
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# --------------------------------------------------------------------------
# the real Fashion-MNIST (Debian package dataset-fashion-mnist)
# --------------------------------------------------------------------------


@pytest.mark.skipif(
    not (REAL_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_real_fashion_mnist_from_system_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(catalog, "SYSTEM_DIRS", {"fashion_mnist": [REAL_FASHION_MNIST]})
    monkeypatch.setenv("RESTE_DATA", str(tmp_path))  # an empty per-user folder: the system copy is next
    train, test = data.create_loaders("fashion_mnist", batch_size=256)
    assert (train.dataset_size, test.dataset_size) == (60000, 10000)
    assert train.source == str(REAL_FASHION_MNIST)
    assert torch.bincount(train.labels, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    images, labels = collect(test)
    assert images.shape == (10000, 1, 28, 28)
    # The stored statistics are the training set's: normalised test data ~N(0, 1).
    assert abs(images.mean().item()) < 0.05 and abs(images.std().item() - 1) < 0.05
    x, y = next(iter(train))
    assert x.shape == (256, 1, 28, 28) and y.max() < 10


def test_a_mirror_that_is_not_a_url_is_a_usage_error_naming_the_option(tmp_path, monkeypatch, capsys):
    from reste.cli import main
    from reste.errors import UsageError

    root = tmp_path / "root"
    # was: `error: unknown url type: 'notaurl/train-images-idx3-ubyte.gz'`, exit 1
    assert main(["download", "mnist", "--mirror", "notaurl", "--root", str(root), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --mirror 'notaurl' is not a base URL") and "http://" in err and "file:///" in err
    assert len(err.strip().splitlines()) == 1 and not root.exists()
    # a local folder given as a path: the message spells its file:// URL
    assert main(["download", "mnist", "--mirror", str(tmp_path), "--root", str(root), "--quiet"]) == 2
    assert f"{tmp_path.resolve().as_uri()}/" in capsys.readouterr().err
    monkeypatch.setenv("RESTE_MIRROR", "ftp:/nowhere")
    with pytest.raises(UsageError, match=r"\$RESTE_MIRROR 'ftp:/nowhere' is not a base URL"):
        data.download("mnist", root, progress=False)
    assert not root.exists()


def test_a_file_url_mirror_downloads_from_a_local_folder(tmp_path, monkeypatch):
    served = tmp_path / "served"
    arrays = fx.make_idx_dataset(served, n_train=24, n_test=6)
    _pin_md5s(monkeypatch, "mnist", served)
    folder = data.download("mnist", tmp_path / "root", mirror=served.resolve().as_uri(), progress=False)
    assert np.array_equal(data.load_arrays("mnist", folder.parent).train_images[:, 0], arrays["train_images"])


def test_a_data_folder_that_cannot_be_written_is_named_with_the_way_out(tmp_path, monkeypatch):
    # e.g. a read-only home: downloading into ~/.cache/reste/data would fail; say where else to put it
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != read_only and real_access(path, mode))
    steps = catalog.how_to_get("mnist", read_only / "cache" / "data")  # not there yet: its parent decides
    assert (
        steps[0]
        == f"{read_only / 'cache' / 'data'} is not writable: set RESTE_DATA=DIR (or data.root=DIR) to a writable folder"
    )
    assert not catalog.how_to_get("mnist", tmp_path / "elsewhere")[0].endswith("writable folder")


# --------------------------------------------------------------------------
# ImageNet RandomResizedCrop scale (data.crop_scale)
# --------------------------------------------------------------------------


def _torchvision_crop_box(width, height, scale, rng):
    """torchvision's ``RandomResizedCrop.get_params`` (ratio 3/4..4/3), rewritten from its source
    with Python's ``random`` for the draws, in its order (area, log ratio, then top, then left).
    Returns ((left, top, right, bottom), whether the centred fallback was taken)."""
    import math

    area = width * height
    log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = rng.randint(0, height - h)
            j = rng.randint(0, width - w)
            return (j, i, j + w, i + h), False
    in_ratio = width / height
    if in_ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif in_ratio > 4 / 3:
        w, h = int(round(height * (4 / 3))), height
    else:
        w, h = width, height
    i, j = (height - h) // 2, (width - w) // 2
    return (j, i, j + w, i + h), True


def test_imagenet_crop_box_is_torchvisions_for_both_scales_and_a_larger_scale_only_rejects_more():
    import random

    from reste.data.imagenet import TRAIN_SCALE, _random_resized_crop_box

    sizes = [(500, 375), (64, 64), (40, 89), (300, 100)]  # landscape, square, tall, 3:1 (often falls back)
    fallbacks, accepted = {}, {}
    for scale in ((0.08, 1.0), (0.08, 1.25)):
        fallbacks[scale], accepted[scale] = 0, []
        for width, height in sizes:
            for seed in range(1500):
                box = _random_resized_crop_box(width, height, random.Random(seed), scale)
                expected, fell_back = _torchvision_crop_box(width, height, scale, random.Random(seed))
                assert box == expected, (scale, width, height, seed)
                left, top, right, bottom = box
                assert 0 <= left < right <= width and 0 <= top < bottom <= height  # never beyond the image
                assert (right - left) * (bottom - top) <= width * height
                fallbacks[scale] += fell_back
                if not fell_back:
                    accepted[scale].append((right - left) * (bottom - top) / (width * height))
    # the default is torchvision's (0.08, 1.0), and the old call (no scale) draws the same boxes
    assert TRAIN_SCALE == (0.08, 1.0)
    assert _random_resized_crop_box(500, 375, random.Random(7)) == _random_resized_crop_box(
        500, 375, random.Random(7), (0.08, 1.0)
    )
    # hi > 1: the draws above the image's area are rejected, so more tries fail and more crops are
    # the centred fallback (here 44 and 117 of 6,000), while the accepted windows are drawn as before
    # (their mean area fraction 0.348 and 0.352)
    assert 0 < 2 * fallbacks[0.08, 1.0] < fallbacks[0.08, 1.25]
    means = {scale: sum(areas) / len(areas) for scale, areas in accepted.items()}
    assert abs(means[0.08, 1.0] - means[0.08, 1.25]) < 0.02 and 0.3 < means[0.08, 1.0] < 0.4


def test_imagenet_loader_takes_crop_scale_and_other_data_sets_refuse_it(tmp_path):
    pytest.importorskip("PIL")
    fx.write_image_folders(tmp_path / "imagenet", per_class=2, val_per_class=1)
    default, _ = data.create_loaders("imagenet", root=tmp_path, batch_size=3, seed=1)
    paper, _ = data.create_loaders("imagenet", root=tmp_path, batch_size=3, seed=1, crop_scale=(0.08, 1.25))
    assert default.dataset.crop_scale == (0.08, 1.0) and paper.dataset.crop_scale == (0.08, 1.25)
    default.set_epoch(2)
    paper.set_epoch(2)
    a, b = collect(default)[0], collect(paper)[0]
    assert a.shape == b.shape == (6, 3, 224, 224) and not torch.equal(a, b)  # same seeds, other windows
    for bad in ((0.5, 0.1), (0, 1), (0.08,), (0.08, float("inf")), "ab"):
        with pytest.raises(ValueError, match=r"crop_scale must be two numbers \[lo, hi\] with 0 < lo <= hi"):
            data.create_loaders("imagenet", root=tmp_path, batch_size=3, crop_scale=bad)
    with pytest.raises(ValueError, match="fashion_mnist has no RandomResizedCrop .* only imagenet takes crop_scale"):
        data.create_loaders("fashion_mnist", root=tmp_path, crop_scale=(0.08, 1.0))
