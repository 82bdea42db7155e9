"""What an exported model scores: the export-time check on real test images, and ``reste eval FILE``.

An export made by ``reste export`` carries two more metadata entries (compact JSON strings in
safetensors' metadata, next to ``graph``):

- ``data``: what evaluating it needs: the run's data set (``name``), its test subset
  (``subset``: the run's ``data.subset``, null for the whole test set), ``seed``, the data
  folder the run was given (``root``, null for the default search), ``input_shape``
  ``[C, H, W]`` and the normalisation the model expects (``mean``, ``std`` per channel:
  ``x = (pixel / 255 - mean) / std``, float32 NCHW);
- ``verification``: the loaded file against the trained model on the run's test images
  (``images``, ``max_abs_logit_diff``, ``agreement``: the share of images whose predicted
  class is the same, ``trained_top1`` and ``exported_top1`` on those images) and on random
  inputs (``random_inputs``, ``random_max_abs_logit_diff``), and whether it ``passed``.
  ``images`` is 0 and ``reason`` says why when the data set could not be read.

Adding them rewrites the file with the same tensors (safetensors stores metadata in its
header), so the format version does not change and older readers ignore them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import torch
from torch import nn

from .export import ExportError, read_graph

__all__ = [
    "DATA_KEY",
    "VERIFY_KEY",
    "LOGIT_TOLERANCE",
    "MIN_AGREEMENT",
    "data_spec",
    "read_metadata",
    "write_metadata",
    "eval_loader",
    "compare",
    "check_export",
    "evaluate_export",
]

DATA_KEY = "data"
VERIFY_KEY = "verification"
#: the largest |logit difference| on random inputs between the loaded file and the trained model that passes
LOGIT_TOLERANCE = 1e-3
#: the smallest share of real test images on which both must predict the same class. Not 1: the
#: trained model scales its binary convs in float (``alpha * w`` inside the conv), the file after
#: the integer sum, so activations differ by float rounding (~1e-6); one within that of 0 before a
#: binary layer takes the other sign, and the logits of that image move by much more than rounding.
MIN_AGREEMENT = 0.99
#: random inputs checked besides the real images (they reach value ranges test images may not)
RANDOM_INPUTS = 8


def _images(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


# ----------------------------------------------------------------------------- metadata
def data_spec(config) -> dict:
    """The ``data`` entry of a run's export: what evaluating it on the run's test images needs."""
    from .. import data as rdata
    from ..train.config import config_from_dict

    cfg = config_from_dict(config) if isinstance(config, dict) else config
    meta = rdata.info(cfg.data.name)
    return {
        "name": rdata.canonical_name(cfg.data.name),
        "split": "test",
        "subset": cfg.data.subset,
        "test_subset": cfg.data.test_subset,
        "seed": cfg.seed,
        "root": cfg.data.root,
        "test_batch_size": cfg.data.test_batch_size or cfg.data.batch_size,
        "input_shape": [meta.in_channels, meta.image_size, meta.image_size],
        "mean": list(meta.mean),
        "std": list(meta.std),
    }


def read_metadata(path) -> dict:
    """The ``data`` and ``verification`` entries of an export, parsed (``{}`` for those it lacks)."""
    from safetensors import safe_open

    read_graph(path)  # a clear error for a missing file or one that is no reste export
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    found = {}
    for key in (DATA_KEY, VERIFY_KEY):
        if key in meta:
            try:
                found[key] = json.loads(meta[key])
            except ValueError:
                raise ExportError(
                    f"{path}: metadata entry {key!r} is not valid JSON; the file is damaged, re-export it"
                ) from None
    return found


def write_metadata(path, entries: dict) -> Path:
    """Add or replace metadata entries (JSON-encoded) of an export; the tensors are written back unchanged."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    from ..train.checkpoint import atomic_write

    read_graph(path)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    meta.update({key: json.dumps(value, sort_keys=True, separators=(",", ":")) for key, value in entries.items()})
    data = save(load_file(str(path)), metadata=meta)
    return atomic_write(Path(path), lambda handle: handle.write(data))


# ----------------------------------------------------------------------------- test images
def _test_images(spec: dict, same: bool, subset) -> tuple:
    """``(subset, test_subset)`` for the loaders: ``subset="run"`` is the run's own two on its data
    set (``same``) and the whole test set on another; a number or None is taken as given."""
    if subset != "run":
        return subset, None
    return (spec.get("subset"), spec.get("test_subset")) if same else (None, None)


