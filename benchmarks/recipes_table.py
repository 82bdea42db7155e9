"""The table of docs/recipes.md from the runs its commands write.

    python benchmarks/recipes_table.py runs/recipes

Reads ``<dir>/<recipe>-s<seed>/summary.json`` for the recipes scratch, two_step_1 + two_step_2
(one row, times added), distill (with the training time of the teacher its config names in its
own column: several students may share one teacher) and teacher, and prints one Markdown row
per recipe: final test top-1 per seed, their mean, and the mean training time per seed.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import yaml

ROWS = {  # row label: (run prefixes whose times add up, the run whose accuracy counts)
    "binary from scratch (the main job)": (("scratch",), "scratch"),
    "two-step (1W/32A, then 1W/1A from it)": (("two_step_1", "two_step_2"), "two_step_2"),
    "distilled from a float teacher": (("distill",), "distill"),
    "the float teacher itself": (("teacher",), "teacher"),
}


def _summary(folder: Path, prefix: str, seed: str) -> dict | None:
    path = folder / f"{prefix}-s{seed}" / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _teacher_summary(run: Path) -> dict | None:
    """The summary of the teacher run named by ``train.teacher`` in the run's config.yaml."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    source = Path(config["train"]["teacher"])
    path = (source if source.is_dir() else source.parent) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def table(folder: Path) -> str:
    seeds = sorted({p.name.rsplit("-s", 1)[1] for p in folder.glob("*-s*") if p.is_dir()}, key=int)
    lines = [
        "| recipe | epochs | "
        + " | ".join(f"top-1 seed {s}" for s in seeds)
        + " | mean | time per seed | teacher training |",
        "|---|---|" + "---|" * len(seeds) + "---|---|---|",
    ]
    for label, (parts, scored) in ROWS.items():
        accs, times, epochs, teacher = [], [], None, []
        for seed in seeds:
            runs = [_summary(folder, p, seed) for p in parts]
            if any(r is None or not r.get("complete") for r in runs):
                accs.append(None)
                continue
            accs.append(_summary(folder, scored, seed)["final_top1"])
            times.append(sum(r["seconds"] for r in runs))
            epochs = "+".join(str(r["epochs"]) for r in runs)
            if scored == "distill":  # the teacher the run names (several students may share one)
                t = _teacher_summary(folder / f"distill-s{seed}")
                teacher.append(t["seconds"] if t else None)
        done = [a for a in accs if a is not None]
        cells = [f"{a:.2f}" if a is not None else "–" for a in accs]
        mean = f"{statistics.mean(done):.2f}" if done else "–"
        secs = f"{statistics.mean(times) / 60:.1f} min" if times else "–"
        extra = f"{statistics.mean(t for t in teacher if t) / 60:.1f} min" if any(teacher) else ""
        lines.append(f"| {label} | {epochs or '–'} | " + " | ".join(cells) + f" | {mean} | {secs} | {extra} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/recipes")))
