"""The ``reste train`` and ``reste eval`` commands.

``reste train [CONFIG.yaml] [key=value ...] [--resume RUN_DIR] [--force] [--print-config] [--quiet]``
``reste eval RUN_DIR_OR_CHECKPOINT [--which last|best] [--data NAME] [--root DIR] ...``

Configuration errors print one message (no traceback) and exit with code 2; an
interrupted run exits with 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM)
after writing a checkpoint and printing the resume command. The errors raise
:class:`reste.errors.ReSTEError` subclasses that :func:`reste.cli.main` reports (see its docstring).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import ReSTEError, UsageError
from .config import ConfigError, help_epilog

__all__ = ["register", "run_train", "run_eval"]


def register(subparsers) -> None:
    """Add ``train`` and ``eval`` to the ``reste`` command line."""
    p = subparsers.add_parser(
        "train",
        help="train a binary network (default: binary ResNet-20 + ReSTE on Fashion-MNIST)",
        description=(
            "Train a model. With no arguments this is the main job: a binary (1W/1A) ResNet-20 with "
            "ReSTE (o_end = 3) on Fashion-MNIST. Give a YAML config and/or key=value overrides "
            "(values are read as YAML: optim.lr=0.05 train.amp=bf16 optim.betas=[0.9,0.99]). "
            "Multi-GPU / multi-node: torchrun --nproc_per_node=N -m reste train ..."
        ),
        epilog=help_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]", help="a YAML config file and/or dotted overrides"
    )
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from checkpoints/last.pt (only a few options may change, e.g. train.epochs)",
    )
    p.add_argument("--force", action="store_true", help="overwrite the run directory named by out.name if it exists")
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved configuration as YAML and exit (no training)"
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar or per-epoch lines; the final summary and the run directory are still printed",
    )
    p.set_defaults(func=run_train)
    _allow_options_anywhere(p, takes_value=("--resume",))

    e = subparsers.add_parser(
        "eval",
        help="evaluate a trained run, a checkpoint or an exported 1-bit model on a test set",
        description="Load a checkpoint and its config (or an exported .safetensors file), rebuild the model and\n"
        "the test loader, print top-1, top-5, loss and the number of test images. By default the test\n"
        "images are the ones the run reported on (its data.subset), so the numbers match the run's.",
        epilog="examples:\n  reste eval runs/my-run\n  reste eval runs/my-run --which last --full --threads 2\n"
        "  reste eval runs/my-run/model-1bit.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument(
        "source",
        metavar="RUN_DIR_OR_FILE",
        help="a run directory (uses checkpoints/<which>.pt), a .pt checkpoint, "
        "or a .safetensors file from `reste export`",
    )
    e.add_argument(
        "--which", choices=("last", "best"), help="checkpoint of a run directory (default: best, as `reste export`)"
    )
    e.add_argument(
        "--data",
        metavar="NAME",
        help="evaluate on this data set instead of the one trained on (same classes and channels)",
    )
    e.add_argument("--root", metavar="DIR", help="data folder (default: the run's data.root)")
    e.add_argument("--batch-size", type=int, metavar="N", help="evaluation batch size")
    images = e.add_mutually_exclusive_group()
    images.add_argument(
        "--subset", type=int, metavar="N", help="only the first N // 5 test images (default: the run's test images)"
    )
    images.add_argument("--full", action="store_true", help="the whole test set, also for a run trained on a subset")
    e.add_argument(
        "--threads", type=int, metavar="N", help="CPU threads for torch and the 1-bit kernel (default: torch's)"
    )
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto; an export: cpu)")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(func=run_eval)


def _allow_options_anywhere(parser: argparse.ArgumentParser, takes_value: tuple[str, ...]) -> None:
    """Let ``reste train cfg.yaml --quiet optim.lr=0.1`` work.

    argparse fills a ``nargs="*"`` positional from one run of words only, so words after an
    option would be "unrecognized". Sub-parsers cannot use ``parse_intermixed_args``, so the
    words are reordered (options first, keeping their values) before the normal parse.
    """
    original = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        options, positionals = [], []
        i = 0
        while i < len(args):
            word = args[i]
            if word == "--":
                positionals += args[i + 1 :]
                break
            if word.startswith("-") and len(word) > 1:
                options.append(word)
                if word in takes_value and i + 1 < len(args):
                    options.append(args[i + 1])
                    i += 1
            else:
                positionals.append(word)
            i += 1
        return original(options + positionals, namespace)

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]  # the reordering wrapper, on purpose


def _split_items(items: list[str]) -> tuple[str | None, list[str]]:
    """The config file and the ``key=value`` overrides of ``reste train``'s words. A word that is a
    config key (not a file) lacks its ``=VALUE``: an error that shows the override it meant."""
    import os

    from .config import _all_keys

    config, overrides = None, []
    keys = set(_all_keys())
    for i, item in enumerate(items):
        if "=" in item:
            overrides.append(item)
            continue
        if item in keys and not os.path.exists(item):
            value = items[i + 1] if i + 1 < len(items) and "=" not in items[i + 1] else "VALUE"
            raise ConfigError(
                f"{item!r} is a config key without a value; write {item}={value} (key=value, no spaces around '=')"
            )
        if config is None:
            config = item
        else:
            hint = ""
            if not config.endswith((".yaml", ".yml")) and not os.path.exists(config):
                hint = f" (if {config!r} is a setting, write {config}={item})"
            raise ConfigError(
                f"two config files given ({config!r} and {item!r}); give one YAML file, then key=value overrides" + hint
            )
    return config, overrides


def run_train(args: argparse.Namespace) -> int:
    from .config import config_to_yaml, load_config
    from .trainer import resume_config, train

    try:
        config, overrides = _split_items(args.items)
        if args.resume is not None and config is not None:
            raise ConfigError(f"--resume uses the config saved in {args.resume}; do not also give {config!r}")
        if args.print_config:
            cfg = resume_config(args.resume, overrides) if args.resume else load_config(config, overrides)
            from ..models.build import check_model
            from .config import data_info

            # what set-up checks against the data set (model.kwargs.image_size, the model's size): a
            # config --print-config shows is one that trains; shapes only, nothing allocated or read
            check_model(cfg, data_info(cfg))
            print(config_to_yaml(cfg), end="")
            return 0
        train(config, resume=args.resume, force=args.force, progress=not args.quiet, summary=True, overrides=overrides)
        return 0
    except (ReSTEError, BrokenPipeError):  # a config, ..., interrupt; stdout closed (`| head`): reste.cli's
        raise
    except OSError as err:  # e.g. disk full or permission denied while writing the run directory
        where = os.path.abspath(err.filename) if isinstance(err.filename, str) else err.filename
        what = f"cannot write {where}: {err.strerror}" if err.filename and err.strerror else str(err)
        raise ReSTEError(
            f"{what}; free space or give a writable folder with out.dir=DIR (files written before it are intact: "
            "every write is atomic)"
        ) from None


def run_eval(args: argparse.Namespace) -> int:
    from .trainer import evaluate

    export = str(args.source).endswith(".safetensors")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    if args.subset is not None and args.subset < 1:
        raise UsageError(
            f"--subset must be a positive number of training images (the first N // 5 test images are "
            f"evaluated, at least 1), got {args.subset}; or --full for the whole test set"
        )
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}; e.g. --batch-size 512")
    _check_device(args.device)
    if export and args.which:
        raise UsageError(
            f"--which chooses a checkpoint of a run directory; {args.source} holds the one it was exported from"
        )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # the packed kernel uses torch's thread count too
    subset = None if args.full else (args.subset if args.subset is not None else "run")
    if export:  # not a reste export, damaged, ...: an ExportError, exit 1 like a bad checkpoint
        from reste.deploy.verify import evaluate_export

        result = evaluate_export(
            args.source,
            data=args.data,
            root=args.root,
            batch_size=args.batch_size,
            subset=subset,
            device="cpu" if args.device == "auto" else args.device,
        )
    else:
        result = evaluate(
            args.source,
            data=args.data,
            root=args.root,
            batch_size=args.batch_size,
            subset=subset,
            device=args.device,
            which=args.which or "best",
        )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        top5 = "n/a" if result["top5"] is None else f"{result['top5']:.2f}%"
        picked = [f"data.{key}={result[key]}" for key in ("subset", "test_subset") if result.get(key) is not None]
        which = "the whole test set" if not picked else f"the first ones, as {' and '.join(picked)}; --full for all"
        label = f"{result['file']} ({result['checkpoint']}, " if export else f"{result['checkpoint']} ("
        images = f"{result['count']:,} image{'' if result['count'] == 1 else 's'}"
        print(f"{label}epoch {result['epoch']}) on the {result['data']} test set: {images} ({which})")
        print(f"  top-1 {result['top1']:.2f}%  top-5 {top5}  loss {result['loss']:.4f}")
    return 0


def _check_device(device: str) -> None:
    """``--device``: auto, cpu, cuda or cuda:N, and CUDA only where there is a GPU (exit 2)."""
    from .distributed import resolve_device

    resolve_device(device, key="--device")
