"""What a binary model costs once deployed: parameters by bit width, memory, MACs.

``summary(model, input_size)`` runs one forward pass with hooks and returns a
:class:`ModelSummary`; ``print`` it for a per-layer table with totals.

Accounting (one image; the numbers of the deployed, bit-packed model):

- rows are the modules that hold state or compute: conv/linear layers (binary, packed
  or real) and any other module with its own parameters or buffers (batch norms);
  estimators are training-only and not counted;
- memory: a binary weight is 1 bit, each output channel's (row's) bits padded to whole
  bytes as the export stores them; its layer also stores ``alpha`` (one float per
  layer or per output channel) and its bias; an eval-mode BatchNorm is stored as
  ``reste export`` writes it, two floats per channel (``scale``, ``shift``); every other
  parameter and buffer (``num_batches_tracked`` excluded) is stored at its dtype's width
  (32 bits for float32);
- float32-equivalent: every parameter and buffer at 32 bits (the float model, no alpha);
- MACs: conv (any dimension) ``out_elements * in_channels/groups * prod(kernel)``, transposed
  conv ``in_elements * out_channels/groups * prod(kernel)``, linear
  ``out_elements * in_features``, split into ``1x1`` (binary weights and binary
  inputs: XNOR-popcount), ``1x32`` (binary weights, real inputs: additions) and
  ``32x32`` (real), at every call of the layer (one used twice does its work twice; its
  memory counts once). Operations outside modules (attention products, residual adds)
  and normalisation/activation arithmetic are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..estimators import Estimator
from ..nn.layers import BinaryLayer
from .packed import PackedBinaryConv2d, _PackedBinary

__all__ = ["LayerSummary", "ModelSummary", "summary"]


@dataclass
class LayerSummary:
    """One row of :class:`ModelSummary`."""

    name: str
    kind: str
    output_shape: tuple
    input_bits: int | None  # 1 or 32 for conv/linear; None for other modules
    weight_bits: int | None
    params: int
    params_1bit: int
    params_32bit: int
    memory_bits: int
    macs_1x1: int = 0
    macs_1x32: int = 0
    macs_32x32: int = 0
    #: the same state stored as float32 (what the float model needs)
    float32_bits: int = 0

    @property
    def memory_bytes(self) -> int:
        return math.ceil(self.memory_bits / 8)

    @property
    def macs(self) -> int:
        return self.macs_1x1 + self.macs_1x32 + self.macs_32x32


@dataclass
class ModelSummary:
    """Per-layer costs and totals; ``str()`` gives a table."""

    input_size: tuple
    layers: list = field(default_factory=list)

    def _total(self, attr: str) -> int:
        return sum(getattr(layer, attr) for layer in self.layers)

    @property
    def params(self) -> int:
        return self._total("params")

    @property
    def params_1bit(self) -> int:
        return self._total("params_1bit")

    @property
    def params_32bit(self) -> int:
        return self._total("params_32bit")

    @property
    def memory_bits(self) -> int:
        return self._total("memory_bits")

    @property
    def memory_bytes(self) -> int:
        return math.ceil(self.memory_bits / 8)

    @property
    def float32_bits(self) -> int:
        return self._total("float32_bits")

    @property
    def float32_bytes(self) -> int:
        return math.ceil(self.float32_bits / 8)

    @property
    def compression(self) -> float:
        """float32-equivalent size / deployed size."""
        return self.float32_bits / self.memory_bits if self.memory_bits else float("nan")

    @property
    def macs_1x1(self) -> int:
        return self._total("macs_1x1")

    @property
    def macs_1x32(self) -> int:
        return self._total("macs_1x32")

    @property
    def macs_32x32(self) -> int:
        return self._total("macs_32x32")

    @property
    def macs(self) -> int:
        return self.macs_1x1 + self.macs_1x32 + self.macs_32x32

    @property
    def binary_mac_share(self) -> float:
        """Share of MACs with binary weights and binary inputs (XNOR-popcount)."""
        return self.macs_1x1 / self.macs if self.macs else 0.0

    def to_dict(self) -> dict:
        """Plain data: the rows and the totals (JSON-serialisable)."""
        rows = [dict(asdict(layer), memory_bytes=layer.memory_bytes, macs=layer.macs) for layer in self.layers]
        totals = {
            key: getattr(self, key)
            for key in (
                "params",
                "params_1bit",
                "params_32bit",
                "memory_bits",
                "memory_bytes",
                "float32_bits",
                "float32_bytes",
                "compression",
                "macs",
                "macs_1x1",
                "macs_1x32",
                "macs_32x32",
                "binary_mac_share",
            )
        }
        return {"input_size": list(self.input_size), "layers": rows, "totals": totals}

    def __str__(self) -> str:
        def bits(b):
            return "-" if b is None else str(b)

        head = (
            "layer",
            "kind",
            "output",
            "A bits",
            "W bits",
            "params",
            "1-bit",
            "32-bit",
            "memory B",
            "MACs 1x1",
            "MACs 1x32",
            "MACs 32x32",
        )
        rows = [head]
        for l in self.layers:
            rows.append(
                (
                    l.name,
                    l.kind,
                    "x".join(map(str, l.output_shape)),
                    bits(l.input_bits),
                    bits(l.weight_bits),
                    f"{l.params:,}",
                    f"{l.params_1bit:,}",
                    f"{l.params_32bit:,}",
                    f"{l.memory_bytes:,}",
                    f"{l.macs_1x1:,}",
                    f"{l.macs_1x32:,}",
                    f"{l.macs_32x32:,}",
                )
            )
        rows.append(
            (
                "total",
                "",
                "",
                "",
                "",
                f"{self.params:,}",
                f"{self.params_1bit:,}",
                f"{self.params_32bit:,}",
                f"{self.memory_bytes:,}",
                f"{self.macs_1x1:,}",
                f"{self.macs_1x32:,}",
                f"{self.macs_32x32:,}",
            )
        )
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        right = set(range(3, len(head)))

        def fmt(r):
            return "  ".join(
                c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))
            ).rstrip()

        rule = "  ".join("-" * w for w in widths)
        lines = [fmt(rows[0]), rule] + [fmt(r) for r in rows[1:-1]] + [rule, fmt(rows[-1])]
        lines += [
            "",
            f"input {'x'.join(map(str, self.input_size))}, MACs per image",
            f"model size            {self.memory_bytes:,} bytes ({self.memory_bits:,} bits)",
            f"float32-equivalent    {self.float32_bytes:,} bytes",
            f"memory compression    {self.compression:.2f}x",
            f"MACs                  {self.macs:,} ({self.macs_1x1:,} binary 1x1, {self.macs_1x32:,} 1-bit weight x "
            f"real input, {self.macs_32x32:,} real)",
            f"binary MAC share      {100 * self.binary_mac_share:.2f}%",
        ]
        return "\n".join(lines)


def _state_tensors(module: nn.Module):
    """(name, tensor, is_parameter) of a module's own state that inference needs."""
    for name, p in module.named_parameters(recurse=False):
        yield name, p, True
    for name, b in module.named_buffers(recurse=False):
        if b is not None and name != "num_batches_tracked":
            yield name, b, False


