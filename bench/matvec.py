"""One-row products the way decoding meets them: every weight of SmolLM2-135M's shape once (far larger than
any cache), then the 113 MB tied head alone, by four kernels PyTorch offers on CPU: `F.linear` (MKL sgemv on
one core), our thread split (mmadapter/matvec.py), MKL's packed sgemm (`mkl._mkl_linear` over
`_mkl_reorder_linear_weight`) and oneDNN's packed weights (`mkldnn._linear_pointwise` over
`_reorder_linear_weight`). Random fp32 weights: only the bytes matter.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import report, setup_threads


def kernels(weights: list[Tensor]) -> dict[str, Callable[[Tensor, int], Tensor]]:
    """name -> product(x, i) of one row x with weights[i], each kernel's packed form prepared once."""
    from mmadapter.matvec import split_matvec, thread_split

    splits = [thread_split(w) for w in weights]
    mkl = [torch.ops.mkl._mkl_reorder_linear_weight(w, 1) for w in weights]
    dnn = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights]
    return {
        "F.linear": lambda x, i: F.linear(x, weights[i]),
        "thread split (ours)": lambda x, i: F.linear(x, weights[i]) if splits[i] is None else split_matvec(x, splits[i]),
        "MKL packed": lambda x, i: torch.ops.mkl._mkl_linear(x, mkl[i], weights[i], None, 1),
        "oneDNN packed": lambda x, i: torch.ops.mkldnn._linear_pointwise(x, dnn[i], None, "none", [], ""),
    }


def sweep_seconds(product: Callable[[Tensor, int], Tensor], weights: list[Tensor], indices: range,
                  runs: int) -> float:
    """Median seconds of one pass over weights[indices], one row each."""
    rows = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}
    times = []
    for _ in range(runs + 1):  # the first pass warms up
        start = time.perf_counter()
        for i in indices:
            product(rows[weights[i].shape[1]], i)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def run(runs: int = 7) -> str:
    from mmadapter.config import LlamaConfig

    c = LlamaConfig.from_name("smollm2-135m")
    qkv = c.head_dim * (c.n_heads + 2 * c.n_kv_heads)
    shapes = [(qkv, c.dim), (c.dim, c.head_dim * c.n_heads), (2 * c.ffn_dim, c.dim), (c.dim, c.ffn_dim)] * c.n_layers
    weights = [torch.randn(s) for s in shapes] + [torch.randn(c.vocab_size, c.dim)]  # fused as the lean step does
    model_gb, head_gb = sum(w.numel() for w in weights) * 4 / 1e9, weights[-1].numel() * 4 / 1e9
    products = kernels(weights)
    check = torch.randn(1, c.dim)
    rows = []
    for name, product in products.items():
        torch.testing.assert_close(product(check, 0), F.linear(check, weights[0]), rtol=1e-4, atol=1e-4)
        every = sweep_seconds(product, weights, range(len(weights)), runs)
        head = sweep_seconds(product, weights, range(len(weights) - 1, len(weights)), runs)
        rows.append([name, f"{every * 1e3:.1f} ms", f"{model_gb / every:.1f} GB/s", f"{head * 1e3:.2f} ms",
                     f"{head_gb / head:.1f} GB/s"])
    return report("matvec", f"One-row products over SmolLM2-135M's weights ({model_gb * 1e3:.0f} MB fp32, "
                  f"{torch.get_num_threads()} threads; median of {runs})",
                  ["kernel", "all weights", "read", "head alone", "read"], rows, {})


if __name__ == "__main__":
    setup_threads()
    run()
