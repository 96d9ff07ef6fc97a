"""The model a demo adapter trains in: the embedded base, a shapes tower, a fresh adapter of a recipe."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import VisionConfig
    from ..model import MMAdapter


def demo_model(vision: VisionConfig, n_layers: int, n_prompts: int, template: str, prompt_init_std: float = 1.0,
               seed: int = 0, lora_rank: int = 0) -> MMAdapter:
    """Base + tower + a fresh adapter; with spatial tokens the prompt count is the tower's token count
    (n_prompts is used by the other projectors)."""
    from ..config import AdapterConfig
    from ..model import load_base
    from ..spatial_tokens import spatial_token_count

    model = load_base("smollm2-135m-instruct")
    tower = model.attach_vision(vision)
    if vision.projector == "spatial":
        n_prompts = spatial_token_count(tower.config, tower.feature_dim)[0]
    model.add_adapter(AdapterConfig(n_prompts=n_prompts, n_layers=n_layers, prompt_init_std=prompt_init_std,
                                    lora_rank=lora_rank),
                      seed=seed)
    model.adapter.template = template
    return model
