"""The frozen LLaMA-family decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU, a static KV cache.

One readable file in the spirit of nanoGPT / gpt-fast. Weights use the Hugging Face layout for q/k
(RoPE rotates the two halves of each head, as transformers' `rotate_half` does); the loaders in
`weights.py` convert Meta and GGUF checkpoints, which store q/k rows interleaved, into this layout.

An adapter reaches the base in two ways. Every adapter: `Attention.forward` adds the gated prompt term
    tanh(g_h) * softmax(Q_h K_p,hᵀ / √d) V_p,h
to the untouched causal attention, with K_p/V_p = prompt · W_k/W_v (no RoPE) computed once by
`Attention.project_prompt` and handed in through `AdapterKV` (see adapter.py and the README's
"The adapter, exactly"). V2 adapters also tune the base (tuning.py): their biases, LoRA terms and norm
weights come with the request too (`AdapterKV.tuning`, per row of a batch) and are added after the frozen
products; nothing here is ever written after loading. The lean one-token step is decode_step.py.

Every frozen projection is a `Linear`; `replace_linears` swaps them for another implementation
(quantised weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LlamaConfig
from .matvec import matvec_or_matmul

if TYPE_CHECKING:
    from .tuning import LayerTerms, RowTuning


class Linear(nn.Linear):
    """A bias-free frozen projection whose one-token product uses every core (`matvec_or_matmul`).

    quant.py has int8 / 4-bit / fp16-weight drop-ins with the same interface (forward, `dense_weight`)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return matvec_or_matmul(x, self.weight)

    def dense_weight(self) -> Tensor:
        """The weight [out, in] as a plain tensor (the quantised linears dequantise here)."""
        return self.weight


def fused_weight(owner: nn.Module, names: tuple[str, ...]) -> Tensor | None:
    """The weights of `owner`'s plain `Linear`s `names` as one [Σ out, in] tensor, so one product replaces
    several; None when any of them is another module (quantised) or trainable: those stay separate.

    Concatenated on first use; the Linears' weights then become views into it, so resident memory does not
    grow and loading, training and state dicts see the same parameters. Whatever replaces a weight (loading
    with assign, `.to()`, swapping the module) is noticed here, and the weights are fused again.
    """
    linears = [getattr(owner, n) for n in names]
    weights = [m.weight for m in linears if type(m) is Linear and not m.weight.requires_grad]
    if len(weights) < len(names) or len({(w.dtype, w.device) for w in weights}) != 1:
        return None
    starts = [sum(w.shape[0] for w in weights[:i]) for i in range(len(weights))]
    fused = owner.__dict__.setdefault("_fused_weights", {}).get(names)
    if fused is not None and fused.dtype == weights[0].dtype and all(  # still the views made below?
            w.data_ptr() == fused.data_ptr() + s * fused.stride(0) * fused.element_size() for w, s in zip(weights, starts)):
        return fused
    with torch.inference_mode(False), torch.no_grad():  # normal tensors: training may use them later
        fused = torch.cat(weights)  # [Σ out, in]
        for m, w, s in zip(linears, weights, starts):
            m.weight = nn.Parameter(fused[s:s + w.shape[0]], requires_grad=False)
    owner._fused_weights[names] = fused
    return fused


class Embedding(nn.Embedding):
    """The token embedding; with tied weights also the LM head (`project`). quant.QuantEmbedding is its drop-in."""

    def project(self, h: Tensor) -> Tensor:
        """Logits [..., vocab] from final-normed hidden states [..., C]."""
        return matvec_or_matmul(h, self.weight)

    def dense_weight(self) -> Tensor:
        return self.weight


def replace_linears(module: nn.Module, make: Callable[[str, Linear], nn.Module]) -> int:
    """Replace every frozen `Linear` under `module` by `make(qualified_name, linear)`; returns how many.

    The seam for variants of the frozen projections (weight-only quantisation):
    each lives in its own module and swaps the layers after loading, so this file never branches.
    An untied `output` head is read through its `.weight` (`head_weight`), so its replacement keeps one.
    """
    targets = [(name, child) for name, child in module.named_modules() if isinstance(child, Linear)]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attr, make(name, linear))
    return len(targets)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        """x [B, ..., C]; weight: another one than the base's (V2 tuning): [C], or [B, C] one per row."""
        weight = self.weight if weight is None else weight
        if weight.dim() > 1:
            weight = weight.view(weight.shape[0], *[1] * (x.dim() - 2), weight.shape[-1])  # [B, 1.., C]
        if x.dtype == weight.dtype == torch.float32:
            if weight.dim() == 1:
                return F.rms_norm(x, (x.shape[-1],), weight, self.eps)  # one op, the same math as below
            return F.rms_norm(x, (x.shape[-1],), None, self.eps) * weight
        # Normalise in fp32 whatever the activation dtype (as the reference and transformers do).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight.to(x.dtype) * x32.to(x.dtype)  # a tuned fp32 weight (V2) keeps bf16 activations bf16


