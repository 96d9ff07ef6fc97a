"""A frozen fp32 weight packed once by oneDNN for products with a few rows (batched decoding).

`F.linear` of a few rows (2-8: a batch of decoding requests) against a large weight runs far below the
memory bandwidth on some CPUs: measured on a 2-core AMD EPYC (AVX2), the LM head of SmolLM2 (49152 x 576,
113 MB) took 26 ms for 2 rows and 62 ms for 8 where one row took 11 ms, while oneDNN's linear over a copy
of the weight reordered for it took 5-17 ms for 1-8 rows. PyTorch reaches oneDNN's fp32 linear through
operators that are not public API (`mkldnn._reorder_linear_weight`, `mkldnn._linear_pointwise`, what
torch.compile's CPU backend emits), so the packed product is checked against `F.linear` when it is made and
is not used (with a log line) where those operators are missing or disagree. The packed copy costs the
weight's size again, so the decoding step packs within a memory budget (decode_step.py: `packed_mb`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

ROWS_HINT = 8  # the row count oneDNN chooses its blocking for (the batch engine's default batch)
TOLERANCE = 1e-4  # relative to F.linear: the same fp32 sums, in another order


def pack_rows(weight: Tensor) -> Callable[[Tensor], Tensor] | None:
    """x [B, in] -> x Wᵀ [B, out] over a oneDNN-packed copy of the fp32 CPU weight [out, in], or None where
    that is unavailable or wrong on this machine (then use F.linear)."""
    ops = torch.ops.mkldnn
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return None
    try:
        with torch.no_grad():
            packed = ops._reorder_linear_weight(weight.detach(), ROWS_HINT)

            def product(x: Tensor) -> Tensor:
                return ops._linear_pointwise(x, packed, None, "none", [], "")

            x = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
            ref = F.linear(x, weight)
            err = float((product(x) - ref).norm() / ref.norm().clamp(min=1e-12))
    except RuntimeError as e:  # an operator that changed or is missing in this build
        log.info("oneDNN packed linear unavailable (%s): batched decoding uses F.linear", e)
        return None
    if not err <= TOLERANCE:
        log.warning("oneDNN packed linear disagrees with F.linear on this CPU (relative error %.3g): batched "
                    "decoding uses F.linear", err)
        return None
    return product


class RowsProduct:
    """x [B, in] -> x Wᵀ: F.linear, or for B > 1 the oneDNN-packed product, packed by `pack()` or on first use
    (so a process that never decodes a batch never holds the copy)."""

    def __init__(self, weight: Tensor) -> None:
        self.weight = weight
        self._packed: Callable[[Tensor], Tensor] | None = None
        self._tried = False

    def pack(self) -> None:
        if not self._tried:
            self._packed, self._tried = pack_rows(self.weight), True

    def __call__(self, x: Tensor) -> Tensor:
        if x.shape[0] > 1:
            self.pack()
            if self._packed is not None and x.dtype == torch.float32:
                return self._packed(x)
        return F.linear(x, self.weight)
