"""Helpers shared by the reste.deploy tests (test_deploy.py, test_deploy_chain.py)."""

from __future__ import annotations

import contextlib
import threading

import torch

from reste.deploy import packed as packed_mod


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
