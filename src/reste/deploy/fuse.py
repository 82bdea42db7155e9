"""Fuse ``packed conv -> ReLU -> BatchNorm2d`` into the conv's kernel epilogue, bit-exactly.

Also: a BatchNorm before a binary conv into its packing (:func:`fuse_prologues`), a residual add
into the conv's output (:func:`fuse_residual_adds`), and a binary conv whose only consumer is the
next binary conv into writing that conv's packed input (:func:`fuse_chains`).

The binary networks here compute ``conv -> ReLU -> BN`` per unit. In inference the
ReLU and the eval-mode BatchNorm are per-element maps the XNOR-popcount kernel can
apply while it writes the conv output, saving two passes over memory per layer (on
the 2-core CPU, more time than the binary convolution itself).

Safety:

- the data flow is read from ``torch.fx`` traces of each module that owns a packed
  conv, with all its children opaque; a conv is fused only with the ReLU/BN modules
  that consume its output and nothing else, each called once and not shared. Modules
  whose forward cannot be traced (e.g. data-dependent checks) are left as they are,
  but their children are still examined;
- the kernel must reproduce PyTorch's BatchNorm bit for bit, so the later binary
  layers see exactly the same signs. PyTorch evaluates an eval-mode BN as
  ``x * a + b`` with per-channel ``a, b`` it derives from the statistics (the exact
  rounding of that derivation is its own); ``a`` and ``b`` are read back from the BN
  itself, exactly, by :func:`reste.deploy.batchnorm._bn_coefficients` (the reading an
  export stores BatchNorms with), and the fused layer
  is checked against the unfused chain on random inputs, in NCHW and channels-last,
  with a fused multiply-add and then with a separate multiply and add. If neither
  matches bit for bit the BN is not fused.
"""

from __future__ import annotations

import operator
from collections import Counter

import torch
from torch import fx, nn

from .batchnorm import _bn_coefficients
from .packed import PackedBinaryConv2d, _ChainLink, _ext, fused_batchnorm, refuse_state_dict_into_fused

__all__ = ["fuse_epilogues", "fuse_prologues", "fuse_residual_adds", "fuse_chains"]


class _OpaqueChildren(fx.Tracer):
    """Trace only the root's own forward; every submodule is a single call node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _sole_consumer(node: fx.Node, children: dict, calls: Counter, shared: Counter):
    """The child module that is the only user of ``node``'s value, used nowhere else; else None."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.op != "call_module" or user.args != (node,) or user.kwargs:
        return None
    module = children.get(user.target)
    if module is None or calls[user.target] != 1 or shared[id(module)] != 1:
        return None
    return user, module


def _try_fuse(conv: PackedBinaryConv2d, relu: nn.ReLU | None, bn: nn.BatchNorm2d | None, seed: int):
    """Fuse what reproduces the unfused chain bit for bit; returns the absorbed modules."""
    gen = torch.Generator().manual_seed(seed)
    # enough positions that every output channel sees ~100 values; both memory layouts
    probe = torch.randn(4, conv.in_channels, 9 * conv.stride[0], 9 * conv.stride[1], generator=gen)
    inputs = (probe, probe.contiguous(memory_format=torch.channels_last))

    def expected(chain):
        with torch.no_grad():
            outs = []
            for x in inputs:
                y = conv(x)
                for module in chain:
                    y = module(y)
                outs.append(y)
            return outs

    def matches(wanted) -> bool:
        with torch.no_grad():
            return all(torch.equal(conv(x), want) for x, want in zip(inputs, wanted))

    if bn is not None:
        affine = _bn_coefficients(bn)
        if affine is not None:
            wanted = expected([m for m in (relu, bn) if m is not None])
            for fma in (True, False):
                conv.fuse_epilogue(
                    relu=relu is not None, bn=bn, kernel_scale=affine[0], kernel_shift=affine[1], kernel_fma=fma
                )
                if matches(wanted):
                    return [m for m in (relu, bn) if m is not None]
                conv.fuse_epilogue(relu=False, bn=None)
    if relu is not None:
        wanted = expected([relu])
        conv.fuse_epilogue(relu=True, bn=None)
        if matches(wanted):
            return [relu]
        conv.fuse_epilogue(relu=False, bn=None)
    return []


