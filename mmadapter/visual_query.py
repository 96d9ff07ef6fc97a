"""LLaMA-Adapter V2's image path after CLIP: every CLIP token -> K visual tokens, one per prompt.

    tokens [B, N, E_clip] (the tower's last layer, ln_post @ proj, class token first)
      -> clip_proj Linear(E_clip, W) + LayerNorm                                  [B, N, W]
      -> K learned visual queries placed first, then `depth` pre-LN ViT blocks    [B, K + N, W]
      -> the first K outputs -> visual_proj Linear(W, C) + LayerNorm              [B, K, C]
Token k is added to prompt k of every adapted layer (adapter.py). The blocks have the layout of timm
0.3.2's `Block` (norm1, attn.qkv with bias, attn.proj, norm2, mlp.fc1, GELU, mlp.fc2), which the
released checkpoints store, so their tensors load by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    def __init__(self, width: int, n_heads: int) -> None:
        super().__init__()
        if width % n_heads:
            raise ValueError(f"visual query width {width} is not divisible by {n_heads} heads")
        self.n_heads = n_heads
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, n, w = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.n_heads, w // self.n_heads).permute(2, 0, 3, 1, 4)  # [3, B, h, N, d]
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, h, N, d]
        return self.proj(y.transpose(1, 2).reshape(b, n, w))


class ViTBlock(nn.Module):
    """Pre-LN transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, width: int, n_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width), SelfAttention(width, n_heads)
        self.norm2, self.mlp = nn.LayerNorm(width), Mlp(width, int(width * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisualQuery(nn.Module):
    """CLIP tokens (flattened, as the feature cache keeps them) -> K visual tokens [B, K, C]."""

    def __init__(self, clip_dim: int, dim: int, n_queries: int, width: int = 768, depth: int = 8,
                 n_heads: int = 16) -> None:
        super().__init__()
        self.clip_dim = clip_dim
        self.clip_proj, self.clip_proj_norm = nn.Linear(clip_dim, width), nn.LayerNorm(width)
        self.visual_query = nn.Parameter(torch.randn(n_queries, width))  # the reference's nn.Embedding init
        self.visual_blocks = nn.ModuleList(ViTBlock(width, n_heads) for _ in range(depth))
        self.visual_proj, self.visual_proj_norm = nn.Linear(width, dim), nn.LayerNorm(dim)

    def forward(self, features: Tensor) -> Tensor:
        """features [B, N * clip_dim] or [B, N, clip_dim] -> [B, K, C]."""
        tokens = features.reshape(features.shape[0], -1, self.clip_dim)  # [B, N, E_clip]
        x = self.clip_proj_norm(self.clip_proj(tokens))  # [B, N, W]
        k = self.visual_query.shape[0]
        x = torch.cat([self.visual_query.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)  # [B, K + N, W]
        for block in self.visual_blocks:
            x = block(x)
        return self.visual_proj_norm(self.visual_proj(x[:, :k]))  # [B, K, C]