def _stored_as_scale_shift(module: nn.Module) -> bool:
    """A BatchNorm that an export stores as two floats per channel (its running statistics fold in)."""
    return (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and module.affine
        and module.running_mean is not None
        and module.running_var is not None
    )


#: the layers counted with MACs (``nn.Conv1d``/``Conv3d``/``ConvTranspose*d`` too: binarize keeps them real)
_LAYERS = (BinaryLayer, _PackedBinary, nn.modules.conv._ConvNd, nn.Linear)


def _is_row(module: nn.Module) -> bool:
    if isinstance(module, _LAYERS):
        return True
    if isinstance(module, Estimator):
        return False
    return any(True for _ in _state_tensors(module))


def _binary_info(module: nn.Module):
    """(binary_weights, binary_inputs, weight_count, stored_bits, alpha_count) of a conv/linear row; the
    stored bits pad each output channel's row of weights to whole bytes, as ``pack_signs`` does."""
    if isinstance(module, _PackedBinary):
        rows = module.weight_bits.shape[0]
        return True, module.binary_inputs, module.taps * rows, module.weight_bits.numel() * 8, module.alpha.numel()
    if isinstance(module, BinaryLayer) and module.binary_weights:
        with torch.no_grad():
            alpha = module.weight_alpha().numel()
        rows = module.weight.shape[0]
        taps = module.weight.numel() // rows
        return True, module.binary_inputs, module.weight.numel(), rows * 8 * math.ceil(taps / 8), alpha
    return False, False, 0, 0, 0


def _taps_per_output(module: nn.Module) -> int:
    """Multiply-accumulates per output element (per *input* element for a transposed conv)."""
    if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
        return module.out_channels // module.groups * math.prod(module.kernel_size)
    if isinstance(module, (nn.modules.conv._ConvNd, PackedBinaryConv2d)):
        return module.in_channels // module.groups * math.prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, _PackedBinary):
        return module.taps
    return 0


