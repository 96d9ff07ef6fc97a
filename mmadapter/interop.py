"""Adapters of other projects: the LLaMA-Adapter V1 release (.pth) and PEFT AdaptionPrompt (import/export).

Both hold what ours holds (prompts per adapted layer, gates), named and gated differently:

LLaMA-Adapter V1 (OpenGVLab/LLaMA-Adapter, `llama_adapter_len10_layer30_release.pth`)
  adapter_query.weight          [L*K, C]      row block i = the i-th adapted layer, bottom to top
                                              (the reference reshapes it to [L, K, C])
  layers.{i}.attention.gate     [1, H, 1, 1]  per head; older code: [1], one value for every head.
                                              The release stores all layers' gates; the bottom
                                              n_layers - L are never used (and stay exactly zero).
  K is not stored: the official inference (example.py) fixes K = 10 and sets L = rows / K.
  The V1 training code multiplies by tanh(gate), like ours, so gates map 1:1. The official inference
  code (llama/model.py) forgot the tanh and multiplies by the raw gate; we keep tanh, i.e. the model
  the adapter was trained as.

PEFT AdaptionPrompt (peft/tuners/adaption_prompt/, `adapter_config.json` + `adapter_model.safetensors`)
  base_model.model.model.layers.{i}.self_attn.adaption_prompt  [1, K, C]
  base_model.model.model.layers.{i}.self_attn.adaption_gate    [1]   one per layer, used WITHOUT tanh
  config: peft_type "ADAPTION_PROMPT", adapter_len K, adapter_layers L (the top L), target_modules.
  PEFT repeats kv heads for GQA as we do (query head h reads kv head h // (H/G)), so prompts map 1:1.
  Gates: our per-head g, all equal, export as a = tanh(g); a PEFT gate a with |a| < 1 imports as
  g = atanh(a) in an adapter with one gate per layer. |a| >= 1 has no tanh pre-image: refused, never
  clipped. Per-head gates that differ, or a projector (images), have no PEFT equivalent: refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .adapter import Adapter
from .adapter_file import METADATA_KEY, AdapterFileError, AdapterMeta, build_adapter, load_adapter, read_adapter
from .atomic import atomic_save, atomic_write_text
from .config import AdapterConfig, LlamaConfig, VisionConfig
from .safe_io import load_torch_weights

if TYPE_CHECKING:
    from .model import MMAdapter

log = logging.getLogger(__name__)

FORMATS = ("mmadapter", "peft", "v1", "v2")
V1_QUERY_KEY = "adapter_query.weight"
V1_DEFAULT_PROMPTS = 10  # the official adapter_len; the release file does not store it
V1_TEMPLATE = "alpaca"  # the V1 release was trained on Alpaca with the Alpaca prompt
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_TYPE = "ADAPTION_PROMPT"
PEFT_PREFIX = "base_model.model.model.layers"
PEFT_TARGET = "self_attn"

_V1_GATE = re.compile(r"layers\.(\d+)\.attention\.gate")
_PEFT_KEY = re.compile(r"(?:.*\.)?layers\.(\d+)\.(\w+)\.adaption_(prompt|gate)")


class InteropError(AdapterFileError):
    """A foreign adapter that cannot be converted; the message says why and what to do."""


# ----------------------------------------------------------------------------------------------
# Dispatch


def detect_format(path: str | os.PathLike) -> str:
    """The format at `path`, "mmadapter", "peft" or "v1", from its layout (the readers check contents)."""
    path = Path(path)
    if not path.exists():
        raise InteropError(f"{path}: no such adapter file or directory")
    if path.is_dir():
        if (path / PEFT_CONFIG).exists() or any((path / w).exists() for w in PEFT_WEIGHTS):
            return "peft"
        raise InteropError(f"{path}: a directory without {PEFT_CONFIG}, so not a PEFT adapter; pass an adapter "
                           "file (.safetensors, V1 .pth) or a PEFT adapter directory")
    if path.suffix == ".safetensors":
        keys, metadata = safetensors_header(path)
        if METADATA_KEY in metadata:
            return "mmadapter"
        if any(_PEFT_KEY.fullmatch(k) for k in keys):
            return "peft"
        raise InteropError(f"{path}: a safetensors file that is neither an mmadapter adapter (no '{METADATA_KEY}' "
                           "metadata) nor a PEFT AdaptionPrompt adapter (no '...adaption_prompt' tensors)")
    if path.name in PEFT_WEIGHTS:
        return "peft"
    if path.suffix in (".pth", ".pt"):
        return "v2" if _is_v2_file(path) else "v1"
    raise InteropError(f"{path}: unknown adapter format; expected an mmadapter .safetensors file, a PEFT adapter "
                       "directory (adapter_config.json + adapter_model.safetensors) or a LLaMA-Adapter V1 / V2 .pth")


def _is_v2_file(path: Path) -> bool:
    """A LLaMA-Adapter V2 checkpoint ({"model", "config"}); unreadable files are left to the V1 reader's error."""
    from .interop_v2 import is_v2

    try:
        return is_v2(load_torch_weights(path))
    except Exception:
        return False


