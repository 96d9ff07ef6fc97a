"""The oneDNN-packed product batched decoding uses for the LM head: equal to F.linear for every row count,
and refused (None: F.linear is used) where it is unavailable or disagrees."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmadapter import packed_rows
from mmadapter.packed_rows import RowsProduct, pack_rows

needs_onednn = pytest.mark.skipif(pack_rows(torch.randn(64, 32)) is None,
                                  reason="oneDNN's packed linear is not available in this PyTorch build")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 9, 33])
def test_the_packed_product_equals_f_linear(rows):
    weight = torch.randn(1000, 96)
    x = torch.randn(rows, 96)
    product = pack_rows(weight)
    torch.testing.assert_close(product(x), F.linear(x, weight), rtol=1e-5, atol=1e-4)


@needs_onednn
def test_rows_product_packs_on_the_first_batch_only(monkeypatch):
    weight = torch.randn(300, 64)
    product = RowsProduct(weight)
    x1, x4 = torch.randn(1, 64), torch.randn(4, 64)
    torch.testing.assert_close(product(x1), F.linear(x1, weight))
    assert not product._tried  # one row never packs: no copy for single-stream decoding
    torch.testing.assert_close(product(x4), F.linear(x4, weight), rtol=1e-5, atol=1e-4)
    assert product._packed is not None


def test_no_onednn_or_a_disagreeing_product_falls_back_to_f_linear(monkeypatch):
    weight = torch.randn(200, 48)
    x = torch.randn(5, 48)
    assert pack_rows(weight.to(torch.bfloat16)) is None and pack_rows(weight.double()) is None
    monkeypatch.setattr(packed_rows, "TOLERANCE", -1.0)  # any error "disagrees"
    assert pack_rows(weight) is None
    product = RowsProduct(weight)
    torch.testing.assert_close(product(x), F.linear(x, weight))
    assert product._tried and product._packed is None
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert pack_rows(weight) is None


def test_the_decode_step_packs_the_head_first_then_layers_within_its_budget():
    from mmadapter.config import LlamaConfig
    from mmadapter.decode_step import DecodeStep
    from mmadapter.llama import Llama

    config = LlamaConfig(name="tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=512,
                         max_seq_len=64)
    base = Llama(config).requires_grad_(False)
    head = 512 * 64 * 4
    layer = (64 * (64 + 2 * 32) + 64 * 64 + 2 * 128 * 64 + 64 * 128) * 4  # q/k/v, wo, gate/up, down
    assert DecodeStep(base, packed_mb=0).packed_bytes == 0
    assert DecodeStep(base, packed_mb=head / 2**20).packed_bytes == head
    assert DecodeStep(base, packed_mb=1).packed_bytes == head + 2 * layer


@needs_onednn
def test_a_batched_step_over_packed_weights_decodes_the_same_tokens(tiny_hf):
    from mmadapter import AdapterConfig
    from mmadapter.decode_step import DecodeStep
    from mmadapter.model import load_base
    from test_decode_step import PROMPTS, greedy

    model = load_base(str(tiny_hf[0]))
    model.add_adapter(AdapterConfig(n_prompts=4, n_layers=3), seed=0)
    with torch.no_grad():
        model.adapter.gates.fill_(0.5)
    with torch.inference_mode():
        kv = model.adapter_kv(None, None)
    packed = DecodeStep(model.base)
    plain_tokens, plain_logits = greedy(model.base, DecodeStep(model.base, packed_mb=0), PROMPTS, kv)
    tokens, logits = greedy(model.base, packed, PROMPTS, kv)
    assert len(PROMPTS) > 1 and packed.packed_bytes > 0
    assert tokens.tolist() == plain_tokens.tolist()
    torch.testing.assert_close(logits, plain_logits, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_a_batch_engine_packs_at_start_and_a_single_stream_never(tiny_hf):
    from mmadapter.batching import BatchEngine
    from mmadapter.model import load_base

    model = load_base(str(tiny_hf[0]))
    engine = BatchEngine(model, max_batch=4)  # its memory is taken when it starts, not under load
    assert engine._decode_step._packed and all(p._packed is not None for p in engine._decode_step._packed)
    single = BatchEngine(model, max_batch=1)
    assert not any(p._tried for p in single._decode_step._packed)
