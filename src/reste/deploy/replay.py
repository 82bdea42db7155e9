"""Replay a deployed model's forward for a fixed input shape without its Python overhead.

At batch 1 a packed network spends more time in Python than in its kernels: the packed
ResNet-20's forward took 2.03 ms on the Zen 2 VM, 0.48 ms of it in the C calls; the rest was
module calls, plan and buffer-pool lookups, views and layout checks, about 85 µs per conv.
:func:`capture` removes it. Per input key (shape, dtype, device, memory layout) it

1. traces the model with ``torch.fx`` into one flat graph (packed layers and ``torch.nn`` modules
   are the leaves; ``nn.Identity`` nodes vanish), computing every value on the example as it goes;
2. turns each packed conv and linear layer the kernel runs into direct calls of the kernel
   (``pack_rows``, ``conv``) with every argument bound in advance, into private copies of the
   layer's tensors, and a fixed output buffer of its own; a conv whose output only the next
   packed conv reads writes that conv's packed input instead (as
   :func:`reste.deploy.fuse.fuse_chains`, here across blocks too), and a residual of the output's
   shape is added by the kernel;
3. writes the graph out as one straight-line Python function and checks it on the example:
   its output must equal the model's bit for bit, or the capture is refused.

Every other node (the float stem, pooling, the classifier, anything of the user's) calls the same
function or module ``forward`` the model calls, so the result is the model's, bit for bit.

Constraints (each checked, or the call is handed to the model itself; docs/deploy.md has the list):

- inference only: the model must be in eval mode; an input that requires grad under autograd,
  a call under autocast, a global forward hook or a module hook registered since the capture runs
  the model itself;
- the model's forward must be traceable by ``torch.fx`` (no Python control flow on tensor values),
  take one tensor and have no forward hooks when it is captured;
- a shape the example's values decided (``x[x > 0]``) is checked on every call; another one runs
  the model itself;
- an in-place change of the model's tensors is noticed (version counters) and captured again;
  after replacing a module, parameter or buffer, call :meth:`CapturedModel.reset`;
- tracing patches ``nn.Module`` for the whole process (``torch.fx`` does), so captured models hold
  their calls while one traces; capture every shape up front before serving from several threads.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import operator
import threading
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, fx, nn

from ..errors import UsageError
from .packed import PackedBinaryConv2d, PackedBinaryLinear, _ext, _PackedBinary, global_forward_hooks

__all__ = ["CapturedModel", "CaptureError", "capture"]

_CL = torch.channels_last
_VERSION = operator.attrgetter("_version")

#: in-place methods that change a tensor's shape or strides, not its values: a graph with one of them
#: gets a fresh view of each fixed output buffer per call (they must not change the bound view)
_METADATA_INPLACE = frozenset(
    {
        "as_strided_",
        "detach_",
        "requires_grad_",
        "squeeze_",
        "swapaxes_",
        "swapdims_",
        "t_",
        "transpose_",
        "unsqueeze_",
    }
)


#: in-place methods that can give a tensor other memory: a forward with one is not captured (a fixed
#: buffer's address is bound into the replay)
_STORAGE_INPLACE = frozenset({"resize_", "resize_as_", "set_"})


class CaptureError(UsageError, ValueError):
    """The model cannot be captured."""


class _ShapeChanged(Exception):
    """A replay met a shape other than the example's where the example's values decided it."""


# ----------------------------------------------------------------------------- one trace at a time
class _Gate:
    """Captured models' calls share it; a trace holds it alone: ``torch.fx`` patches
    ``nn.Module.__call__`` and ``__getattr__`` for the whole process while it traces, and a module
    called from another thread meanwhile would be traced into. A waiting trace goes first (new
    calls wait for it); a thread that holds the gate may take it again (shared in shared, anything
    in exclusive), and one that holds it shared never asks for it alone (see :meth:`held`)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._waiting = 0  # traces waiting for the gate
        self._owner: int | None = None
        self._depth = 0
        self._mine = threading.local()  # this thread's shared holds

    def held(self) -> bool:
        """Whether this thread holds the gate shared (then it must not ask for it alone)."""
        return getattr(self._mine, "count", 0) > 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            while (self._owner is not None and self._owner != me) or (
                self._waiting and self._owner != me and not self.held()
            ):
                self._cond.wait()
            self._readers += 1
            self._mine.count = getattr(self._mine, "count", 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._mine.count -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._owner != me:
                assert not self.held(), "a thread holding the gate shared asked for it alone"
                self._waiting += 1
                try:
                    while self._owner is not None or self._readers:
                        self._cond.wait()
                finally:
                    self._waiting -= 1
                self._owner = me
            self._depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._owner = None
                self._cond.notify_all()


_GATE = _Gate()


# ----------------------------------------------------------------------------- tracing
class _ConcreteProxy(fx.Proxy):
    """A traced value that knows the example's shape, dtype and device, so a forward's checks of
    them (``if x.shape[-2:] != ...``, ``batch, tokens, dim = x.shape``) run as plain Python while
    tracing; the graph is then valid for that input key only, which is all a capture replays.
    A shape read here is checked on every replay (values can decide shapes). A branch on the
    values themselves still fails to trace."""

    def _value(self, shape_read: bool = False):
        tracer = self.tracer
        assert isinstance(tracer, _Tracer)  # the only tracer that makes these proxies
        value = tracer.values[self.node]
        if shape_read and isinstance(value, Tensor):  # (the length of a tuple of chunks is fixed)
            tracer.shape_reads.add(self.node)
        return value

    @property
    def shape(self):
        return self._value(True).shape

    def size(self, dim=None):
        value = self._value(True)
        return value.size() if dim is None else value.size(dim)

    def dim(self):
        return self._value().dim()

    def __len__(self):
        return len(self._value(True))

    @property
    def ndim(self):
        return self._value().dim()

    @property
    def dtype(self):
        return self._value().dtype

    @property
    def device(self):
        return self._value().device


class _Tracer(fx.Tracer):
    """Trace through every module except the packed layers and ``torch.nn``'s own, computing each
    node's value on the example as it is created (packed convs unchained: their float outputs)."""

    def __init__(self, example: Tensor):
        super().__init__()
        self.example = example
        self.values: dict = {}
        self.shape_reads: set = set()
        self.constants: dict = {}  # fx's tensor constants by name, as the forward created them
        self.placeholders = 0
        self.evaluating = False  # while a leaf module runs on real values: record nothing

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        leaf = isinstance(m, (_PackedBinary, CapturedModel))  # a captured model inside runs as itself
        return leaf or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        if self.evaluating:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self.evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ConcreteProxy(node, self)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind == "output":
            return node
        if kind == "placeholder":
            self.placeholders += 1
            if self.placeholders > 1 and not node.args:  # a later argument without a default
                raise CaptureError("capture replays models that take one tensor; this forward takes more arguments")
            self.values[node] = self.example if self.placeholders == 1 else node.args[0]
            return node
        real_args = fx.node.map_arg(node.args, lambda n: self.values[n])
        real_kwargs = dict(fx.node.map_arg(node.kwargs, lambda n: self.values[n]))
        self.evaluating = True
        try:
            if kind == "get_attr":  # a parameter, a buffer, or a tensor constant fx just stored on the root
                value = _fetch(self.root, target)
                if isinstance(target, str) and target.startswith("_tensor_constant") and isinstance(value, Tensor):
                    # a tensor the forward created: kept as created (each replay copies it), while the
                    # trace may change one copy in place, which every node of the name shares
                    if target not in self.constants:
                        self.constants[target] = (value, value.clone())
                    value = self.constants[target][1]
            elif kind == "call_module":
                real_kwargs.pop("chained", None)
                value = self.root.get_submodule(target)(*real_args, **real_kwargs)
            elif kind == "call_function":
                value = target(*real_args, **real_kwargs)
            else:  # call_method
                value = getattr(real_args[0], target)(*real_args[1:], **real_kwargs)
        finally:
            self.evaluating = False
        self.values[node] = value
        return node


def _trace(model: nn.Module, example: Tensor) -> tuple[fx.Graph, dict, set, dict]:
    """The flat graph of ``model`` on ``example``, each node's value, the nodes whose shape was read,
    and the tensor constants fx made (tensors the forward created from constants) by name."""
    tracer = _Tracer(example)
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    # arguments left at their defaults are constants of the trace (a `shift is None` check holds)
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    before = set(vars(model))
    try:
        graph = tracer.trace(model, concrete_args=defaults or None)
    except CaptureError:
        raise
    except Exception as err:  # fx raises many kinds: TraceError, TypeError, NotImplementedError ...
        raise CaptureError(
            f"cannot capture {type(model).__name__}: torch.fx could not trace its forward "
            f"({type(err).__name__}: {err}). Run the model itself, or make its forward free of Python "
            "control flow on tensor values"
        ) from err
    finally:
        for name in set(vars(model)) - before:  # the constants fx stored on the model (their values are kept)
            if name.startswith(("_tensor_constant", "_torchbind_obj")):
                delattr(model, name)
    return graph, tracer.values, tracer.shape_reads, {name: made for name, (made, _) in tracer.constants.items()}


# ----------------------------------------------------------------------------- run-time helpers
def _layout(x: Tensor) -> str:
    return (
        "channels_last"
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=_CL)
        else "contiguous"
    )


