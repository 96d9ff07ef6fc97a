"""Quantised one-row products, the candidates for decoding with a smaller base: every linear weight of
SmolLM2-135M's shape once per sweep (far larger than any cache), one row each, by

- fp32 `F.linear` with our thread split (the float baseline, mmadapter/matvec.py);
- PyTorch's weight-only kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) with bf16 activations
  (what mmadapter uses) and with fp32 activations;
- a dequantise-and-reduce written in PyTorch and compiled by `torch.compile` (inductor's C++ code) for each
  shape, fp32 activations: the kernel a compiler generates when no library kernel fits. Compile time is
  reported beside it;
- fbgemm's dynamic-quantised linear (`quantized.linear_dynamic`) over the same int8 codes and per-row scales:
  fp32 in and out, the activations quantised per tensor on the fly to 7 bits (`reduce_range`: full 8-bit
  activations can overflow the AVX2 kernel's 16-bit pair sums, and measured worse). Its error column is on
  a Gaussian row; on SmolLM2's real hidden states, whose few outlier channels are hundreds of times larger
  than the rest, it errs several times more than the bf16 kernel and changes greedy text, which is why
  mmadapter does not decode with it;
- fbgemm's fp16-weight linear (`quantized.linear_dynamic_fp16`): half the fp32 bytes, fp32 activations.

Each row of the table: time per sweep, the bytes its weights hold read per second, and the speed against fp32.
The machine's CPU flags are in the result file: the bf16 rows depend on native bf16 support.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import report, setup_threads
from .matvec import sweep_seconds


def _int8_reduce(x: Tensor, codes: Tensor, scales: Tensor) -> Tensor:
    return (x * codes.to(torch.float32)).sum(-1) * scales  # [1, out]


def _int4_reduce(x: Tensor, low: Tensor, high: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    """low/high [out, groups, 16] uint8 nibbles of inputs 0-15 / 16-31 of each group; scales, zeros [out, groups]."""
    out, groups, _ = low.shape
    xg = x.view(groups, 2, 16)
    partial = (low.to(torch.float32) * xg[:, 0] + high.to(torch.float32) * xg[:, 1]).sum(-1)  # [out, groups]
    xs = xg.sum((-1, -2))  # [groups]
    return ((partial - 8 * xs) * scales + zeros * xs).sum(-1)[None]  # [1, out]


def _fbgemm_int8(codes: Tensor, scales: Tensor) -> torch.ScriptObject:
    """int8 codes [out, in] and per-row scales [out] packed for fbgemm's dynamic-quantised linear, unchanged."""
    scales = scales.double()
    with warnings.catch_warnings():
        # fbgemm packs only from a qint8 tensor, and PyTorch has deprecated the functions that make one; the
        # tensor lives for this call only (what is timed is the packed kernel), so that warning says nothing here
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions", category=UserWarning)
        weight = torch._make_per_channel_quantized_tensor(codes, scales, torch.zeros_like(scales, dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(weight, None)


def _fbgemm_products(weights: list[Tensor], int8_parts: list[tuple[Tensor, Tensor]]
                     ) -> dict[str, Callable[[Tensor, int], Tensor]]:
    """fbgemm's int8 (the Int8Linears' own codes and scales) and fp16 products; none where PyTorch has no fbgemm."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return {}
    packed8 = [_fbgemm_int8(codes, scales) for codes, scales in int8_parts]
    packed16 = [torch.ops.quantized.linear_prepack_fp16(w, None) for w in weights]
    return {"int8 fbgemm dynamic, fp32 x": lambda x, i: torch.ops.quantized.linear_dynamic(x, packed8[i], True),
            "fp16 fbgemm, fp32 x": lambda x, i: torch.ops.quantized.linear_dynamic_fp16(x, packed16[i])}


def candidates(weights: list[Tensor]) -> tuple[dict[str, Callable[[Tensor, int], Tensor]], dict[str, float]]:
    """name -> product(x, i), each weight quantised once; and the compile seconds of the compiled ones."""
    from mmadapter.matvec import split_matvec, thread_split
    from mmadapter.quant import GROUP_SIZE, Int4Linear, Int8Linear

    splits = [thread_split(w) for w in weights]
    int8 = [Int8Linear.from_float(w) for w in weights]
    int4 = [Int4Linear.from_float(w) for w in weights]
    int8_parts = [(q.weight_int8, q.weight_scale.float()) for q in int8]
    int4_parts = []
    for q in int4:
        codes = q.codes(0, q.out_features).view(q.out_features, -1, GROUP_SIZE)  # [out, groups, 32]
        sz = q.weight_scale_zero.float().transpose(0, 1)  # [out, groups, 2]
        int4_parts.append((codes[..., :16].contiguous(), codes[..., 16:].contiguous(), sz[..., 0].contiguous(),
                           sz[..., 1].contiguous()))
    compiled8, compiled4 = torch.compile(_int8_reduce, dynamic=False), torch.compile(_int4_reduce, dynamic=False)
    compile_s: dict[str, float] = {}
    for name, fn, parts in (("int8 compiled, fp32 x", compiled8, int8_parts),
                            ("4-bit compiled, fp32 x", compiled4, int4_parts)):
        start = time.perf_counter()
        for i in {w.shape: i for i, w in enumerate(weights)}.values():  # one graph per shape
            fn(torch.randn(1, weights[i].shape[1]), *parts[i])
        compile_s[name] = time.perf_counter() - start
    products = {
        "fp32 (thread split)": lambda x, i: F.linear(x, weights[i]) if splits[i] is None else split_matvec(x, splits[i]),
        "int8 kernel, bf16 x": lambda x, i: int8[i].kernel(x.to(torch.bfloat16)).float(),
        "int8 kernel, fp32 x": lambda x, i: torch.ops.aten._weight_int8pack_mm(x, int8[i].weight_int8,
                                                                              int8[i].weight_scale.float()),
        "int8 compiled, fp32 x": lambda x, i: compiled8(x, *int8_parts[i]),
        **_fbgemm_products(weights, int8_parts),
        "4-bit kernel, bf16 x": lambda x, i: int4[i].kernel(x.to(torch.bfloat16)).float(),
        "4-bit compiled, fp32 x": lambda x, i: compiled4(x, *int4_parts[i]),
    }
    return products, compile_s


def run(runs: int = 5) -> str:
    from mmadapter.config import LlamaConfig

    c = LlamaConfig.from_name("smollm2-135m")
    kv = c.n_kv_heads * c.head_dim
    shapes = [(c.dim, c.dim), (kv, c.dim), (kv, c.dim), (c.dim, c.dim), (c.ffn_dim, c.dim), (c.ffn_dim, c.dim),
              (c.dim, c.ffn_dim)] * c.n_layers
    torch.manual_seed(0)
    weights = [torch.randn(s) * 0.05 for s in shapes]
    n = sum(w.numel() for w in weights)
    stored = {"fp32": 4 * n, "fp16": 2 * n, "int8": n, "4-bit": n // 2}
    products, compile_s = candidates(weights)
    check = torch.randn(1, c.dim)
    rows, base = [], None
    for name, product in products.items():
        ref = F.linear(check, weights[0])
        err = float((product(check, 0) - ref).norm() / ref.norm())
        seconds = sweep_seconds(product, weights, range(len(weights)), runs)
        base = base or seconds
        scheme = name.split()[0]
        rows.append([name, f"{seconds * 1e3:.1f} ms", f"{stored[scheme] / seconds / 1e9:.1f} GB/s",
                     f"{base / seconds:.2f}x", f"{err:.3f}", f"{compile_s.get(name, 0.0):.0f} s"])
    return report("quant_kernels", f"Quantised one-row products over SmolLM2-135M's linear weights "
                  f"({stored['fp32'] / 1e6:.0f} MB fp32, {torch.get_num_threads()} threads; median of {runs})",
                  ["candidate", "one sweep", "weights read", "vs fp32", "rel. error vs fp32", "compile"], rows,
                  {"compile_seconds": compile_s})


if __name__ == "__main__":
    setup_threads()
    run()