def rope_inv_freq(config: LlamaConfig) -> Tensor:
    """Rotary inverse frequencies [head_dim/2], with Llama-3.1 frequency scaling when configured."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    low_freq_wavelen = s.original_max_seq_len / s.low_freq_factor
    high_freq_wavelen = s.original_max_seq_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_tables(config: LlamaConfig, length: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """cos, sin tables [length, head_dim] in fp32."""
    inv_freq = rope_inv_freq(config).to(device)
    t = torch.arange(length, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # [length, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [length, d]
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, h, T, d]; cos/sin [B or 1, 1, T, d] (fp32, cast to x's dtype)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


@dataclass
class AdapterKV:
    """Prompt keys/values of the adapted layers, computed once per forward pass or per request.

    first_layer: index of the lowest adapted layer; kv[i] belongs to layer first_layer + i and holds
    (k, v) of shape [B or 1, n_kv_heads, K, head_dim]; gates [L, n_heads] (or [L, B, n_heads], one adapter
    per row of a continuous batch) are already tanh-ed. tuning: the V2 biases, norms and LoRA of the request
    (or of each row of a batch), added to every layer's frozen products; None without V2 tuning.
    """

    first_layer: int
    kv: list[tuple[Tensor, Tensor]]
    gates: Tensor
    tuning: RowTuning | None = None

    def for_layer(self, i: int) -> tuple[Tensor, Tensor, Tensor] | None:
        j = i - self.first_layer
        if j < 0:
            return None
        k, v = self.kv[j]
        return k, v, self.gates[j]


class KVCache:
    """One layer's static cache [B, n_kv_heads, max_len, head_dim]: views into one tensor per request."""

    def __init__(self, k: Tensor, v: Tensor) -> None:
        self.k, self.v = k, v

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor, end: int) -> tuple[Tensor, Tensor]:
        """Write k/v [B, G, T, d] at slots input_pos [T]; return the slots [0, end) [B, G, end, d]."""
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k[:, :, :end], self.v[:, :, :end]


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
    """Scaled dot-product attention with grouped kv heads: q [B, H, T, d], k/v [B, G, S, d] -> [B, H, T, d].

    Query head h uses kv head h // (H/G). One query token takes `attend_one` instead.
    """
    grouped = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=grouped)


