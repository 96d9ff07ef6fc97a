"""The hardware limit: this machine's memory-read bandwidth with the benchmark's thread count.

Decoding one token reads every weight once, so tokens/s <= bandwidth / weight bytes. Measured as
the median time to sum a 1 GiB tensor (far larger than any cache) with torch's own threads.
"""

from __future__ import annotations

import statistics
import time

import torch

from .common import report, setup_threads


def read_bandwidth(gib: float = 1.0, runs: int = 7) -> float:
    """Bytes per second read by a full-tensor sum."""
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / statistics.median(times)


def run() -> str:
    from mmadapter.config import LlamaConfig

    bw = read_bandwidth()
    c = LlamaConfig.from_name("smollm2-135m")
    params = c.vocab_size * c.dim + c.n_layers * (c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
                                                 + 3 * c.dim * c.ffn_dim)
    rows = [[name, f"{params * size / 1e6:.0f} MB", f"{bw / (params * size):.0f}"]
            for name, size in (("fp32", 4), ("bf16", 2))]
    return report("bandwidth", f"Decode bound of SmolLM2-135M: memory read {bw / 1e9:.1f} GB/s "
                  f"({torch.get_num_threads()} threads)", ["weights", "bytes read per token", "tokens/s bound"], rows,
                  {"bandwidth_bytes_per_s": bw})


if __name__ == "__main__":
    setup_threads()
    run()
