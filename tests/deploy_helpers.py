"""Helpers shared by the reste.deploy tests (test_deploy.py, test_deploy_chain.py, test_replay.py)."""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn

import reste
from reste.deploy import packed as packed_mod
from reste.nn import BinaryConv2d


@contextlib.contextmanager
def forced_kernel_path(name: str):
    """Run the body on kernel path ``name`` (restoring the previous one after); ``"reference"``
    (no compiled extension) forces nothing."""
    if name == "reference":
        yield name
        return
    ext = packed_mod._ext()
    before = ext.isa()
    assert ext.select(name, "the test") == name
    try:
        yield name
    finally:
        ext.select(before)


def disagreements_across_threads(fn, xs, want, rounds: int) -> list[int]:
    """Call ``fn(xs[i])`` ``rounds`` times from one Python thread per input, all at once;
    the indices whose output was ever not ``torch.equal`` to ``want[i]``."""
    bad: list[int] = []

    def work(i):
        with torch.no_grad():
            for _ in range(rounds):
                if not torch.equal(fn(xs[i]), want[i]):
                    bad.append(i)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return bad


def binarized(
    model: nn.Module, input_padding: str = "zero", seed: int = 0, size: int = 12, binarize: bool = True
) -> nn.Module:
    """Binary layers (unless already), BatchNorm statistics from a few train-mode passes, eval mode."""
    torch.manual_seed(seed)
    if binarize:
        model = reste.binarize(model, keep=("first", "last"))
    for m in model.modules():
        if isinstance(m, BinaryConv2d):
            m.input_padding = input_padding
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, size, size))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # BatchNorms far from fresh ones, so the signs depend on their arithmetic
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.mul_(torch.randn(m.num_features, generator=gen) * 2)
                m.bias.add_(torch.randn(m.num_features, generator=gen))
    return model.eval()