def _key(x: Tensor) -> tuple:
    return (tuple(x.shape), x.dtype, x.device, _layout(x))


def _same_shape(t, shape: torch.Size):
    """``t``, after checking that its shape is the example's (else the call runs the model itself)."""
    if not isinstance(t, Tensor) or t.shape != shape:
        raise _ShapeChanged
    return t


def _kernel_input(t: Tensor, shape: torch.Size) -> Tensor:
    """``t`` as the kernel reads it (float32, channels-last, CPU); its shape is checked before any
    pointer is handed to C."""
    if t.shape != shape:
        raise _ShapeChanged
    if t.dtype is not torch.float32 or t.device.type != "cpu" or not t.is_contiguous(memory_format=_CL):
        t = t.detach().to(device="cpu", dtype=torch.float32).contiguous(memory_format=_CL)
    return t


def _rows_input(t: Tensor, shape: torch.Size) -> Tensor:
    """``t`` as a packed linear layer's kernel reads it: its rows ``[M, in_features]``, float32,
    contiguous, on the CPU (its shape checked first)."""
    if t.shape != shape:
        raise _ShapeChanged
    rows = t.reshape(-1, shape[-1])
    if rows.dtype is not torch.float32 or rows.device.type != "cpu" or not rows.is_contiguous():
        rows = rows.detach().to(device="cpu", dtype=torch.float32).contiguous()
    return rows


