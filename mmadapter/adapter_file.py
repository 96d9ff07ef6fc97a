"""The mmadapter adapter file: one .safetensors holding the trainable tensors and a JSON header.

Layout (format "mmadapter-adapter", version 1): the adapter's state dict, every name checked on load
  tensors   prompts [L, K, C], gates [L, H] (or [L, 1]), gate_scale [L] (V2 LoRA files),
            tuning.* (V2: per-layer biases, LoRA A/B and tuned norm weights, tuning.py),
            projector.* (multimodal: V1's fc1/fc2, the visual query's blocks, or spatial tokens' norm,
            fc1, fc2 and position [K, C])
  metadata  safetensors' string map with one key, "mmadapter", a JSON object:
    format, version          "mmadapter-adapter", 1
    adapter                  AdapterConfig (n_prompts, n_layers, ...)
    base                     {name, fingerprint, config: LlamaConfig}: the base it was trained on
    vision                   VisionConfig of the tower the adapter was trained with (not necessarily the
                             model's) and its own projector fields, or null; feature_dim
    template                 prompt template used in training ("alpaca", "chat", ...)
    training                 free-form summary (steps, loss, data, ...)
Readers accept any version-1 file and ignore keys they do not know, so newer minor additions load
in older releases; a file with a higher major version is refused with a message to upgrade.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .adapter import Adapter
from .atomic import atomic_save
from .config import AdapterConfig, LlamaConfig, VisionConfig
from .towers import is_tower, same_model

if TYPE_CHECKING:
    from .model import MMAdapter

FORMAT = "mmadapter-adapter"
VERSION = 1
METADATA_KEY = "mmadapter"


class AdapterFileError(ValueError):
    """An adapter file that cannot be used here; the message says why and what to do."""


@dataclass
class AdapterMeta:
    adapter: AdapterConfig
    base_name: str
    base_fingerprint: str
    base_config: LlamaConfig
    vision: VisionConfig | None = None
    feature_dim: int | None = None
    template: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
    version: int = VERSION

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT, "version": self.version, "adapter": self.adapter.to_dict(),
            "base": {"name": self.base_name, "fingerprint": self.base_fingerprint, "config": self.base_config.to_dict()},
            "vision": self.vision.to_dict() if self.vision else None, "feature_dim": self.feature_dim,
            "template": self.template, "training": self.training,
        })

    @classmethod
    def from_json(cls, text: str, source: str) -> AdapterMeta:
        try:
            d = json.loads(text)
            if not isinstance(d, dict):
                raise AdapterFileError(f"{source}: adapter metadata should be a JSON object, found {type(d).__name__}")
            if d.get("format") != FORMAT:
                raise AdapterFileError(f"{source}: not an mmadapter adapter (format {d.get('format')!r})")
            if int(d["version"]) > VERSION:
                raise AdapterFileError(f"{source}: written by a newer mmadapter (format version {d['version']}, "
                                       f"this release reads {VERSION}); upgrade mmadapter")
            base = d["base"]
            return cls(adapter=AdapterConfig.from_dict(d["adapter"]), base_name=base.get("name", ""),
                       base_fingerprint=base.get("fingerprint", ""), base_config=LlamaConfig.from_dict(base["config"]),
                       vision=VisionConfig.from_dict(d["vision"]) if d.get("vision") else None,
                       feature_dim=d.get("feature_dim"), template=d.get("template"),
                       training=d.get("training") or {}, version=int(d["version"]))
        except AdapterFileError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, ArithmeticError, RecursionError) as e:
            raise AdapterFileError(f"{source}: malformed adapter metadata ({type(e).__name__}: {e})") from e


def adapter_meta(model: MMAdapter, adapter: Adapter | None = None, training: dict[str, Any] | None = None) -> AdapterMeta:
    adapter = adapter or model.adapter
    if adapter is None:
        raise ValueError("the model has no adapter to save")
    tower = model.tower_for(adapter)
    vision = getattr(tower, "config", None) if adapter.projector is not None else None
    if vision is not None:  # where the features come from: the tower; how they become tokens: the adapter's own
        own = adapter.vision_config.to_dict() if adapter.vision_config is not None else {}
        vision = VisionConfig.from_dict({**vision.to_dict(), **{k: own[k] for k in PROJECTOR_FIELDS if k in own}})
    if vision is not None and getattr(tower, "weights_hash", None):
        vision = VisionConfig.from_dict({**vision.to_dict(), "weights_hash": tower.weights_hash[:16]})
    return AdapterMeta(adapter=adapter.config, base_name=model.base_name, base_fingerprint=model.base_fingerprint,
                       base_config=model.base.config, vision=vision,
                       feature_dim=getattr(tower, "feature_dim", None) if vision else None,
                       template=adapter.template or model.template, training=training or {})


# VisionConfig fields that shape the projector, not the tower's features: adapters sharing a tower may differ.
PROJECTOR_FIELDS = ("projector_hidden", "spatial_grid", "query_width", "query_depth", "query_heads")


def save_adapter(model: MMAdapter, path: str | os.PathLike, training: dict[str, Any] | None = None,
                 adapter: Adapter | None = None) -> Path:
    """Write the adapter atomically (temp file, fsync, rename); returns the path."""
    from safetensors.torch import save_file

    meta = adapter_meta(model, adapter, training)
    adapter = adapter or model.adapter
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapter.state_dict().items()}
    path = Path(path)
    atomic_save(path, lambda tmp: save_file(tensors, tmp, metadata={METADATA_KEY: meta.to_json()}))
    return path


def read_adapter(path: str | os.PathLike) -> tuple[AdapterMeta, dict[str, torch.Tensor]]:
    """Metadata and tensors of an adapter file, without touching any model."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such adapter file")
    try:
        with safe_open(path, framework="pt") as f:
            header = (f.metadata() or {}).get(METADATA_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except AdapterFileError:
        raise
    except Exception as e:
        raise AdapterFileError(f"{path}: cannot read the adapter ({type(e).__name__}: {e}); the file is truncated, "
                               "corrupt or not a safetensors file") from e
    if header is None:
        raise AdapterFileError(f"{path}: a safetensors file without mmadapter metadata; to import a PEFT or "
                               "LLaMA-Adapter V1 file use `mmadapter convert`")
    return AdapterMeta.from_json(header, str(path)), tensors


def load_adapter(model: MMAdapter, path: str | os.PathLike, *, activate: bool = True,
                 allow_base_mismatch: bool = False, vision: VisionConfig | str | None = None) -> Adapter:
    """Build the adapter stored at `path` over `model`'s base, with the image tower it was trained with.

    The tower comes from the file's vision config; `vision` (a VisionConfig or `MODEL[:WEIGHTS]`) points
    at it elsewhere, e.g. moved weights, for adapters trained with that tower model. The model's own tower is used when it is that tower;
    otherwise the adapter gets its own, shared with other adapters trained over the same tower. A tower
    whose weights differ from the ones the adapter was trained with is refused.
    """
    meta, tensors = read_adapter(path)
    check_base(meta, model, str(path), allow_base_mismatch)
    tower = _tower_for(model, meta, str(path), vision) if meta.vision is not None else None
    adapter = build_adapter(meta, tensors, str(path)).to(model.device)
    model.adopt_tower(adapter, tower)
    if activate:
        model.use_adapter(adapter)
    return adapter


def build_adapter(meta: AdapterMeta, tensors: dict[str, torch.Tensor], source: str) -> Adapter:
    """An Adapter from a file's metadata and tensors (on CPU), checking every name, shape and value.

    The expected shapes come from a meta-device build, so metadata claiming a huge adapter allocates nothing.
    """
    try:
        with torch.device("meta"):
            shell = Adapter(meta.adapter, meta.base_config, meta.vision, meta.feature_dim)
    except (ValueError, TypeError, RuntimeError, ArithmeticError) as e:  # e.g. a negative or non-integer size
        raise AdapterFileError(f"{source}: the adapter metadata describes no valid adapter ({e})") from e
    expected = {k: tuple(v.shape) for k, v in shell.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != got:
        raise AdapterFileError(f"{source}: tensors {got} do not match the adapter config, which expects {expected}")
    bad = [k for k, v in tensors.items() if not v.is_floating_point() or not bool(torch.isfinite(v).all())]
    if bad:
        raise AdapterFileError(f"{source}: tensors {', '.join(bad)} are not finite floating-point values (NaN, "
                               "infinity or integers); the training diverged or the file is corrupt")
    adapter = Adapter(meta.adapter, meta.base_config, meta.vision, meta.feature_dim)
    adapter.load_state_dict(tensors, strict=True)
    adapter.template = meta.template
    return adapter


def check_base(meta: AdapterMeta, model: MMAdapter, source: str, allow_mismatch: bool = False) -> None:
    ours, theirs = model.base.config, meta.base_config
    shape = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")
    if any(getattr(ours, k) != getattr(theirs, k) for k in shape):
        raise AdapterFileError(
            f"{source}: trained on base {meta.base_name!r} ({', '.join(f'{k}={getattr(theirs, k)}' for k in shape)}) "
            f"but this base {model.base_name!r} has {', '.join(f'{k}={getattr(ours, k)}' for k in shape)}; "
            "load it over the base it was trained on")
    if (not allow_mismatch and meta.base_fingerprint and model.base_fingerprint
            and meta.base_fingerprint != model.base_fingerprint):
        raise AdapterFileError(
            f"{source}: trained on base {meta.base_name!r} (fingerprint {meta.base_fingerprint}) but this base "
            f"{model.base_name!r} has fingerprint {model.base_fingerprint}: different weights. Load it over the "
            "base it was trained on, or pass allow_base_mismatch=True (--allow-base-mismatch) if this is the "
            "same model in another format or quantisation")


def _tower_for(model: MMAdapter, meta: AdapterMeta, source: str, given: VisionConfig | str | None):
    """The tower `meta` was trained with (the model's shared one of that identity), at the place `given`
    names when its weights moved."""
    want = meta.vision
    given = VisionConfig.from_spec(given) if isinstance(given, str) else given
    if given is not None and same_model(given.model, want.model):  # where the tower is now; the file's shape
        want = VisionConfig.from_dict({**want.to_dict(), "model": given.model, "pretrained": given.pretrained})
    try:
        tower = model.shared_tower(want)
    except (ValueError, OSError, RuntimeError) as e:
        raise AdapterFileError(
            f"{source}: cannot build the image tower this adapter was trained with ({want.spec}): {e}. "
            f"If the tower's weights moved, point at them: --vision {want.model}:/path/to/weights "
            "(vision='MODEL:WEIGHTS' in Python)") from e
    if not is_tower(tower, want) or tower.feature_dim != meta.feature_dim:
        raise AdapterFileError(
            f"{source}: trained with the image tower {want.spec} ({want.n_scales} scales, weights "
            f"{want.weights_hash}) but the tower built from it has weights {tower.weights_hash[:16]} "
            f"({tower.feature_dim} features): other weights than in training. Point at the tower's original "
            f"weights with --vision {want.model}:/path/to/weights (vision='MODEL:WEIGHTS' in Python)")
    return tower
