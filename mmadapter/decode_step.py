"""The lean one-token decoding step: the math of `Llama.forward` over one token, in fewer ops.

`Llama.forward` dispatches ~50 ops per layer for one token (each a fixed few µs on a CPU), this ~35: fused
q/k/v and gate/up products (`fused_weight`) whose one-row split over the threads is prepared once, RoPE as
one multiply-add over q and k (1/√d folded into q's table), the new k/v written straight into the cache, the
prompt term in one place. A step is built once per base; what belongs to a request (or to each row of a
batch) comes with its `AdapterKV` and is prepared once per adapter object: the prompts' K/V and gates, and
the V2 tuning (norm weights, biases and LoRA, fused per group of projections like the frozen weights, per
row where rows differ: tuning.fused_terms). So a token costs one Python loop over the layers, and the base
is only ever read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .llama import AdapterKV, Embedding, KVCache, Linear, Llama, fused_weight
from .matvec import split_matvec, thread_split
from .packed_rows import RowsProduct
from .tuning import FusedTerms, fused_terms, projection_shapes

GROUPS = (("wq", "wk", "wv"), ("wo",), ("w1", "w3"), ("w2",))  # the products of a layer, in order
# batched steps over F.linear ran 2.2x (4 rows) / 1.6x (8 rows) slower than over packed copies of every weight
# on a 2-core AMD EPYC; 1 GiB holds them all for SmolLM2-135M (540 MB) and the head of a 7B model
PACKED_MB = 1024.0


class LayerTuning(NamedTuple):
    """One layer's V2 terms for decoding: norm weights ([C], [B, C] or None: the base's) and the terms of
    the fused q/k/v, wo, gate/up and w2 products (None: none)."""

    attention_norm: Tensor | None
    ffn_norm: Tensor | None
    products: tuple[FusedTerms | None, ...]


class Prepared(NamedTuple):
    """A request's (or batch's) per-layer state: prompts (keys ᵀ [Bp, G, d, K], values [Bp, G, K, d], gate
    [1 or B, G, H/G, 1]) or None, V2 tuning or None, and the final norm's tuned weight or None."""

    prompts: list[tuple[Tensor, Tensor, Tensor] | None]
    tuning: list[LayerTuning | None]
    norm: Tensor | None