def _refuse_training(model: nn.Module) -> None:
    if model.training:
        raise CaptureError("capture is for inference: call model.eval() before capturing")


def _hooked(model: nn.Module) -> str | None:
    if global_forward_hooks():
        return "a global forward hook is registered"
    for name, m in model.named_modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return f"module {name or type(model).__name__!r} has a forward hook"
    return None


def _tensors_equal(a, b) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        return bool(((a == b) | (a.isnan() & b.isnan())).all()) if a.is_floating_point() else torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


class _Program:
    """One captured input key: the generated function, the fixed buffers and the objects it calls."""

    def __init__(self, fn: Callable, keep: list, buffer_storages: set, source: str, summary: dict):
        self.fn = fn
        self.template = None  # the model's output on the example: the containers a replay returns
        self.keep = keep  # every tensor an address in the bound arguments points into
        self.buffer_storages = buffer_storages
        self.source = source
        self.summary = summary
        self.lock = threading.Lock()

    def own(self, value, template, memo: dict | None = None):
        """``value`` in the containers of ``template`` (the model's own output on the example: fx
        turns an OrderedDict into a dict), with every tensor that lives in a fixed buffer copied out
        (the next call overwrites it); a tensor returned twice is copied once, as one tensor."""
        memo = {} if memo is None else memo
        if isinstance(value, Tensor):
            if value.untyped_storage().data_ptr() not in self.buffer_storages:
                return value
            if id(value) not in memo:
                memo[id(value)] = value.clone()
            return memo[id(value)]
        if isinstance(value, (tuple, list)) and isinstance(template, (tuple, list)) and len(value) == len(template):
            items = [self.own(v, t, memo) for v, t in zip(value, template)]
            return type(template)(*items) if hasattr(template, "_fields") else type(template)(items)
        if isinstance(value, dict) and isinstance(template, dict) and value.keys() == template.keys():
            return _same_dict(template, ((k, self.own(v, template[k], memo)) for k, v in value.items()))
        return value