def eval_loader(
    spec: dict,
    *,
    data: str | None = None,
    root=None,
    batch_size: int | None = None,
    subset="run",
    device="cpu",
    download: bool | None = None,
):
    """The test loader a ``data`` spec describes: the run's test images by default.

    ``data``/``root`` replace the data set / folder; ``subset="run"`` keeps the run's test
    subset and ``test_subset`` (on the run's data set; another data set is used whole), None takes the whole
    test set, a number N its first N // 5 images (as ``data.subset`` does). ``download`` as for
    :func:`reste.data.create_loaders`.
    """
    from .. import data as rdata

    name = rdata.canonical_name(data or spec["name"])
    same = name == spec["name"]
    subset, test_subset = _test_images(spec, same, subset)
    if root is None and same:
        root = spec.get("root")
    batch = batch_size or spec.get("test_batch_size") or 256
    _, loader = rdata.create_loaders(
        name,
        root=root,
        batch_size=batch,
        test_batch_size=batch,
        augment=False,
        seed=spec.get("seed", 0),
        device=device,
        subset=subset,
        test_subset=test_subset,
        download=download,
        test_only=True,
    )
    meta = rdata.info(name)
    mean, std = spec.get("mean"), spec.get("std")
    if same and mean is not None and (tuple(mean), tuple(cast(list, std))) != (tuple(meta.mean), tuple(meta.std)):
        # the file says how its model was fed; that wins over this reste's catalog
        if not hasattr(loader, "normalize"):
            raise ExportError(
                f"the export was made with normalisation mean={mean} std={std}, but this reste normalises {name} "
                f"with mean={list(meta.mean)} std={list(meta.std)} and cannot change it for this loader"
            )
        from ..data.augment import Normalizer

        loader.normalize = Normalizer(mean, std, loader.device)
    return loader


@torch.no_grad()
def compare(trained: nn.Module, exported: nn.Module, loader, limit: int | None = None) -> dict:
    """The exported model against the trained one on (the first ``limit``) images of ``loader``."""
    trained.eval()
    exported.eval()
    count = agree = right_trained = right_exported = over = 0
    worst = 0.0
    for images, labels in loader:
        if limit is not None:
            images, labels = images[: limit - count], labels[: limit - count]
        a, b = trained(images).float(), exported(images).float()
        diff = (a - b).abs().amax(1)
        worst = max(worst, diff.max().item())
        over += int((diff > LOGIT_TOLERANCE).sum())
        pa, pb = a.argmax(1), b.argmax(1)
        agree += int((pa == pb).sum())
        right_trained += int((pa == labels).sum())
        right_exported += int((pb == labels).sum())
        count += len(labels)
        if limit is not None and count >= limit:
            break
    share = lambda n: n / count if count else None  # noqa: E731
    return {
        "images": count,
        "max_abs_logit_diff": worst if count else None,
        "images_over_tolerance": over,
        "agreement": share(agree),
        "trained_top1": 100.0 * (right_trained / count) if count else None,
        "exported_top1": 100.0 * (right_exported / count) if count else None,
    }


def _run_config(run_dir: Path, checkpoint: str) -> dict:
    """The config a run's checkpoint was trained with (as ``load_run_model`` reads it)."""
    from ..train.checkpoint import load_checkpoint
    from ..train.rundir import checkpoint_path, read_config

    path = checkpoint_path(run_dir, checkpoint) if checkpoint in ("best", "last") else Path(checkpoint)
    config = load_checkpoint(path, required=("model",)).get("config")
    return config or read_config(run_dir)


