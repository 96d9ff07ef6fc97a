"""Next-token cross-entropy through the (frozen) LM head, in row chunks, with the gradient made in forward.

The plain way materialises logits [N, V] in fp32, then log-softmax, then a gradient of the same size:
for SmolLM2 at 1,024 labelled tokens that is three fresh 200 MB tensors per step, and on CPU their
first-touch page faults alone cost longer than the head's matrix products. Here each chunk of rows
computes its logits, its loss and, when a gradient is needed, d loss / d h = (softmax - onehot) W, in
one buffer of about 32 MB; backward only scales the stored [N, C] gradient. The head's weight is
frozen, so no gradient is made for it. Rows may carry weights (a sample's tokens 1/its length, so that
every sample counts once however long its answer).
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_ELEMENTS = 2**23  # logits per chunk (32 MB in fp32)


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor,  # type: ignore[override]
                row_weights: Tensor | None) -> Tensor:
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
            nll = peak + mass.log() - picked  # [n_chunk, 1]: -log softmax at the targets
            scale = None if row_weights is None else row_weights[rows, None].to(acc)  # [n_chunk, 1]
            total += (nll if scale is None else nll * scale).sum()
            if grad_h is not None:
                probs = logits.div_(mass)
                probs[torch.arange(probs.shape[0], device=h.device), target] -= 1.0
                if scale is not None:
                    probs.mul_(scale)
                grad_h[rows] = (probs.to(weight.dtype) @ weight).to(h.dtype)  # [n_chunk, C]
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_total.to(grad_h.dtype), None, None, None


def head_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, reduction: str = "mean",
                       row_weights: Tensor | None = None) -> Tensor:
    """Cross-entropy of logits h [N, C] @ weight[V, C]ᵀ against targets [N]; "sum" or "mean" over rows,
    each row's term times row_weights [N] when given (the mean then divides by their sum)."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    total = _HeadCrossEntropy.apply(h, weight, targets, row_weights)
    if reduction == "sum":
        return total
    return total / (max(h.shape[0], 1) if row_weights is None else row_weights.sum().clamp_min(1e-12))
