"""The shipped demo: a small CLIP trained on the generated shapes world and an adapter that reads it.

    import mmadapter
    model = mmadapter.load_demo()            # SmolLM2-135M-Instruct + ShapesCLIP-64 + the shapes adapter
    model.generate("What color is this shape?", image="red_circle.png")   # -> "red" (mmadapter/app/examples/)

The tower knows only the shapes world (coloured circles, squares and triangles on a light
background); for real photographs use a real CLIP and an adapter trained with it. Both files are
rebuilt from scratch by `make demo-weights` (mmadapter.demo.build).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter_file import AdapterFileError
from .registry import ADAPTER_FILE, DEMO_TAG, TOWER_FILE, TOWER_NAME, register_tower_config

if TYPE_CHECKING:
    from ..adapter_set import AdapterSet
    from ..model import MMAdapter

DEMO_ADAPTER_NAME = "shapes-demo"
REBUILD = "rebuild them with `make demo-weights` or reinstall mmadapter"

STATUS_NOTE = (
    f"ℹ️ **Demo tower:** `{TOWER_NAME}` knows only the generated shapes world (red, green, blue, orange, yellow "
    "and gray circles, squares and triangles on a light background); it cannot describe photographs. For real "
    "images start the app with a real CLIP, `--vision ViT-L-14:openai` (or `--vision MODEL:/path/weights.safetensors`), "
    "and put an adapter trained with that tower in `--adapters-dir`."
)

__all__ = ["ADAPTER_FILE", "DEMO_ADAPTER_NAME", "DEMO_TAG", "TOWER_FILE", "TOWER_NAME", "DemoFileError",
           "add_demo_adapter", "load_demo", "register_tower_config"]


class DemoFileError(AdapterFileError):
    """A shipped demo file is missing or unreadable; the message names it."""


def load_demo(base: str | None = None, adapter: str | Path | None = None, tower: str | Path | None = None,
              **base_options: Any) -> MMAdapter:
    """The embedded base with the shapes-world tower and the demo adapter active; `base_options` (dtype,
    device) go to `load_base`."""
    from ..config import VisionConfig
    from ..model import load_base
    from ..adapter_file import load_adapter
    from ..vision import VisionWeightsError

    tower_file, adapter_file = Path(tower or TOWER_FILE), Path(adapter or ADAPTER_FILE)
    for path, what in ((tower_file, "demo vision tower"), (adapter_file, "demo adapter")):
        if not path.is_file():
            raise DemoFileError(f"the {what} file {path} is missing; {REBUILD}")
    model = load_base(base, **base_options) if base else load_base(**base_options)
    try:
        model.attach_vision(VisionConfig(model=TOWER_NAME, pretrained=str(tower_file)))
    except (VisionWeightsError, RuntimeError, OSError, ValueError) as e:
        raise DemoFileError(f"the demo vision tower file {tower_file} cannot be loaded ({e}); {REBUILD}") from e
    try:
        load_adapter(model, adapter_file)
    except AdapterFileError as e:
        raise DemoFileError(f"the demo adapter file {adapter_file} cannot be loaded ({e}); {REBUILD}") from e
    return model


def add_demo_adapter(adapters: AdapterSet) -> tuple[str | None, list[str]]:
    """Put the demo adapter into an app's adapter set; it brings its own tower (the shipped one).

    Returns (the name of the adapter that answers image questions or None, lines for the status).
    """
    missing = [p.name for p in (TOWER_FILE, ADAPTER_FILE) if not p.is_file()]
    if missing:
        return None, [f"⚠️ The demo files {', '.join(missing)} are missing; {REBUILD}."]
    name = adapters.try_load(ADAPTER_FILE, DEMO_ADAPTER_NAME)
    return name, [STATUS_NOTE] if name else []
