"""Next-token cross-entropy through the (frozen) LM head, in row chunks, with the gradient made in forward.

The plain way materialises logits [N, V] in fp32, then log-softmax, then a gradient of the same size:
for SmolLM2 at 1,024 labelled tokens that is three fresh 200 MB tensors per step, and on CPU their
first-touch page faults alone cost longer than the head's matrix products. Here each chunk of rows
computes its logits, its loss and, when a gradient is needed, d loss / d h = (softmax - onehot) W, in
one buffer of about 32 MB; backward only scales the stored [N, C] gradient. The head's weight is
frozen, so no gradient is made for it.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_ELEMENTS = 2**23  # logits per chunk (32 MB in fp32)


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor) -> Tensor:  # type: ignore[override]
        n, vocab = h.shape[0], weight.shape[0]
        chunk = min(n, max(1, CHUNK_ELEMENTS // vocab))
        acc = torch.promote_types(h.dtype, torch.float32)  # at least fp32 for the softmax
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=acc, device=h.device)
        buffer = torch.empty(chunk, vocab, dtype=acc, device=h.device)  # every chunk's logits, reused
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            target = targets[rows]
            logits = buffer[: target.shape[0]]  # [n_chunk, V]
            logits.copy_(h[rows] @ weight.t())
            peak = logits.amax(dim=-1, keepdim=True)
            picked = logits.gather(1, target[:, None])
            mass = logits.sub_(peak).exp_().sum(dim=-1, keepdim=True)  # logits now hold exp(logit - peak)
            total += (peak + mass.log() - picked).sum()  # -log softmax at the targets
            if grad_h is not None:
                probs = logits.div_(mass)
                probs[torch.arange(probs.shape[0], device=h.device), target] -= 1.0
                grad_h[rows] = (probs.to(weight.dtype) @ weight).to(h.dtype)  # [n_chunk, C]
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_total.to(grad_h.dtype), None, None


def head_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of logits h [N, C] @ weight[V, C]ᵀ against targets [N]; "sum" or "mean" over rows."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    total = _HeadCrossEntropy.apply(h, weight, targets)
    return total / max(h.shape[0], 1) if reduction == "mean" else total
