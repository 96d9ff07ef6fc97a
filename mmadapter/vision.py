"""The frozen open_clip image tower: pixels -> the features an adapter's projector turns into image tokens.

The tower is built only through `open_clip.create_model_and_transforms`, so the architecture, weights and
preprocessing are open_clip's own; the features come from open_clip's `forward_intermediates` API
(open_clip_torch >= 2.31), so nothing in open_clip is reimplemented. What it reads depends on the projector
(VisionConfig.projector) that will use it:

- "mlp" (LLaMA-Adapter, arXiv 2303.16199, §3.3: CLIP's global feature at M depths, concatenated along
  channels; mlp_projector.py maps them to one image token):
  - ViT towers: the class token after M blocks evenly spaced over the depth (the deepest being the
    last block), each through the tower's own `ln_post` and `proj`. The deepest scale is exactly
    `encode_image(x)` before normalisation; every scale has the embedding width E -> [B, M*E].
  - ModifiedResNet towers (RN50, ...): the global-average-pooled output of the deepest M of the four
    stages layer1..layer4 (so n_scales is 1..4; the default 4 uses every stage). Widths differ per
    stage (256+512+1024+2048 for RN50) -> [B, sum of widths].
- "visual-query" and "spatial" (visual_query.py, spatial_tokens.py; ViT towers only): every token of one
  block (the last, or after `token_depth` blocks), class token first, each through ln_post and proj,
  flattened -> [B, N*E].

Where the weights come from is tower_weights.py; which towers count as the same is towers.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pickle
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch import nn

from .config import SELF_CONTAINED_TOWERS, VisionConfig
from .images import fit_for_tower
from .tower_weights import VisionWeightsError, resolve_pretrained
from .towers import canonical_name, packaged_towers

log = logging.getLogger(__name__)

__all__ = ["VisionTower", "VisionWeightsError", "weights_sha256"]  # VisionWeightsError: raised when building

_SUPPORTED = (
    "open_clip VisionTransformer towers with class-token pooling (ViT-B-32, ViT-L-14, ...) and "
    "ModifiedResNet towers (RN50, RN101, ...)"
)


class VisionTower(nn.Module):
    """A frozen open_clip image tower returning multi-scale global features [B, feature_dim].

    Attributes: feature_dim, transform (open_clip's eval transform; use `preprocess`, which bounds
    the picture first), image_size (H, W), weights_hash (sha256 prefix of the visual weights) and
    fingerprint (model, scales and weights_hash; keys cached features across processes).
    The tower stays in eval mode even when a parent module calls .train() (BatchNorm statistics
    and patch dropout must not change), and its parameters never require grad.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        import open_clip  # optional dependency: mmadapter[vision]

        if config.n_scales < 1:
            raise ValueError(f"VisionConfig.n_scales={config.n_scales} must be at least 1")
        name = canonical_name(config.model)
        for packaged in packaged_towers():  # towers shipped in packages, known like open_clip's own
            if open_clip.get_model_config(packaged.name) is None:
                open_clip.add_model_config(packaged.config_file)
        _check_model_config(open_clip, name)
        pretrained, quick_gelu = resolve_pretrained(open_clip, name, config.pretrained)
        try:
            with torch.random.fork_rng(devices=[]):  # random weights from config.seed: built again the same
                torch.manual_seed(config.seed)
                model, _, preprocess = open_clip.create_model_and_transforms(
                    name, pretrained=pretrained, force_quick_gelu=quick_gelu, weights_only=True
                )
        except pickle.UnpicklingError as e:
            raise VisionWeightsError(
                f"refusing to unpickle {pretrained}: it holds more than tensors ({e}). "
                "Re-save the state dict as .safetensors or as a plain tensor dict."
            ) from e
        except RuntimeError as e:
            if pretrained is not None and Path(pretrained).is_file():
                raise VisionWeightsError(f"{pretrained} does not hold {name} weights: {e}") from e
            raise
        except Exception as e:  # e.g. safetensors' own error type for a truncated or garbage file
            if pretrained is not None and Path(pretrained).is_file():
                raise VisionWeightsError(f"{pretrained} cannot be read as {name} weights ({type(e).__name__}: {e}); "
                                         "the file is truncated, corrupt or not a checkpoint") from e
            raise
        visual = model.visual
        del model  # the text tower is never used: let it be freed

        self.kind = _tower_kind(open_clip, visual, name)
        self.visual = visual
        self.all_tokens = config.tokens  # visual-query and spatial projectors read every token of one layer
        if self.all_tokens and self.kind != "vit":
            raise ValueError(f"{name}: the {config.projector} projector reads ViT tokens; this is a {self.kind} tower")
        self.n_scales = config.n_scales
        self.take_indices = [self._token_index(visual, config)] if self.all_tokens else \
            self._scale_indices(visual, config.n_scales)
        self.feature_dim = self._feature_dim(visual)
        if self.all_tokens:
            clip_dim = int(visual.proj.shape[1]) if visual.proj is not None else visual.ln_post.normalized_shape[0]
            n_tokens = visual.positional_embedding.shape[0]  # patches + class token
            self.feature_dim = n_tokens * clip_dim  # every token, flattened: [B, N * E]
            config = dataclasses.replace(config, clip_dim=clip_dim)
            if config.projector == "spatial":  # the depth read, recorded in adapters trained over this tower
                config = dataclasses.replace(config, token_depth=self.take_indices[0] + 1)
        self.transform: Callable[[Image.Image], torch.Tensor] = preprocess
        self.resize_mode: str = visual.preprocess_cfg.get("resize_mode", "shortest")
        size = visual.preprocess_cfg["size"]
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)

        self.visual.requires_grad_(False)
        self.eval()
        self.weights_hash = weights_sha256(self.visual)[:16]
        self.config = dataclasses.replace(config, weights_hash=self.weights_hash)
        variant = "+quickgelu" if quick_gelu else ""
        last = self.all_tokens and self.take_indices[0] == len(visual.transformer.resblocks) - 1
        features = "tokens" if last else f"tokens@{self.take_indices[0] + 1}" if self.all_tokens \
            else f"m{config.n_scales}"
        self.fingerprint = f"{name}{variant}:{features}{':bgr' if config.bgr else ''}:{self.weights_hash}"
        if config.weights_hash is not None and config.weights_hash != self.weights_hash:
            log.warning(
                "vision tower weights (sha256 %s) differ from the ones this config was trained with (%s): "
                "image features will not match what the projector learned",
                self.weights_hash, config.weights_hash,
            )

    def train(self, mode: bool = True) -> VisionTower:
        return super().train(False)  # frozen: always eval (see the class docstring)

    @property
    def device(self) -> torch.device:
        return next(self.visual.parameters()).device

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> [3, H, W]: open_clip's resize, crop and normalisation, after the size policy
        of `fit_for_tower` (every image path, training, evaluation, app and API, comes through here).
        Channels are swapped first when the config asks for BGR (VisionConfig.bgr)."""
        if self.config.bgr:
            image = Image.merge("RGB", image.convert("RGB").split()[::-1])
        return self.transform(fit_for_tower(image, self.resize_mode))

    def preprocess_batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB PIL images -> [B, 3, H, W] with open_clip's resize, crop and normalisation."""
        return torch.stack([self.preprocess(image) for image in images])

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] preprocessed pixels -> [B, feature_dim] multi-scale global features."""
        first_param = next(self.visual.parameters())
        pixels = pixels.to(device=first_param.device, dtype=first_param.dtype)
        if self.all_tokens:  # every token of one block (V2: the last) through ln_post and proj
            out = self.visual.forward_intermediates(
                pixels, indices=self.take_indices, intermediates_only=True,
                output_fmt="NLC", output_extra_tokens=True,
            )
            tokens = torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)
            tokens = self._project_class_token(tokens)  # [B, N, E]: ln_post and proj act per token
            return tokens.flatten(1)  # [B, N * E]
        if self.kind == "vit":
            out = self.visual.forward_intermediates(
                pixels, indices=self.take_indices, intermediates_only=True,
                output_fmt="NLC", output_extra_tokens=True,
            )
            # image_intermediates_prefix: M x [B, 1, width], the class token after each chosen block
            scales = [self._project_class_token(prefix[:, 0]) for prefix in out["image_intermediates_prefix"]]
        else:
            out = self.visual.forward_intermediates(pixels, indices=self.take_indices, intermediates_only=True)
            scales = [stage.mean(dim=(2, 3)) for stage in out["image_intermediates"]]  # M x [B, C_m]
        return torch.cat(scales, dim=-1)  # [B, feature_dim]

    def _project_class_token(self, token: torch.Tensor) -> torch.Tensor:
        """[B, width] -> [B, E], as VisionTransformer._pool does for 'tok' pooling (LayerNorm is per
        token, so normalising before or after taking the token is the same)."""
        token = self.visual.ln_post(token)
        return token @ self.visual.proj if self.visual.proj is not None else token

    @staticmethod
    def _token_index(visual: nn.Module, config: VisionConfig) -> int:
        """The block whose tokens a token projector reads: after `token_depth` blocks, else the last."""
        n_blocks = len(visual.transformer.resblocks)
        depth = config.token_depth or n_blocks
        if depth > n_blocks:
            raise ValueError(f"VisionConfig.token_depth={depth} exceeds the tower's {n_blocks} transformer blocks")
        return depth - 1

    def _scale_indices(self, visual: nn.Module, n_scales: int) -> list[int]:
        if self.kind == "vit":
            n_blocks = len(visual.transformer.resblocks)
            if n_scales > n_blocks:
                raise ValueError(f"n_scales={n_scales} exceeds the tower's {n_blocks} transformer blocks")
            return [(m + 1) * n_blocks // n_scales - 1 for m in range(n_scales)]  # last = n_blocks - 1
        if n_scales > 4:
            raise ValueError(f"n_scales={n_scales}: a ResNet tower has 4 stages, so n_scales must be 1 to 4")
        return list(range(5 - n_scales, 5))  # forward_intermediates indexes [stem, layer1, ..., layer4]

    def _feature_dim(self, visual: nn.Module) -> int:
        if self.kind == "vit":
            width = visual.proj.shape[1] if visual.proj is not None else visual.ln_post.normalized_shape[0]
            return self.n_scales * int(width)
        stages = [visual.layer1, visual.layer2, visual.layer3, visual.layer4]
        return sum(stages[i - 1][-1].bn3.num_features for i in self.take_indices)


def weights_sha256(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes) in sorted key order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# --- tower type checks --------------------------------------------------------------------------


def _check_model_config(open_clip: Any, model_name: str) -> None:
    """Reject unknown names and unsupported tower types before any weights are downloaded."""
    if model_name.startswith(SELF_CONTAINED_TOWERS):
        return  # the config lives with the weights; _tower_kind checks the built tower
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(
            f"unknown open_clip model {model_name!r}; open_clip.list_models() lists the known names "
            "(e.g. ViT-L-14, ViT-B-32, RN50)"
        )
    vision_cfg = cfg.get("vision_cfg", {})
    if "timm_model_name" in vision_cfg:
        raise ValueError(
            f"{model_name} uses a timm image tower ({vision_cfg['timm_model_name']}); mmadapter supports {_SUPPORTED}"
        )


def _tower_kind(open_clip: Any, visual: nn.Module, model_name: str) -> str:
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        if not hasattr(visual, "forward_intermediates"):
            raise RuntimeError(f"open_clip {open_clip.__version__} is too old: mmadapter needs open_clip_torch>=2.31")
        if visual.attn_pool is not None or visual.pool_type != "tok":
            raise ValueError(
                f"{model_name}: ViT towers with attentional or {visual.pool_type!r} pooling are not supported; "
                f"mmadapter supports {_SUPPORTED}"
            )
        return "vit"
    if isinstance(visual, ModifiedResNet):
        return "resnet"
    raise ValueError(f"{model_name} has a {type(visual).__name__} image tower; mmadapter supports {_SUPPORTED}")
