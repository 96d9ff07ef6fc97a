"""What every base checkpoint reader checks: names and shapes against the config, config values by type
and range, JSON files by form, and q/k rows in the half-split RoPE layout llama.py uses."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from .config import LlamaConfig
from .gguf_tensor import interleaved_to_half
from .llama import Llama
from .safe_io import CheckpointError, read_json_object


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


def qk_to_half_split(state: dict[str, Tensor], config: LlamaConfig) -> dict[str, Tensor]:
    """Every layer's wq / wk of a Meta or GGUF state dict in the half-split layout (in place)."""
    for i in range(config.n_layers):
        for name, heads in (("wq", config.n_heads), ("wk", config.n_kv_heads)):
            key = f"layers.{i}.attention.{name}.weight"
            if key in state:
                state[key] = interleaved_to_half(state[key], heads)
    return state


def read_json(path: Path) -> dict:
    try:
        return read_json_object(path)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
