"""Where the shipped demo tower lives and how open_clip learns its architecture.

Kept apart from the rest of `mmadapter.demo` (which builds models and adapters) so that the vision tower can
resolve `VisionConfig(model="ShapesCLIP-64", pretrained="shapes-demo")` without importing anything above it.
"""

from __future__ import annotations

from pathlib import Path

TOWER_NAME = "ShapesCLIP-64"
DEMO_TAG = "shapes-demo"  # VisionConfig(model=TOWER_NAME, pretrained=DEMO_TAG): the weights shipped in the package
CONFIG_FILE = Path(__file__).with_name(f"{TOWER_NAME}.json")
WEIGHTS_DIR = Path(__file__).with_name("weights")
TOWER_FILE = WEIGHTS_DIR / f"{TOWER_NAME}.safetensors"
ADAPTER_FILE = WEIGHTS_DIR / "shapes-adapter.safetensors"


def register_tower_config() -> None:
    """Make open_clip know the demo tower's architecture (idempotent)."""
    import open_clip

    if open_clip.get_model_config(TOWER_NAME) is None:
        open_clip.add_model_config(CONFIG_FILE)