def _bn_formula(
    relu: nn.ReLU | None, bn: nn.BatchNorm2d, scale: torch.Tensor, shift: torch.Tensor, channels: int, seed: int
) -> bool | None:
    """Whether PyTorch computes ``bn(relu(x))`` as ``fma(x, scale, shift)`` (True) or as a multiply, then
    an add (False), judged on float outputs in both memory layouts; None if neither matches bit for bit.

    Only the signs reach a binary conv, but two roundings and one can differ in sign next to zero,
    so the float values are compared, not the conv outputs. The fused form is computed exactly in
    float64 (the product of two floats fits) and rounded once more to float32: that double rounding
    could differ from a true fma only on an exact float32 halfway case, which random data never hits
    here, and the check only chooses between the two forms."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, channels, 7, 5, generator=gen) * 3
    x.view(-1)[::11] = 0.0
    a, b = scale.reshape(1, -1, 1, 1), shift.reshape(1, -1, 1, 1)
    results = set()
    with torch.no_grad():
        for xx in (x, x.contiguous(memory_format=torch.channels_last)):
            y = torch.relu(xx) if relu is not None else xx
            want = bn(y)
            if torch.equal(want, y * a + b):
                results.add(False)
            elif torch.equal(want, (y.double() * a.double() + b.double()).float()):
                results.add(True)
            else:
                return None
    return results.pop() if len(results) == 1 else None


def _producer(node: fx.Node, children: dict, calls: Counter, shared: Counter, kind: type):
    """(node, module) of the ``kind`` child module that computes ``node``'s only input, if this
    is that value's only use and the module is called once and not shared; else None."""
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return None
    src = node.args[0]
    module = children.get(src.target) if src.op == "call_module" else None
    if type(module) is not kind or len(src.users) != 1 or calls[src.target] != 1 or shared[id(module)] != 1:
        return None
    return src, module


def _traced_parents(model: nn.Module, skip=None):
    """``(name, module, graph, children, calls, shared)`` for each module of ``model`` (listed
    before any is changed) that has a packed conv child and whose forward traces: ``graph`` its
    traced forward with the children as opaque calls, ``calls`` how often each child is called,
    ``shared`` how often each module object occurs in ``model``. Modules whose forward cannot be
    traced, or that ``skip(name, module, shared)`` names, are left as they are."""
    shared = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    for parent_name, parent in list(model.named_modules()):
        if skip is not None and skip(parent_name, parent, shared):
            continue
        children = dict(parent.named_children())
        if not any(type(c) is PackedBinaryConv2d for c in children.values()):
            continue
        try:
            graph = _OpaqueChildren().trace(parent)
        except Exception:  # noqa: BLE001 - any untraceable forward: leave this module as it is
            continue
        yield (
            parent_name,
            parent,
            graph,
            children,
            Counter(n.target for n in graph.nodes if n.op == "call_module"),
            shared,
        )


def _single_use_conv(node, children: dict, calls: Counter, shared: Counter):
    """The packed binary conv ``node`` calls if the kernel runs it and it is used only there
    (one call, one owner: fusing changes what it computes), else None."""
    conv = children.get(node.target) if node.op == "call_module" else None
    if not (type(conv) is PackedBinaryConv2d and conv.binary_inputs and conv._kernel_supported()):
        return None
    return conv if calls[node.target] == 1 and shared[id(conv)] == 1 else None


def fuse_prologues(model: nn.Module) -> list[str]:
    """Fuse every safe ``[ReLU ->] BatchNorm2d -> packed conv`` (e.g. VGG-small's real first
    conv unit feeding the first binary conv): the kernel maps each input value as the BN would
    while it packs the signs, so the BN's float output is never written. Fused only if the
    BN's own arithmetic is reproduced bit for bit (:func:`_bn_formula`) and the conv's output
    then equals the unfused chain's. Run after :func:`fuse_epilogues` (a BN between two binary
    convs is better absorbed by the first one's epilogue). Returns the names of the convs."""
    if _ext() is None:
        return []
    fused: list[str] = []
    for parent_name, parent, graph, children, calls, shared in _traced_parents(model):
        for node in list(graph.nodes):
            conv = _single_use_conv(node, children, calls, shared)
            if conv is None or getattr(conv, "pre_bn", None) is not None:
                continue
            found = _producer(node, children, calls, shared, nn.BatchNorm2d)
            if found is None:
                continue
            bn_node, bn = found
            if bn.training or bn.running_mean is None or bn.num_features != conv.in_channels:
                continue
            relu_found = _producer(bn_node, children, calls, shared, nn.ReLU)
            relu = relu_found[1] if relu_found is not None else None
            affine = _bn_coefficients(bn)
            fma = None if affine is None else _bn_formula(relu, bn, *affine, conv.in_channels, seed=len(fused))
            if affine is None or fma is None:
                continue
            gen = torch.Generator().manual_seed(len(fused))
            probe = torch.randn(3, conv.in_channels, 6 * conv.stride[0], 5 * conv.stride[1], generator=gen)
            with torch.no_grad():
                chain = [m for m in (relu, bn) if m is not None]
                wanted = []
                for x in (probe, probe.contiguous(memory_format=torch.channels_last)):
                    y = x.clone()  # an in-place ReLU must not change the probe the fused conv sees
                    for m in chain:
                        y = m(y)
                    wanted.append(conv(y))
                conv.fuse_prologue(relu is not None, bn, affine[0], affine[1], fma)
                ok = all(
                    torch.equal(conv(x), want)
                    for x, want in zip((probe, probe.contiguous(memory_format=torch.channels_last)), wanted)
                )
            if not ok:
                conv.unfuse_prologue()
                continue
            for module in chain:
                name = next(n for n, m in children.items() if m is module)
                setattr(parent, name, nn.Identity())
            fused.append(f"{parent_name}.{node.target}" if parent_name else node.target)
    _refuse_state_dicts(model)
    return fused