def _row(name: str, module: nn.Module, inputs: tuple, output: torch.Tensor, images: int) -> LayerSummary:
    """One layer's row from its output on a batch of ``images`` inputs. Not every layer sees the
    batch first (attention projections run on ``[L, N, E]`` or ``[L*N, E]``), so the per-image
    count divides the whole output by the batch instead of dropping a leading dimension."""
    binary_w, binary_a, bin_count, bin_stored, alpha_count = _binary_info(module)
    params = p1 = p32 = mem = f32 = 0
    for tname, t, is_param in _state_tensors(module):
        n = t.numel()
        if binary_w and tname in ("weight", "weight_bits"):
            # the latent float weight (training) or the packed bits (deployed): 1 bit per weight
            params += bin_count
            p1 += bin_count
            mem += bin_stored
            f32 += 32 * bin_count
            continue
        if isinstance(module, _PackedBinary):
            if tname in ("alpha", "post_scale", "post_shift"):
                continue  # alpha is counted below, like a training layer's; the others derive from a fused BN
            is_param = is_param or tname == "bias"  # a packed layer keeps the trained bias as a buffer
        if is_param:
            params += n
            p32 += n
        if not (tname in ("running_mean", "running_var") and _stored_as_scale_shift(module)):
            mem += n * t.element_size() * 8
        f32 += 32 * n
    if binary_w:
        mem += 32 * alpha_count
    fused_bn = getattr(module, "post_bn", None)
    if fused_bn is not None:  # a BatchNorm absorbed into the kernel epilogue (reste.deploy.fuse) still counts
        for key in ("weight", "bias", "mean", "var"):
            t = fused_bn[key]
            if t is not None:
                if key in ("weight", "bias"):  # stored as (scale, shift): the statistics fold in
                    params += t.numel()
                    p32 += t.numel()
                    mem += t.numel() * t.element_size() * 8
                f32 += 32 * t.numel()
    row = LayerSummary(
        name=name or "(model)",
        kind=type(module).__name__,
        output_shape=tuple(output.shape[1:]) if output.dim() and output.shape[0] == images else tuple(output.shape),
        input_bits=(1 if binary_a else 32) if _taps_per_output(module) else None,
        weight_bits=(1 if binary_w else 32) if _taps_per_output(module) else None,
        params=params,
        params_1bit=p1,
        params_32bit=p32,
        memory_bits=mem,
        float32_bits=f32,
    )
    transposed = isinstance(module, nn.modules.conv._ConvNd) and module.transposed
    counted = inputs[0] if transposed and inputs and isinstance(inputs[0], torch.Tensor) else output
    macs = counted.numel() // images * _taps_per_output(module)
    if binary_w and binary_a:
        row.macs_1x1 = macs
    elif binary_w:
        row.macs_1x32 = macs
    else:
        row.macs_32x32 = macs
    return row


def summary(
    model: nn.Module, input_size: Sequence[int], device: str | torch.device | None = None, *, batch_dim: int = 0
) -> ModelSummary:
    """Per-layer parameters, memory and MACs of ``model`` for one input of ``input_size``.

    Args:
        model: any model; binary layers (training or packed) are counted at 1 bit per weight.
        input_size: ``(C, H, W)`` of one image (or ``(N, C, H, W)``; MACs are per image), or one
            sample's size for other inputs, e.g. ``(L, E)`` for a sequence of ``L`` tokens.
        device: where to run the measuring forward pass (default: the model's device).
        batch_dim: where the model wants the batch dimension in its input: 0 (the default) or,
            for sequence-first models (``nn.Transformer*`` with ``batch_first=False``), 1.

    The model runs once in eval mode on zeros under ``torch.no_grad()``; its mode is restored. A model
    built on the meta device (``with torch.device("meta"): ...``) gives the same numbers without
    allocating its weights or activations: a way to size a model or an input before building it.
    """
    size = tuple(int(s) for s in input_size)
    if len(size) < 1 or any(s < 1 for s in size):
        raise ValueError(f"input_size must be positive sizes like (3, 32, 32), got {input_size!r}")
    if batch_dim not in range(len(size) + 1):
        raise ValueError(f"batch_dim must be between 0 and {len(size)} for input_size {size}, got {batch_dim!r}")
    batch = size if len(size) == 4 and batch_dim == 0 else size[:batch_dim] + (1,) + size[batch_dim:]
    images = batch[batch_dim]
    first: torch.Tensor | None = next(iter(model.parameters()), None)
    if first is None:
        first = next(iter(model.buffers()), None)
    device = (
        torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
    )
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    rows: dict[str, LayerSummary] = {}
    order: list[str] = []
    handles = []

    def hook_for(name):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                return
            row = _row(name, module, inputs, output, images)
            if name not in rows:
                rows[name] = row
            else:  # called again (a shared layer, a loop): its work counts every time, its memory once
                for key in ("macs_1x1", "macs_1x32", "macs_32x32"):
                    setattr(rows[name], key, getattr(rows[name], key) + getattr(row, key))

        return hook

    def visit(module: nn.Module, prefix: str):
        if _is_row(module):
            order.append(prefix)
            handles.append(module.register_forward_hook(hook_for(prefix)))
            if isinstance(module, _LAYERS):
                return  # a layer's estimators are not separate rows
        for child_name, child in module.named_children():
            visit(child, f"{prefix}.{child_name}" if prefix else child_name)

    visit(model, "")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():  # on the meta device (a model built under torch.device("meta")) shapes only
            model(torch.zeros(batch, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    result = ModelSummary(input_size=size[-3:] if len(size) >= 3 else size)
    result.layers = [rows[name] for name in order if name in rows]
    return result