# ----------------------------------------------------------------------------- code generation
class _Builder:
    """Turns a traced graph and its example values into the source of one straight-line function."""

    def __init__(self):
        self.globals: dict = {
            "_kernel_input": _kernel_input,
            "_rows_input": _rows_input,
            "_same_shape": _same_shape,
            "torch": torch,
        }
        self.lines: list[str] = []
        self.keep: list = []
        self.buffers: set = set()
        self.counter = 0
        self.buffer_bytes = 0

    def bind(self, obj, hint: str) -> str:
        self.counter += 1
        name = f"_{hint}{self.counter}"
        self.globals[name] = obj
        return name

    def expr(self, arg, names: dict) -> str:
        """Python source for a node argument: a variable, a literal, or a bound constant."""
        if isinstance(arg, fx.Node):
            return names[arg]
        if isinstance(arg, tuple) and hasattr(arg, "_fields"):  # a namedtuple keeps its type
            return f"{self.bind(type(arg), 't')}({', '.join(self.expr(a, names) for a in arg)})"
        if isinstance(arg, tuple):
            return "(" + "".join(self.expr(a, names) + ", " for a in arg) + ")"
        if isinstance(arg, list):
            return "[" + ", ".join(self.expr(a, names) for a in arg) + "]"
        if isinstance(arg, dict):
            items = "{" + ", ".join(f"{self.expr(k, names)}: {self.expr(v, names)}" for k, v in arg.items()) + "}"
            return (
                items
                if type(arg) in (dict, fx.immutable_collections.immutable_dict)
                else f"{self.bind(type(arg), 't')}({items})"
            )
        if isinstance(arg, slice):
            return f"slice({self.expr(arg.start, names)}, {self.expr(arg.stop, names)}, {self.expr(arg.step, names)})"
        if arg is None or type(arg) in (bool, int, str) or (type(arg) is float and math.isfinite(arg)):
            return repr(arg)
        return self.bind(arg, "c")

    def call(self, target: str, args, kwargs, names: dict) -> str:
        for name in (target.rpartition(".")[2], *kwargs):  # only identifiers go into the source as names
            _identifier(name)
        parts = [self.expr(a, names) for a in args] + [f"{k}={self.expr(v, names)}" for k, v in kwargs.items()]
        return f"{target}({', '.join(parts)})"

    def buffer(self, shape, dtype) -> Tensor:
        with torch.inference_mode(False):  # a normal tensor, whatever mode the capture ran in
            t = torch.empty(shape, dtype=dtype)
        self.keep.append(t)
        self.buffers.add(t.untyped_storage().data_ptr())
        self.buffer_bytes += t.numel() * t.element_size()
        return t


def _identifier(name) -> str:
    if not (isinstance(name, str) and name.isidentifier()):
        raise CaptureError(f"cannot capture a call with the name {name!r}; run the model itself")
    return name


def _eligible_conv(m: nn.Module, x, residual) -> bool:
    """Whether the capture may run this packed conv's kernel itself: where its ``forward`` would
    (``_use_kernel``), on float32 NCHW-shaped inputs with the weights on the CPU."""
    if not isinstance(m, PackedBinaryConv2d) or not isinstance(x, Tensor) or not m._use_kernel(x):
        return False
    if m.weight_bits.device.type != "cpu" or x.dtype is not torch.float32 or x.dim() != 4:
        return False
    if residual is not None:
        if not isinstance(residual, Tensor) or residual.dtype is not torch.float32 or residual.device.type != "cpu":
            return False
    return True


def _eligible_linear(m: nn.Module, x) -> bool:
    """Whether the capture may run this packed linear layer's kernel itself: where its ``forward``
    would (``_use_kernel``), on float32 inputs of its width with the weights on the CPU."""
    return (
        isinstance(m, PackedBinaryLinear)
        and isinstance(x, Tensor)
        and m._use_kernel(x)
        and m.weight_bits.device.type == "cpu"
        and x.dtype is torch.float32
        and x.dim() >= 1
        and x.shape[-1] == m.in_features
    )


def _conv_inputs(node: fx.Node) -> tuple:
    """``(x, residual)`` arguments of a packed conv call (either may be a node)."""
    args, kwargs = list(node.args), dict(node.kwargs)
    x = args[0] if args else kwargs.get("x")
    residual = args[1] if len(args) > 1 else kwargs.get("residual")
    return x, residual


