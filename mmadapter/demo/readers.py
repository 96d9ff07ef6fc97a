"""The question-conditioned readers of the tower probe (reader_probe.py): small networks over frozen features.

Every reader maps (global features [B, G], last-layer tokens [B, T, E], question ids [B, 3]) to answer
logits [B, A]; each uses only its own input, so one training loop serves them all. The question ids are
(template, colour, shape), colour and shape 0 where the question names none.

- GlobalReader: question embedding ⊕ the multi-scale global features -> 3-layer MLP. What an adapter that
  sees one global vector (LLaMA-Adapter V1's projector) can get out of the tower, question by question.
- TokenReader: a query made from the question reads the tokens (plus a learned position embedding per
  token) with one multi-head attention; with reads=2 a second query, made from the question and the first
  read, reads again (relations like "closest to the red object" need to find the red object first).
"""

from __future__ import annotations

import torch
from torch import nn


class QuestionEmbedding(nn.Module):
    """(template, colour, shape) ids [B, 3] -> [B, width]: the sum of three learned embeddings."""

    def __init__(self, n_templates: int, n_colours: int, n_shapes: int, width: int) -> None:
        super().__init__()
        self.template = nn.Embedding(n_templates, width)
        self.colour = nn.Embedding(n_colours + 1, width)  # id 0: no colour named
        self.shape = nn.Embedding(n_shapes + 1, width)

    def forward(self, question: torch.Tensor) -> torch.Tensor:
        return self.template(question[:, 0]) + self.colour(question[:, 1]) + self.shape(question[:, 2])  # [B, width]


def mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    """Three linear layers with GELUs between."""
    return nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                         nn.Linear(hidden, n_out))


class GlobalReader(nn.Module):
    reads_tokens = False  # its trainer need not gather tokens

    def __init__(self, embed: QuestionEmbedding, global_dim: int, n_answers: int, width: int = 64,
                 hidden: int = 128) -> None:
        super().__init__()
        self.embed = embed
        self.head = mlp(width + global_dim, hidden, n_answers)

    def forward(self, global_features: torch.Tensor, tokens: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.embed(question), global_features], dim=-1))  # [B, A]


class AttentionRead(nn.Module):
    """Multi-head attention of one query over T tokens, each token's key and value plus a learned position
    embedding ([T, width] each), computed in the tokens' own space.

    Exactly nn.MultiheadAttention(width, heads, kdim=E+T, vdim=E+T) over the tokens with a one-hot position
    appended (tested), but the query is taken through each head's key projection instead of every token
    ((q W_k) · x = q · (W_k x)), and each head's attention-weighted mean of the tokens through its value
    projection afterwards (the weights sum to one): no [B, T, width] keys or values, so training costs T
    times less. The key bias adds the same score to every token, so it is left out.
    """

    def __init__(self, width: int, token_dim: int, n_tokens: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads={heads}")
        self.heads, self.head_dim = heads, width // heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(token_dim, width, bias=False)
        self.v_proj = nn.Linear(token_dim, width)
        self.out_proj = nn.Linear(width, width)
        # at the scale of the projected tokens, so that where a token is can be read from the first step
        self.key_position = nn.Parameter(torch.randn(n_tokens, width))
        self.value_position = nn.Parameter(torch.randn(n_tokens, width))

    def forward(self, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """query [B, width], tokens [B, T, E] -> [B, width]."""
        b, e = query.shape[0], tokens.shape[-1]
        q = self.q_proj(query).view(b, self.heads, self.head_dim)  # [B, H, D]
        q_in_tokens = torch.einsum("bhd,hde->bhe", q, self.k_proj.weight.view(self.heads, self.head_dim, e))
        scores = torch.einsum("bhe,bte->bht", q_in_tokens, tokens)  # [B, H, T]
        scores = scores + torch.einsum("bhd,thd->bht", q, self.key_position.view(-1, self.heads, self.head_dim))
        weights = (scores / self.head_dim ** 0.5).softmax(-1)  # [B, H, T]
        mean = weights @ tokens  # [B, H, E]: each head's weighted mean of the tokens
        heads = torch.einsum("bhe,hde->bhd", mean, self.v_proj.weight.view(self.heads, self.head_dim, e))
        heads = heads + torch.einsum("bht,thd->bhd", weights, self.value_position.view(-1, self.heads, self.head_dim))
        heads = heads + self.v_proj.bias.view(self.heads, self.head_dim)  # [B, H, D]
        return self.out_proj(heads.reshape(b, -1))  # [B, width]


class TokenReader(nn.Module):
    reads_tokens = True

    def __init__(self, embed: QuestionEmbedding, n_tokens: int, token_dim: int, n_answers: int, width: int = 64,
                 heads: int = 4, reads: int = 1, hidden: int = 128) -> None:
        super().__init__()
        if reads < 1:
            raise ValueError(f"reads={reads}: a token reader reads at least once")
        self.embed = embed
        # read r's query comes from the question and the r - 1 reads before it
        self.queries = nn.ModuleList(nn.Linear(width * (r + 1), width) for r in range(reads))
        self.reads = nn.ModuleList(AttentionRead(width, token_dim, n_tokens, heads) for _ in range(reads))
        self.head = mlp(width * (reads + 1), hidden, n_answers)

    def forward(self, global_features: torch.Tensor, tokens: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        state = [self.embed(question)]  # [B, width] each: the question, then every read
        for query, read in zip(self.queries, self.reads):
            state.append(read(query(torch.cat(state, dim=-1)), tokens))
        return self.head(torch.cat(state, dim=-1))  # [B, A]
