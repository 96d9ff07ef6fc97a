"""Several adapters over one frozen base, chosen per request by name (the app's adapter dropdown).

Adapters are small (~1M parameters) and separate from the base, so a set holds one base and many
adapters; a request passes the chosen one to `MMAdapter.generate/stream(adapter=...)`, and the base's
weights are never copied or written. Prompts, gates, projectors and a V2 adapter's bias, norm and LoRA
tensors are read from the adapter per call (the request's state, `MMAdapter.adapter_kv`). Files that fail
to load are recorded in `errors` (and logged), not raised, so one bad file does not take the others down.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapter import Adapter
from .config import VisionConfig
from .interop import PEFT_CONFIG, import_adapter

if TYPE_CHECKING:
    from .model import MMAdapter

log = logging.getLogger(__name__)

NO_ADAPTER = "none — base model"
ADAPTER_SUFFIXES = (".safetensors", ".pth", ".pt")


class AdapterSet:
    def __init__(self, model: MMAdapter, vision: VisionConfig | str | None = None) -> None:
        """vision: where the image tower of adapters trained with that tower model is (`MODEL[:WEIGHTS]`);
        every multimodal adapter gets the tower it was trained with, shared when identical."""
        self.model, self.vision = model, vision
        self._adapters: dict[str, Adapter | None] = {NO_ADAPTER: None}
        self.sources: dict[str, str] = {}
        self.errors: dict[str, str] = {}  # path -> why it did not load

    @classmethod
    def from_paths(cls, model: MMAdapter, paths: Iterable[str | os.PathLike], *, allow_base_mismatch: bool = False,
                   vision: VisionConfig | str | None = None) -> AdapterSet:
        adapters = cls(model, vision)
        for path in paths:
            adapters.try_load(path, allow_base_mismatch=allow_base_mismatch)
        return adapters

    @classmethod
    def from_folder(cls, model: MMAdapter, folder: str | os.PathLike, *, allow_base_mismatch: bool = False,
                    vision: VisionConfig | str | None = None) -> AdapterSet:
        """Every adapter in `folder`: *.safetensors (ours or PEFT), V1 *.pth, PEFT sub-directories."""
        return cls.from_paths(model, adapter_paths(folder), allow_base_mismatch=allow_base_mismatch, vision=vision)

    def add(self, name: str, adapter: Adapter | None, source: str = "") -> None:
        if name in self._adapters:
            raise ValueError(f"an adapter named {name!r} is already in the set (from {self.sources.get(name, '?')})")
        self._adapters[name] = adapter
        self.sources[name] = source

    def load(self, path: str | os.PathLike, name: str | None = None, *, allow_base_mismatch: bool = False) -> str:
        """Load an adapter file of any supported format under `name` (default: the file name); returns the name."""
        path = Path(path)
        name = name or (path.stem if path.is_file() else path.name)
        if name in self._adapters:
            raise ValueError(f"{path}: an adapter named {name!r} is already in the set; pass another name")
        adapter = import_adapter(self.model, path, allow_base_mismatch=allow_base_mismatch, vision=self.vision)
        self.add(name, adapter, str(path))
        return name

    def try_load(self, path: str | os.PathLike, name: str | None = None, *,
                 allow_base_mismatch: bool = False) -> str | None:
        """`load`, recording a failure in `errors` instead of raising; returns the name or None."""
        try:
            return self.load(path, name, allow_base_mismatch=allow_base_mismatch)
        except (ValueError, OSError, RuntimeError) as e:
            self.errors[str(path)] = str(e)
            log.warning("adapter %s not loaded: %s", path, e)
            return None

    def names(self) -> list[str]:
        """NO_ADAPTER first, then the adapters in load order."""
        return list(self._adapters)

    def get(self, name: str | None) -> Adapter | None:
        """The adapter called `name`; None (or NO_ADAPTER) is the base model alone."""
        if name is None:
            return None
        if name not in self._adapters:
            raise ValueError(f"no adapter named {name!r}; loaded: {', '.join(self._adapters)}")
        return self._adapters[name]

    def generate(self, name: str | None, prompt: Any, image: Any = None, **kwargs: Any) -> str | list[str]:
        """`MMAdapter.generate` with the adapter called `name`."""
        return self.model.generate(prompt, image, adapter=self.get(name), **kwargs)

    def stream(self, name: str | None, prompt: str, image: Any = None, **kwargs: Any) -> Iterator[str]:
        """`MMAdapter.stream` with the adapter called `name`."""
        return self.model.stream(prompt, image, adapter=self.get(name), **kwargs)

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)


def adapter_paths(folder: str | os.PathLike) -> list[Path]:
    """The adapters in a folder, sorted: *.safetensors, *.pth / *.pt, PEFT sub-directories."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such adapter directory")
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and _is_adapter(p))


def _is_adapter(path: Path) -> bool:
    if path.is_dir():
        return (path / PEFT_CONFIG).exists()
    return path.suffix in ADAPTER_SUFFIXES