def import_adapter(model: MMAdapter, path: str | os.PathLike, fmt: str | None = None, *,
                   n_prompts: int | None = None, n_layers: int | None = None,
                   allow_base_mismatch: bool = False, vision: VisionConfig | str | None = None) -> Adapter:
    """An adapter of any supported format built over `model`'s base (not activated).

    n_prompts / n_layers override K / L for V1 files, which do not store K; `vision` is where the image
    tower of a multimodal mmadapter file is (see `load_adapter`), or the tower of a V2 checkpoint (default:
    CLIP ViT-L/14 'openai', channel-swapped images; see interop_v2.py).
    """
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise InteropError(f"unknown adapter format {fmt!r}; known: {', '.join(FORMATS)}")
    if fmt != "v1" and (n_prompts is not None or n_layers is not None):
        raise InteropError(f"{path}: K and L overrides only apply to V1 files; a {fmt} adapter stores its shape")
    if fmt == "mmadapter":
        return load_adapter(model, path, activate=False, allow_base_mismatch=allow_base_mismatch, vision=vision)
    if fmt == "peft":
        return load_peft(model, path)
    if fmt == "v2":
        from .interop_v2 import load_v2

        return load_v2(model, path, vision)
    return load_v1(model, path, n_prompts=n_prompts, n_layers=n_layers)


def adapter_from_file(path: str | os.PathLike) -> tuple[AdapterMeta, Adapter]:
    """An mmadapter file as an Adapter without loading its base (for export and inspection)."""
    meta, tensors = read_adapter(path)
    return meta, build_adapter(meta, tensors, str(path))


def _new_adapter(prompts: Tensor, gates: Tensor, base: LlamaConfig, template: str | None) -> Adapter:
    """An Adapter holding prompts [L, K, C] and raw gates [L, H] (or [L, 1]: one per layer) over `base`."""
    n_layers, n_prompts, _ = prompts.shape
    gate = "per-layer" if gates.shape[1] == 1 else "per-head"
    adapter = Adapter(AdapterConfig(n_prompts=n_prompts, n_layers=n_layers, gate=gate), base)
    with torch.no_grad():
        adapter.prompts.copy_(prompts)
        adapter.gates.copy_(gates)
    adapter.template = template
    return adapter


def _to_model(adapter: Adapter, model: MMAdapter) -> Adapter:
    return adapter.to(model.device)


# ----------------------------------------------------------------------------------------------
# LLaMA-Adapter V1


