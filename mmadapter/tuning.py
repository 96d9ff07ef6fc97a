"""Bias, norm and LoRA tuning of the frozen base (LLaMA-Adapter V2, arXiv 2304.15010 §3).

V2 unfreezes a few cheap things of the base itself:
  bias tuning   zero-init biases on wq, wo, w1, w2, w3 of every layer, and every RMSNorm weight
                (both layers' norms and the final norm) replaced by a tuned copy;
  LoRA          y = W x + B (A x) on wq, wk, wv, wo, w1, w2, w3, with A [r, in], B [out, r].
The tensors live in the adapter (so only they are saved); `apply_tuning` puts them into a base by
wrapping whatever frozen projection is there (plain, quantised, ...) in a `TunedLinear` and pointing
the norms at the tuned weights, and takes them out again when another adapter (or none) is used. The
base never registers the adapter's tensors: its parameters and state dict stay the frozen weights.

The prompt K/V of the adapted layers go through the frozen W_k / W_v only, without LoRA, as in the
reference: `Attention.project_prompt` calls `frozen_projection(self.wk)`.
"""

from __future__ import annotations

from collections.abc import Callable

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


class TunedLinear(nn.Module):
    """A frozen projection plus a tuned bias and/or LoRA: frozen(x) + B (A x) + bias."""

    def __init__(self, frozen: nn.Module, bias: Tensor | None, lora_a: Tensor | None, lora_b: Tensor | None) -> None:
        super().__init__()
        self.frozen = frozen
        # The adapter's Parameters, deliberately not registered here: the base's parameters, state dict,
        # fingerprint and freeze() keep meaning the frozen weights only.
        self.__dict__.update(bias=bias, lora_a=lora_a, lora_b=lora_b)

    def forward(self, x: Tensor) -> Tensor:
        y = self.frozen(x)
        if self.lora_a is not None:
            y = y + F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y


def frozen_projection(module: nn.Module) -> nn.Module:
    """The frozen projection inside a TunedLinear (or the module itself)."""
    return module.frozen if isinstance(module, TunedLinear) else module


def fused_tuning(modules: list[nn.Module]) -> Callable[[Tensor, Tensor], Tensor] | None:
    """For projections whose outputs are concatenated (q/k/v, gate/up): one function (x, y) -> y plus every
    module's LoRA and bias term, their tensors fused once: A stacked [Σr, in] and B block-diagonal [Σout, Σr]
    (both kept transposed), biases concatenated [Σout], zeros where a module has none. None when none is
    tuned. A snapshot: for decoding, where the adapter does not change within a request."""
    tuned = [m for m in modules if isinstance(m, TunedLinear)]
    if not tuned:
        return None
    outs = [m.frozen.weight.shape[0] if isinstance(m, TunedLinear) else m.weight.shape[0] for m in modules]
    with torch.no_grad():
        like = tuned[0].bias if tuned[0].bias is not None else tuned[0].lora_b
        bias = None
        if any(m.bias is not None for m in tuned):
            bias = torch.cat([m.bias if isinstance(m, TunedLinear) and m.bias is not None else like.new_zeros(n)
                              for m, n in zip(modules, outs)]).detach()  # [Σout]
        loras = [(m.lora_a, m.lora_b) if isinstance(m, TunedLinear) and m.lora_a is not None else None for m in modules]
        a = b = None
        if any(loras):
            a = torch.cat([ab[0] for ab in loras if ab is not None]).t().contiguous()  # Aᵀ [in, Σr]
            b = torch.block_diag(*[ab[1] if ab is not None else like.new_zeros(n, 0)
                                   for ab, n in zip(loras, outs)]).t().contiguous()  # Bᵀ [Σr, Σout]

    def add_terms(x: Tensor, y: Tensor) -> Tensor:
        if a is not None:
            y = y.addmm_(x @ a.to(x.dtype), b.to(x.dtype))  # y + B (A x)
        return y if bias is None else y.add_(bias.to(y.dtype))

    return add_terms


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
                self.norm.copy_(_norm_weight(base.norm))
                for tuned, layer in zip(self.layers, base.layers):
                    tuned.attention_norm.copy_(_norm_weight(layer.attention_norm))
                    tuned.ffn_norm.copy_(_norm_weight(layer.ffn_norm))


def _norm_weight(norm: nn.Module) -> Tensor:
    return norm._parameters["weight"]  # the base's own weight, even while a tuned one shadows it


def apply_tuning(base: nn.Module, tuning: BaseTuning | None) -> None:
    """Make `base` compute with `tuning` (None: the untouched frozen base). Cheap when already so."""
    if getattr(base, "_active_tuning", None) is tuning:
        return
    for i, layer in enumerate(base.layers):
        t = tuning.layers[i] if tuning is not None else None
        for module, names in ((layer.attention, ATTENTION), (layer.feed_forward, ("w1", "w2", "w3"))):
            for name in names:
                frozen = frozen_projection(getattr(module, name))
                bias = t.bias[name] if t is not None and name in t.bias else None
                a = t.lora_a[name] if t is not None and name in t.lora_a else None
                b = t.lora_b[name] if t is not None and name in t.lora_b else None
                setattr(module, name, frozen if bias is None and a is None else TunedLinear(frozen, bias, a, b))
        _set_norm(layer.attention_norm, t.attention_norm if t is not None else None)
        _set_norm(layer.ffn_norm, t.ffn_norm if t is not None else None)
    _set_norm(base.norm, tuning.norm if tuning is not None else None)
    base.__dict__["_active_tuning"] = tuning  # not a submodule: the base does not own the adapter's tensors


def _set_norm(norm: nn.Module, tuned: nn.Parameter | None) -> None:
    """Point `norm.weight` at the tuned weight (an instance attribute shadows the registered, frozen one,
    which stays the base's parameter) or back at the frozen one."""
    if tuned is None:
        norm.__dict__.pop("weight", None)
    else:
        norm.__dict__["weight"] = tuned
