"""The open_clip tower (multi-scale features, weights, preprocessing) and the projector.

Parity references are open_clip's own model (`encode_image`, its returned transform, its modules)
built from tiny architecture configs registered for the test session.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from mmadapter import tower_weights, vision  # noqa: E402
from mmadapter.config import VisionConfig  # noqa: E402
from mmadapter.mlp_projector import Projector  # noqa: E402
from mmadapter.vision import VisionTower, VisionWeightsError  # noqa: E402

TINY_VIT = "mmtest-tiny-vit"
TINY_RESNET = "mmtest-tiny-rn"
TINY_VIT_AVGPOOL = "mmtest-tiny-vit-avgpool"
_TEXT_CFG = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
TINY_MODEL_CONFIGS = {
    TINY_VIT: {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "patch_size": 8,
                                               "head_width": 32}, "text_cfg": _TEXT_CFG},
    TINY_RESNET: {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
                  "text_cfg": _TEXT_CFG},
    TINY_VIT_AVGPOOL: {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                                                       "head_width": 32, "pool_type": "avg"}, "text_cfg": _TEXT_CFG},
}


def register_tiny_models(directory: Path) -> None:
    """Write the tiny architecture JSONs and add them to open_clip's registry (idempotent)."""
    if all(name in open_clip.list_models() for name in TINY_MODEL_CONFIGS):
        return
    for name, cfg in TINY_MODEL_CONFIGS.items():
        (directory / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(directory)


def save_reference(model_name: str, path: Path, seed: int) -> torch.nn.Module:
    """A randomly initialised open_clip model (the reference), saved to `path` as its full state dict."""
    torch.manual_seed(seed)
    model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=None)
    model.eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # init is gamma 0 / stats 0, 1: make eval-mode BN matter
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return model


@pytest.fixture(scope="module", autouse=True)
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> None:
    register_tiny_models(tmp_path_factory.mktemp("open_clip_configs"))


@pytest.fixture(scope="module")
def vit_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("ckpt") / "tiny_vit.safetensors"
    return path, save_reference(TINY_VIT, path, seed=0)


@pytest.fixture(scope="module")
def resnet_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("ckpt") / "tiny_rn.pt"
    return path, save_reference(TINY_RESNET, path, seed=1)


def random_pixels(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# --- ViT ----------------------------------------------------------------------------------------


def test_vit_deepest_scale_is_encode_image_and_others_are_class_tokens(vit_checkpoint) -> None:
    path, reference = vit_checkpoint
    tower = VisionTower(VisionConfig(model=TINY_VIT, pretrained=str(path), n_scales=4))
    x = random_pixels()
    features = tower(x)
    assert tower.kind == "vit"
    assert tower.feature_dim == 4 * 32 and features.shape == (3, 4 * 32)
    assert tower.take_indices == [0, 1, 2, 3]

    with torch.no_grad():
        expected_last = reference.encode_image(x, normalize=False)
    torch.testing.assert_close(features[:, -32:], expected_last)

    # Every scale: the class token after block i through the reference's own ln_post and proj,
    # captured with forward hooks on the reference model's blocks.
    captured: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: captured.append(out))
             for block in reference.visual.transformer.resblocks]
    with torch.no_grad():
        reference.encode_image(x)
    for hook in hooks:
        hook.remove()
    batch_first = reference.visual.transformer.batch_first
    class_tokens = [(out if batch_first else out.transpose(0, 1))[:, 0] for out in captured]
    with torch.no_grad():
        expected = torch.cat([reference.visual.ln_post(t) @ reference.visual.proj for t in class_tokens], dim=-1)
    torch.testing.assert_close(features, expected)


def test_vit_scales_are_evenly_spaced_ending_at_the_last_block(vit_checkpoint) -> None:
    path, reference = vit_checkpoint
    two = VisionTower(VisionConfig(model=TINY_VIT, pretrained=str(path), n_scales=2))
    one = VisionTower(VisionConfig(model=TINY_VIT, pretrained=str(path), n_scales=1))
    assert two.take_indices == [1, 3] and one.take_indices == [3]
    x = random_pixels(2)
    torch.testing.assert_close(one(x), reference.encode_image(x, normalize=False).detach())
    torch.testing.assert_close(two(x)[:, 32:], one(x))
    with pytest.raises(ValueError, match="exceeds the tower's 4 transformer blocks"):
        VisionTower(VisionConfig(model=TINY_VIT, pretrained=None, n_scales=5))


def test_slash_names_are_open_clips_dash_names(vit_checkpoint) -> None:
    path, _ = vit_checkpoint
    slash = VisionTower(VisionConfig(model=TINY_VIT.replace("-", "/", 1), pretrained=str(path)))
    dash = VisionTower(VisionConfig(model=TINY_VIT, pretrained=str(path)))
    assert slash.fingerprint == dash.fingerprint


