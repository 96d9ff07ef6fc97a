"""The demo's small CLIP: open_clip's own model classes and contrastive loss, trained on the shapes world.

The architecture is a registered open_clip model config (`ShapesCLIP-64.json` beside this file: a
64 px ViT with 8 px patches and a small text tower over open_clip's bundled tokenizer). Each image is
paired with a caption that states every object's colour, shape and coarse position
("red circle top left, blue square middle center"), and with hard negatives: for each image, captions of
the same scene with one binding changed (a shape, two colours swapped, mirrored positions), so the
contrastive task can only be solved by an image embedding that knows which colour goes with which
shape and where, not just which words occur. The weights are saved as a full open_clip state dict
(safetensors, fp16) and load through `VisionConfig(model=TOWER_NAME, pretrained=<file>)`, exactly
like a user's own CLIP checkpoint.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import shapes
from .registry import TOWER_NAME, register_tower_config

@dataclass
class TowerTraining:
    steps: int = 300
    batch_size: int = 192
    lr: float = 2e-3
    warmup_steps: int = 20
    weight_decay: float = 0.1
    hard_negatives: int = 3  # extra captions per image, each with one binding changed
    seed: int = 0


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
                     ) -> torch.Tensor:
    """open_clip's ClipLoss with hard-negative captions as extra texts on the image->text side (NegCLIP).

    image_features [B, E] and text_features [B + B*N, E] are normalised; the first B texts are the images'
    own captions. With N = 0 this is exactly open_clip.ClipLoss (tested).
    """
    n = image_features.shape[0]
    logits = logit_scale * image_features @ text_features.T  # [B, B + B*N]
    labels = torch.arange(n, device=logits.device)
    image_to_text = torch.nn.functional.cross_entropy(logits, labels)
    text_to_image = torch.nn.functional.cross_entropy(logits[:, :n].T, labels)
    return (image_to_text + text_to_image) / 2


def train_tower(out_file: Path, config: TowerTraining, progress: bool = True) -> dict[str, Any]:
    """Train the tower from scratch on freshly generated scenes; write the weights; return a summary with the losses."""
    import open_clip
    from safetensors.torch import save_file

    register_tower_config()
    torch.manual_seed(config.seed)
    model, _, preprocess = open_clip.create_model_and_transforms(TOWER_NAME, pretrained=None)
    tokenizer = open_clip.get_tokenizer(TOWER_NAME)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98))
    rng = np.random.default_rng([shapes.SPLIT_SEEDS["train"], 10**9])  # not the adapter's training scenes
    losses: list[float] = []
    start = time.time()
    model.train()
    bar = tqdm(range(config.steps), desc="CLIP tower", disable=not progress)
    for step in bar:
        lr = config.lr * min(1.0, (step + 1) / config.warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        scenes = [shapes.sample_scene(rng) for _ in range(config.batch_size)]
        images = torch.stack([preprocess(_training_view(s, rng)) for s in scenes])  # [B, 3, 64, 64]
        negatives = [shapes.hard_negative(s, rng) for s in scenes for _ in range(config.hard_negatives)]
        texts = tokenizer([shapes.clip_caption(s) for s in scenes + negatives])  # [B * (1 + N), context_length]
        image_features = model.encode_image(images, normalize=True)  # [B, E]
        text_features = model.encode_text(texts, normalize=True)  # [B * (1 + N), E]
        loss = contrastive_loss(image_features, text_features, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.1e}")
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format": "open_clip", "model": TOWER_NAME})
    tmp.replace(out_file)
    return {"steps": config.steps, "batch_size": config.batch_size, "lr": config.lr, "seed": config.seed,
            "hard_negatives": config.hard_negatives,
            "images_seen": config.steps * config.batch_size, "final_loss": float(np.mean(losses[-10:])),
            "seconds": round(time.time() - start, 1), "losses": losses}


def _training_view(scene: shapes.Scene, rng: np.random.Generator) -> Any:
    """Mostly clean 64 px renderings (cheap), sometimes a bigger, noisy or JPEG one, as users' images are."""
    if rng.random() < 0.25:
        return shapes.render_varied(scene, rng)
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    return shapes.render(scene, 64, background=background)
