"""``reste sweep`` and ``reste report``: grids of runs and the tables and figures made from them."""

from __future__ import annotations

import argparse
import shlex

SWEEP_EPILOG = """\
examples:
  reste sweep configs/fashion_mnist/seed_resnet20.yaml estimator.o_end=1,2,3,4,5 --seeds 0,1
  reste sweep cfg.yaml estimator.schedule=linear,cosine,power train.epochs=3 --out runs/ways

Values are read as YAML (3 is a number, cosine a string, [1,2] a list; commas inside
brackets do not split). A key with one value is applied to every run and left out of
the run names. Run the same command again to continue an interrupted sweep: finished
runs (summary.json marked complete) are skipped, runs with a checkpoint are resumed. A run
is reused only if it was made with the options this command gives it (up to device,
threads, checkpoint frequency and the like); otherwise nothing starts (exit 2).
"""

REPORT_EPILOG = """\
examples:
  reste report runs/sweep-seed_resnet20 --out reports/o_end
  reste report runs/oend runs/fixed runs/ways runs/estimators --out docs
  reste report runs/repro --out docs        # a folder of sweeps: each sweep in it is read

Writes OUT/report.md and, with matplotlib installed (pip install reste[plot]),
OUT/figures/*.png. Numbers reported by the paper are shown in separate columns headed
"paper (reported, ...)".
"""


def register(subparsers) -> None:
    """Add the ``sweep`` and ``report`` sub-commands."""
    sweep = subparsers.add_parser(
        "sweep",
        help="run a grid of training runs (cartesian product), resumable",
        description="Run every combination of the listed config values, each run in its own directory.",
        epilog=SWEEP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sweep.add_argument(
        "items",
        nargs="+",
        metavar="ITEM",
        help="an optional base config YAML first, then grid items key=v1,v2,... (dotted config keys)",
    )
    sweep.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1 (adds seed to the grid)")
    sweep.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1; each is its own process)")
    sweep.add_argument("--out", default=None, help="sweep directory (default runs/sweep-<config name>)")
    sweep.set_defaults(func=run_sweep)

    report = subparsers.add_parser(
        "report",
        help="tables and figures (seed Tables 1-3, Figures 1-3) from run or sweep directories",
        description="Summarise finished runs: mean ± std over seeds, laid out like the paper's tables.",
        epilog=REPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument(
        "dirs",
        nargs="+",
        metavar="RUN_OR_SWEEP_DIR",
        help="run directories, sweep directories (or folders of runs), and/or folders of sweep directories",
    )
    report.add_argument("--out", required=True, help="output directory for report.md and figures/")
    report.add_argument("--no-plots", action="store_true", help="write the tables only")
    report.set_defaults(func=run_report)


def run_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .sweep import Sweep, SweepError

    items = list(args.items)
    config = items.pop(0) if items and "=" not in items[0] else None
    if not items and args.seeds is None:
        raise SweepError("nothing to sweep; give key=v1,v2 items and/or --seeds")
    out = args.out or str(Path("runs") / f"sweep-{Path(config).stem if config else 'default'}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds is not None else None
    except ValueError:
        raise SweepError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    # a SweepError prints "error: reste sweep: ...", a SweepConfigError what `reste train` prints: both exit 2
    sweep = Sweep(config=config, grid=items, out=out, seeds=seeds, jobs=args.jobs)
    return sweep.run()


def run_report(args: argparse.Namespace) -> int:
    from .report import build_report

    command = (
        "reste report " + " ".join(shlex.quote(str(d)) for d in args.dirs) + f" --out {shlex.quote(str(args.out))}"
    )
    command += " --no-plots" if args.no_plots else ""
    # a directory that is neither a run nor a sweep: NotARunError, exit 1 (reste.cli reports it)
    report = build_report(args.dirs, args.out, command=command, plots=not args.no_plots)
    print(
        f"wrote {report.path}"
        + (f" and {len(report.figures)} figure(s) in {report.path.parent / 'figures'}" if report.figures else "")
    )
    for line in report.left_out:  # as in report.md: runs found but not counted (unfinished, failed, no results)
        print(f"left out: {line.replace('`', '')}")
    for line in report.duplicates:  # as in report.md: copies of one (setting, seed) are one seed
        print(f"duplicate: {line.replace('`', '')}")
    for line in report.not_drawn:  # the same lines as in report.md: what is missing and why
        print(f"not drawn: {line}")
    return 0
