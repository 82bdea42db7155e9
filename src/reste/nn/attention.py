"""Multi-head attention with its projections as ``nn.Linear`` submodules.

``torch.nn.MultiheadAttention`` keeps its input projection as a raw parameter
(``in_proj_weight``) and calls ``F.linear`` on it inside one functional call, so
swapping layers cannot reach it. :class:`MultiheadAttention` computes the same
function with the projections as child modules, which ``binarize`` then swaps like
any other linear layer:

- ``in_proj``: ``Linear(E, 3E)``, the packed q/k/v projection (one weight, hence one
  binary scale ``alpha``, as the ``qkv`` layer of reste's ViT), when ``kdim = vdim = E``;
  otherwise ``q_proj``, ``k_proj``, ``v_proj``;
- ``out_proj``: ``Linear(E, E)``.

The arithmetic between them is PyTorch's (``F.multi_head_attention_forward``)::

    q, k, v = split(in_proj(x))                 # per head: d = E / heads
    A = softmax(q k^T / sqrt(d) + mask)         # SDPA when need_weights=False
    out = out_proj(A v)

with the same masks (``attn_mask`` bool or float, ``key_padding_mask``, ``is_causal``),
``bias_k/bias_v``, ``add_zero_attn``, dropout, ``batch_first`` and unbatched inputs, and
``need_weights`` / ``average_attn_weights`` returning the same attention weights.
State dicts of ``nn.MultiheadAttention`` (``in_proj_weight``, ``q_proj_weight``, ...)
load into it, so float checkpoints of torchvision's ViT start a binarized one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MultiheadAttention"]


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True = do not attend) as an additive float mask: 0 or -inf."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


class MultiheadAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` with linear submodules; same arguments, same forward.

    Build one from an existing module with :meth:`from_torch` (parameters shared).
    """

    bias_k: Tensor | None  # Parameters, or None without add_bias_kv
    bias_v: Tensor | None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        kw = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.dropout, self.batch_first, self.add_zero_attn = dropout, batch_first, add_zero_attn
        self.packed = self.kdim == embed_dim and self.vdim == embed_dim
        if self.packed:
            self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias, **kw)
        else:
            self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
            self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **kw)
            self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.zeros(1, 1, embed_dim, **kw))
            self.bias_v = nn.Parameter(torch.zeros(1, 1, embed_dim, **kw))
        else:
            self.bias_k = self.bias_v = None

    # torch's fused encoder-layer fast path (nn.TransformerEncoderLayer in eval mode) reads
    # self_attn's raw weights and would compute a float attention past the binary layers;
    # it checks this flag first, so False keeps every call on this module's forward
    _qkv_same_embed_dim = False

    # read by code written for nn.MultiheadAttention (initialisers, torch's fast-path checks)
    @property
    def in_proj_weight(self) -> Tensor | None:
        return self.in_proj.weight if self.packed else None

    @property
    def in_proj_bias(self) -> Tensor | None:
        return self.in_proj.bias if self.packed else None

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> MultiheadAttention:
        """The same attention as ``mha``, sharing its parameters (q/k/v biases are views)."""
        # built on the meta device: every tensor is replaced by one of mha's below, so nothing is allocated
        new = cls(
            mha.embed_dim,
            mha.num_heads,
            mha.dropout,
            mha.in_proj_bias is not None,
            mha.bias_k is not None,
            mha.add_zero_attn,
            mha.kdim,
            mha.vdim,
            mha.batch_first,
            device="meta",
            dtype=mha.out_proj.weight.dtype,
        )
        if new.packed:
            new.in_proj.weight, new.in_proj.bias = mha.in_proj_weight, mha.in_proj_bias
        else:
            biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.detach().chunk(3)
            for name, b in zip("qkv", biases):
                proj = getattr(new, f"{name}_proj")
                proj.weight = getattr(mha, f"{name}_proj_weight")
                proj.bias = None if b is None else nn.Parameter(b, requires_grad=mha.in_proj_bias.requires_grad)
        new.out_proj.weight, new.out_proj.bias = mha.out_proj.weight, mha.out_proj.bias
        new.bias_k, new.bias_v = mha.bias_k, mha.bias_v
        new.train(mha.training)
        return new

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # nn.MultiheadAttention's names -> ours, so its checkpoints load (torchvision's ViT)
        rename = {"q_proj_weight": "q_proj.weight", "k_proj_weight": "k_proj.weight", "v_proj_weight": "v_proj.weight"}
        if self.packed:
            rename.update(in_proj_weight="in_proj.weight", in_proj_bias="in_proj.bias")
        for old, new in rename.items():
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        if not self.packed and prefix + "in_proj_bias" in state_dict:
            for name, b in zip("qkv", state_dict.pop(prefix + "in_proj_bias").chunk(3)):
                state_dict.setdefault(f"{prefix}{name}_proj.bias", b)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if not self.packed:
            return self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if query is key and key is value:  # self-attention: one product, as PyTorch
            return self.in_proj(query).chunk(3, dim=-1)
        # cross-attention: the packed layer (one alpha) projects each input; unused rows are dropped
        e = self.embed_dim
        q = self.in_proj(query)[..., :e]
        if key is value:
            k, v = self.in_proj(key)[..., e:].chunk(2, dim=-1)
        else:
            k, v = self.in_proj(key)[..., e : 2 * e], self.in_proj(value)[..., 2 * e :]
        return q, k, v

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        if self.batch_first and batched:  # transposed together, so that `is` still tells self-attention
            if key is value:
                if query is key:
                    query = key = value = query.transpose(0, 1)
                else:
                    query, key = query.transpose(0, 1), key.transpose(0, 1)
                    value = key
            else:
                query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out, weights = self._attend(
            query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal, batched
        )
        return (out.transpose(0, 1) if self.batch_first and batched else out), weights

    def _attend(
        self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal, batched
    ):
        """PyTorch's computation on sequence-first ``[L, N, E]`` inputs."""
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, _ = query.shape
        heads, d = self.num_heads, self.head_dim
        key_padding_mask = _float_mask(key_padding_mask, query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "is_causal=True needs attn_mask too (nn.Transformer.generate_square_subsequent_mask), "
                "as for torch.nn.MultiheadAttention"
            )
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # SDPA applies the causal mask itself
        else:
            attn_mask = _float_mask(attn_mask, query.dtype)
            if key_padding_mask is not None:
                is_causal = False  # the merged mask is no longer causal
        q, k, v = self._project(query, key, value)
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        q = q.reshape(tgt_len, bsz * heads, d).transpose(0, 1)
        k = k.reshape(k.shape[0], bsz * heads, d).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * heads, d).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros(bsz * heads, 1, d, dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        src_len = k.shape[1]
        if key_padding_mask is not None:
            key_padding_mask = (
                key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1).reshape(bsz * heads, 1, src_len)
            )
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            q_scaled = q * math.sqrt(1.0 / d)
            if attn_mask is None:
                scores = torch.bmm(q_scaled, k.transpose(-2, -1))
            else:  # baddbmm as PyTorch: the mask is added inside the product, not after its rounding
                scores = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            weights = F.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, self.embed_dim)
            weights = weights.view(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            if attn_mask is not None:
                attn_mask = (
                    attn_mask.unsqueeze(0) if attn_mask.shape[0] == 1 else attn_mask.view(bsz, heads, -1, src_len)
                )
            out = F.scaled_dot_product_attention(
                q.view(bsz, heads, tgt_len, d),
                k.view(bsz, heads, src_len, d),
                v.view(bsz, heads, src_len, d),
                attn_mask,
                dropout_p,
                is_causal,
            )
            out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, self.embed_dim)
            weights = None
        out = self.out_proj(out).view(tgt_len, bsz, self.embed_dim)
        return (out if batched else out.squeeze(1)), weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"
