"""The chunked head cross-entropy against torch's own, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmadapter import loss as loss_module
from mmadapter.loss import head_cross_entropy


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_matches_torch_cross_entropy(monkeypatch, reduction):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 3 * 50)  # several chunks of 3 rows, one short
    torch.manual_seed(0)
    h = torch.randn(10, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64)
    targets = torch.randint(0, 50, (10,))
    ours = head_cross_entropy(h, weight, targets, reduction)
    (g_ours,) = torch.autograd.grad(ours * 1.7, h)
    ref = F.cross_entropy(h @ weight.t(), targets, reduction=reduction)
    (g_ref,) = torch.autograd.grad(ref * 1.7, h)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)


def test_no_gradient_work_without_autograd():
    h, weight = torch.randn(4, 8), torch.randn(20, 8)
    with torch.no_grad():
        value = head_cross_entropy(h, weight, torch.tensor([1, 2, 3, 4]))
    torch.testing.assert_close(value, F.cross_entropy(h @ weight.t(), torch.tensor([1, 2, 3, 4])))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_row_weights_match_weighted_torch_cross_entropy(monkeypatch, reduction):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 4 * 30)
    torch.manual_seed(1)
    h = torch.randn(9, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 8, dtype=torch.float64)
    targets = torch.randint(0, 30, (9,))
    row_weights = torch.rand(9, dtype=torch.float64)
    ours = head_cross_entropy(h, weight, targets, reduction, row_weights)
    (g_ours,) = torch.autograd.grad(ours, h)
    terms = F.cross_entropy(h @ weight.t(), targets, reduction="none") * row_weights
    ref = terms.sum() if reduction == "sum" else terms.sum() / row_weights.sum()
    (g_ref,) = torch.autograd.grad(ref, h)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)
