"""Zero-init gated adaptation prompts: the ~1M trainable parameters of LLaMA-Adapter.

The adapter is a separate module from the frozen base, so one base can serve several adapters and
only adapter tensors are ever saved. It holds
  prompts   [L, K, C]  P_l, N(0, std) like the reference's nn.Embedding init,
  gates     [L, H]     g_l, zero-init: the model equals the base exactly at step 0 ([L, 1] with
                       AdapterConfig(gate="per-layer"): one gate shared by the heads of a layer),
  projector (optional) the vision MLP that turns multi-scale CLIP features into one image token I_p.
For sample b in layer l the prompt is P_l + I_p[b] (README, "The adapter, exactly"); text-only samples use P_l.
With LLaMA-Adapter V2's visual-query projector, or spatial tokens (spatial_tokens.py), I_p[b] is K image
tokens [K, C], added to the K prompts token by token; V2 adapters also hold base tuning (biases, norms, LoRA:
tuning.py) and, with new_gate, a per-layer scale of the prompt term: new_gate_l * tanh(g_l).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from .config import AdapterConfig, LlamaConfig, VisionConfig
from .llama import AdapterKV, Llama
from .tuning import BaseTuning


def variant_name(config: AdapterConfig, vision: VisionConfig | None) -> str:
    """The kind of adapter, for people: LLaMA-Adapter (V1 prompts, optional image MLP or spatial tokens) or
    V2 multimodal."""
    if config.tunes_base or config.new_gate or (vision is not None and vision.projector == "visual-query"):
        parts = (["bias"] if config.bias_tuning else []) + ([f"LoRA r{config.lora_rank}"] if config.lora_rank else [])
        return f"LLaMA-Adapter V2 multimodal ({' + '.join(parts) or 'prompts only'})"
    if vision is None:
        return "LLaMA-Adapter"
    return "LLaMA-Adapter multimodal (" + ("spatial tokens" if vision.projector == "spatial" else "image MLP") + ")"


def describe_image_path(vision: VisionConfig, feature_dim: int | None, n_prompts: int) -> str:
    """How an adapter turns an image into tokens, in one line (`mmadapter info`)."""
    if vision.projector == "spatial":
        depth = "the last layer" if vision.token_depth is None else f"depth {vision.token_depth}"
        grid = "one per patch" if vision.spatial_grid is None else \
            f"a {vision.spatial_grid}\u00d7{vision.spatial_grid} grid"
        return f"spatial tokens: {n_prompts} tokens from {grid} at {depth} (class token first)"
    if vision.projector == "visual-query":
        return f"visual query: {n_prompts} tokens from every token of the last layer"
    return f"image MLP: one token from {vision.n_scales} global features, added to all {n_prompts} prompts"


def build_projector(vision: VisionConfig, feature_dim: int, dim: int, n_prompts: int) -> nn.Module:
    """The trainable image projector a vision config asks for: V1's MLP (the paper's method), V2's visual
    query or spatial tokens."""
    if vision.projector == "spatial":
        from .spatial_tokens import build_spatial_tokens

        return build_spatial_tokens(vision, feature_dim, dim, n_prompts)
    if vision.projector == "mlp":
        from .mlp_projector import Projector

        return Projector(feature_dim, dim, vision.projector_hidden)
    if vision.projector == "visual-query":
        from .visual_query import VisualQuery

        if feature_dim % vision.clip_dim:
            raise ValueError(f"tower features of size {feature_dim} are not whole tokens of width {vision.clip_dim}")
        return VisualQuery(vision.clip_dim, dim, n_prompts, vision.query_width, vision.query_depth,
                           vision.query_heads)
    raise ValueError(f"unknown projector {vision.projector!r}; known: 'mlp', 'visual-query', 'spatial'")


class Adapter(nn.Module):
    def __init__(self, config: AdapterConfig, base: LlamaConfig, vision: VisionConfig | None = None,
                 feature_dim: int | None = None) -> None:
        super().__init__()
        n_layers = config.adapted_layers(base.n_layers)
        self.config, self.base_config, self.vision_config = config, base, vision
        self.first_layer = base.n_layers - n_layers
        self.template: str | None = None  # the prompt template it was trained with, when known
        self.prompts = nn.Parameter(torch.randn(n_layers, config.n_prompts, base.dim) * config.prompt_init_std)
        self.gates = nn.Parameter(torch.zeros(n_layers, config.n_gates(base.n_heads)))  # [L, H] or [L, 1]
        self.gate_scale = nn.Parameter(torch.ones(n_layers)) if config.new_gate else None
        self.tuning: BaseTuning | None = None
        if config.tunes_base:
            self.tuning = BaseTuning(base, config.bias_tuning, config.lora_rank)
        self.projector: nn.Module | None = None
        if vision is not None:
            if feature_dim is None:
                raise ValueError("an adapter with a vision config needs the tower's feature_dim")
            self.projector = build_projector(vision, feature_dim, base.dim, config.n_prompts)
        self.use_tower(None)

    def use_tower(self, tower: nn.Module | None) -> None:
        """The image tower this adapter was trained with (None: the model's). Held, not owned: it is
        no submodule, so it is never saved with the adapter and adapters trained over one tower share it."""
        self.__dict__["tower"] = tower

    @property
    def n_layers(self) -> int:
        return self.prompts.shape[0]

    @property
    def variant(self) -> str:
        return variant_name(self.config, self.vision_config if self.projector is not None else None)

    def image_tokens(self, features: Tensor, has_image: Tensor | None = None) -> Tensor:
        """I_p [B, C] (or [B, K, C] for visual-query and spatial projectors) from tower features [B, F]; rows without
        an image are zero (plain prompts)."""
        if self.projector is None:
            raise ValueError("this adapter has no projector: it was built without a vision config")
        tokens = self.projector(features.to(self.prompts.dtype))
        if has_image is not None:
            tokens = tokens * has_image.to(tokens.dtype).view(-1, *[1] * (tokens.dim() - 1))
        return tokens

    def prompt_kv(self, base: Llama, image_tokens: Tensor | None = None) -> AdapterKV:
        """Prompt K/V of every adapted layer through its frozen W_k/W_v.

        image_tokens: None, [B, C] (one image token, added to all K prompts), or visual tokens
        [B, Kv, C] with Kv 1 or K (added to the prompts one by one).
        """
        visual = None
        if image_tokens is not None:
            visual = image_tokens[:, None, :] if image_tokens.dim() == 2 else image_tokens  # [B, Kv, C]
        kv = []
        for i in range(self.n_layers):
            prompt = self.prompts[i][None]  # [1, K, C]
            if visual is not None:
                prompt = prompt + visual  # [B, K, C]
            kv.append(base.layers[self.first_layer + i].attention.project_prompt(prompt))
        gates = torch.tanh(self.gates).expand(self.n_layers, self.base_config.n_heads)  # [L, H]
        if self.gate_scale is not None:
            gates = gates * self.gate_scale[:, None]
        return AdapterKV(self.first_layer, kv, gates)

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters by part, for the model summary."""
        counts = OrderedDict(prompts=self.prompts.numel(), gates=self.gates.numel())
        if self.gate_scale is not None:
            counts["gates"] += self.gate_scale.numel()
        if self.projector is not None:
            counts["projector"] = sum(p.numel() for p in self.projector.parameters())
        if self.tuning is not None:
            for name, p in self.tuning.named_parameters():
                part = "bias" if ".bias." in name else "lora" if ".lora_" in name else "norms"
                counts[part] = counts.get(part, 0) + p.numel()
        counts["total"] = sum(counts.values())
        return counts