def test_unsupported_vit_pooling_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="'avg' pooling are not supported.*VisionTransformer.*ModifiedResNet"):
        VisionTower(VisionConfig(model=TINY_VIT_AVGPOOL, pretrained=None))


# --- ResNet -------------------------------------------------------------------------------------


def test_resnet_features_are_pooled_stage_outputs(resnet_checkpoint) -> None:
    path, reference = resnet_checkpoint
    tower = VisionTower(VisionConfig(model=TINY_RESNET, pretrained=str(path)))
    assert tower.kind == "resnet"
    assert tower.feature_dim == 8 * 4 + 16 * 4 + 32 * 4 + 64 * 4  # Bottleneck expansion 4, width doubling
    x = random_pixels(2)
    visual = reference.visual
    with torch.no_grad():
        h = visual.stem(x)
        pooled = []
        for stage in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
            h = stage(h)
            pooled.append(h.mean(dim=(2, 3)))
    features = tower(x)
    torch.testing.assert_close(features, torch.cat(pooled, dim=-1))

    deepest_two = VisionTower(VisionConfig(model=TINY_RESNET, pretrained=str(path), n_scales=2))
    assert deepest_two.feature_dim == 32 * 4 + 64 * 4
    torch.testing.assert_close(deepest_two(x), torch.cat(pooled[2:], dim=-1))
    with pytest.raises(ValueError, match="4 stages"):
        VisionTower(VisionConfig(model=TINY_RESNET, pretrained=None, n_scales=5))


