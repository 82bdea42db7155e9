"""Cost of the export checksum: load(verify=True) vs load(verify=False), and the hash alone (docs/reliability.md).

Run: python benchmarks/checksum_cost.py  (one thread; ResNet-20 and VGG-small, CIFAR-10 shapes, random weights)
"""
import sys, time, tempfile, statistics
import torch
from reste import models
from reste.deploy import export, load
import importlib; E = importlib.import_module("reste.deploy.export")
torch.set_num_threads(1)
for name in ("resnet20", "vgg_small"):
    arch = {"name": name, "num_classes": 10, "in_channels": 3, "precision": "1w1a", "estimator": "reste", "image_size": 32, "kwargs": {}}
    model = models.create(name, **{k: v for k, v in arch.items() if k not in ("name", "kwargs")})
    path = tempfile.mktemp(suffix=".safetensors")
    E.export(model, path, architecture=arch)
    import os
    size = os.path.getsize(path)
    res = {}
    for verify in (False, True, False, True):
        ts = []
        for _ in range(7):
            t = time.perf_counter(); load(path, verify=verify); ts.append(time.perf_counter() - t)
        res.setdefault(verify, []).extend(ts)
    from safetensors.torch import load_file
    import json
    blobs = load_file(path)
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f: graph = json.loads(f.metadata()["graph"])
    hs = []
    for _ in range(20):
        t = time.perf_counter(); E._checksum(graph, blobs); hs.append(time.perf_counter() - t)
    print(f"{name}: file {size:,} B; load verify=False median {statistics.median(res[False])*1e3:.1f} ms, verify=True {statistics.median(res[True])*1e3:.1f} ms; checksum alone median {statistics.median(hs)*1e3:.3f} ms")