def check_export(
    run_dir,
    out,
    model: nn.Module,
    checkpoint: str = "best",
    *,
    verify: bool = True,
    images: int | None = 1000,
    root=None,
) -> tuple[list[str], str | None]:
    """Record the run's data set in an export and check the file against the trained model.

    Loads ``out`` back and compares its logits with ``model``'s on the first ``images`` (None:
    all) of the run's test images and on random inputs; stores the ``data`` and
    ``verification`` entries in the file. Returns the lines to print and what failed (None if it passed:
    at most :data:`LOGIT_TOLERANCE` on random inputs, the same class on at least :data:`MIN_AGREEMENT`
    of the test images).
    A data set that cannot be read leaves the random-input check only, with a warning line.
    """
    from .. import data as rdata
    from .export import load

    run_dir, out = Path(run_dir), Path(out)
    spec = data_spec(_run_config(run_dir, checkpoint))
    if not verify:
        write_metadata(out, {DATA_KEY: spec})
        return [], None
    deployed = load(out)
    model = model.cpu().eval()
    x = torch.randn(RANDOM_INPUTS, *spec["input_shape"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        random_diff = (deployed(x) - model(x)).abs().max().item()
    lines = []
    try:
        loader = eval_loader(spec, root=root, download=False)  # an export never starts a download
        result = compare(model, deployed, loader, images)
        result["inputs"] = f"{spec['name']} test images"
    except (rdata.DatasetNotFoundError, rdata.CorruptDataError, ValueError, OSError) as err:
        result = {"images": 0, "reason": str(err)}
        lines.append(
            "  warning: could not read the run's test images, so the export is checked on random inputs only "
            "(give the data folder with --root DIR):"
        )
        lines += [f"    {line}" for line in str(err).splitlines()]
    result.update({"random_inputs": RANDOM_INPUTS, "random_max_abs_logit_diff": random_diff})
    problem = None
    if result["images"] and result["agreement"] < MIN_AGREEMENT:
        problem = (
            "the exported model predicts another class than the trained model on "
            f"{100 * (1 - result['agreement']):.2f}% "
            f"of {result['images']} test images (at most {100 * (1 - MIN_AGREEMENT):g}% expected)"
        )
    elif random_diff > LOGIT_TOLERANCE:
        problem = (
            f"the exported model's logits differ from the trained model's by {random_diff:.3g} on random "
            f"inputs (at most {LOGIT_TOLERANCE:g} expected)"
        )
    result["passed"] = problem is None
    write_metadata(out, {DATA_KEY: spec, VERIFY_KEY: result})
    if result["images"]:
        lines.append(
            f"  verified on {result['images']} {spec['name']} test images: predictions agree on "
            f"{100 * result['agreement']:.2f}% (top-1 trained {result['trained_top1']:.2f}%, exported "
            f"{result['exported_top1']:.2f}%), max |logit difference| = {result['max_abs_logit_diff']:.2e}"
            + (
                f" ({_images(result['images_over_tolerance'])} above {LOGIT_TOLERANCE:g}, where an activation within "
                "float rounding of 0 took the other sign; see docs/deploy.md)"
                if result["images_over_tolerance"]
                else ""
            )
        )
    lines.append(f"  verified on {RANDOM_INPUTS} random inputs: max |logit difference| = {random_diff:.2e}")
    return lines, problem


# ----------------------------------------------------------------------------- reste eval FILE
def evaluate_export(
    path, *, data: str | None = None, root=None, batch_size: int | None = None, subset="run", device: str = "cpu"
) -> dict:
    """Test accuracy of an exported file, by default on the test images of the run it came from.

    Arguments as for :func:`reste.train.evaluate` (``subset``: see :func:`eval_loader`); the
    data set, test subset and normalisation come from the file's ``data`` entry, so a file
    exported without one (from Python, or by an older reste) needs ``data``.
    Returns ``{"top1", "top5", "loss", "count", "checkpoint", "epoch", "data", "subset", "run", "file"}``.
    """
    from .. import data as rdata
    from ..train.config import ConfigError
    from ..train.evaluation import check_class_folders, evaluate_model
    from .export import load

    path = Path(path)
    graph = read_graph(path)
    spec = read_metadata(path).get(DATA_KEY)
    arch = graph.get("architecture") or {}
    if spec is None:
        if data is None:
            raise ConfigError(
                f"{path} does not record the data set it was trained on (it was exported from Python or by an "
                "older reste); give it with --data NAME, or re-export the run with `reste export`"
            )
        spec = {"name": rdata.canonical_name(data), "subset": None, "seed": 0, "root": None}
    try:
        meta = rdata.info(data or spec["name"])
    except ValueError as err:
        raise ConfigError(f"--data: {err}") from None
    want = (arch.get("num_classes"), arch.get("in_channels"))
    classes = meta.num_classes if meta.in_memory else want[0]  # a class-folder tree: checked on its folders below
    if arch and want != (classes, meta.in_channels):
        raise ConfigError(
            f"{path} holds a model for {want[0]} classes and {want[1]} channels and cannot be evaluated on "
            f"{meta.name} ({meta.num_classes} classes, {meta.in_channels} channels)"
        )
    dev = torch.device(device)
    model = load(path).to(dev)
    loader = eval_loader(spec, data=data, root=root, batch_size=batch_size, subset=subset, device=dev)
    num_classes = want[0] if arch and want[0] else meta.num_classes
    # an export of the data set's own head (every ImageNet export before data.num_classes): a warning
    check_class_folders(loader, num_classes, path, strict=num_classes != meta.num_classes)
    subset, test_subset = _test_images(spec, meta.name == spec["name"], subset)
    result = evaluate_model(model, loader, dev, num_classes=num_classes)
    source = graph.get("source") or {}
    result.update(
        {
            "checkpoint": source.get("checkpoint"),
            "epoch": source.get("epoch"),
            "run": source.get("run"),
            "data": meta.name,
            "subset": subset,
            "test_subset": test_subset,
            "file": str(path),
        }
    )
    return result
