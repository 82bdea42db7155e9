"""``reste summary``, ``reste export`` and ``reste bench-infer``.

Errors are :class:`reste.errors.ReSTEError` (exit 1: a file that is missing, damaged or not reste's, a
failed check) or :class:`reste.errors.UsageError` (exit 2: a source or size that cannot be right);
:func:`reste.cli.main` prints them. Errors of other libraries (safetensors, the ONNX exporters, OS
errors) are turned into ``ReSTEError`` here, with the message the command always gave.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from contextlib import contextmanager
from pathlib import Path

from ..errors import ReSTEError, UsageError

SUMMARY_EPILOG = """\
examples:
  reste summary runs/fashion_mnist-resnet20_bireal-1w1a-reste-20261126-000235
  reste summary configs/cifar10/vgg_small_1w1a.yaml --json vgg.json
  reste summary model.safetensors --input-size 1 28 28
  reste summary resnet20 --input-size 3 32 32 --precision 1w32a
"""

EXPORT_EPILOG = """\
examples:
  reste export runs/my-run --out resnet20-1bit.safetensors
  reste export runs/my-run --checkpoint last --out last.safetensors
  reste export runs/my-run --format onnx --out model.onnx     # needs pip install 'reste[onnx]'

The file holds every binary layer's weights at 1 bit each plus its scale alpha, batch
norms and real layers as float32, and the architecture; load it with
reste.deploy.load(FILE). Training state (optimizer, latent float weights, estimator
parameters) is left out.

--format onnx (or an --out ending in .onnx) writes an ONNX graph instead (binary
weights as +-1 float constants times alpha, sign(0) = +1 explicit, dynamic batch size),
checked against the trained model with onnxruntime when it is installed. See
docs/deploy.md, Interoperability.

The file is written beside --out under a temporary name, checked, and only then renamed
over --out: an export stopped by an error or an interrupt leaves --out as it was.
"""

BENCH_EPILOG = """\
examples:
  reste bench-infer --threads 1 --isa all     # every kernel path this CPU supports, one JSON each
  reste bench-infer --json bench.json
  reste bench-infer --isa avx2 --quick
