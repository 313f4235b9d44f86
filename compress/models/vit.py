"""A Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"), timm's layout.

Written in plain torch with timm's module and attribute names (``Attention`` with ``qkv``,
``num_heads``, ``head_dim``, ``scale`` and ``proj``; ``Mlp`` with ``fc1``/``fc2``), so structured
pruning of attention heads is tested without timm. Unlike timm 1.0's ``Attention``, the output of
the heads is reshaped to ``num_heads * head_dim``, not to the input width: heads and head
dimensions can be removed while the residual stream keeps its width (as in Torch-Pruning's ViT
example).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from compress.models._registry import MODELS

__all__ = ["Attention", "Mlp", "Block", "VisionTransformer"]


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection (Vaswani et al. 2017, eq. 1)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape  # (B, N, D)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, N, N)
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@MODELS.register("vit")
class VisionTransformer(nn.Module):
    """Patch embedding (a strided conv), a class token, learned position embeddings, ``depth``
    blocks, a final LayerNorm and a linear ``head`` on the class token."""

    def __init__(self, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, patch_size: int = 4,
                 embed_dim: int = 64, depth: int = 4, num_heads: int = 4, mlp_ratio: float = 2.0):
        super().__init__()
        c, h, w = input_shape
        if h < patch_size or w < patch_size:
            raise ValueError(f"input {h}x{w} is smaller than one {patch_size}x{patch_size} patch")
        n_patches = (h // patch_size) * (w // patch_size)
        self.patch_embed = nn.Conv2d(c, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n_patches + 1, embed_dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, D)
        x = self.blocks(x + self.pos_embed)
        return self.head(self.norm(x)[:, 0])
