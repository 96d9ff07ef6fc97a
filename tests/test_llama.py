"""The frozen LM against transformers: a tiny random GQA Llama, Llama-3.1 RoPE scaling, the real SmolLM2."""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny_hf

from mmadapter import load_base
from mmadapter.generate import Sampling, decode_tokens


def test_tiny_hf_logits_match_transformers(tiny_hf):
    path, hf = tiny_hf
    model = load_base(str(path))
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)
        ref = hf(tokens).logits
    assert ours.abs().max() > 1.0  # non-trivial logits, so the tolerance below means something
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    hf = save_tiny_hf(tmp_path, rope_scaling=scaling, rope_theta=500000.0)
    model = load_base(str(tmp_path))
    assert model.base.config.rope_scaling is not None
    tokens = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-5, rtol=0)


def test_tied_embeddings_match_transformers(tmp_path):
    hf = save_tiny_hf(tmp_path, tie_word_embeddings=True, num_key_value_heads=4)
    model = load_base(str(tmp_path))
    assert model.base.output is None
    tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-5, rtol=0)


def _greedy_full_recompute(base, prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = base.head(base(torch.tensor([tokens])))[0, -1]
            tokens.append(int(logits.argmax()))
    return tokens[len(prompt):]


def test_kv_cache_decoding_equals_full_recomputation(tiny_hf):
    model = load_base(str(tiny_hf[0]))
    prompt = [5, 17, 99, 3, 42, 7]
    cached = [int(t) for t in decode_tokens(model.base, [prompt], None, Sampling(max_new_tokens=12), eos_ids=())]
    assert cached == _greedy_full_recompute(model.base, prompt, 12)


def test_left_padded_batch_equals_each_prompt_alone(tiny_hf):
    model = load_base(str(tiny_hf[0]))
    prompts = [[5, 17, 99, 3, 42, 7, 8, 9], [11, 12], [200, 201, 202, 203, 1]]
    s = Sampling(max_new_tokens=10)
    batched = torch.stack(list(decode_tokens(model.base, prompts, None, s, eos_ids=())), dim=1)  # [B, n]
    for i, p in enumerate(prompts):
        alone = torch.stack(list(decode_tokens(model.base, [p], None, s, eos_ids=())), dim=1)[0]
        assert batched[i].tolist() == alone.tolist()


@pytest.fixture(scope="module")
def smollm_hf():
    from transformers import AutoModelForCausalLM

    from mmadapter.weights import embedded_path

    path = embedded_path("smollm2-135m-instruct")
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def test_embedded_smollm2_matches_transformers(smollm, smollm_hf):
    tok = smollm.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Name three primary colours."}]))
    tokens = torch.tensor([prompt])
    with torch.no_grad():
        ours, ref = smollm(tokens), smollm_hf(tokens).logits
    assert ref.abs().max() > 5
    torch.testing.assert_close(ours, ref, atol=5e-4, rtol=0)

    s = Sampling(max_new_tokens=32)
    cont = [int(t) for t in decode_tokens(smollm.base, [prompt], None, s, eos_ids=())]
    with torch.no_grad():
        ref_ids = smollm_hf.generate(tokens, max_new_tokens=32, do_sample=False, eos_token_id=None,
                                     attention_mask=torch.ones_like(tokens))
    assert cont == ref_ids[0, len(prompt):].tolist()


def test_embedded_default_answers_sensibly(smollm):
    answer = smollm.generate("What is the capital of France?", max_new_tokens=24)
    assert "Paris" in answer


def test_one_row_product_uses_every_core_and_equals_linear():
    from mmadapter.matvec import matvec_or_matmul

    torch.manual_seed(0)
    weight, x = torch.randn(96, 40), torch.randn(1, 1, 40)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            torch.testing.assert_close(matvec_or_matmul(x, weight), torch.nn.functional.linear(x, weight))
    finally:
        torch.set_num_threads(threads)
    rows = torch.randn(2, 3, 40)
    torch.testing.assert_close(matvec_or_matmul(rows, weight), torch.nn.functional.linear(rows, weight))


def test_replace_linears_swaps_every_frozen_projection():
    """The seam for quantised or LoRA projections: every Linear is swapped, and the model runs through the
    replacements (a pass-through wrapper keeps the logits bit for bit; one that doubles them does not)."""
    from torch import nn

    from mmadapter.config import LlamaConfig
    from mmadapter.llama import Linear, Llama, replace_linears

    class Scaled(nn.Module):
        def __init__(self, inner: Linear, scale: float) -> None:
            super().__init__()
            self.inner, self.scale = inner, scale

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) * self.scale

    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("tiny")).eval()  # tied embeddings: the head is the embedding
    tokens = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        before = model.head(model(tokens))
        names = []
        assert replace_linears(model, lambda name, lin: names.append(name) or Scaled(lin, 1.0)) == 4 * 7
        assert {"layers.0.attention.wq", "layers.3.feed_forward.w2"} <= set(names)
        assert all(isinstance(m, Scaled) for layer in model.layers for m in (layer.attention.wv, layer.feed_forward.w1))
        torch.testing.assert_close(model.head(model(tokens)), before, rtol=0, atol=0)
        replace_linears(model.layers[0].attention, lambda name, lin: Scaled(lin, 2.0))
        assert (model.head(model(tokens)) - before).abs().max() > 1e-3