def attend_one(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
               prompt: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """Attention of one query token (decoding) with plain matmuls, plus the gated prompt term when given:
    q [B, H, 1, d], k/v [B, G, S, d], mask [B or 1, 1, 1, S]; prompt (pk, pv [Bp, G, K, d] with Bp 1 or
    B, gate [H] or [B, H] tanh-ed: rows of a continuous batch have their own adapters) -> [B, H, 1, d].

    On CPU, SDPA's per-call overhead costs more than the whole computation at T=1, and decoding runs
    this in every layer for every token, where each op's fixed cost counts: the scale is applied to q
    once and the prompt batch is broadcast, not expanded. The math is the general path's in
    `Attention.forward` (a separate softmax over the prompts, a tanh-gated sum).
    """
    b, h, _, d = q.shape
    g, s = k.shape[1], k.shape[2]
    qg = q.reshape(b, g, h // g, d) * d**-0.5  # [B, G, H/G, d]: the query heads sharing each kv head
    scores = (qg @ k.transpose(-1, -2)).float()  # [B, G, H/G, S], softmax in fp32
    if mask is not None:
        scores = scores.masked_fill(~mask.reshape(mask.shape[0], 1, 1, s), float("-inf"))
    y = scores.softmax(-1).to(v.dtype) @ v  # [B, G, H/G, d]
    if prompt is not None:
        pk, pv, gate = prompt
        prompt_probs = (qg @ pk.transpose(-1, -2)).float().softmax(-1).to(pv.dtype)  # [B, G, H/G, K]
        y = y.addcmul(gate.to(y.dtype).view(-1, g, h // g, 1), prompt_probs @ pv)  # gate [H] or per row [B, H]
    return y.reshape(b, h, 1, d)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = Linear(config.dim, config.n_heads * self.head_dim)
        self.wk = Linear(config.dim, config.n_kv_heads * self.head_dim)
        self.wv = Linear(config.dim, config.n_kv_heads * self.head_dim)
        self.wo = Linear(config.n_heads * self.head_dim, config.dim)

    @property
    def activation_dtype(self) -> torch.dtype:
        """The activations' dtype: the weights' for float bases, fp32 (the norms') for quantised ones."""
        weight = getattr(self.wo, "weight", None)
        return weight.dtype if weight is not None and weight.is_floating_point() else torch.float32

    def project_prompt(self, prompt: Tensor) -> tuple[Tensor, Tensor]:
        """Adaptation prompts [Bp, K, C] through this layer's frozen W_k / W_v (never their LoRA), without RoPE."""
        bp, n, _ = prompt.shape
        prompt = prompt.to(self.activation_dtype)
        k = self.wk(prompt).view(bp, n, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [Bp, G, K, d]
        v = self.wv(prompt).view(bp, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None = None,
                input_pos: Tensor | None = None, end: int = 0,
                prompt: tuple[Tensor, Tensor, Tensor] | None = None, terms: LayerTerms | None = None) -> Tensor:
        b, t, _ = x.shape
        q = _tuned(self.wq, "wq", x, terms).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, d]
        k = _tuned(self.wk, "wk", x, terms).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, G, T, d]
        v = _tuned(self.wv, "wv", x, terms).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(input_pos, k, v, end)  # [B, G, S, d]
        if t == 1:
            y = attend_one(q, k, v, mask, prompt)  # decoding
        else:
            y = attend(q, k, v, mask, causal=mask is None)  # [B, H, T, d]
            if prompt is not None:
                pk, pv, gate = prompt  # [Bp, G, K, d] x2, gate [H] or per row [B, H] (tanh applied)
                pk, pv = pk.expand(b, -1, -1, -1), pv.expand(b, -1, -1, -1)
                y_prompt = attend(q, pk, pv, None, causal=False)  # every query sees all K prompts
                y = y + gate.to(y.dtype).reshape(-1, self.n_heads, 1, 1) * y_prompt
        return _tuned(self.wo, "wo", y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim), terms)


class FeedForward(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.w1 = Linear(config.dim, config.ffn_dim)  # gate
        self.w3 = Linear(config.dim, config.ffn_dim)  # up
        self.w2 = Linear(config.ffn_dim, config.dim)  # down

    def forward(self, x: Tensor, terms: LayerTerms | None = None) -> Tensor:
        return _tuned(self.w2, "w2", F.silu(_tuned(self.w1, "w1", x, terms)) * _tuned(self.w3, "w3", x, terms), terms)


def _tuned(projection: nn.Module, name: str, x: Tensor, terms: LayerTerms | None) -> Tensor:
    """The frozen product plus the request's V2 terms of projection `name`, when it has any."""
    y = projection(x)
    return y if terms is None else terms.add(name, x, y)


class Block(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None, cache: KVCache | None = None,
                input_pos: Tensor | None = None, end: int = 0,
                prompt: tuple[Tensor, Tensor, Tensor] | None = None, terms: LayerTerms | None = None) -> Tensor:
        norm1 = None if terms is None else terms.norm_weight("attention_norm", self.attention_norm.weight)
        h = h + self.attention(self.attention_norm(h, norm1), cos, sin, mask, cache, input_pos, end, prompt, terms)
        norm2 = None if terms is None else terms.norm_weight("ffn_norm", self.ffn_norm.weight)
        return h + self.feed_forward(self.ffn_norm(h, norm2), terms)


class Llama(nn.Module):
    """A LLaMA-family decoder whose weights stay frozen; only adapter prompts/gates train."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = None if config.tie_embeddings else Linear(config.dim, config.vocab_size)
        self._rope: tuple[Tensor, Tensor] | None = None

    @property
    def device(self) -> torch.device:
        """Where the weights live (the token embedding's device)."""
        return self.tok_embeddings.weight.device

    def rope(self, length: int) -> tuple[Tensor, Tensor]:
        """cos/sin tables covering at least `length` positions, built lazily on the weights' device."""
        device = self.device
        if self._rope is None or self._rope[0].shape[0] < length or self._rope[0].device != device:
            size = max(length, min(self.config.max_seq_len, 4096))
            self._rope = rope_tables(self.config, size, device)
        return self._rope

    def head_weight(self) -> Tensor:
        """The LM head's weight [vocab, C]: the token embedding when tied."""
        return self.tok_embeddings.dense_weight() if self.output is None else self.output.dense_weight()

    def head(self, h: Tensor) -> Tensor:
        """Logits [..., vocab] from final-normed hidden states [..., C]."""
        return self.tok_embeddings.project(h) if self.output is None else self.output(h)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> Tensor:
        """Zeroed cache storage [2, n_layers, B, n_kv_heads, max_len, head_dim]; see `layer_caches`."""
        c, norm = self.config, self.norm.weight  # the activations' dtype, also for quantised weights
        return torch.zeros(2, c.n_layers, batch, c.n_kv_heads, max_len, c.head_dim, dtype=dtype or norm.dtype,
                           device=norm.device)

    @staticmethod
    def layer_caches(storage: Tensor) -> list[KVCache]:
        return [KVCache(storage[0, i], storage[1, i]) for i in range(storage.shape[1])]

    def forward(self, tokens: Tensor | None = None, *, input_pos: Tensor | None = None,
                cache: list[KVCache] | None = None, key_mask: Tensor | None = None,
                adapter: AdapterKV | None = None, hidden: Tensor | None = None, start_layer: int = 0) -> Tensor:
        """Final-normed hidden states [B, T, C]; `head()` turns them into logits.

        tokens [B, T]; input_pos [T]: cache slots of these tokens (default 0..T-1); key_mask [B, S]:
        True where a cache slot (or, without a cache, a position) holds a real token — pass it for
        left-padded batches, position ids then count real tokens only. `hidden` + `start_layer` resume
        from the output of layer start_layer-1 (the frozen-prefix cache). Layers below the first
        adapted one always run without autograd.
        """
        h = self.tok_embeddings(tokens) if hidden is None else hidden  # [B, T, C]
        b, t, _ = h.shape
        if input_pos is None:
            input_pos = torch.arange(t, device=h.device)
        end = int(input_pos[-1]) + 1
        positions, mask = self._positions_and_mask(input_pos, end, key_mask, causal_needed=cache is not None)
        cos, sin = self.rope(end)
        cos, sin = cos[positions].unsqueeze(-3), sin[positions].unsqueeze(-3)  # [B or 1, 1, T, d]
        first_trained = adapter.first_layer if adapter is not None else self.config.n_layers
        tuning = adapter.tuning if adapter is not None else None
        for i in range(start_layer, self.config.n_layers):
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= first_trained):
                h = self.layers[i](h, cos, sin, mask, cache[i] if cache else None, input_pos, end,
                                   adapter.for_layer(i) if adapter is not None else None,
                                   tuning.layer(i) if tuning is not None else None)
        return self.norm(h, tuning.norm_weight(None, "norm", self.norm.weight) if tuning is not None else None)

    def prefix(self, tokens: Tensor, n_layers: int, tuning: RowTuning | None = None) -> Tensor:
        """Output of the bottom n_layers [B, T, C] (frozen, no autograd): what the prefix cache stores.
        tuning: a V2 adapter's terms, which reach below its prompts (they get no gradient there either)."""
        with torch.no_grad():
            h = self.tok_embeddings(tokens)
            b, t, _ = h.shape
            cos, sin = self.rope(t)
            cos, sin = cos[:t][None, None], sin[:t][None, None]
            for i, layer in enumerate(self.layers[:n_layers]):  # plain causal attention, no cache, no prompts
                h = layer(h, cos, sin, end=t, terms=tuning.layer(i) if tuning is not None else None)
        return h

    @staticmethod
    def _positions_and_mask(input_pos: Tensor, end: int, key_mask: Tensor | None,
                            causal_needed: bool) -> tuple[Tensor, Tensor | None]:
        """RoPE positions [B or 1, T] and a boolean attention mask [B or 1, 1, T, end] (None: plain causal)."""
        if key_mask is None:
            positions = input_pos[None]
            t = input_pos.numel()
            if not causal_needed or t == end or t == 1:
                return positions, None  # prefill from slot 0 (is_causal is exact) or one query seeing all
            keys = torch.arange(end, device=input_pos.device)
            return positions, (keys[None, :] <= input_pos[:, None])[None, None]
        key_mask = key_mask[:, :end].bool()
        pos_all = (key_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, end]: real tokens counted from 0
        positions = pos_all[:, input_pos]  # [B, T]
        keys = torch.arange(end, device=input_pos.device)
        causal = keys[None, :] <= input_pos[:, None]  # [T, end]
        mask = causal[None] & key_mask[:, None, :]  # [B, T, end]
        # A padding query sees no real key; let it see itself so its softmax stays finite (no NaN leaks).
        mask = mask | (keys[None, :] == input_pos[:, None])[None]
        return positions, mask[:, None]
