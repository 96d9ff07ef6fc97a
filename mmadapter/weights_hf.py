"""Hugging Face checkpoint directories: config.json, model.safetensors (or sharded with an index) and the
tokenizer files beside them, mapped to Meta's tensor names."""

from __future__ import annotations

import re
from pathlib import Path

from torch import Tensor

from .config import LlamaConfig, RopeScaling
from .safe_io import CheckpointError
from .tokenizer import Tokenizer
from .weights_checks import checked_config, read_json


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

    config = hf_config(read_json(path / "config.json"), str(path / "config.json"))
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
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
