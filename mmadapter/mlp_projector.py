"""V1's image projector (LLaMA-Adapter, arXiv 2303.16199, §3.3): the tower's concatenated multi-scale
global features -> one image token I_p, added to every adaptation prompt. The other projectors sit
beside it: visual_query.py (V2) and spatial_tokens.py."""

from __future__ import annotations

import torch
from torch import nn


class Projector(nn.Module):
    """Trainable MLP from the concatenated multi-scale features to one image token I_p.

    Linear(feature_dim, hidden) -> GELU -> Linear(hidden, dim): [B, feature_dim] -> [B, dim].
    Parameters: (feature_dim + 1) * hidden + (hidden + 1) * dim; at hidden=128 that is 0.92M for
    ViT-L-14 (4 x 768 features) into a 4096-wide LM, 0.47M into SmolLM2-135M (576).
    """

    def __init__(self, feature_dim: int, dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(feature_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(features)))  # [B, feature_dim] -> [B, dim]