def test_tower_stays_frozen_in_eval_mode(resnet_checkpoint) -> None:
    path, _ = resnet_checkpoint
    tower = VisionTower(VisionConfig(model=TINY_RESNET, pretrained=str(path)))
    parent = torch.nn.ModuleDict({"tower": tower, "head": torch.nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training
    assert not any(module.training for module in tower.modules())  # BatchNorm keeps its running stats
    assert not any(p.requires_grad for p in tower.parameters())
    x = random_pixels(2)
    with torch.enable_grad():
        first = tower(x)
    assert first.grad_fn is None
    torch.testing.assert_close(tower(x), first)  # no running-statistics update happened


# --- weights ------------------------------------------------------------------------------------


def test_local_checkpoints_load_their_weights(vit_checkpoint, tmp_path: Path, caplog) -> None:
    path, reference = vit_checkpoint
    other_path = tmp_path / "other.pt"
    other = save_reference(TINY_VIT, other_path, seed=7)
    x = random_pixels(2)

    from_safetensors = VisionTower(VisionConfig(model=TINY_VIT, pretrained=str(path)))
    from_pt = VisionTower(VisionConfig(model=TINY_VIT, pretrained=str(other_path)))
    with caplog.at_level(logging.WARNING, logger="mmadapter.vision"):
        random_tower = VisionTower(VisionConfig(model=TINY_VIT, pretrained=None, seed=1))
    assert "RANDOM WEIGHTS" in caplog.text and "meaningless" in caplog.text
    # random weights come from the config's seed (save_reference(seed=0) draws them the same way as seed=0)
    assert VisionTower(VisionConfig(model=TINY_VIT, pretrained=None, seed=1)).weights_hash == random_tower.weights_hash
    assert VisionTower(VisionConfig(model=TINY_VIT, pretrained=None, seed=0)).weights_hash == \
        vision.weights_sha256(reference.visual)[:16]

    torch.testing.assert_close(from_pt(x)[:, -32:], other.encode_image(x, normalize=False).detach())
    assert not torch.allclose(from_safetensors(x), from_pt(x))
    assert not torch.allclose(from_safetensors(x), random_tower(x))

    # The fingerprint follows the weights: same file -> same, other weights -> different.
    again = VisionTower(VisionConfig(model=TINY_VIT, pretrained=str(path)))
    assert again.fingerprint == from_safetensors.fingerprint
    assert again.weights_hash == vision.weights_sha256(reference.visual)[:16]
    assert TINY_VIT in again.fingerprint and again.weights_hash in again.fingerprint
    assert len({from_safetensors.fingerprint, from_pt.fingerprint, random_tower.fingerprint}) == 3
    scales2 = VisionTower(VisionConfig(model=TINY_VIT, pretrained=str(path), n_scales=2))
    assert scales2.fingerprint != again.fingerprint  # other features, other cache entries


class _NotATensor:
    pass


def test_pickled_objects_are_refused(vit_checkpoint, tmp_path: Path) -> None:
    path, reference = vit_checkpoint
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": reference.state_dict(), "payload": _NotATensor()}, evil)
    with pytest.raises(VisionWeightsError, match="refusing to unpickle"):
        VisionTower(VisionConfig(model=TINY_VIT, pretrained=str(evil)))


def test_checkpoint_of_another_architecture_is_a_clear_error(resnet_checkpoint) -> None:
    path, _ = resnet_checkpoint
    with pytest.raises(VisionWeightsError, match=f"does not hold {TINY_VIT} weights"):
        VisionTower(VisionConfig(model=TINY_VIT, pretrained=str(path)))


@pytest.mark.parametrize("pretrained, message", [
    ("/nonexistent/clip.safetensors", "does not exist"),
    ("bogus-tag", "neither a checkpoint file nor an open_clip tag"),
])
def test_bad_pretrained_values(pretrained: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(VisionWeightsError, match=message):
        VisionTower(VisionConfig(model=TINY_VIT, pretrained=pretrained))
    weird = tmp_path / "weights.onnx"
    weird.write_bytes(b"x")
    with pytest.raises(VisionWeightsError, match="unsupported checkpoint type"):
        VisionTower(VisionConfig(model=TINY_VIT, pretrained=str(weird)))


def test_unknown_and_unsupported_models_fail_before_any_download() -> None:
    with pytest.raises(ValueError, match="unknown open_clip model 'not-a-model'"):
        VisionTower(VisionConfig(model="not-a-model", pretrained=None))
    with pytest.raises(ValueError, match="timm image tower.*supports.*VisionTransformer"):
        VisionTower(VisionConfig(model="ViT-SO400M-14-SigLIP", pretrained="webli"))


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path))  # ~/.cache/clip too
    return tmp_path / "hub"


def test_offline_tag_not_in_cache_fails_fast(empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(VisionWeightsError) as info:
        VisionTower(VisionConfig(model="ViT-B-32", pretrained="openai"))
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "ViT-B-32" in message and "'openai'" in message and "HF_HUB_OFFLINE" in message
    assert "local checkpoint file" in message and "ViT-B-32:/path/to/weights" in message


def test_unreachable_hub_fails_fast(empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(tower_weights, "host_reachable", lambda host: False)
    with pytest.raises(VisionWeightsError, match="huggingface.co cannot be reached.*local checkpoint file"):
        VisionTower(VisionConfig(model="ViT-B-32", pretrained="openai"))


def test_cached_tag_weights_pass_the_offline_check(empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check looks where huggingface_hub keeps files, so cached weights load offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tag_cfg = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    repo_id = tag_cfg["hf_hub"].rstrip("/")
    with pytest.raises(VisionWeightsError):
        tower_weights.require_tag_weights("ViT-B-32", "openai", tag_cfg)
    repo = empty_hub_cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"")
    tower_weights.require_tag_weights("ViT-B-32", "openai", tag_cfg)  # no error
    # OpenAI weights were trained with QuickGELU, which the plain ViT-B-32 config lacks: forced on.
    assert tower_weights.resolve_pretrained(open_clip, "ViT-B-32", "openai") == ("openai", True)


# --- preprocessing ------------------------------------------------------------------------------


def test_preprocess_is_open_clips_eval_transform(vit_checkpoint) -> None:
    path, _ = vit_checkpoint
    tower = VisionTower(VisionConfig(model=TINY_VIT, pretrained=str(path)))
    _, _, reference_preprocess = open_clip.create_model_and_transforms(TINY_VIT, pretrained=None)
    assert tower.image_size == (32, 32)

    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    pixels = tower.preprocess(picture)
    assert pixels.shape == (3, 32, 32)
    torch.testing.assert_close(pixels, reference_preprocess(picture))

    # Normalisation is open_clip's OpenAI mean/std: a flat colour maps to (c/255 - mean) / std.
    flat = tower.preprocess(Image.new("RGB", (40, 40), (10, 128, 250)))
    mean, std = torch.tensor(OPENAI_DATASET_MEAN), torch.tensor(OPENAI_DATASET_STD)
    expected = (torch.tensor([10, 128, 250]) / 255 - mean) / std
    torch.testing.assert_close(flat[:, 16, 16], expected.float(), atol=1e-5, rtol=0)
    assert tower.preprocess_batch([picture, picture]).shape == (2, 3, 32, 32)


# --- projector ----------------------------------------------------------------------------------


def test_projector_shapes_parameters_and_gradients() -> None:
    torch.manual_seed(0)
    projector = Projector(feature_dim=128, dim=48, hidden=16)
    assert sum(p.numel() for p in projector.parameters()) == (128 + 1) * 16 + (16 + 1) * 48
    features = torch.randn(3, 128)
    out = projector(features)
    assert out.shape == (3, 48)
    expected = projector.fc2(torch.nn.functional.gelu(projector.fc1(features)))
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
