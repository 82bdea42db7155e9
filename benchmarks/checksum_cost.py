"""Cost of the export checksum: load(verify=True) vs load(verify=False), and the hash alone (docs/reliability.md).

Run: python benchmarks/checksum_cost.py  (one thread; ResNet-20 and VGG-small, CIFAR-10 shapes, random weights)
"""

import importlib
import json
import os
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from reste import models
from reste.analysis.cost import median_seconds
from reste.deploy import load

E = importlib.import_module("reste.deploy.export")  # the module (reste.deploy.export is also the function's name)


def median_ms(fn, repeats: int) -> float:
    return median_seconds(fn, repeats) * 1e3


def main() -> None:
    torch.set_num_threads(1)
    for name in ("resnet20", "vgg_small"):
        arch = {
            "name": name,
            "num_classes": 10,
            "in_channels": 3,
            "precision": "1w1a",
            "estimator": "reste",
            "image_size": 32,
            "kwargs": {},
        }
        model = models.create(name, **{k: v for k, v in arch.items() if k not in ("name", "kwargs")})
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"{name}.safetensors")
            E.export(model, path, architecture=arch)
            size = os.path.getsize(path)
            # each measured twice (7 loads each), the lower median kept: the CPU is shared
            plain = [median_ms(lambda: load(path, verify=False), 7) for _ in range(2)]
            checked = [median_ms(lambda: load(path, verify=True), 7) for _ in range(2)]
            blobs = load_file(path)
            with safe_open(path, framework="pt") as f:
                graph = json.loads(f.metadata()["graph"])
            alone = median_ms(lambda: E._checksum(graph, blobs), 20)
        print(
            f"{name}: file {size:,} B; load verify=False {min(plain):.1f} ms, verify=True {min(checked):.1f} ms; "
            f"checksum alone {alone:.3f} ms"
        )


if __name__ == "__main__":
    main()