"""


def register(subparsers) -> None:
    """Add the deployment sub-commands."""
    s = subparsers.add_parser(
        "summary",
        help="per-layer parameters by bit width, memory and MACs of a model",
        description="Summarise what a model costs deployed: parameters by bit width, memory (bits and bytes), "
        "MACs by precision, and the totals (size, float32 size, compression, binary MAC share).",
        epilog=SUMMARY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument(
        "source",
        metavar="RUN_OR_CONFIG",
        help="a run directory, a config YAML (or a bundled config's name, cifar10/resnet20_1w1a), an exported "
        ".safetensors file, or a model name",
    )
    s.add_argument(
        "--input-size",
        nargs=3,
        type=int,
        metavar=("C", "H", "W"),
        help="input of one image (default: the data set's, for a model name 3 32 32)",
    )
    s.add_argument(
        "--precision", choices=("1w1a", "1w32a", "fp"), default="1w1a", help="for a model name only (default 1w1a)"
    )
    s.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    s.set_defaults(func=run_summary)

    e = subparsers.add_parser(
        "export",
        help="write a trained run's model with 1-bit packed weights (safetensors)",
        description="Export the model of a run directory with every binary layer packed to 1 bit per weight.",
        epilog=EXPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `reste train`")
    e.add_argument(
        "--format",
        choices=("safetensors", "onnx"),
        default=None,
        help="safetensors: 1-bit packed weights for reste.deploy; onnx: an ONNX graph for other runtimes "
        "(default: from --out's extension, .onnx for onnx, else safetensors)",
    )
    e.add_argument(
        "--exporter",
        choices=("dynamo", "torchscript"),
        default="dynamo",
        help="with --format onnx: PyTorch's ONNX exporter (default dynamo, PyTorch's default)",
    )
    e.add_argument(
        "--out", metavar="FILE", help="output file (default RUN_DIR/model-1bit.safetensors, or RUN_DIR/model.onnx)"
    )
    e.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which checkpoint (default: best)")
    e.add_argument("--no-verify", action="store_true", help="skip checking the loaded file against the trained model")
    e.add_argument(
        "--verify-images",
        type=_images,
        default=1000,
        metavar="N|all",
        help="check on the first N of the run's test images (default 1000; all: every one)",
    )
    e.add_argument("--root", metavar="DIR", help="data folder for the check (default: the run's)")
    e.set_defaults(func=run_export)

    b = subparsers.add_parser(
        "bench-infer",
        help="time packed binary layers and models against float PyTorch on this CPU",
        description="Benchmark XNOR-popcount inference against float F.conv2d / float models with the same threads.",
        epilog=BENCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_bench_arguments(b)
    b.set_defaults(func=run_bench)


def add_bench_arguments(parser) -> None:
    """The options of ``reste bench-infer`` and ``benchmarks/bench_infer.py``."""
    parser.add_argument("--threads", type=int, default=None, help="torch and kernel threads (default: torch's)")
    parser.add_argument(
        "--repeats", type=int, default=7, help="alternating samples per measurement; medians (default 7)"
    )
    parser.add_argument("--quick", action="store_true", help="one shape per family and ResNet-20 only (a smoke test)")
    parser.add_argument(
        "--isa",
        default="auto",
        metavar="auto|all|NAME[,NAME]",
        help="kernel path(s) to measure: auto (this CPU's default), all (every path it supports, one "
        "result each), or names among portable, avx2, avx512, neon (default auto)",
    )
    parser.add_argument(
        "--json",
        default=None,
        metavar="FILE|DIR|-",
        help="where to write the results: a file, a folder (one file per path, named "
        "infer_<cpu>_<isa>_t<threads>[_quick]_<date>.json, <cpu> with its family and model, _run2, _run3... added "
        "rather than overwrite a file; default: benchmarks/results where the current folder has "
        "one, as the root of a clone of reste does, else the current folder), or - for none",
    )


def _images(text: str) -> int | None:
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of images or 'all', got {text!r}")
    return int(text)


class _UnknownSource(UsageError, ValueError):
    """The summary source is neither a run, a config, an export nor a model name (or its
    --input-size is absurd): a usage error (exit code 2)."""


#: what a forward pass holds at once, in multiples of its largest layer output (that output, its
#: input, a residual, a temporary); the bound ``reste summary`` checks before it runs the model
ACTIVATION_COPIES = 4


def _sizes(size) -> str:
    return " ".join(map(str, size))


def _input_size(args) -> tuple | None:
    """--input-size, refused (exit 2) unless every size is at least 1."""
    if args.input_size is None:
        return None
    size = tuple(args.input_size)
    if any(s < 1 for s in size):
        raise _UnknownSource(f"--input-size {_sizes(size)}: every size must be >= 1 (C H W of one image, e.g. 3 32 32)")
    return size


def _check_input(shape_only, size: tuple, label: str, expected: tuple | None = None) -> None:
    """Refuse (exit 2, naming --input-size) an input the model cannot take, or whose activations would not
    fit this process's memory, by running ``shape_only`` (built on the meta device) on it: shapes only,
    nothing is allocated. ``expected``: the (C, H, W) the model was built for, where known."""
    import torch

    from ..models.registry import memory_limit

    if expected is not None and size[0] != expected[0]:
        raise _UnknownSource(
            f"--input-size {_sizes(size)}: {label} takes {expected[0]}-channel images, not {size[0]}; "
            f"give --input-size {expected[0]} H W (it was built for {_sizes(expected)})"
        )
    largest = 0

    def hook(module, inputs, output):
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel() * output.element_size())

    handles = [m.register_forward_hook(hook) for m in shape_only.modules()]
    x = torch.zeros((1, *size), device="meta")
    try:
        shape_only.eval()
        with torch.no_grad():  # as summary() runs it; on the meta device, shapes only
            shape_only(x)
    except (RuntimeError, ValueError, TypeError, IndexError, ZeroDivisionError) as err:
        built = f" (it was built for {_sizes(expected)})" if expected is not None else ""
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise _UnknownSource(
            f"--input-size {_sizes(size)}: {label} cannot run on this input ({first}); give an input size the "
            f"model takes{built}"
        ) from None
    finally:
        for h in handles:
            h.remove()
    need = x.numel() * x.element_size() + ACTIVATION_COPIES * largest
    limit = memory_limit()
    if need > limit:
        raise _UnknownSource(
            f"--input-size {_sizes(size)}: running {label} on it needs about {need / 2**30:.3g} GiB of activations "
            f"(its largest layer output alone is {largest / 2**30:.3g} GiB); this process may use "
            f"{limit / 2**30:.3g} GiB; give a smaller size"
        )


def _model_for_summary(args):
    """(model, input_size) described by the summary source; the input is first checked on a twin of the
    model built on the meta device (:func:`_check_input`), so a bad or absurd --input-size allocates nothing."""
    import torch

    from .. import models
    from .export import architecture_from_config, build_architecture, load, read_graph

    given = _input_size(args)
    src = Path(args.source)
    if not src.exists() and src.suffix not in (".yaml", ".yml", ".safetensors") and args.source not in models.names():
        # a bundled config named without .yaml (cifar10/resnet20_1w1a), as reste train takes it
        from ..train.config import ConfigError, find_config

        try:
            found = find_config(src)
        except ConfigError:  # no such config either: the error below names every kind of source
            found = None
        if found is not None and found.is_file():
            src = found
    if src.suffix == ".safetensors":
        arch = read_graph(src).get("architecture") or {}
        model = load(src)  # its architecture is checked against the file's bytes before it is built
        if given is None and not arch.get("name"):
            raise ValueError(f"{src} records no architecture; give --input-size C H W")
        default = (arch.get("in_channels", 3), arch.get("image_size") or 32, arch.get("image_size") or 32)
        if arch.get("name"):
            with torch.device("meta"):
                shape_only = build_architecture(arch)
            _check_input(shape_only, given or default, f"{src.name} ({arch['name']})", default)
        return model, given or default
    if src.is_dir() or src.suffix in (".yaml", ".yml"):
        from ..train.config import ConfigError, data_info, find_config, load_config
        from ..train.rundir import CONFIG

        cfg_path = src / CONFIG if src.is_dir() else find_config(src)  # a missing file: ConfigError, exit 2
        if not cfg_path.is_file():
            raise ConfigError(f"{cfg_path} does not exist; give a run directory (with config.yaml) or a config file")
        cfg = load_config(str(cfg_path))
        meta = data_info(cfg)
        from ..models.build import check_model

        check_model(cfg, meta)  # model.kwargs={width: 300}: refused on the meta device, before allocating
        arch = architecture_from_config(cfg)
        default = (meta.in_channels, meta.image_size, meta.image_size)
        with torch.device("meta"):
            shape_only = build_architecture(arch)
        _check_input(shape_only, given or default, f"{arch['name']} for {meta.name}", default)
        return build_architecture(arch), given or default
    if args.source in models.names():
        size = given or (3, 32, 32)
        with torch.device("meta"):  # shapes only: an absurd --input-size is refused before allocating
            try:
                shape_only = models.create(
                    args.source, in_channels=size[0], precision=args.precision, image_size=size[1]
                )
            except ValueError as err:  # a size the model cannot be built for (vgg_small below 8x8)
                raise _UnknownSource(
                    f"--input-size {_sizes(size)}: {args.source} cannot be built for it ({err}); give another size"
                ) from None
            problem = models.check_size(shape_only, copies=1)
        if problem:
            raise _UnknownSource(f"{args.source} with --input-size {_sizes(size)}: {problem}; give a smaller size")
        _check_input(shape_only, size, args.source)
        model = models.create(args.source, in_channels=size[0], precision=args.precision, image_size=size[1])
        return model, size
    raise _UnknownSource(
        f"{args.source!r} is not a run directory, a .yaml config (a file, or a bundled name such as "
        f"cifar10/resnet20_1w1a), a .safetensors export or a model name ({', '.join(models.names())})"
    )


def _json_target(args) -> Path | None:
    """--json of ``reste summary``: a file (its folder is created when missing); a folder is a usage error."""
    if not args.json:
        return None
    path = Path(args.json)
    if path.is_dir():
        raise UsageError(f"--json {path} is a directory; give a file name such as {path / 'summary.json'}")
    return path


def run_summary(args: argparse.Namespace) -> int:
    import json

    from ..train.checkpoint import atomic_write
    from .summary import summary

    json_path = _json_target(args)
    try:
        model, size = _model_for_summary(args)
    except ReSTEError:  # _UnknownSource, ConfigError (exit 2), ExportError, a data set's error (exit 1)
        raise
    except (ValueError, TypeError, OSError) as err:  # a file that is missing, damaged or not reste's
        raise ReSTEError(str(err)) from None
    result = summary(model, size)
    print(result)
    if json_path is not None:
        text = json.dumps(result.to_dict(), indent=2)
        try:
            atomic_write(json_path, lambda handle: handle.write(text.encode()))  # creates a missing folder
        except OSError as err:
            raise ReSTEError(f"cannot write --json {json_path}: {err.strerror or err}; choose another --json") from None
        print(f"\nwrote {json_path}")
    return 0


#: the file name extensions of the export formats; an --out with one of them implies its format
_FORMAT_OF_SUFFIX = {".safetensors": "safetensors", ".onnx": "onnx"}
_DEFAULT_NAME = {"safetensors": "model-1bit.safetensors", "onnx": "model.onnx"}


def _export_target(args: argparse.Namespace, run_dir: Path) -> tuple[str, Path]:
    """(format, --out) of ``reste export``: the format from --format, else from --out's extension
    (``.onnx``: onnx, anything else: safetensors); a --format that contradicts the extension, or an
    --out that is a folder, is a usage error."""
    fmt = getattr(args, "format", None)
    out = Path(args.out) if args.out else None
    if out is not None:
        implied = _FORMAT_OF_SUFFIX.get(out.suffix.lower())
        if fmt is None:
            fmt = implied or "safetensors"
        elif implied is not None and implied != fmt:
            raise UsageError(
                f"--out {out} is a {out.suffix} file but --format is {fmt}; give --format {implied}, or an --out "
                f"ending in .{fmt} (without --format the extension decides)"
            )
    fmt = fmt or "safetensors"
    out = out if out is not None else run_dir / _DEFAULT_NAME[fmt]
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give a file name such as {out / _DEFAULT_NAME[fmt]}")
    return fmt, out


def _check_kernel_setting() -> None:
    """Refuse a ``RESTE_DEPLOY_ISA`` this CPU cannot run (KernelPathError, exit 2) before any work."""
    from .packed import _ext

    _ext()


@contextmanager
def _staged(out: Path):
    """A temporary file name beside ``out`` (same folder, so the final rename is atomic), removed
    on any error or interrupt: what is not renamed over ``out`` leaves no trace, not even the
    folders made for it."""
    missing = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # deepest first
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _write_error(err, out, out) from None
    tmp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    done = False
    try:
        yield tmp
        done = True
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        for folder in missing if not done else ():
            try:
                folder.rmdir()  # only if still empty: a file that went there (a failed check's) stays
            except OSError:
                break


def _publish(tmp: Path, out: Path, passed: bool) -> Path:
    """Rename the checked ``tmp`` over ``out`` (and fsync the folder); returns where it went.

    A file whose check ran and failed never replaces a previous file: then it goes beside it,
    to ``<stem>.failed<suffix>``, so the report has it and the old file stays."""
    from ..train.checkpoint import _fsync_dir

    dest = out if passed or not out.exists() else out.with_name(f"{out.stem}.failed{out.suffix}")
    os.replace(tmp, dest)
    _fsync_dir(dest.parent)
    return dest


def _write_error(err: OSError, tmp: Path, out: Path) -> ReSTEError:
    """An OS error while writing the export, naming ``out`` (not the temporary file)."""
    name = err.filename
    if name is not None and Path(name).name.startswith(f".{out.name}."):
        name = out
    what = f"cannot write {name}: {err.strerror}" if name and err.strerror else str(err).replace(str(tmp), str(out))
    return ReSTEError(
        f"{what}; nothing was written to {out} (a previous file there is intact); free some space "
        "or choose another --out"
    )


def _failed_check(problem: str, dest: Path, out: Path, entry: str) -> ReSTEError:
    where = f"the file is kept at {dest}" if dest == out else f"{out} is unchanged, the new file is kept at {dest}"
    return ReSTEError(f"{problem}; {where}, its metadata entry {entry!r} has the numbers; please report this")


def run_export(args: argparse.Namespace) -> int:
    from .export import export, load_run_model
    from .summary import summary

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ReSTEError(f"{run_dir} is not a directory; give a run directory written by `reste train`")
    fmt, out = _export_target(args, run_dir)
    _check_kernel_setting()
    if fmt == "onnx":
        return _run_export_onnx(args, run_dir, out)
    from .verify import check_export

    with _staged(out) as tmp:
        try:
            model, arch, source = load_run_model(run_dir, args.checkpoint)
            export(model, tmp, architecture=arch, source=source)
            # records the run's data set in the file, and checks it on real test images (see verify.py)
            lines, problem = check_export(
                run_dir,
                tmp,
                model,
                args.checkpoint,
                verify=not args.no_verify,
                images=args.verify_images,
                root=args.root,
            )
            dest = _publish(tmp, out, problem is None)
        except (ReSTEError, BrokenPipeError):  # ExportError, CheckpointError, ConfigError, a data set's error
            raise
        except OSError as err:  # e.g. a full disk: the temporary file is removed, --out untouched
            raise _write_error(err, tmp, out) from None
        except ValueError as err:
            raise ReSTEError(str(err).replace(str(tmp), str(out))) from None
    size = (arch["in_channels"], arch["image_size"], arch["image_size"])
    s = summary(model, size)
    print(f"exported {run_dir.name} ({source['checkpoint']}, epoch {source['epoch']}) to {dest}")
    size_bytes = dest.stat().st_size  # the final file, its data and verification entries included
    print(
        f"  file {size_bytes:,} bytes: {s.float32_bytes / size_bytes:.1f}x smaller than the model's "
        f"float32 weights ({s.float32_bytes:,} bytes)"
    )
    from .packed import slow_kernel_note

    note = slow_kernel_note()
    if note:  # the file is fine; this machine would run it slowly
        print(f"warning: {note}", file=sys.stderr)
    for line in lines:
        print(line)
    if problem:  # the export ran but its check did not pass: the work failed
        raise _failed_check(problem, dest, out, "verification")
    return 0


def _run_export_onnx(args: argparse.Namespace, run_dir: Path, out: Path) -> int:
    """``reste export RUN_DIR --format onnx``: write the graph, check it with onnxruntime if installed,
    then rename it over ``out``."""
    from .. import data as rdata
    from .export import load_run_model
    from .onnx import INSTALL_HINT, check_onnx, export_onnx, write_onnx_metadata
    from .verify import _run_config, data_spec, eval_loader

    lines: list[str] = []
    warning = problem = None
    with _staged(out) as tmp:
        try:
            model, arch, source = load_run_model(run_dir, args.checkpoint)
            spec = data_spec(_run_config(run_dir, args.checkpoint))
            shape = tuple(spec["input_shape"])
        except ReSTEError:  # ExportError, CheckpointError, ConfigError, a data set's error
            raise
        except (ValueError, OSError) as err:
            raise ReSTEError(str(err)) from None
        try:
            export_onnx(
                model,
                tmp,
                shape,
                exporter=args.exporter,
                metadata={"reste.architecture": arch, "reste.source": source, "reste.data": spec},
            )
        except (ReSTEError, BrokenPipeError):  # ExportError (no onnx packages, a model that cannot be packed)
            raise
        except OSError as err:
            raise _write_error(err, tmp, out) from None
        except Exception as err:  # noqa: BLE001 - the exporters raise their own types; name the model and the way out
            raise ReSTEError(
                f"PyTorch's {args.exporter} ONNX exporter failed on {run_dir.name}: {type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''} (try --exporter "
                f"{'torchscript' if args.exporter == 'dynamo' else 'dynamo'})"
            ) from None
        ort = False
        if not args.no_verify:
            try:
                import onnxruntime  # noqa: F401

                ort = True
            except ImportError:
                warning = (
                    f"warning: onnxruntime is not installed, so {out} is not checked against the trained model "
                    f"({INSTALL_HINT})"
                )
        try:
            if ort:
                loader = None
                try:
                    loader = eval_loader(spec, root=args.root, download=False)
                except (rdata.DatasetNotFoundError, rdata.CorruptDataError, ValueError, OSError) as err:
                    lines.append(
                        "  warning: could not read the run's test images, so the ONNX file is checked on random "
                        f"inputs only (give the data folder with --root DIR): {str(err).splitlines()[0]}"
                    )
                result = check_onnx(model, tmp, shape, loader, args.verify_images)
                problem = result.pop("problem")
                write_onnx_metadata(tmp, {"reste.verification": result})
                if result["images"]:
                    lines.append(
                        f"  onnxruntime on {result['images']} {spec['name']} test images: predictions agree on "
                        f"{100 * result['agreement']:.2f}% (top-1 trained {result['trained_top1']:.2f}%, onnx "
                        f"{result['exported_top1']:.2f}%), max |logit difference| = {result['max_abs_logit_diff']:.2e}"
                    )
                lines.append(
                    f"  onnxruntime on {result['random_inputs']} random inputs (batch {result['random_inputs']}): "
                    f"max |logit difference| = {result['random_max_abs_logit_diff']:.2e}"
                )
            dest = _publish(tmp, out, problem is None)
        except (ReSTEError, BrokenPipeError):
            raise
        except OSError as err:
            raise _write_error(err, tmp, out) from None
    print(
        f"exported {run_dir.name} ({source['checkpoint']}, epoch {source['epoch']}) to {dest} "
        f"(ONNX, {args.exporter} exporter, {dest.stat().st_size:,} bytes; input [N, {', '.join(map(str, shape))}])"
    )
    if warning:
        print(warning, file=sys.stderr)
    for line in lines:
        print(line)
    if problem:
        raise _failed_check(problem, dest, out, "reste.verification")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from .bench import main

    try:
        return main(args)
    except ReSTEError:  # e.g. RESTE_DEPLOY_ISA forcing a path this CPU lacks: KernelPathError, exit 2
        raise
    except (RuntimeError, ValueError) as err:  # e.g. --isa naming a path this CPU lacks: the message names the fix
        raise ReSTEError(str(err)) from None