def _refuse_state_dicts(model: nn.Module) -> None:
    """Once a BatchNorm is fused into a packed conv of ``model``, its ``load_state_dict`` refuses
    before loading anything (no state_dict holds a fused BatchNorm; see FusedStateDictError)."""
    if not getattr(model, "_reste_refuses_state_dicts", False) and any(fused_batchnorm(m) for m in model.modules()):
        model.register_load_state_dict_pre_hook(refuse_state_dict_into_fused)
        object.__setattr__(model, "_reste_refuses_state_dicts", True)  # a plain flag, not a module attribute


def fuse_epilogues(
    model: nn.Module, residual_adds: bool = True, prologues: bool = True, chains: bool = True
) -> list[str]:
    """Fuse every safe ``packed conv -> [ReLU] -> [BatchNorm2d]`` chain of an eval-mode ``model``.

    The absorbed ReLU and BN modules are replaced by ``nn.Identity`` in their parent.
    Then :func:`fuse_prologues`, :func:`fuse_residual_adds` and :func:`fuse_chains` run (unless
    ``prologues``, ``residual_adds`` or ``chains`` is False). Returns the names of
    the convs that absorbed a ReLU or BN. Needs the compiled kernel (without it there is
    nothing to gain, and nothing is changed).
    """
    if _ext() is None:
        return []
    fused: list[str] = []
    for parent_name, parent, graph, children, calls, shared in _traced_parents(model):
        for node in list(graph.nodes):
            conv = _single_use_conv(node, children, calls, shared)
            if conv is None:
                continue
            relu = bn = None
            tail, step = node, _sole_consumer(node, children, calls, shared)
            if step is not None and type(step[1]) is nn.ReLU:
                tail, relu = step
                step = _sole_consumer(tail, children, calls, shared)
            if (
                step is not None
                and type(step[1]) is nn.BatchNorm2d
                and not step[1].training
                and step[1].running_mean is not None
                and step[1].num_features == conv.out_channels
            ):
                bn = step[1]
            if relu is None and bn is None:
                continue
            absorbed = _try_fuse(conv, relu, bn, seed=len(fused))
            for module in absorbed:
                name = next(n for n, m in children.items() if m is module)
                setattr(parent, name, nn.Identity())
            if absorbed:
                fused.append(f"{parent_name}.{node.target}" if parent_name else node.target)
    if prologues:
        fuse_prologues(model)
    _refuse_state_dicts(model)
    if residual_adds:
        fuse_residual_adds(model)
    if chains:
        fuse_chains(model)
    return fused


def _add_with_other(node: fx.Node, value: fx.Node):
    """The other operand if ``node`` is ``value + other`` or ``other + value`` (no alpha, no out), else None."""
    if node.op != "call_function" or node.target not in (operator.add, torch.add) or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    other = b if a is value else a if b is value else None
    return other if isinstance(other, fx.Node) and other is not value else None


