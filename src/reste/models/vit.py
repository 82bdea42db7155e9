"""A plain float Vision Transformer (ViT-tiny by default).

Nothing here knows about binarization: the attention (qkv, proj) and MLP (fc1,
fc2) layers are ordinary ``nn.Linear`` that :func:`reste.binarize` swaps for
binary ones, while the patch embedding and the classification head stay real
(``full_precision``), as in the ReSTE paper's binary ViT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import register_model

__all__ = ["VisionTransformer"]


class Attention(nn.Module):
    """Multi-head self-attention: one qkv projection, scaled dot product, output projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@register_model("vit_tiny")  # the defaults are ViT-tiny's: patch 16, width 192, depth 12, 3 heads, MLP 768
class VisionTransformer(nn.Module):
    """ViT: patch embedding (conv with kernel = stride = patch), class token, learned
    position embeddings, ``depth`` pre-norm blocks, final LayerNorm, linear head on the
    class token.

    Built for one ``image_size`` (the position embeddings have one entry per patch);
    ``patch_size`` must divide it: ViT-tiny on 224x224 uses 16, on 32x32 or 28x28 use 4.
    """

    #: the patch embedding and the head stay real
    full_precision = ("patch_embed", "head")

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 224,
        patch_size: int = 16,
        dim: int = 192,
        depth: int = 12,
        heads: int = 3,
        mlp_dim: int = 768,
    ):
        super().__init__()
        if image_size % patch_size:
            divisors = [p for p in range(2, min(image_size, 32) + 1) if image_size % p == 0]
            raise ValueError(
                f"patch_size={patch_size} does not divide image_size={image_size}; "
                f"pass a patch_size that does, e.g. one of {divisors}"
            )
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.image_size = image_size
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # the usual ViT initialisation: small truncated normals, zero biases
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"this ViT was built for {self.image_size}x{self.image_size} inputs but got "
                f"{x.shape[-2]}x{x.shape[-1]}; create it with image_size={x.shape[-1]}"
            )
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat((cls, tokens), dim=1) + self.pos_embed
        tokens = self.norm(self.blocks(tokens))
        return self.head(tokens[:, 0])