class DecodeStep:
    """The one-token step of `base`; call it like `generate.decode_one_token`'s step."""

    def __init__(self, base: Llama, packed_mb: float = PACKED_MB) -> None:
        """packed_mb: memory for oneDNN-packed copies of the fp32 weights that batched steps read (packed_rows.py),
        the head first (the largest), then layer by layer; made by `pack()` or on the first batched step (0: none)."""
        c, self.base = base.config, base
        self.shape = (c.n_heads, c.n_kv_heads, c.head_dim)
        budget = PackBudget(packed_mb)
        tied = base.output is None and type(base.tok_embeddings) is Embedding
        head = "tok_embeddings" if tied else "output" if type(base.output) is Linear else None
        self.head = _product(base, (head,), budget) if head else base.head
        self.layers = [(b.attention_norm, _product(b.attention, GROUPS[0], budget),
                        _product(b.attention, GROUPS[1], budget), b.ffn_norm,
                        _product(b.feed_forward, GROUPS[2], budget), _product(b.feed_forward, GROUPS[3], budget))
                       for b in base.layers]
        self.packed_bytes, self._packed = budget.used, budget.granted
        shapes = projection_shapes(c)
        self.outs = [[shapes[n][1] for n in names] for names in GROUPS]
        h, g, d = self.shape
        scale = torch.cat((torch.full((h, 1), d**-0.5), torch.ones(g, 1))).to(base.device)  # [H+G, 1]
        sign = torch.cat((-torch.ones(d // 2), torch.ones(d // 2))).to(base.device)  # rotate_half as a roll
        self.cos_scale, self.sin_scale = scale, scale * sign  # [H+G, 1], [H+G, d]
        self._adapter: AdapterKV | None = None
        self._prepared = Prepared([None] * c.n_layers, [None] * c.n_layers, None)

    def pack(self) -> None:
        """Make the packed copies now rather than on the first batched step (a server's memory, known at start)."""
        for product in self._packed:
            product.pack()

    def prepare(self, adapter: AdapterKV | None, dtype: torch.dtype) -> Prepared:
        """The request's per-layer state (see `Prepared`), made once per adapter object."""
        if adapter is self._adapter:
            return self._prepared
        h, g, d = self.shape
        n = len(self.layers)
        prompts: list = [None] * n
        for i in range(adapter.first_layer if adapter else n, n):
            pk, pv, gate = adapter.for_layer(i)  # type: ignore[union-attr,misc]
            prompts[i] = (pk.transpose(-1, -2), pv, gate.to(dtype).reshape(-1, g, h // g, 1))
        tuning, norm = [None] * n, None
        rows = adapter.tuning if adapter is not None else None
        if rows is not None:
            with torch.no_grad():
                for i, block in enumerate(self.base.layers):
                    tuning[i] = LayerTuning(rows.norm_weight(i, "attention_norm", block.attention_norm.weight),
                                            rows.norm_weight(i, "ffn_norm", block.ffn_norm.weight),
                                            tuple(fused_terms(rows, i, names, outs, dtype)
                                                  for names, outs in zip(GROUPS, self.outs)))
                norm = rows.norm_weight(None, "norm", self.base.norm.weight)
        self._adapter, self._prepared = adapter, Prepared(prompts, tuning, norm)
        return self._prepared

    def __call__(self, token: Tensor, pos: int, cache: list[KVCache], key_mask: Tensor | None,
                 adapter: AdapterKV | None) -> Tensor:
        """The tokens [B] at cache slot `pos` in, logits [B, V] of the next token out."""
        prepared = self.prepare(adapter, self.base.norm.weight.dtype)  # the activations' dtype
        return self.run(token, pos, torch.tensor([pos], device=token.device), cache, key_mask, prepared)

    def run(self, token: Tensor, pos: int, slot: Tensor, cache: list[KVCache], key_mask: Tensor | None,
            prepared: Prepared) -> Tensor:
        """The step itself, free of per-request state (what `torch.compile` may trace); slot: [pos]."""
        (h_, g, d), end, x = self.shape, pos + 1, self.base.tok_embeddings(token)  # x [B, C]
        b, dtype = x.shape[0], x.dtype
        (cos, sin), hidden = self.base.rope(end), None
        if key_mask is None:
            cos, sin = cos[pos:end], sin[pos:end]  # [1, d]
        else:
            positions = key_mask[:, :pos].sum(-1)  # [B]: real tokens before this one (padding not counted)
            cos, sin = cos[positions], sin[positions]  # [B, d]
            hidden = ~key_mask[:, None, None, :end]  # [B, 1, 1, end]: padding slots
            hidden[..., pos] = False  # a padding row sees itself (finite softmax), as in `Llama.forward`
        cos = (cos[:, None] * self.cos_scale).to(dtype)  # [B or 1, H+G, d]: q's rows also carry 1/√d
        sin = (sin[:, None] * self.sin_scale).to(dtype)
        cast = dtype != torch.float32  # softmax runs in fp32
        for (norm1, qkv, wo, norm2, w13, w2), layer_cache, prompt, tuned in zip(
                self.layers, cache, prepared.prompts, prepared.tuning):
            n1, n2, (t_qkv, t_wo, t_13, t_2) = tuned if tuned is not None else _PLAIN
            xn = norm1(x, n1)
            qk, v = _add(t_qkv, xn, qkv(xn)).view(b, h_ + 2 * g, d).split((h_ + g, g), 1)  # [B, H+G, d], [B, G, d]
            qk = torch.addcmul(qk * cos, qk.roll(d // 2, -1), sin)  # RoPE of q (with 1/√d) and k
            q = qk[:, :h_].view(b, g, h_ // g, d)  # the query heads sharing each kv head
            layer_cache.k.index_copy_(2, slot, qk[:, h_:, None])  # [B, G, 1, d] into slot pos
            layer_cache.v.index_copy_(2, slot, v[:, :, None])
            scores = q @ layer_cache.k[:, :, :end].transpose(-1, -2)  # [B, G, H/G, end]
            if hidden is not None:
                scores.masked_fill_(hidden, float("-inf"))
            probs = scores.softmax(-1, dtype=torch.float32)
            y = (probs.to(dtype) if cast else probs) @ layer_cache.v[:, :, :end]  # [B, G, H/G, d]
            if prompt is not None:  # + tanh(g) · softmax(q K_pᵀ/√d) V_p: its own softmax, no RoPE
                pk_t, pv, gate = prompt
                probs = (q @ pk_t).softmax(-1, dtype=torch.float32)  # [B, G, H/G, K]
                y.addcmul_(gate, (probs.to(dtype) if cast else probs) @ pv)
            y = y.view(b, h_ * d)
            x = x + _add(t_wo, y, wo(y))
            xn = norm2(x, n2)
            gate_up = _add(t_13, xn, w13(xn))  # [B, 2F]
            y = F.silu(gate_up[:, : gate_up.shape[1] // 2]).mul_(gate_up[:, gate_up.shape[1] // 2:])
            x = x + _add(t_2, y, w2(y))
        return self.head(self.base.norm(x, prepared.norm))


_PLAIN = LayerTuning(None, None, (None, None, None, None))


def _add(terms: FusedTerms | None, x: Tensor, y: Tensor) -> Tensor:
    """y (a fresh product of x) plus the V2 terms, when the group has any."""
    return y if terms is None else terms.add(x, y)


class PackBudget:
    """Bytes left for packed copies; a weight that fits is granted one."""

    def __init__(self, megabytes: float) -> None:
        self.left, self.used = int(megabytes * 2**20), 0
        self.granted: list[RowsProduct] = []

    def product(self, weight: Tensor) -> Callable[[Tensor], Tensor]:
        """Several rows times the weight: over a packed copy where it fits the budget, else F.linear."""
        size = weight.numel() * weight.element_size()
        if weight.dtype != torch.float32 or size > self.left:
            return lambda x: F.linear(x, weight)
        self.left, self.used = self.left - size, self.used + size
        self.granted.append(RowsProduct(weight))
        return self.granted[-1]


def _product(owner: nn.Module, names: tuple[str, ...], budget: PackBudget) -> Callable[[Tensor], Tensor]:
    """x [B, in] -> x Wᵀ [B, Σ out] for owner's projections `names`: one product over their (fused) weight, a
    single fp32 row split over the threads (matvec.py) with the split weight prepared here, several rows by
    F.linear or, where the budget grants it, over a oneDNN-packed copy (packed_rows.py); quantised
    projections are called one by one."""
    modules = [getattr(owner, n) for n in names]
    single = modules[0]
    plain = len(names) == 1 and type(single) in (Linear, Embedding) and not single.weight.requires_grad
    weight = single.weight if plain else fused_weight(owner, names) if len(names) > 1 else None
    if weight is None:
        return modules[0] if len(modules) == 1 else lambda x: torch.cat([m(x) for m in modules], dim=-1)
    split = thread_split(weight)
    rows = budget.product(weight)

    def product(x: Tensor) -> Tensor:
        return split_matvec(x, split) if split is not None and x.shape[0] == 1 else rows(x)

    return product