def read_v1(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a V1 .pth, loaded weights-only (memory-mapped when the file allows it)."""
    path = Path(path)
    if not path.is_file():
        raise InteropError(f"{path}: no such file")
    try:
        state = load_torch_weights(path)
    except Exception as e:  # UnpicklingError for non-tensor objects, RuntimeError/EOFError for corrupt files
        raise InteropError(f"{path}: cannot read it as a weights-only PyTorch file ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); it is corrupt or holds more than "
                           "tensors (only plain tensor files are loaded, nothing is unpickled)") from e
    from .interop_v2 import is_v2

    if is_v2(state):
        raise InteropError(f"{path}: a LLaMA-Adapter V2 checkpoint, not V1; read it as format 'v2'")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a training checkpoint ({"model": ..., "optimizer": ...})
    if not isinstance(state, dict) or V1_QUERY_KEY not in state:
        raise InteropError(f"{path}: no '{V1_QUERY_KEY}' tensor, so not a LLaMA-Adapter V1 adapter")
    used = [k for k in state if k == V1_QUERY_KEY or (isinstance(k, str) and _V1_GATE.fullmatch(k))]
    if not all(isinstance(state[k], Tensor) and state[k].is_floating_point() for k in used):
        raise InteropError(f"{path}: '{V1_QUERY_KEY}' and the gates must be floating-point tensors")
    return state


def v1_gates(state: dict[str, Tensor]) -> dict[int, Tensor]:
    """Layer index -> its gate, flattened to [H] (per head) or [1] (the older scalar gate)."""
    return {int(m.group(1)): v.reshape(-1) for k, v in state.items() if (m := _V1_GATE.fullmatch(k))}


def v1_shape(state: dict[str, Tensor], n_base_layers: int, n_prompts: int | None = None,
             n_layers: int | None = None) -> tuple[int, int, str]:
    """(K, L, how) for a V1 file: overrides first, else L from the gates, else the official K = 10.

    L comes from the gate keys when only the adapted layers carry a gate, else from the top block of
    non-zero gates (unused gates are never trained and stay exactly zero, as in the release).
    """
    rows = state[V1_QUERY_KEY].shape[0]
    gates = v1_gates(state)

    def fits(n: int) -> bool:
        return 1 <= n <= n_base_layers and rows % n == 0

    candidates: list[tuple[int, str]] = []
    if n_layers is not None:
        candidates.append((n_layers, "given"))
    elif n_prompts is not None:
        if n_prompts < 1 or rows % n_prompts:
            raise InteropError(f"K={n_prompts} does not divide the {rows} rows of {V1_QUERY_KEY}")
        candidates.append((rows // n_prompts, f"{rows} rows / given K={n_prompts}"))
    else:
        layers = sorted(gates)
        if layers and layers == list(range(n_base_layers - len(layers), n_base_layers)) \
                and len(layers) < n_base_layers:
            candidates.append((len(layers), "gate keys of the top layers only"))
        trained = [i for i in layers if bool(gates[i].float().ne(0).any())]
        if trained:
            candidates.append((n_base_layers - min(trained), "non-zero gates"))
        if rows % V1_DEFAULT_PROMPTS == 0:
            candidates.append((rows // V1_DEFAULT_PROMPTS, f"the official K={V1_DEFAULT_PROMPTS}"))
    for n, how in candidates:
        if fits(n):
            return rows // n, n, how
    tried = ", ".join(f"L={n} ({how})" for n, how in candidates) or "none"
    raise InteropError(f"cannot work out K (prompts per layer) and L (adapted layers) of this V1 adapter: "
                       f"{rows} rows over a base of {n_base_layers} layers, tried {tried}; pass them "
                       "explicitly (--n-prompts / --n-layers)")


def v1_to_adapter(state: dict[str, Tensor], base: LlamaConfig, n_prompts: int | None = None,
                  n_layers: int | None = None, source: str = "V1 adapter") -> Adapter:
    """Our Adapter from V1 tensors: prompts = adapter_query reshaped [L, K, C], gates taken 1:1."""
    query = state[V1_QUERY_KEY]
    if query.ndim != 2 or query.shape[1] != base.dim:
        raise InteropError(f"{source}: {V1_QUERY_KEY} has shape {tuple(query.shape)} but the base has dim "
                           f"{base.dim}; use the base the adapter was trained on (--base)")
    gates = v1_gates(state)
    if gates and max(gates) >= base.n_layers:
        raise InteropError(f"{source}: has a gate for layer {max(gates)} but the base has {base.n_layers} layers; "
                           "use the base the adapter was trained on (--base)")
    k, n, how = v1_shape(state, base.n_layers, n_prompts, n_layers)
    first = base.n_layers - n
    rows = []
    for i in range(first, base.n_layers):
        if i not in gates:
            raise InteropError(f"{source}: no gate 'layers.{i}.attention.gate' for adapted layer {i} "
                               f"(K={k}, L={n} from {how}); check --n-layers / --n-prompts")
        g = gates[i]
        if g.numel() == 1:
            g = g.expand(base.n_heads)  # the older scalar gate: one value for every head
        elif g.numel() != base.n_heads:
            raise InteropError(f"{source}: layer {i}'s gate has {g.numel()} values but the base has "
                               f"{base.n_heads} heads; use the base the adapter was trained on (--base)")
        rows.append(g.float())
    log.info("%s: K=%d prompts x L=%d layers (%s)", source, k, n, how)
    prompts = query.float().reshape(n, k, base.dim)  # [L, K, C], bottom adapted layer first
    scalar = all(gates[i].numel() == 1 for i in range(first, base.n_layers))
    stacked = torch.stack([r[:1] for r in rows]) if scalar else torch.stack(rows)  # [L, 1]: one gate per layer
    return _new_adapter(prompts, stacked, base, V1_TEMPLATE)


def load_v1(model: MMAdapter, path: str | os.PathLike, n_prompts: int | None = None,
            n_layers: int | None = None) -> Adapter:
    """A V1 .pth as an Adapter over `model`'s base (not activated)."""
    adapter = v1_to_adapter(read_v1(path), model.base.config, n_prompts, n_layers, source=str(path))
    return _to_model(adapter, model)


# ----------------------------------------------------------------------------------------------
# PEFT AdaptionPrompt


def read_peft(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(adapter_config.json, tensors) of a PEFT adapter directory or its weights file."""
    path = Path(path)
    if not path.exists():
        raise InteropError(f"{path}: no such file or directory")
    folder = path if path.is_dir() else path.parent
    weights = path if path.is_file() else next((folder / w for w in PEFT_WEIGHTS if (folder / w).exists()), None)
    if weights is None:
        raise InteropError(f"{folder}: no {' or '.join(PEFT_WEIGHTS)}; a PEFT adapter directory holds "
                           f"{PEFT_CONFIG} and its weights (save_pretrained writes both)")
    config: dict[str, Any] = {}
    if (folder / PEFT_CONFIG).exists():
        try:
            config = json.loads((folder / PEFT_CONFIG).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or UTF-8
            raise InteropError(f"{folder / PEFT_CONFIG}: cannot read JSON ({type(e).__name__}: {e})") from e
        if not isinstance(config, dict):
            raise InteropError(f"{folder / PEFT_CONFIG}: expected a JSON object, found a {type(config).__name__}")
        if config.get("peft_type") != PEFT_TYPE:
            raise InteropError(f"{folder}: a PEFT adapter of type {config.get('peft_type')!r}; only "
                               f"{PEFT_TYPE} (LLaMA-Adapter) adapters can be converted")
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(weights)
        else:
            tensors = load_torch_weights(weights)
    except Exception as e:
        raise InteropError(f"{weights}: cannot read the adapter weights ({type(e).__name__}: {e}); the file is "
                           "truncated or corrupt") from e
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) and v.is_floating_point()
                                                for k, v in tensors.items()):
        raise InteropError(f"{weights}: expected a dict of floating-point tensors; this is not a PEFT adapter")
    return config, tensors


def peft_to_adapter(config: dict[str, Any], tensors: dict[str, Tensor], base: LlamaConfig,
                    source: str = "PEFT adapter") -> Adapter:
    """Our Adapter from PEFT tensors: prompts stacked to [L, K, C], gate a -> atanh(a) on every head."""
    prompts: dict[int, Tensor] = {}
    gates: dict[int, Tensor] = {}
    for key, value in tensors.items():
        m = _PEFT_KEY.fullmatch(key)
        if m is None:
            raise InteropError(f"{source}: unexpected tensor {key!r}; an AdaptionPrompt adapter holds only "
                               "'...layers.{i}.self_attn.adaption_prompt' and '.adaption_gate'")
        (prompts if m.group(3) == "prompt" else gates)[int(m.group(1))] = value
    layers = sorted(prompts)
    if not layers or sorted(gates) != layers:
        raise InteropError(f"{source}: prompts for layers {layers} but gates for layers {sorted(gates)}; "
                           "each adapted layer needs both")
    n = len(layers)
    if layers != list(range(base.n_layers - n, base.n_layers)):
        raise InteropError(f"{source}: adapts layers {layers[0]}-{layers[-1]}, but PEFT adapts the top layers and "
                           f"this base has {base.n_layers}; use the base the adapter was trained on (--base)")
    k = prompts[layers[0]].shape[-2] if prompts[layers[0]].ndim >= 2 else 0
    for i in layers:
        if tuple(prompts[i].shape) != (1, k, base.dim):
            raise InteropError(f"{source}: layer {i}'s adaption_prompt has shape {tuple(prompts[i].shape)}, expected "
                               f"(1, K, {base.dim}) for this base; use the base the adapter was trained on (--base)")
        if gates[i].numel() != 1:
            raise InteropError(f"{source}: layer {i}'s adaption_gate has shape {tuple(gates[i].shape)}, expected (1,)")
    for field, want in (("adapter_len", k), ("adapter_layers", n)):
        if field in config and config[field] != want:
            raise InteropError(f"{source}: {PEFT_CONFIG} says {field}={config[field]} but the tensors have {want}")
    raw = torch.stack([gates[i].reshape(()) for i in layers]).double()  # [L], used without tanh by PEFT
    bad = [(i, float(a)) for i, a in zip(layers, raw) if not bool(a.abs() < 1)]
    if bad:
        shown = ", ".join(f"layer {i}: {a:g}" for i, a in bad[:4])
        raise InteropError(f"{source}: gate values with |a| >= 1 ({shown}) cannot be represented: mmadapter "
                           "applies tanh to its gates (as LLaMA-Adapter does) and tanh stays inside (-1, 1). "
                           "Nothing was clipped; such an adapter has no exact mmadapter equivalent")
    gate = torch.atanh(raw).float()[:, None]  # [L, 1]: PEFT's one gate per layer
    stacked = torch.cat([prompts[i].float() for i in layers])  # [L, K, C]
    return _new_adapter(stacked, gate, base, None)


def load_peft(model: MMAdapter, path: str | os.PathLike) -> Adapter:
    """A PEFT AdaptionPrompt adapter (directory or weights file) as an Adapter over `model`'s base."""
    config, tensors = read_peft(path)
    return _to_model(peft_to_adapter(config, tensors, model.base.config, source=str(path)), model)


def adapter_to_peft(adapter: Adapter, base_name: str = "") -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(adapter_config.json, tensors) of the PEFT AdaptionPrompt adapter equal to `adapter`."""
    if adapter.projector is not None:
        raise InteropError("this adapter has an image projector (a multimodal adapter); PEFT AdaptionPrompt "
                           "has no image input, so it cannot be exported to PEFT")
    gates = adapter.gates.detach().cpu()  # [L, H]
    for j, row in enumerate(gates):
        if not bool((row == row[0]).all()):
            raise InteropError(
                f"layer {adapter.first_layer + j} has different gates per head (tanh(g) from "
                f"{float(torch.tanh(row.min())):.4g} to {float(torch.tanh(row.max())):.4g}); PEFT AdaptionPrompt "
                "keeps one gate per layer, so this adapter cannot be exported without changing its outputs. Train "
                "with one gate per layer (--gate per-layer, AdapterConfig(gate='per-layer')) to export to PEFT")
    prompts = adapter.prompts.detach().to("cpu", torch.float32)  # [L, K, C]
    tensors: dict[str, Tensor] = {}
    for j in range(adapter.n_layers):
        key = f"{PEFT_PREFIX}.{adapter.first_layer + j}.{PEFT_TARGET}"
        tensors[f"{key}.adaption_prompt"] = prompts[j][None].contiguous()  # [1, K, C]
        tensors[f"{key}.adaption_gate"] = torch.tanh(gates[j, :1].double()).float()  # [1], used without tanh
    config = {
        "peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "adapter_len": adapter.config.n_prompts,
        "adapter_layers": adapter.n_layers, "target_modules": PEFT_TARGET,
        "base_model_name_or_path": base_name or None, "inference_mode": True, "revision": None,
        "auto_mapping": None,
    }
    return config, tensors


def save_peft(adapter: Adapter, path: str | os.PathLike, base_name: str = "") -> Path:
    """Write a PEFT adapter directory (adapter_config.json + adapter_model.safetensors); returns it."""
    from safetensors.torch import save_file

    config, tensors = adapter_to_peft(adapter, base_name)
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise InteropError(f"{folder}: exists and is not a directory; a PEFT adapter is a directory")
    atomic_save(folder / PEFT_WEIGHTS[0], lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_text(folder / PEFT_CONFIG, json.dumps(config, indent=2) + "\n")
    return folder


def safetensors_header(path: Path) -> tuple[list[str], dict[str, str]]:
    """(tensor names, metadata) of a safetensors file, without reading the tensors."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys()), f.metadata() or {}
    except Exception as e:
        raise InteropError(f"{path}: cannot read the safetensors header ({type(e).__name__}: {e}); the file is "
                           "truncated, corrupt or not a safetensors file") from e
