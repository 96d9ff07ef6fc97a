"""Bias, norm and LoRA tuning of the frozen base (LLaMA-Adapter V2, arXiv 2304.15010 §3).

V2 unfreezes a few cheap things of the base itself:
  bias tuning   zero-init biases on wq, wo, w1, w2, w3 of every layer, and every RMSNorm weight
                (both layers' norms and the final norm) replaced by a tuned copy;
  LoRA          y = W x + B (A x) on wq, wk, wv, wo, w1, w2, w3, with A [r, in], B [out, r].
The tensors live in the adapter (so only they are saved) and reach the base with each request, never
inside it: `RowTuning` says which rows of a batch use which adapter's tuning, and the forward adds each
row's terms after the frozen product x Wᵀ (and takes each row's norm weight). The base's modules and
weights are never written after loading, so one base serves V1 and V2 requests side by side, in one batch
or from several threads.

The prompt K/V of the adapted layers go through the frozen W_k / W_v only, without LoRA, as in the
reference (`Attention.project_prompt`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LlamaConfig

BIASED = ("wq", "wo", "w1", "w2", "w3")
LORA = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
ATTENTION = ("wq", "wk", "wv", "wo")


def projection_shapes(config: LlamaConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of every projection of a layer."""
    c, q, kv, f = config.dim, config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim, config.ffn_dim
    return {"wq": (c, q), "wk": (c, kv), "wv": (c, kv), "wo": (q, c), "w1": (c, f), "w3": (c, f), "w2": (f, c)}


class LayerTuning(nn.Module):
    """One layer's tuned tensors: biases [out], LoRA A [r, in] / B [out, r], norm weights [C]."""

    def __init__(self, config: LlamaConfig, bias: bool, lora_rank: int) -> None:
        super().__init__()
        shapes = projection_shapes(config)
        self.bias = nn.ParameterDict({n: nn.Parameter(torch.zeros(shapes[n][1])) for n in BIASED} if bias else {})
        self.lora_a = nn.ParameterDict(
            {n: nn.Parameter(torch.randn(lora_rank, shapes[n][0]) / shapes[n][0] ** 0.5) for n in LORA}
            if lora_rank else {})
        self.lora_b = nn.ParameterDict(
            {n: nn.Parameter(torch.zeros(shapes[n][1], lora_rank)) for n in LORA} if lora_rank else {})
        self.attention_norm = nn.Parameter(torch.ones(config.dim)) if bias else None
        self.ffn_norm = nn.Parameter(torch.ones(config.dim)) if bias else None

    def terms(self, name: str) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(bias [out], LoRA A [r, in], LoRA B [out, r]) of projection `name`; None where it has none."""
        bias = self.bias[name] if name in self.bias else None
        if name not in self.lora_a:
            return bias, None, None
        return bias, self.lora_a[name], self.lora_b[name]


class BaseTuning(nn.Module):
    """The tuned tensors of every layer (and the final norm) of one base."""

    def __init__(self, config: LlamaConfig, bias: bool, lora_rank: int) -> None:
        super().__init__()
        if lora_rank < 0:
            raise ValueError(f"lora_rank={lora_rank} must be 0 (no LoRA) or positive")
        self.layers = nn.ModuleList(LayerTuning(config, bias, lora_rank) for _ in range(config.n_layers))
        self.norm = nn.Parameter(torch.ones(config.dim)) if bias else None

    def copy_base_norms(self, base: nn.Module) -> None:
        """Start the tuned norms from the base's own (what training from a base does)."""
        with torch.no_grad():
            if self.norm is not None:
                self.norm.copy_(base.norm.weight)
                for tuned, layer in zip(self.layers, base.layers):
                    tuned.attention_norm.copy_(layer.attention_norm.weight)
                    tuned.ffn_norm.copy_(layer.ffn_norm.weight)

    def norm_weight(self, layer: int | None, which: str) -> Tensor | None:
        """The tuned weight of a norm ("attention_norm" / "ffn_norm" of `layer`, or the final one: layer None)."""
        return self.norm if layer is None else getattr(self.layers[layer], which)