def fuse_residual_adds(model: nn.Module) -> list[str]:
    """Give each ``packed conv [-> fused ReLU/BN] -> + other`` the sum to compute itself.

    A residual block ends in ``conv(h) + shortcut(x)``; PyTorch would allocate a new tensor
    for the sum (on the 2-core VM the page faults of a fresh 4 MB tensor cost more than the
    add), where the packed conv can add ``other`` into its own output buffer: the same float
    addition, so the same bits. The block (a child of ``model``, never ``model`` itself) is
    replaced by an ``fx.GraphModule`` of its traced forward in which that add became
    ``conv(h, other)``; everything else, its children included, stays as it was. Run after
    :func:`fuse_epilogues` (the ReLU/BN between the conv and the add must have been absorbed).
    Returns the names of the convs that took an add.
    """
    if _ext() is None:
        return []
    done = []
    blocks = _traced_parents(
        model,
        skip=lambda name, module, shared: not name or shared[id(module)] != 1 or isinstance(module, fx.GraphModule),
    )
    for parent_name, parent, graph, children, calls, shared in blocks:
        changed = []
        for node in list(graph.nodes):
            conv = _single_use_conv(node, children, calls, shared)
            if conv is None or len(node.args) != 1 or node.kwargs:
                continue
            chain, tail = [], node  # the absorbed ReLU/BN, now nn.Identity, between the conv and the add
            while len(tail.users) == 1:
                user = next(iter(tail.users))
                if user.op == "call_module" and type(children.get(user.target)) is nn.Identity and user.args == (tail,):
                    chain.append(user)
                    tail = user
                    continue
                break
            if len(tail.users) != 1:
                continue
            add = next(iter(tail.users))
            other = _add_with_other(add, tail)
            if other is None:
                continue
            with graph.inserting_before(add):  # after `other` and the conv's input: both come before the add
                fused = graph.call_module(node.target, (node.args[0], other))
            add.replace_all_uses_with(fused)
            for dead in [add] + chain[::-1] + [node]:
                graph.erase_node(dead)
            changed.append(f"{parent_name}.{node.target}")
        if not changed:
            continue
        _replace_with_graph(model, parent_name, parent, graph, children)
        done += changed
    return done


def _unhooked(*modules: nn.Module) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def fuse_chains(model: nn.Module) -> list[str]:
    """Let each packed conv whose output only the next binary conv reads write that conv's packed input.

    ``A -> [absorbed ReLU/BN, now nn.Identity] -> B`` with A's value used nowhere else (VGG-small's
    conv2 -> conv3 and conv4 -> conv5, each ResNet basic block's conv1 -> conv2): A's kernel then
    applies B's prologue map and the sign as it computes each output and writes B's padded bit rows
    directly, and B skips its packing; A's float output is never written. Conservative like the
    other fusions: A and B are packed convs the kernel runs, each called once and not shared, A's
    value (through Identity modules, each called once) has B as its only user, as B's input and not
    also its residual, no module on the way has hooks, and A and B are children of the same parent
    (a child of ``model``, not ``model`` itself), which is replaced by an ``fx.GraphModule`` of its
    traced forward in which A is called with ``chained=True`` (as :func:`fuse_residual_adds` does;
    a block it already rewrote is traced again). Run last (the ReLU/BN between must have been
    absorbed). Anything else, and every call of A without ``chained=True``, keeps the float output.
    Returns ``"parent.A -> parent.B"`` per chain.
    """
    if _ext() is None:
        return []
    done = []
    parents = _traced_parents(model, skip=lambda name, module, shared: not name or shared[id(module)] != 1)
    for parent_name, parent, graph, children, calls, shared in parents:
        links = []
        for node in list(graph.nodes):
            first = _single_use_conv(node, children, calls, shared)
            if first is None or set(node.kwargs) - {"chained"} or len(node.args) not in (1, 2) or not _unhooked(first):
                continue
            between, tail = [], node
            while len(tail.users) == 1:
                user = next(iter(tail.users))
                module = children.get(user.target) if user.op == "call_module" else None
                if type(module) is not nn.Identity or user.args != (tail,) or user.kwargs:
                    break
                if calls[user.target] != 1 or shared[id(module)] != 1 or not _unhooked(module):
                    break
                between.append(module)
                tail = user
            if len(tail.users) != 1:
                continue
            user = next(iter(tail.users))
            second = _single_use_conv(user, children, calls, shared)
            if (
                second is None
                or second is first
                or not user.args
                or user.args[0] is not tail
                or tail in user.args[1:]
                or set(user.kwargs) - {"chained"}
                or second.in_channels != first.out_channels
                or not _unhooked(second)
            ):
                continue
            node.kwargs = {"chained": True}
            links.append((first, _ChainLink(second, tuple(between))))
            prefix = f"{parent_name}." if parent_name else ""
            done.append(f"{prefix}{node.target} -> {prefix}{user.target}")
        if not links:
            continue
        _replace_with_graph(model, parent_name, parent, graph, children)
        for first, link in links:
            first._chain = link
    return done


def _replace_with_graph(model: nn.Module, parent_name: str, parent: nn.Module, graph: fx.Graph, children: dict) -> None:
    """Put an ``fx.GraphModule`` of ``parent``'s rewritten ``graph`` where ``parent`` was in ``model``."""
    graph.lint()
    for node in graph.nodes:  # postponed annotations are strings, which torch.save of a GraphModule cannot name
        node.type = None
    module = fx.GraphModule(parent, graph, class_name=type(parent).__name__)
    for name, child in children.items():  # keep every child reachable under its name, used or not
        if not hasattr(module, name):
            module.add_module(name, child)
    owner_name, _, attr = parent_name.rpartition(".")
    setattr(model.get_submodule(owner_name) if owner_name else model, attr, module)