def _build(
    model: nn.Module, graph: fx.Graph, values: dict, shape_reads: set, constants: dict
) -> tuple[_Program, object]:
    """Generate the replay of ``graph``, traced on an example whose value per node is in ``values``
    (they give the shapes and layouts); also returns the traced result."""
    ext = _ext()  # None: no kernel steps, every node runs as in the model
    modules = dict(model.named_modules())
    nodes = list(graph.nodes)

    # 1. aliases: an nn.Identity passes its argument through
    alias: dict = {}

    def resolve(a):
        while isinstance(a, fx.Node) and a in alias:
            a = alias[a]
        return a

    first_of: dict = {}  # a tensor constant read by several get_attr nodes is one tensor per call
    for node in nodes:
        if node.op == "get_attr" and node.target in constants:
            if node.target in first_of:
                alias[node] = first_of[node.target]
            else:
                first_of[node.target] = node
    for node in nodes:
        if (
            node.op == "call_module"
            and type(modules[node.target]) is nn.Identity
            and len(node.args) == 1
            and isinstance(node.args[0], fx.Node)
            and not node.kwargs
        ):
            alias[node] = node.args[0]
    output = next(n for n in nodes if n.op == "output")
    result = fx.node.map_arg(output.args[0], lambda n: values[n])

    # 2. which packed layers the capture runs, and which convs feed the next one packed
    convs, linears = {}, {}
    for node in nodes:
        if ext is None or node.op != "call_module" or node in alias:
            continue
        m = modules[node.target]
        if isinstance(m, PackedBinaryConv2d):
            x, r = (resolve(a) for a in _conv_inputs(node))
            if isinstance(x, fx.Node):
                xv, rv = values[x], values[r] if isinstance(r, fx.Node) else r
                if _eligible_conv(m, xv, rv) and (rv is None or tuple(rv.shape) == tuple(values[node].shape)):
                    convs[node] = (m, x, r)
        elif isinstance(m, PackedBinaryLinear) and len(node.args) == 1 and not node.kwargs:
            x = resolve(node.args[0])
            if isinstance(x, fx.Node) and _eligible_linear(m, values[x]):
                linears[node] = (m, x)
    uses: dict = {}
    for node in nodes:
        if node in alias:
            continue
        for where, arg in enumerate((*node.args, *node.kwargs.values())):
            for used in _nodes_in(arg):
                uses.setdefault(resolve(used), []).append((node, where))
    chained: dict = {}  # producer node -> consumer node
    for node in convs:
        users = uses.get(node, [])
        if len(users) != 1:
            continue
        user, where = users[0]
        if user in convs and user is not node and where == 0 and convs[user][1] is node and convs[user][2] is not node:
            chained[node] = user
    fed = set(chained.values())
    called = {getattr(n.target, "__name__", n.target) for n in nodes if n.op in ("call_method", "call_function")}
    if called & _STORAGE_INPLACE:
        raise CaptureError(
            f"cannot capture a forward that calls {sorted(called & _STORAGE_INPLACE)[0]} (it can move a tensor's "
            "memory, which a replay's fixed buffers must not); run the model itself"
        )
    fresh_views = bool(called & _METADATA_INPLACE)
    shape_reads = {resolve(n) for n in shape_reads} - set(chained)  # a chained conv's value is never made

    # 3. the straight-line function
    b = _Builder()
    names: dict = {}
    for node in nodes:
        if node not in alias:
            names[node] = f"v{len(names)}"
    for node in alias:
        names[node] = names[resolve(node)]
    plans: dict = {}  # (layer, input shape) -> its private plan
    xbits: dict = {}  # conv node -> its packed-input buffer
    # (layout, value) -> the variable holding the value as a kernel reads it (converted once, however often read)
    ready: dict = {}

    def private_plan(m: PackedBinaryConv2d | PackedBinaryLinear, shape: tuple) -> dict:
        # built for the capture (fresh tensors, copies of alpha and bias), not the layer's cached one
        if (id(m), shape) not in plans:
            plans[(id(m), shape)] = m._build_plan(shape)
            b.keep.append(plans[(id(m), shape)])
        return plans[(id(m), shape)]

    def kernel_ready(value) -> str:
        key = ("channels_last", value)
        if key not in ready:
            source = names[value] if isinstance(value, fx.Node) else b.bind(value, "r")
            ready[key] = f"{source}_k" if isinstance(value, fx.Node) else f"{source}k"
            shape = b.bind(values[value].shape if isinstance(value, fx.Node) else value.shape, "shape")
            b.lines.append(f"    {ready[key]} = _kernel_input({source}, {shape})")
        return ready[key]

    def forget_converted() -> None:
        if ready:
            b.lines.append(f"    del {', '.join(sorted(set(ready.values())))}")
            ready.clear()

    def fixed_view(view: Tensor) -> str:
        # a metadata-changing in-place op would change a view bound once: then a fresh one per call
        return f"{b.bind(view, 'out')}.detach()" if fresh_views else b.bind(view, "out")

    # liveness: the variables each node reads, and the position of each variable's last reader
    position = {node: i for i, node in enumerate(n for n in nodes if n not in alias)}
    read_by = {node: {names[resolve(a)] for a in _nodes_in((node.args, node.kwargs))} for node in position}
    last_read: dict = {}
    for node, i in position.items():
        for v in read_by[node]:
            last_read[v] = len(position) if node.op == "output" else i
    b.lines.append("def forward(x, T):")
    with torch.inference_mode(False):  # views of the fixed buffers: normal tensors in any mode
        for node in nodes:
            if node in alias:
                continue
            var = names[node]
            if node.op == "placeholder":  # the input, then any argument left at its default
                b.lines.append(f"    {var} = {'x' if node is nodes[0] else b.expr(node.args[0], names)}")
            elif node.op == "get_attr" and node.target in constants:  # created by the forward: again each call
                b.lines.append(f"    {var} = {b.bind(constants[node.target], 'const')}.clone()")
            elif node.op == "get_attr":
                b.lines.append(f"    {var} = {b.bind(values[node], 'attr')}")
            elif node in convs:
                m, x, r = convs[node]
                plan = private_plan(m, tuple(values[x].shape))
                pre, post = m._prologue_args(b.keep), m._epilogue_args(b.keep)
                if node not in xbits:
                    xbits[node] = b.buffer((plan["xbits"],), torch.uint8)
                xb = xbits[node]
                if node not in fed:
                    b.lines.append(
                        f"    {b.bind(ext.pack_rows, 'pack')}({kernel_ready(x)}.data_ptr(), "
                        f"*{b.bind(plan['pack'], 'pk')}, {xb.data_ptr()}, T, *{b.bind(pre, 'pre')})"
                    )
                res = "0"
                if r is not None:
                    res = f"{kernel_ready(r)}.data_ptr()"
                if node in chained:
                    nxt_node = chained[node]
                    nm = convs[nxt_node][0]
                    nplan = private_plan(nm, tuple(values[node].shape))
                    xbits[nxt_node] = b.buffer((nplan["xbits"],), torch.uint8)
                    _, _, _, _, nph, npw, npix, nrow_bytes, nplus_one = nplan["pack"]
                    nxt = (xbits[nxt_node].data_ptr(), nph, npw, nrow_bytes, nplus_one, *nm._prologue_args(b.keep))
                    out_ptr, tail = 0, f", *{b.bind(nxt, 'nxt')}"
                    view = "None"
                else:
                    out = b.buffer(plan["out"], torch.float32)
                    out_ptr, tail = out.data_ptr(), ""
                    view = fixed_view(out.permute(0, 3, 1, 2))
                conv_args = f"{xb.data_ptr()}, *{b.bind(plan['conv'], 'cv')}, *{b.bind(post, 'post')}"
                b.lines.append(
                    f"    {b.bind(ext.conv, 'conv')}({conv_args}, {out_ptr}, T, {res}, {plan['nibbles']}{tail})"
                )
                b.lines.append(f"    {var} = {view}")
            elif node in linears:
                m, x = linears[node]
                plan = private_plan(m, (values[x].numel() // m.in_features, m.in_features))
                xb = b.buffer((plan["xbits"],), torch.uint8)
                out = b.buffer(plan["out"], torch.float32)
                if ("rows", x) not in ready:
                    ready[("rows", x)] = f"{names[x]}_rows"
                    b.lines.append(f"    {names[x]}_rows = _rows_input({names[x]}, {b.bind(values[x].shape, 'shape')})")
                b.lines.append(
                    f"    {b.bind(ext.pack_rows, 'pack')}({ready[('rows', x)]}.data_ptr(), "
                    f"*{b.bind(plan['pack'], 'pk')}, {xb.data_ptr()}, T)"
                )
                conv_args = (
                    f"{xb.data_ptr()}, *{b.bind(plan['conv'], 'cv')}, *{b.bind(m._epilogue_args(b.keep), 'post')}"
                )
                b.lines.append(f"    {b.bind(ext.conv, 'conv')}({conv_args}, {out.data_ptr()}, T)")
                b.lines.append(f"    {var} = {fixed_view(out.reshape(*values[x].shape[:-1], m.out_features))}")
            elif node.op == "call_module":
                forget_converted()  # each call may change a tensor in place: convert again after it
                kwargs = dict(node.kwargs)
                kwargs.pop("chained", None)
                module_forward = b.bind(modules[node.target].forward, "m")
                b.lines.append(f"    {var} = {b.call(module_forward, node.args, kwargs, names)}")
            elif node.op == "call_function":
                forget_converted()
                b.lines.append(f"    {var} = {b.call(b.bind(node.target, 'f'), node.args, node.kwargs, names)}")
            elif node.op == "call_method":
                forget_converted()
                obj, *rest = node.args
                b.lines.append(f"    {var} = {b.call(f'{b.expr(obj, names)}.{node.target}', rest, node.kwargs, names)}")
            elif node.op == "output":
                b.lines.append(f"    return {b.expr(node.args[0], names)}")
            if node in shape_reads and node.op != "output":  # a shape the forward read: the example's, every call
                b.lines.append(f"    _same_shape({var}, {b.bind(values[node].shape, 'shape')})")
            if node.op != "output":  # drop what no later node reads, as eager Python does: its memory is reused warm
                done = sorted(v for v in {*read_by[node], var} if last_read.get(v, -1) <= position[node])
                if done:
                    b.lines.append(f"    del {', '.join(done)}")
    source = "\n".join(b.lines) + "\n"
    namespace = dict(b.globals)
    exec(compile(source, f"<reste.deploy.capture of {type(model).__name__}>", "exec"), namespace)  # noqa: S102
    count = lambda kind: sum(n.op == "call_module" and isinstance(modules[n.target], kind) for n in nodes)  # noqa: E731
    summary = {
        "packed_convs": count(PackedBinaryConv2d),
        "packed_linears": count(PackedBinaryLinear),
        "kernel_steps": len(convs) + len(linears),
        "chained": len(chained),
        "fixed_buffer_bytes": b.buffer_bytes,
    }
    return _Program(namespace["forward"], b.keep, b.buffers, source, summary), result


def _nodes_in(arg) -> list:
    found: list = []

    def note(n: fx.Node) -> fx.Node:
        found.append(n)
        return n

    fx.node.map_arg(arg, note)
    return found


def _fetch(model: nn.Module, target: str):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ----------------------------------------------------------------------------- the module
class CapturedModel(nn.Module):
    """``model`` with each input key's forward replayed as one generated function (see the module
    docstring); a drop-in replacement for inference. ``captures`` maps each captured input key
    (shape, dtype, device, layout) to what was captured."""

    def __init__(self, model: nn.Module, max_shapes: int = 8):
        super().__init__()
        if max_shapes < 1:
            raise ValueError(f"max_shapes must be at least 1, got {max_shapes}")
        self.model = model
        self.max_shapes = int(max_shapes)
        self._programs: dict = {}
        self._build_lock = threading.Lock()
        self._watched: list = []  # the model's parameters and buffers when it was captured
        self._versions: list = []
        self._hook_dicts: list = []  # every module's forward (pre-)hook dict when it was captured

    def reset(self) -> None:
        """Forget every capture; the next call captures again. Changes through the model's tensors
        (``load_state_dict``, in-place edits) are noticed by themselves; replacing a module, a
        parameter or a buffer, or fusing again, is not: call this after it."""
        with self._build_lock:  # a capture being built now is dropped too
            self._programs = {}
            self._watched, self._versions, self._hook_dicts = [], [], []

    def _changed(self) -> bool:
        """Whether a tensor of the model changed in place since it was captured (a few µs a call)."""
        return list(map(_VERSION, self._watched)) != self._versions

    def _apply(self, fn, *args, **kwargs):
        self.reset()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.reset()
        return super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_programs"], state["_watched"], state["_versions"], state["_hook_dicts"] = {}, [], [], []
        state.pop("_build_lock", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._build_lock = threading.Lock()

    @property
    def captures(self) -> dict:
        return {key: dict(p.summary) for key, p in self._programs.items()}

    def source(self, example: Tensor) -> str:
        """The generated Python of ``example``'s input key (captured first if needed)."""
        return self._program(_standard(example)).source

    def _program(self, x: Tensor) -> _Program:
        key = _key(x)
        program = self._programs.get(key)
        if program is not None:
            return program
        with self._build_lock, _GATE.exclusive():
            program = self._programs.get(key)
            if program is not None:
                return program
            _refuse_training(self.model)
            hooked = _hooked(self.model)
            if hooked:
                raise CaptureError(
                    f"cannot capture: {hooked}, which a capture would not run; remove it or run the model itself"
                )
            # a fresh copy of the example for each run: a forward that changes its input in place
            # must see the same input every time
            example = x.detach().clone(memory_format=torch.preserve_format)
            named = list(_named_tensors(self.model))
            watched = [t for _, t in named]
            versions = list(map(_VERSION, watched))  # before anything runs: a change meanwhile is noticed later
            with torch.no_grad():
                expected = self.model(
                    example.clone(memory_format=torch.preserve_format)
                )  # the model's own errors first
                changed = [name for (name, t), v in zip(named, versions) if _VERSION(t) != v]
                if changed:
                    raise CaptureError(
                        f"cannot capture {type(self.model).__name__}: its forward changes its own tensors "
                        f"({', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}; a BatchNorm in training "
                        "mode, a counter), which a replay would not do; put every module in eval mode "
                        "(model.eval()) or run the model itself"
                    )
                graph, values, shape_reads, constants = _trace(
                    self.model, example.clone(memory_format=torch.preserve_format)
                )
                program, traced = _build(self.model, graph, values, shape_reads, constants)
                program.template = _skeleton(expected)
                traced = program.own(traced, expected)
                got = program.own(program.fn(example, torch.get_num_threads()), expected)
            if not (_tensors_equal(traced, expected) and _tensors_equal(got, expected)):
                if list(map(_VERSION, watched)) != versions:
                    raise CaptureError(
                        f"the tensors of {type(self.model).__name__} changed while it was being captured (in another "
                        "thread?); call it again"
                    )
                raise CaptureError(
                    f"the captured forward of {type(self.model).__name__} does not reproduce the model's output "
                    "bit for bit on the example input, so it is not used; run the model itself (and please report this)"
                )
            if len(self._programs) >= self.max_shapes:
                self._programs.pop(next(iter(self._programs)))
            if not self._programs:  # the state every capture of this model is of
                self._watched, self._versions = watched, versions
                self._hook_dicts = [d for m in self.model.modules() for d in (m._forward_pre_hooks, m._forward_hooks)]
            self._programs[key] = program
            return program

    def _model(self, x: Tensor):
        """The model itself, as inference (what a replay would have computed, without it)."""
        with _GATE.shared(), torch.no_grad():
            return self.model(x)

    def forward(self, x: Tensor):
        if not isinstance(x, Tensor):
            raise TypeError(f"a captured model takes one tensor, got {type(x).__name__}")
        if torch.is_grad_enabled() and x.requires_grad:
            with _GATE.shared():
                return self.model(x)  # inference kernels: autograd goes through the model's own path
        if (
            self.model.training
            or torch.is_autocast_enabled("cpu")
            or global_forward_hooks()
            or any(self._hook_dicts)  # a hook registered since the capture (a replay would not run it)
        ):
            return self._model(x)  # a replay is the eval-mode forward, without autocast or hooks
        if not x.is_contiguous() and _layout(x) != "channels_last":
            return self._model(x)  # a strided input: its own strides may change the model's arithmetic
        if self._programs and self._changed():
            self.reset()  # the model's weights changed in place: capture them again
        if _GATE.held() and _key(x) not in self._programs:
            return self._model(x)  # inside another captured call: tracing now would wait for itself
        program = self._program(x)
        if not program.lock.acquire(blocking=False):
            return self._model(x)  # another thread is replaying this key's buffers
        try:
            with _GATE.shared(), torch.no_grad():
                return program.own(program.fn(x, torch.get_num_threads()), program.template)
        except _ShapeChanged:  # the example's values decided a shape this input does not have
            return self._model(x)
        finally:
            program.lock.release()

    def extra_repr(self) -> str:
        return f"max_shapes={self.max_shapes}, captured={len(self._programs)}"


def _skeleton(value):
    """``value``'s containers, each tensor replaced by None (what :meth:`_Program.own` rebuilds)."""
    if isinstance(value, Tensor):
        return None
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_skeleton(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_skeleton(v) for v in value)
    if isinstance(value, dict):
        return _same_dict(value, ((k, _skeleton(v)) for k, v in value.items()))
    return value


def _same_dict(template: dict, items) -> dict:
    """A dict of ``template``'s type (OrderedDict, defaultdict with its factory ...) holding ``items``."""
    out = copy.copy(template)
    out.clear()
    out.update(items)
    return out


def _named_tensors(model: nn.Module):
    yield from model.named_parameters()
    yield from model.named_buffers()


def _standard(x: Tensor) -> Tensor:
    """``x`` in a layout a capture is keyed on: contiguous, or channels-last 4-D."""
    return x if x.is_contiguous() or _layout(x) == "channels_last" else x.contiguous()


def capture(model: nn.Module, example: Tensor | None = None, max_shapes: int = 8) -> CapturedModel:
    """Wrap a deployed model so that each input key's forward is replayed without Python overhead.

    ``reste.deploy.capture(reste.deploy.load(path))`` returns a module that computes exactly what
    the model computes (checked bit for bit on the first input of each shape, dtype, device and
    layout), faster where per-layer overhead dominates (small models, batch 1). ``example``:
    capture its key now instead of on first use (do so for every shape before serving from several
    threads). ``max_shapes``: how many input keys to keep (the oldest goes). See docs/deploy.md,
    "Capture: batch-1 latency", for the constraints.
    """
    _refuse_training(model)  # now, not at the first call (which would run the model in training mode)
    captured = CapturedModel(model, max_shapes)
    if example is not None:
        captured._program(_standard(example))
    return captured
