"""Spatial image tokens: the tower's token grid, pooled to regions, one image token per prompt.

    tokens [B, N, E]   the class token, then the s x s patch tokens in row-major order, read after
                       `token_depth` blocks through the tower's ln_post and proj (vision.py)
      -> patches pooled to a g x g grid of regions (adaptive average pooling), class token kept first
                                                                          [B, K, E], K = 1 + g*g
         (spatial_grid=None: no pooling, K = N = 1 + s*s)
      -> one shared MLP: LayerNorm(E) -> Linear(E, hidden) -> GELU -> Linear(hidden, C)     [B, K, C]
      -> + a learned position embedding per token, zero at init                            [B, K, C]

Token k is added to prompt k of every adapted layer (adapter.py), as with V2's visual query. Unlike V1's
single token, which shifts every prompt score of a head equally (cancelled by the prompts' own softmax),
region k now moves only prompt k's key, so the question's query can weigh regions against each other and
read what it asks for; which prompt a region feeds also tells where it is (the class token keeps the
global view). Region 1 + r*g + c is row r, column c of the grid (top-left first).

Scale: with PyTorch's default Linear init and LayerNorm'ed inputs the tokens start at a root-mean-square of
about 0.2 per coordinate (tests/test_spatial_tokens.py measures it), a fifth of the prompts' N(0, 1) init
(AdapterConfig.prompt_init_std): each region moves its prompt's key enough for scores to differ by region
from the first step while the learned prompts still dominate; the zero-init gates keep the model equal to the
base at step 0 whatever the scale. No extra scale factor is applied.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import VisionConfig


def spatial_token_count(vision: VisionConfig, feature_dim: int) -> tuple[int, int]:
    """(image tokens K, patch grid side s) that a spatial projector makes from tower features of this size."""
    n_tokens, rest = divmod(feature_dim, vision.clip_dim)
    side = math.isqrt(max(n_tokens - 1, 0))
    if rest or n_tokens < 2 or side * side != n_tokens - 1:
        raise ValueError(f"spatial tokens need a class token and a square grid of patch tokens of width "
                         f"{vision.clip_dim}; tower features of size {feature_dim} are not that")
    grid = vision.spatial_grid
    if grid is None:
        return n_tokens, side
    if not 1 <= grid <= side:
        raise ValueError(f"VisionConfig.spatial_grid={grid}: the tower has a {side}x{side} patch grid, so use "
                         f"1 to {side} (or None for one token per patch)")
    return 1 + grid * grid, side


class SpatialTokens(nn.Module):
    """Tower tokens (flattened, as the feature cache keeps them) -> K spatial image tokens [B, K, C]."""

    def __init__(self, clip_dim: int, side: int, grid: int | None, dim: int, hidden: int) -> None:
        super().__init__()
        self.clip_dim, self.side, self.grid = clip_dim, side, grid
        n_out = 1 + (grid or side) ** 2
        self.norm = nn.LayerNorm(clip_dim)
        self.fc1, self.act, self.fc2 = nn.Linear(clip_dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.position = nn.Parameter(torch.zeros(n_out, dim))  # [K, C]

    @property
    def n_tokens(self) -> int:
        return self.position.shape[0]

    def regions(self, features: Tensor) -> Tensor:
        """features [B, N * E] or [B, N, E] -> [B, K, E]: the class token, then the pooled regions."""
        tokens = features.reshape(features.shape[0], -1, self.clip_dim)  # [B, N, E]
        if self.grid is None:
            return tokens
        b, _, e = tokens.shape
        patches = tokens[:, 1:].transpose(1, 2).reshape(b, e, self.side, self.side)  # [B, E, s, s]
        pooled = F.adaptive_avg_pool2d(patches, self.grid)  # [B, E, g, g]
        return torch.cat([tokens[:, :1], pooled.flatten(2).transpose(1, 2)], dim=1)  # [B, 1 + g*g, E]

    def forward(self, features: Tensor) -> Tensor:
        """features [B, N * E] -> image tokens [B, K, C]."""
        x = self.regions(features)  # [B, K, E]
        x = self.fc2(self.act(self.fc1(self.norm(x))))  # [B, K, C]
        return x + self.position.to(x.dtype)


def build_spatial_tokens(vision: VisionConfig, feature_dim: int, dim: int, n_prompts: int) -> SpatialTokens:
    """The projector of VisionConfig(projector="spatial"); its token count must be the adapter's K."""
    n_tokens, side = spatial_token_count(vision, feature_dim)
    if n_tokens != n_prompts:
        made = "the class token + one per patch" if vision.spatial_grid is None else \
            f"the class token + a {vision.spatial_grid}x{vision.spatial_grid} grid"
        raise ValueError(f"spatial tokens: {n_tokens} image tokens ({made}), one per prompt, but "
                         f"AdapterConfig.n_prompts={n_prompts}; use n_prompts={n_tokens} (--n-prompts {n_tokens}), "
                         "or a spatial_grid g with 1 + g*g prompts")
    return SpatialTokens(vision.clip_dim, side, vision.spatial_grid, dim, vision.projector_hidden)
