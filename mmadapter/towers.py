"""What makes two image towers the same, decided in one place, and the towers packaged by name.

Every loader (mmadapter files, V2 checkpoints) and the model's shared towers compare towers with
`is_tower`, so an adapter gets the model's tower, a shared one or a new one by one rule.
Packaged towers (e.g. the demo's ShapesCLIP-64) are registered here by whoever ships them, so the
tower resolves `VisionConfig(model=NAME, pretrained=TAG)` without importing the package that ships it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import SELF_CONTAINED_TOWERS, VisionConfig


def canonical_name(model_name: str) -> str:
    """open_clip accepts 'ViT-L/14' for 'ViT-L-14'; schema names ('hf-hub:org/repo') keep their slashes."""
    if model_name.startswith(SELF_CONTAINED_TOWERS):
        return model_name
    return model_name.replace("/", "-")


def same_model(a: str, b: str) -> bool:
    """Does a tower given by the user name the file's tower model? Self-contained towers (local-dir:,
    hf-hub:) are named by where they are, so any of them may stand for another (the weights hash decides)."""
    if a.startswith(SELF_CONTAINED_TOWERS) and b.startswith(SELF_CONTAINED_TOWERS):
        return True
    return canonical_name(a) == canonical_name(b)


def tower_key(config: VisionConfig) -> tuple:
    """The identity of the features a tower config gives: equal keys, equal features.

    The features: the model, what is read (M global scales for the MLP, one layer's tokens for the token
    projectors), the projector kind and the channel order. The weights: their hash once known (a built
    tower, a file trained over one), else where they come from and the seed of random ones.
    """
    read = ("scales", config.n_scales) if config.projector == "mlp" else ("tokens", config.token_depth)
    weights = ("sha256", config.weights_hash[:16]) if config.weights_hash else ("source", config.pretrained,
                                                                                 config.seed)
    return canonical_name(config.model), config.projector, config.bgr, read, weights


def is_tower(tower: Any, want: VisionConfig) -> bool:
    """Is the built `tower` the one `want` names? Without a weights hash in `want`, its weights must come
    from the same place (and seed); with one, any place holding those weights will do."""
    have = tower.config if want.weights_hash else dataclasses.replace(tower.config, weights_hash=None)
    return tower_key(have) == tower_key(want)


@dataclass(frozen=True)
class PackagedTower:
    """A tower shipped inside a package: open_clip learns its architecture from `config_file`, and
    `VisionConfig(model=name, pretrained=tag)` reads the weights in `weights_file`."""

    name: str
    tag: str
    config_file: Path
    weights_file: Path


_PACKAGED: dict[str, PackagedTower] = {}


def register_packaged_tower(tower: PackagedTower) -> None:
    """Make a shipped tower known by name (idempotent; registering another tower under a taken name fails)."""
    known = _PACKAGED.setdefault(tower.name, tower)
    if known != tower:
        raise ValueError(f"a packaged tower named {tower.name!r} is already registered ({known}); "
                         "give the new one another name")


def packaged_towers() -> list[PackagedTower]:
    return list(_PACKAGED.values())


def packaged_tower(name: str) -> PackagedTower | None:
    return _PACKAGED.get(name)
