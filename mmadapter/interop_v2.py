"""LLaMA-Adapter V2 multimodal checkpoints (OpenGVLab/LLaMA-Adapter, `llama_adapter_v2_multimodal7b`):
BIAS-7B, LORA-BIAS-7B, CAPTION-7B, LORA-BIAS-7B-v21, read and written without loss.

A released file is a .pth holding {"model": tensors, "config": {"w_bias", "w_lora", "lora_rank"}}; the
base LLaMA comes separately (a Meta, Hugging Face or GGUF checkpoint). Tensor names and their home here:
  adapter_query.weight                 [L*K, C]   prompts [L, K, C] (row block i = i-th adapted layer)
  llama.layers.{i}.attention.gate      [1,H,1,1]  gates [L, H] (raw, tanh at run time); every layer has one,
                                                  the bottom n_layers - L are never used (exactly 0)
  llama.layers.{i}.attention.new_gate  [1,1,1,1]  gate_scale [L] (LoRA files; unused ones stay 1)
  llama.layers.{i}.attention.{wq,wo}.bias, feed_forward.{w1,w2,w3}.bias   tuning.layers.{i}.bias.*
  llama.layers.{i}.{attention,feed_forward}.lora_{w}_l1/_l2.weight        tuning.layers.{i}.lora_a/lora_b.*
  llama.layers.{i}.attention_norm.weight, ffn_norm.weight, llama.norm.weight   tuning norms
  clip_proj, clip_proj_norm, visual_query.weight, visual_blocks.*, visual_proj, visual_proj_norm   projector.*
wq's bias and the LoRA B of wq / wk are stored in Meta's interleaved RoPE row order, like the base's
wq / wk: they are reordered to the half-split layout of llama.py on import and back on export.
The image tower is OpenAI CLIP ViT-L/14 (open_clip `ViT-L-14` with the 'openai' weights, QuickGELU),
all of its last layer's tokens; the reference reads images with OpenCV and never converts BGR to RGB,
so these checkpoints are run on channel-swapped images by default (VisionConfig.bgr).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .adapter import Adapter, variant_name
from .adapter_file import AdapterFileError
from .atomic import atomic_save
from .config import AdapterConfig, LlamaConfig, VisionConfig
from .safe_io import load_torch_weights
from .gguf_tensor import half_to_interleaved, interleaved_to_half

if TYPE_CHECKING:
    from .model import MMAdapter

log = logging.getLogger(__name__)

TEMPLATE = "alpaca"  # the reference's format_prompt, with the "### Input:" variant
SAMPLING = {"temperature": 0.1, "top_p": 0.75}  # the reference demo's defaults
TOWER = VisionConfig(model="ViT-L-14", pretrained="openai", projector="visual-query", query_width=768,
                     query_depth=8, query_heads=16, bgr=True)
CONFIG_KEYS = ("w_bias", "w_lora", "lora_rank")
_LAYER = re.compile(r"llama\.layers\.(\d+)\.")


class V2Error(AdapterFileError):
    """A file that is not a usable LLaMA-Adapter V2 checkpoint; the message says what is wrong."""


def is_v2(obj: Any) -> bool:
    """Whether a loaded .pth object has the V2 layout ({"model": {...visual_query...}, "config": {...}})."""
    return (isinstance(obj, dict) and isinstance(obj.get("model"), dict) and isinstance(obj.get("config"), dict)
            and "visual_query.weight" in obj["model"])


def read_v2(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config, tensors) of a V2 .pth, loaded weights-only and memory-mapped (nothing is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise V2Error(f"{path}: no such file")
    try:
        obj = load_torch_weights(path)
    except Exception as e:
        raise V2Error(f"{path}: cannot read it as a weights-only PyTorch file ({type(e).__name__}); it is corrupt "
                      "or holds more than tensors and plain values (nothing is unpickled)") from e
    if not is_v2(obj):
        raise V2Error(f"{path}: not a LLaMA-Adapter V2 checkpoint (expected {{'model': {{..., "
                      "'visual_query.weight'}}, 'config': {...}}})")
    config, tensors = obj["config"], obj["model"]
    bad = [k for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, Tensor)
           or not v.is_floating_point()]
    if bad:
        raise V2Error(f"{path}: entries {bad[:5]} of 'model' are not floating-point tensors")
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise V2Error(f"{path}: unknown config keys {unknown}; known: {', '.join(CONFIG_KEYS)}")
    return config, tensors


def describe_v2(path: str | os.PathLike) -> dict[str, Any]:
    """What a V2 file holds, for `mmadapter info` (no base needed)."""
    config, tensors = read_v2(path)
    adapter, vision = v2_configs(config, tensors, source=str(path))
    layers = sorted({int(m.group(1)) for k in tensors if (m := _LAYER.match(k))})
    n_base = layers[-1] + 1 if layers else adapter.n_layers
    counts: dict[str, int] = {}
    for name, t in tensors.items():
        part = ("prompts" if name == "adapter_query.weight" else "gates" if name.endswith("gate")
                else "lora" if ".lora_" in name else "norms" if name.startswith("llama.") and "norm" in name
                else "bias" if name.startswith("llama.") else "projector")
        counts[part] = counts.get(part, 0) + t.numel()
    counts["total"] = sum(counts.values())
    problems = tensor_problems(tensors, expected_shapes(adapter, vision, implied_base(tensors, str(path))))
    return {
        "format": variant_name(adapter, vision),
        "tensor_check": {k: v for k, v in problems.items() if v} or "ok: every name and shape as the variant needs",
        "config": config,
        "adapter": {"n_prompts": adapter.n_prompts, "n_layers": adapter.n_layers,
                    "layers": f"{n_base - adapter.n_layers}-{n_base - 1}", "dim": tensors["adapter_query.weight"].shape[1],
                    "image_tokens": f"{adapter.n_prompts}, one per prompt",
                    "visual_query": f"{vision.query_depth} blocks of width {vision.query_width} over CLIP tokens of "
                                    f"width {vision.clip_dim}"},
        "parameters": counts,
        "tower": f"{TOWER.model} '{TOWER.pretrained}' (every token of the last layer); images channel-swapped "
                 "(BGR) like the reference's",
        "template": TEMPLATE,
        "reference_sampling": SAMPLING,
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
    }


# ----------------------------------------------------------------------------------------------
# Shapes and names


def v2_configs(config: dict[str, Any], tensors: dict[str, Tensor], vision: VisionConfig | None = None,
               source: str = "V2 checkpoint") -> tuple[AdapterConfig, VisionConfig]:
    """Adapter and tower configs from a file: K, L, widths and depth from the tensors, the rest (tower,
    the visual blocks' head count, which is not stored: 16 in the released files) from `vision` or TOWER."""
    try:
        k, width = tensors["visual_query.weight"].shape
        rows = tensors["adapter_query.weight"].shape[0]
        clip_dim = tensors["clip_proj.weight"].shape[1]
    except (KeyError, ValueError) as e:
        raise V2Error(f"{source}: missing or malformed visual_query / adapter_query / clip_proj ({e})") from e
    if rows % k:
        raise V2Error(f"{source}: adapter_query has {rows} rows, not a multiple of the {k} visual queries")
    depth = len({m.group(1) for key in tensors if (m := re.match(r"visual_blocks\.(\d+)\.", key))})
    lora_rank = int(config.get("lora_rank", 16)) if config.get("w_lora") else 0
    adapter = AdapterConfig(n_prompts=k, n_layers=rows // k, bias_tuning=bool(config.get("w_bias", False)),
                            lora_rank=lora_rank, new_gate=bool(config.get("w_lora", False)))
    vision = dataclasses.replace(vision or TOWER, projector="visual-query", clip_dim=clip_dim, query_width=width,
                                 query_depth=depth)
    return adapter, vision


def _names(n_base_layers: int, first: int) -> dict[str, str]:
    """Our adapter's parameter names -> the V2 names (without the bottom layers' unused gates)."""
    names = {}
    for i in range(n_base_layers):
        t, p = f"tuning.layers.{i}", f"llama.layers.{i}"
        for w in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
            part = "attention" if w in ("wq", "wk", "wv", "wo") else "feed_forward"
            names[f"{t}.bias.{w}"] = f"{p}.{part}.{w}.bias"
            names[f"{t}.lora_a.{w}"] = f"{p}.{part}.lora_{w}_l1.weight"
            names[f"{t}.lora_b.{w}"] = f"{p}.{part}.lora_{w}_l2.weight"
        names[f"{t}.attention_norm"] = f"{p}.attention_norm.weight"
        names[f"{t}.ffn_norm"] = f"{p}.ffn_norm.weight"
    names["tuning.norm"] = "llama.norm.weight"
    names["projector.visual_query"] = "visual_query.weight"
    return names


def _v2_name(ours: str, names: dict[str, str]) -> str:
    if ours in names:
        return names[ours]
    if ours.startswith("projector."):
        return ours.removeprefix("projector.")  # clip_proj.*, visual_blocks.*, visual_proj.*: the same names
    raise KeyError(ours)


def _permuted(v2_name: str, base: LlamaConfig) -> int | None:
    """Head count for the rows stored in Meta's interleaved RoPE order, else None."""
    if v2_name.endswith(("attention.wq.bias", "attention.lora_wq_l2.weight")):
        return base.n_heads
    if v2_name.endswith("attention.lora_wk_l2.weight"):
        return base.n_kv_heads
    return None


def _reorder(t: Tensor, heads: int | None, to_half: bool) -> Tensor:
    if heads is None:
        return t
    w = t.reshape(t.shape[0], -1)  # a bias [out] is one column
    w = interleaved_to_half(w, heads) if to_half else half_to_interleaved(w, heads)
    return w.reshape(t.shape)


def expected_shapes(adapter: AdapterConfig, vision: VisionConfig, base: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every V2 tensor name and shape a checkpoint of these configs holds, from a meta-device build."""
    with torch.device("meta"):
        shell = Adapter(adapter, base, vision, vision.clip_dim)
    names = _names(base.n_layers, shell.first_layer)
    shapes: dict[str, tuple[int, ...]] = {"adapter_query.weight": (shell.n_layers * adapter.n_prompts, base.dim)}
    for name, t in shell.state_dict().items():
        if name not in ("prompts", "gates", "gate_scale"):
            shapes[_v2_name(name, names)] = tuple(t.shape)
    for i in range(base.n_layers):
        shapes[f"llama.layers.{i}.attention.gate"] = (1, base.n_heads, 1, 1)
        if adapter.new_gate:
            shapes[f"llama.layers.{i}.attention.new_gate"] = (1, 1, 1, 1)
    return shapes


def tensor_problems(tensors: dict[str, Tensor], expected: dict[str, tuple[int, ...]]) -> dict[str, list[str]]:
    """Missing, unexpected and misshapen tensor names ("name [shape] (expected [shape])"), each sorted."""
    return {
        "missing": sorted(set(expected) - set(tensors), key=_natural),
        "unexpected": sorted(set(tensors) - set(expected), key=_natural),
        "misshapen": [f"{k} {list(tensors[k].shape)} (expected {list(expected[k])})"
                      for k in sorted(expected, key=_natural) if k in tensors and tuple(tensors[k].shape) != expected[k]],
    }


def implied_base(tensors: dict[str, Tensor], source: str) -> LlamaConfig:
    """The base shape a V2 file implies by itself (layers from its per-layer gates, width from adapter_query,
    heads from a gate, the FFN and kv widths from tuned tensors where it has them): enough to check its
    names, and its shapes against each other, without the base."""
    gates = {int(m.group(1)): t for k, t in tensors.items()
             if (m := re.fullmatch(r"llama\.layers\.(\d+)\.attention\.gate", k))}
    if "adapter_query.weight" not in tensors or not gates or tensors["adapter_query.weight"].dim() != 2:
        raise V2Error(f"{source}: no adapter_query.weight [L*K, C] or no llama.layers.*.attention.gate; "
                      "not a LLaMA-Adapter V2 checkpoint")
    dim, heads = tensors["adapter_query.weight"].shape[1], gates[max(gates)].numel()
    ffn = next((t.shape[0] for k, t in sorted(tensors.items()) if k.endswith(("feed_forward.w1.bias",
                                                                              "lora_w1_l2.weight"))), 4 * dim)
    kv = next((t.shape[0] for k, t in sorted(tensors.items()) if k.endswith("lora_wk_l2.weight")), dim)
    head_dim = dim // heads if heads and dim % heads == 0 else 0
    n_kv = kv // head_dim if head_dim and kv % head_dim == 0 and heads % max(kv // head_dim, 1) == 0 else heads
    try:
        return LlamaConfig(name="implied by the V2 file", dim=dim, n_layers=max(gates) + 1, n_heads=heads,
                           n_kv_heads=n_kv, ffn_dim=ffn)
    except ValueError as e:
        raise V2Error(f"{source}: inconsistent shapes ({e})") from e


def check_tensors(tensors: dict[str, Tensor], expected: dict[str, tuple[int, ...]], source: str,
                  against: str = "for this base") -> None:
    """Refuse missing, unexpected or wrongly shaped tensors, naming them."""
    found = tensor_problems(tensors, expected)
    missing, unexpected, wrong = found["missing"], found["unexpected"], found["misshapen"]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:8])}"
                        f"{' ...' if len(unexpected) > 8 else ''}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape: {'; '.join(wrong[:8])}")
    if problems:
        advice = ("Load it over the base it was trained on (LLaMA-7B for the released files)"
                  if against == "for this base" else "The file is damaged or not a released V2 layout")
        raise V2Error(f"{source}: does not match a LLaMA-Adapter V2 checkpoint {against}: {'; '.join(problems)}. "
                      f"{advice}")


def _natural(key: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


# ----------------------------------------------------------------------------------------------
# Conversion


def v2_to_state(tensors: dict[str, Tensor], shell: Adapter, base: LlamaConfig, source: str) -> dict[str, Tensor]:
    """Our adapter state dict from V2 tensors (names mapped, Meta row order undone)."""
    first, n, k = shell.first_layer, shell.n_layers, shell.config.n_prompts
    names = _names(base.n_layers, first)
    state = {"prompts": tensors["adapter_query.weight"].float().reshape(n, k, base.dim),
             "gates": torch.stack([tensors[f"llama.layers.{i}.attention.gate"].float().reshape(-1)
                                   for i in range(first, base.n_layers)])}
    if shell.gate_scale is not None:
        state["gate_scale"] = torch.stack([tensors[f"llama.layers.{i}.attention.new_gate"].float().reshape(())
                                           for i in range(first, base.n_layers)])
    for name in shell.state_dict():
        if name not in state:
            v2 = _v2_name(name, names)
            state[name] = _reorder(tensors[v2].float(), _permuted(v2, base), to_half=True)
    def changed(name: str, initial: float) -> bool:
        t = tensors.get(name)
        return t is not None and not t.is_meta and bool(t.ne(initial).any())

    unused = [i for i in range(first) if changed(f"llama.layers.{i}.attention.gate", 0.0)
              or changed(f"llama.layers.{i}.attention.new_gate", 1.0)]
    if unused:
        log.warning("%s: layers %s are not adapted but their gate / new_gate differ from the initial 0 / 1; "
                    "the reference never uses them either, and exporting writes 0 / 1 back", source, unused)
    return state


def state_to_v2(adapter: Adapter) -> dict[str, Tensor]:
    """The V2 tensors of one of our V2 adapters (the inverse of v2_to_state)."""
    base, first = adapter.base_config, adapter.first_layer
    names = _names(base.n_layers, first)
    state = {k: v.detach().float().cpu() for k, v in adapter.state_dict().items()}
    out = {"adapter_query.weight": state.pop("prompts").reshape(-1, base.dim).contiguous()}
    gates, scale = state.pop("gates"), state.pop("gate_scale", None)
    for i in range(base.n_layers):
        j = i - first
        out[f"llama.layers.{i}.attention.gate"] = (gates[j] if j >= 0 else torch.zeros(base.n_heads)).reshape(
            1, -1, 1, 1).clone()
        if scale is not None:
            out[f"llama.layers.{i}.attention.new_gate"] = (scale[j] if j >= 0 else torch.ones(())).reshape(
                1, 1, 1, 1).clone()
    for name, t in state.items():
        v2 = _v2_name(name, names)
        out[v2] = _reorder(t, _permuted(v2, base), to_half=False).contiguous()
    return out


def adapter_from_v2(config: dict[str, Any], tensors: dict[str, Tensor], base: LlamaConfig, feature_dim: int | None,
                    vision: VisionConfig | None = None, source: str = "V2 checkpoint") -> Adapter:
    """Our Adapter from a V2 file's config and tensors, every name and shape checked first.

    feature_dim: the tower's (every token, flattened); None builds the adapter without a tower (export).
    """
    adapter_config, vision = v2_configs(config, tensors, vision, source)
    try:
        check_tensors(tensors, expected_shapes(adapter_config, vision, base), source)
        adapter = Adapter(adapter_config, base, vision, feature_dim or vision.clip_dim)
    except V2Error:
        raise
    except ValueError as e:
        raise V2Error(f"{source}: {e}") from e
    adapter.load_state_dict(v2_to_state(tensors, adapter, base, source), strict=True)
    adapter.template = TEMPLATE
    return adapter


def load_v2(model: MMAdapter, path: str | os.PathLike, vision: VisionConfig | str | None = None) -> Adapter:
    """A V2 .pth as an Adapter over `model`'s base, with the all-token tower it reads (not activated).

    vision: where that tower is (`MODEL[:WEIGHTS]` or a VisionConfig; default TOWER: OpenAI CLIP ViT-L/14,
    the released 16-head visual blocks, images channel-swapped like the reference's). The model's tower is
    used when it is that one; otherwise the adapter gets its own, shared with other adapters over it.
    """
    config, tensors = read_v2(path)
    _, want = v2_configs(config, tensors, tower_config(vision), str(path))
    try:
        tower = model.shared_tower(want)
    except (ValueError, OSError, RuntimeError) as e:
        raise V2Error(f"{path}: cannot build its image tower ({want.spec}): {e}. If the weights are elsewhere, "
                      f"point at them: --vision {want.model}:/path/to/weights") from e
    if tower.config.clip_dim != want.clip_dim:
        raise V2Error(f"{path}: its clip_proj reads tokens of width {want.clip_dim} but the tower {want.model} "
                      f"gives {tower.config.clip_dim}; use the tower it was trained with (CLIP ViT-L/14 for the "
                      "releases)")
    adapter = adapter_from_v2(config, tensors, model.base.config, tower.feature_dim, tower.config, str(path))
    adapter = adapter.to(model.device)
    model.adopt_tower(adapter, tower)
    return adapter


def import_v2_without_tower(model: MMAdapter, path: str | os.PathLike,
                            vision: VisionConfig | str | None = None) -> tuple[Adapter, int]:
    """(adapter, the tower's feature_dim) for converting a V2 file: names and shapes checked against the
    base, the tower's size read from its open_clip config. No tower is built and no CLIP weights are read:
    a conversion copies tensors, so it works offline."""
    config, tensors = check_v2_file(path)
    _, want = v2_configs(config, tensors, tower_config(vision), str(path))
    feature_dim = tower_feature_dim(want, str(path))
    adapter = adapter_from_v2(config, tensors, model.base.config, feature_dim, want, str(path))
    return adapter, feature_dim


def save_v2_import(model: MMAdapter, adapter: Adapter, feature_dim: int, path: str | os.PathLike,
                   training: dict[str, Any]) -> Path:
    """Write an adapter from import_v2_without_tower as an mmadapter file: like save_adapter, with the tower
    the V2 file names (no weights hash: the .pth records none, so any weights of that model load it)."""
    from safetensors.torch import save_file

    from .adapter_file import METADATA_KEY, adapter_meta

    meta = dataclasses.replace(adapter_meta(model, adapter, training), vision=adapter.vision_config,
                               feature_dim=feature_dim)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapter.state_dict().items()}
    path = Path(path)
    atomic_save(path, lambda tmp: save_file(tensors, tmp, metadata={METADATA_KEY: meta.to_json()}))
    return path


def check_v2_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config, tensors) of a V2 file whose names and shapes agree with each other (the base it implies):
    a file with an unexpected, missing or misshapen tensor is refused by name before anything is loaded."""
    config, tensors = read_v2(path)
    adapter, vision = v2_configs(config, tensors, source=str(path))
    try:
        expected = expected_shapes(adapter, vision, implied_base(tensors, str(path)))
    except ValueError as e:
        raise V2Error(f"{path}: inconsistent V2 checkpoint ({e})") from e
    check_tensors(tensors, expected, str(path), against="of its own variant and shape")
    return config, tensors


def tower_feature_dim(vision: VisionConfig, source: str) -> int:
    """Features of an all-token ViT tower (tokens x width), from its open_clip config alone (no weights)."""
    import open_clip

    cfg = open_clip.get_model_config(vision.model)
    if cfg is None or "patch_size" not in cfg.get("vision_cfg", {}):
        raise V2Error(f"{source}: open_clip has no ViT config named {vision.model!r} to size its tower from; "
                      "name an open_clip ViT with --vision MODEL (only its config is read)")
    size, patch = cfg["vision_cfg"]["image_size"], cfg["vision_cfg"]["patch_size"]
    size, patch = (size, size) if isinstance(size, int) else size, (patch, patch) if isinstance(patch, int) else patch
    if cfg["embed_dim"] != vision.clip_dim:
        raise V2Error(f"{source}: its clip_proj reads tokens of width {vision.clip_dim} but the tower {vision.model} "
                      f"gives {cfg['embed_dim']}; use the tower it was trained with (CLIP ViT-L/14 for the releases)")
    n_tokens = (size[0] // patch[0]) * (size[1] // patch[1]) + 1  # patches + class token
    return n_tokens * vision.clip_dim


def tower_config(given: VisionConfig | str | None) -> VisionConfig:
    """The V2 tower: TOWER, or TOWER at the model and weights given (a full visual-query config is kept)."""
    if given is None:
        return TOWER
    given = VisionConfig.from_spec(given) if isinstance(given, str) else given
    if given.projector == "visual-query":
        return given
    return dataclasses.replace(TOWER, model=given.model, pretrained=given.pretrained, seed=given.seed)


def save_v2(adapter: Adapter, path: str | os.PathLike) -> Path:
    """Write one of our V2 adapters as a released-layout .pth (atomically)."""
    if adapter.projector is None or adapter.vision_config.projector != "visual-query":
        raise V2Error(f"only LLaMA-Adapter V2 multimodal adapters (a visual-query projector) export to V2; this is "
                      f"a {adapter.variant}")
    c = adapter.config
    config = {"w_bias": c.bias_tuning, "w_lora": c.lora_rank > 0, "lora_rank": c.lora_rank or 16}
    path = Path(path)
    atomic_save(path, lambda tmp: torch.save({"model": state_to_v2(adapter), "config": config}, tmp))
    return path