@dataclass
class RowTuning:
    """The V2 tuning of a batch: `groups` pairs an adapter's tuning with the rows [n] that use it (None: every
    row, the fast path of a batch with one tuning); rows of no group compute with the plain base. `batch`: the
    number of rows (needed only with row groups)."""

    groups: list[tuple[BaseTuning, Tensor | None]]
    batch: int = 0
    _norms: dict = field(default_factory=dict, repr=False)

    @staticmethod
    def single(tuning: BaseTuning) -> RowTuning:
        return RowTuning([(tuning, None)])

    @property
    def every_row(self) -> bool:
        return len(self.groups) == 1 and self.groups[0][1] is None

    def layer(self, i: int) -> LayerTerms:
        return LayerTerms(self, i)

    def norm_weight(self, layer: int | None, which: str, base_weight: Tensor) -> Tensor | None:
        """The weight a norm computes with: [C] for every row, [B, C] per row, None: the base's own."""
        tuned = [(t.norm_weight(layer, which), rows) for t, rows in self.groups]
        tuned = [(w, rows) for w, rows in tuned if w is not None]
        if not tuned:
            return None
        if self.every_row:
            return tuned[0][0]
        if torch.is_grad_enabled():  # training batches use one tuning; this path is for decoding
            raise ValueError("per-row V2 tuning is for inference; train with one adapter per batch")
        key = (layer, which)
        if key not in self._norms:
            weight = base_weight.detach().expand(self.batch, -1).clone()  # [B, C]
            for w, rows in tuned:
                weight[rows] = w.detach().to(weight.dtype)
            self._norms[key] = weight
        return self._norms[key]

    def add(self, layer: int, name: str, x: Tensor, y: Tensor) -> Tensor:
        """y = x Wᵀ [B, ..., out] plus each row's LoRA term B (A x) and bias, from x [B, ..., in]."""
        for tuning, rows in self.groups:
            bias, a, b = tuning.layers[layer].terms(name)
            if bias is None and a is None:
                continue
            if rows is None:
                if a is not None:
                    y = y + F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))
                if bias is not None:
                    y = y + bias.to(y.dtype)
                continue
            term = y.new_zeros(rows.numel(), *y.shape[1:])
            if a is not None:
                term = term + F.linear(F.linear(x[rows], a.to(x.dtype)), b.to(x.dtype))
            if bias is not None:
                term = term + bias.to(y.dtype)
            y = y.index_add(0, rows, term)
        return y


@dataclass
class LayerTerms:
    """One layer's view of a `RowTuning`: what `Block` and `Attention` call."""

    tuning: RowTuning
    layer: int

    def add(self, name: str, x: Tensor, y: Tensor) -> Tensor:
        return self.tuning.add(self.layer, name, x, y)

    def norm_weight(self, which: str, base_weight: Tensor) -> Tensor | None:
        return self.tuning.norm_weight(self.layer, which, base_weight)


@dataclass
class FusedTerms:
    """The LoRA and bias terms of projections whose outputs are concatenated (q/k/v, gate/up), fused once per
    request for decoding: per group of rows Aᵀ stacked [in, Σr] and Bᵀ block-diagonal [Σr, Σout]; the biases
    concatenated [Σout] (every row) or [B, Σout] (per row, zeros where a row has none)."""

    lora: list[tuple[Tensor | None, Tensor, Tensor]]  # (rows [n] or None: every row, Aᵀ, Bᵀ)
    bias: Tensor | None

    def add(self, x: Tensor, y: Tensor) -> Tensor:
        """y [B, Σout] (the frozen product of x [B, in]) plus the terms, in place."""
        for rows, a, b in self.lora:
            if rows is None:
                y = y.addmm_(x @ a, b)  # y + B (A x)
            else:
                y = y.index_add_(0, rows, (x[rows] @ a) @ b)
        return y if self.bias is None else y.add_(self.bias)


def fused_terms(tuning: RowTuning, layer: int, names: tuple[str, ...], outs: list[int],
                dtype: torch.dtype) -> FusedTerms | None:
    """The terms of projections `names` (out features `outs`) of `layer` for every row, fused (None: none)."""
    with torch.no_grad():
        lora, bias = [], None
        for t, rows in tuning.groups:
            terms = [t.layers[layer].terms(n) for n in names]
            if any(a is not None for _, a, _ in terms):
                a = torch.cat([a for _, a, _ in terms if a is not None]).t()  # Aᵀ [in, Σr]
                b = torch.block_diag(*[b if b is not None else a.new_zeros(n, 0)
                                       for (_, _, b), n in zip(terms, outs)]).t()  # Bᵀ [Σr, Σout]
                lora.append((rows, a.to(dtype).contiguous(), b.to(dtype).contiguous()))
            if any(bi is not None for bi, _, _ in terms):
                like = next(bi for bi, _, _ in terms if bi is not None)
                group_bias = torch.cat([bi if bi is not None else like.new_zeros(n)
                                        for (bi, _, _), n in zip(terms, outs)]).to(dtype)  # [Σout]
                if rows is None:  # the only group: every row
                    bias = group_bias
                else:
                    bias = group_bias.new_zeros(tuning.batch, sum(outs)) if bias is None else bias  # [B, Σout]
                    bias[rows] += group_bias
    return FusedTerms(lora, bias) if lora or bias is not None else None
