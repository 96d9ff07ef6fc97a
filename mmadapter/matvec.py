"""One-token products on CPU: a frozen weight's rows split over the threads.

For a single fp32 row on CPU (decoding one token) BLAS runs the matrix-vector product on one core (11 GB/s
of the ~28 GB/s two cores read on the benchmark machine); as a batched product over thread-count slices of
the rows, each core streams its own slice (20.6 GB/s in isolation): decoding is 25% faster (README,
Benchmarks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def thread_split(weight: Tensor) -> Tensor | None:
    """weight [out, in] as a view [P, in, out/P], one slice of rows per thread, where a one-row product gains
    from it (fp32 on CPU, P ≥ 2 threads dividing the rows); None where the BLAS kernel is parallel already
    (bf16, GPU)."""
    parts = torch.get_num_threads()
    if parts < 2 or weight.shape[0] % parts or weight.dtype != torch.float32 or weight.device.type != "cpu":
        return None
    return weight.view(parts, weight.shape[0] // parts, weight.shape[1]).transpose(1, 2)


def split_matvec(x: Tensor, split: Tensor) -> Tensor:
    """One row x [1, in] (any leading ones) times a `thread_split` weight -> [..., out]."""
    parts, _, width = split.shape
    y = torch.bmm(x.reshape(1, 1, -1).expand(parts, 1, -1), split)  # [P, 1, out/P]: one slice per thread
    return y.reshape(*x.shape[:-1], parts * width)


def matvec_or_matmul(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., in] @ weight[out, in]ᵀ, one row split over the threads (module docstring)."""
    split = thread_split(weight) if x.numel() == x.shape[-1] else None
    return F.linear(x, weight) if split is None else split_matvec(x, split)
