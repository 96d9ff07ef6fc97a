"""GGUF files (llama.cpp): metadata to a LlamaConfig, the vocabulary to a Tokenizer, and tensors handed on
undecoded (gguf_tensor.py decodes one at a time once every name and shape is checked)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import Tensor

from .config import LlamaConfig, RopeScaling
from .gguf_tensor import GGUFTensor, gguf_shape, gguf_tensor
from .llama import rope_inv_freq
from .safe_io import CheckpointError, check_gguf_header
from .tokenizer import Tokenizer
from .weights_checks import check_shapes, checked_config


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
