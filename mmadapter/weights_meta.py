"""Meta LLaMA checkpoint directories: params.json, consolidated.*.pth model-parallel shards (merged here,
read weights-only) and tokenizer.model."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .config import LlamaConfig, RopeScaling
from .safe_io import CheckpointError, load_torch_weights
from .tokenizer import Tokenizer
from .weights_checks import check_shapes, checked_config, qk_to_half_split, read_json


# How model-parallel shards split each tensor: 0 = rows, 1 = columns, None = replicated.
_META_SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1,
                   "tok_embeddings": 1, "output": 0}


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def read_meta_dir(path: Path) -> tuple[LlamaConfig, dict[str, Tensor], Tokenizer | None]:
    params = read_json(path / "params.json")
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
