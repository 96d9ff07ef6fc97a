"""One rule for which towers are the same (towers.is_tower), and packaged towers known by name."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from mmadapter.config import VisionConfig
from mmadapter.towers import PackagedTower, is_tower, register_packaged_tower, same_model, tower_key

HASH = "0123456789abcdef"


def built(config: VisionConfig, weights_hash: str = HASH) -> SimpleNamespace:
    """What a built tower exposes to the rule: its config, with the hash of the weights it loaded."""
    return SimpleNamespace(config=dataclasses.replace(config, weights_hash=weights_hash))


def test_a_known_weights_hash_decides_wherever_the_weights_are():
    tower = built(VisionConfig(model="ViT-B/32", pretrained="/old/place.safetensors"))
    assert is_tower(tower, VisionConfig(model="ViT-B-32", pretrained="/new/place.safetensors", weights_hash=HASH))
    assert not is_tower(tower, VisionConfig(model="ViT-B-32", pretrained="/old/place.safetensors",
                                            weights_hash="fedcba9876543210"))


def test_without_a_hash_the_weights_must_come_from_the_same_place_and_seed():
    tower = built(VisionConfig(model="ViT-B-32", pretrained=None, seed=1))
    assert is_tower(tower, VisionConfig(model="ViT-B-32", pretrained=None, seed=1))
    assert not is_tower(tower, VisionConfig(model="ViT-B-32", pretrained=None, seed=2))
    assert not is_tower(tower, VisionConfig(model="ViT-B-32", pretrained="openai", seed=1))


def test_what_the_tower_reads_is_part_of_its_identity():
    mlp = VisionConfig(model="ViT-B-32", weights_hash=HASH)
    assert tower_key(mlp) != tower_key(dataclasses.replace(mlp, n_scales=2))
    assert tower_key(mlp) != tower_key(dataclasses.replace(mlp, bgr=True))
    assert tower_key(mlp) != tower_key(dataclasses.replace(mlp, projector="visual-query"))
    assert tower_key(mlp) != tower_key(dataclasses.replace(mlp, model="ViT-L-14"))
    tokens = dataclasses.replace(mlp, projector="spatial", token_depth=6)
    assert tower_key(tokens) != tower_key(dataclasses.replace(tokens, token_depth=12))
    # what a tower does not read does not tell towers apart: scales for token projectors
    # and the projector's own shape
    assert tower_key(tokens) == tower_key(dataclasses.replace(tokens, n_scales=2, spatial_grid=3))
    assert tower_key(mlp) == tower_key(dataclasses.replace(mlp, projector_hidden=16))


def test_same_model_spellings():
    assert same_model("ViT-L/14", "ViT-L-14") and not same_model("ViT-L-14", "ViT-B-32")
    assert same_model("hf-hub:org/a", "local-dir:/b")  # self-contained towers: the weights hash decides
    assert tower_key(VisionConfig(model="hf-hub:org/a")) != tower_key(VisionConfig(model="hf-hub:org-a"))


def test_a_name_taken_by_another_packaged_tower_is_refused(tmp_path: Path):
    first = PackagedTower("mmtest-packaged", "tag", tmp_path / "a.json", tmp_path / "a.safetensors")
    register_packaged_tower(first)
    register_packaged_tower(first)  # the same one again: nothing happens
    with pytest.raises(ValueError, match="'mmtest-packaged' is already registered"):
        register_packaged_tower(dataclasses.replace(first, weights_file=tmp_path / "b.safetensors"))


def test_the_demo_tower_resolves_with_only_the_tower_imported():
    """VisionConfig(model="ShapesCLIP-64", pretrained="shapes-demo") reads the shipped weights in a process
    that imports the tower module and nothing of the demo by hand."""
    script = """
import sys
from mmadapter.config import VisionConfig
from mmadapter.vision import VisionTower, weights_sha256
from safetensors.torch import load_file
from mmadapter.demo.registry import TOWER_FILE
tower = VisionTower(VisionConfig(model="ShapesCLIP-64", pretrained="shapes-demo"))
print(tower.fingerprint)
shipped = load_file(TOWER_FILE)
visual = {k[len("visual."):]: v for k, v in shipped.items() if k.startswith("visual.")}
assert visual and all(tower.visual.state_dict()[k].equal(v) for k, v in visual.items())
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ShapesCLIP-64:m4:")
