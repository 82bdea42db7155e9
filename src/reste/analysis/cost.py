"""How much the equilibrium indicators cost next to a training step.

``python -m reste.analysis.cost [--model resnet20] [--kwargs '{patch_size: 7}'] [--batch 128] [--threads 1]`` times,
on random data of the data set's image shape, the median of

- a train step (forward, backward, Adam step),
- :meth:`IndicatorTracker.measure` (right after a backward, as the trainer calls it),
- :meth:`IndicatorTracker.snapshot`,

and prints them with their ratio to the step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from .indicators import IndicatorTracker

__all__ = ["indicator_cost", "median_seconds"]


def median_seconds(fn, reps: int) -> float:
    """The median wall time of ``reps`` calls of ``fn()``, in seconds (the benchmarks use it too)."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def indicator_cost(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, o_end: float = 3.0, reps: int = 15
) -> dict:
    """Median seconds of a train step, ``measure()`` and ``snapshot()`` for ``model`` on one batch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    tracker = IndicatorTracker(model, o_end=o_end)

    def backward():
        F.cross_entropy(model(images), labels).backward()

    def train_step():
        backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(2):  # warm-up: allocator, first-call overheads
        train_step()
        tracker.measure()
    step = median_seconds(train_step, reps)
    backward()  # measure() reads the gradients
    measure = median_seconds(tracker.measure, 2 * reps)
    with tempfile.TemporaryDirectory() as tmp:
        snapshot = median_seconds(lambda: tracker.snapshot(f"{tmp}/snapshot.npz"), max(3, reps // 2))
    return {
        "binary_layers": len(tracker),
        "binary_weights": sum(layer.weight.numel() for _, layer in tracker.layers),
        "step_s": step,
        "measure_s": measure,
        "snapshot_s": snapshot,
        "measure_per_step": measure / step,
        "snapshot_per_step": snapshot / step,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reste.analysis.cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--precision", default="1w1a")
    parser.add_argument("--data", default="fashion_mnist", help="data set whose image shape and classes are used")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument(
        "--kwargs",
        default="{}",
        help="the model's options as a YAML mapping, as model.kwargs in a config, e.g. '{patch_size: 7}'",
    )
    args = parser.parse_args(argv)

    import yaml

    from reste import data, models

    try:
        kwargs = yaml.safe_load(args.kwargs)
    except yaml.YAMLError as err:
        parser.error(f"--kwargs {args.kwargs!r} is not YAML: {err}")
    if not isinstance(kwargs, dict):
        parser.error(f"--kwargs must be a YAML mapping such as '{{patch_size: 7}}', got {args.kwargs!r}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        meta = data.info(args.data)
        model = models.create(
            args.model,
            num_classes=meta.num_classes,
            in_channels=meta.in_channels,
            precision=args.precision,
            image_size=meta.image_size,
            **kwargs,
        )
    except (ValueError, TypeError) as err:  # an unknown name, or options the model does not take
        parser.error(f"cannot build {args.model} for {args.data}: {err}; give its options with --kwargs")
    images = torch.randn(args.batch, meta.in_channels, meta.image_size, meta.image_size)
    labels = torch.randint(0, meta.num_classes, (args.batch,))
    r = indicator_cost(model, images, labels, reps=args.reps)
    print(
        f"{args.model} {args.precision}, batch {args.batch} of {meta.in_channels}x{meta.image_size}x{meta.image_size}, "
        f"{args.threads} thread(s): {r['binary_layers']} binary layers, {r['binary_weights']:,} binary weights"
    )
    print(f"  train step  {r['step_s'] * 1e3:9.1f} ms")
    print(f"  measure()   {r['measure_s'] * 1e3:9.2f} ms  = {100 * r['measure_per_step']:.2f} % of a step")
    print(f"  snapshot()  {r['snapshot_s'] * 1e3:9.1f} ms  = {100 * r['snapshot_per_step']:.1f} % of a step")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
