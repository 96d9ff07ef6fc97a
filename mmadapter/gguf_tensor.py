"""One GGUF tensor, decoded only when asked: to float32, or (Q4_0 / Q4_1) to 4-bit codes and block scales.

`weights_gguf.read_gguf` hands these to the model builder, which decodes one tensor at a time: a float base
dequantises each, a 4-bit base takes Q4 blocks as they are (no fp32 copy of the weights ever exists).
llama.cpp's q/k row permutation is undone here, on whichever form is produced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .safe_io import CheckpointError

_Q4_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}  # per block of 32 weights: f16 d (+ f16 m for Q4_1), 16 nibble bytes


class GGUFTensor:
    """A lazily decoded GGUF tensor; `permute_heads` > 0 reorders q/k rows to the half-split RoPE layout."""

    def __init__(self, tensor: Any, path: Path, permute_heads: int = 0) -> None:
        self.tensor, self.path, self.permute_heads = tensor, path, permute_heads
        self.shape = gguf_shape(tensor)

    def dense(self) -> Tensor:
        """The tensor dequantised to float32, in PyTorch order."""
        return self._rows(gguf_tensor(self.tensor, self.path))

    def int4_parts(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """(codes [out, in] 0..15, scales, zeros [out, in / 32]) with W = (codes - 8) * scale + zero, read from
        Q4_0 / Q4_1 blocks without dequantising; None for other types. Q4_0 is w = (q - 8) d; Q4_1 is
        w = q d + m = (q - 8) d + (m + 8 d). In a block's 16 nibble bytes, byte i holds element i (low nibble)
        and element i + 16 (high nibble)."""
        kind = self.tensor.tensor_type.name
        if kind not in _Q4_BLOCK_BYTES or len(self.shape) != 2:
            return None
        out, inp = self.shape
        raw = np.ascontiguousarray(self.tensor.data).reshape(out, inp // 32, _Q4_BLOCK_BYTES[kind])
        first_nibble = 4 if kind == "Q4_1" else 2
        d = _f16(raw[..., 0:2])  # [out, groups]
        nibbles = torch.from_numpy(raw[..., first_nibble:].copy())  # [out, groups, 16] uint8
        codes = torch.cat((nibbles & 15, nibbles >> 4), dim=-1).reshape(out, inp)
        zeros = _f16(raw[..., 2:4]) + 8 * d if kind == "Q4_1" else torch.zeros_like(d)
        return self._rows(codes), self._rows(d), self._rows(zeros)

    def _rows(self, t: Tensor) -> Tensor:
        if not self.permute_heads:
            return t
        return interleaved_to_half(t, self.permute_heads)


def _f16(pairs: np.ndarray) -> Tensor:
    """[..., 2] bytes holding little-endian float16 values -> float32 [...]."""
    return torch.from_numpy(pairs.copy().view(np.float16)[..., 0].astype(np.float32))


def interleaved_to_half(w: Tensor, n_heads: int) -> Tensor:
    """Reorder q/k rows [n_heads*d, C] from the interleaved (Meta/GGUF) to the half-split (HF) RoPE layout."""
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def half_to_interleaved(w: Tensor, n_heads: int) -> Tensor:
    """The inverse of `interleaved_to_half` (exporting to the Meta layout, e.g. LLaMA-Adapter V2 files)."""
    out, inp = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def gguf_shape(t: Any) -> tuple[int, ...]:
    """A GGUF tensor's shape in PyTorch order (GGUF lists the fastest-varying dimension first)."""
    return tuple(reversed([int(d) for d in t.shape]))


def gguf_tensor(t: Any, path: Path) -> Tensor:
    """One GGUF tensor dequantised to float32."""
    from gguf.quants import dequantize

    try:
        array = np.ascontiguousarray(dequantize(t.data, t.tensor_type).reshape(gguf_shape(t)), dtype=np.float32)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot decode tensor {t.name} of type {t.tensor_type.name} ({e})") from e
    return torch.from_numpy(array if array.flags.writeable else array.copy())  # F32 data is a read-only memmap
