"""Zero-init gated adaptation prompts: exact base equality at init, the reference formula, gradient flow."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmadapter import AdapterConfig, LlamaConfig, build_model, load_base
from mmadapter.adapter import Adapter
from mmadapter.generate import Sampling, decode_tokens


def _tiny(path, adapter: AdapterConfig, seed: int = 0):
    model = load_base(str(path))
    model.add_adapter(adapter, seed=seed)
    return model


def _tokens(b=2, t=20, seed=0):
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


def test_zero_gates_equal_base_exactly(tiny_hf):
    model = _tiny(tiny_hf[0], AdapterConfig(n_prompts=5, n_layers=3))
    tokens = _tokens()
    with torch.no_grad():
        base = model(tokens, adapter=None)
        adapted = model(tokens)
        assert torch.equal(adapted, base)
        model.adapter.gates.fill_(0.5)
        assert (model(tokens) - base).abs().max() > 1e-3


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def naive_reference_logits(model, tokens):
    """The reference LLaMA-Adapter forward written out by hand: prompt keys concatenated in front of the
    text keys, one softmax over the prompt columns scaled by tanh(gate), one over the causal text columns."""
    base, adapter = model.base, model.adapter
    c = base.config
    sd = {k: v.double() for k, v in base.state_dict().items()}
    b, t = tokens.shape
    d, hq, hkv = c.head_dim, c.n_heads, c.n_kv_heads
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, d, 2).double() / d))
    ang = torch.outer(torch.arange(t).double(), inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rms(x, w):
        return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + c.norm_eps)

    h = sd["tok_embeddings.weight"][tokens]
    causal = torch.full((t, t), float("-inf")).triu(1).double()
    for i in range(c.n_layers):
        p = f"layers.{i}."
        x = rms(h, sd[p + "attention_norm.weight"])
        q = (x @ sd[p + "attention.wq.weight"].T).view(b, t, hq, d)
        k = (x @ sd[p + "attention.wk.weight"].T).view(b, t, hkv, d)
        v = (x @ sd[p + "attention.wv.weight"].T).view(b, t, hkv, d)
        q = q * cos[None, :, None] + _rotate_half(q) * sin[None, :, None]
        k = k * cos[None, :, None] + _rotate_half(k) * sin[None, :, None]
        n_prompt = 0
        j = i - adapter.first_layer
        if j >= 0:
            prompt = adapter.prompts[j].detach().double()  # [K, C]
            n_prompt = prompt.shape[0]
            pk = (prompt @ sd[p + "attention.wk.weight"].T).view(1, n_prompt, hkv, d).expand(b, -1, -1, -1)
            pv = (prompt @ sd[p + "attention.wv.weight"].T).view(1, n_prompt, hkv, d).expand(b, -1, -1, -1)
            k, v = torch.cat([pk, k], 1), torch.cat([pv, v], 1)
        k = k.repeat_interleave(hq // hkv, dim=2)  # query head h uses kv head h // (H/G)
        v = v.repeat_interleave(hq // hkv, dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scores = q @ k.transpose(2, 3) / math.sqrt(d)  # [B, H, T, K+T]
        mask = torch.cat([torch.zeros(t, n_prompt).double(), causal], -1)
        scores = scores + mask
        probs = F.softmax(scores[..., n_prompt:], -1)
        if n_prompt:
            gate = torch.tanh(adapter.gates[j].detach().double()).view(1, hq, 1, 1)
            probs = torch.cat([gate * F.softmax(scores[..., :n_prompt], -1), probs], -1)
        out = (probs @ v).transpose(1, 2).reshape(b, t, hq * d)
        h = h + out @ sd[p + "attention.wo.weight"].T
        x = rms(h, sd[p + "ffn_norm.weight"])
        h = h + (F.silu(x @ sd[p + "feed_forward.w1.weight"].T) * (x @ sd[p + "feed_forward.w3.weight"].T)) \
            @ sd[p + "feed_forward.w2.weight"].T
    h = rms(h, sd["norm.weight"])
    head = sd["output.weight"] if "output.weight" in sd else sd["tok_embeddings.weight"]
    return h @ head.T


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["MHA", "GQA"])
def test_adapter_term_matches_reference_formula(tmp_path, n_kv_heads):
    from conftest import save_tiny_hf

    save_tiny_hf(tmp_path, num_key_value_heads=n_kv_heads)
    model = _tiny(tmp_path, AdapterConfig(n_prompts=6, n_layers=3))
    with torch.no_grad():
        model.adapter.gates.copy_(torch.randn_like(model.adapter.gates))  # distinct per head and layer
        tokens = _tokens()
        ours = model(tokens)
    ref = naive_reference_logits(model, tokens).float()
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_gradients_reach_only_prompts_and_gates(tiny_hf):
    model = _tiny(tiny_hf[0], AdapterConfig(n_prompts=4, n_layers=2))
    tokens = _tokens()
    labels = tokens.clone()

    # at step 0 the gates are zero: prompts get exactly zero gradient, gates a non-zero one (tanh(0) = 0 scales their term)
    model.loss(tokens, labels).backward()
    assert torch.count_nonzero(model.adapter.prompts.grad) == 0
    assert model.adapter.gates.grad.abs().sum() > 0

    model.adapter.zero_grad()
    with torch.no_grad():
        model.adapter.gates.fill_(0.3)
    model.loss(tokens, labels).backward()
    assert model.adapter.prompts.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.base.parameters())


def test_no_autograd_graph_below_adapted_layers(tiny_hf):
    model = _tiny(tiny_hf[0], AdapterConfig(n_prompts=4, n_layers=2))
    with torch.no_grad():
        model.adapter.gates.fill_(0.3)
    graphs = {}
    hooks = [layer.register_forward_hook(lambda m, a, out, i=i: graphs.__setitem__(i, out.grad_fn is not None))
             for i, layer in enumerate(model.base.layers)]
    model.loss(_tokens(), _tokens()).backward()
    for hk in hooks:
        hk.remove()
    first = model.adapter.first_layer
    assert first == 2
    assert graphs == {i: i >= first for i in range(4)}


def test_llama7b_trainable_count_matches_paper():
    adapter = Adapter(AdapterConfig(n_prompts=10, n_layers=30), LlamaConfig.from_name("llama-7b"))
    assert sum(p.numel() for p in adapter.parameters()) == 1_228_800 + 960
    assert adapter.first_layer == 2


def test_default_adapts_all_but_bottom_two_layers():
    assert AdapterConfig().adapted_layers(32) == 30
    assert AdapterConfig().adapted_layers(30) == 28
    with pytest.raises(ValueError, match="n_layers"):
        AdapterConfig(n_layers=40).adapted_layers(32)


def test_cached_decoding_with_adapter_equals_recomputation(tiny_hf):
    model = _tiny(tiny_hf[0], AdapterConfig(n_prompts=5, n_layers=3))
    with torch.no_grad():
        model.adapter.gates.fill_(0.7)
    prompt = [9, 8, 7, 6, 5]
    kv = model.adapter_kv()
    cached = [int(t) for t in decode_tokens(model.base, [prompt], kv, Sampling(max_new_tokens=10), eos_ids=())]
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    assert cached == tokens[len(prompt):]


def test_build_model_on_embedded_default_summarises_parts(smollm):
    model = build_model(smollm, AdapterConfig(), seed=0)
    text = model.summary()
    assert "prompts" in text and "gates" in text and f"{10 * 28 * 576:,}" in text
    model.use_adapter(None)  # leave the shared fixture as we found it


@pytest.mark.parametrize("prompt_batch", [1, 3])
def test_one_token_prompt_attention_equals_the_general_path(prompt_batch):
    """Decoding's plain-matmul path (`attend_one`) against the general one (SDPA), with a different gate
    per head (a head-to-gate mix-up shows), grouped kv heads, padding in the mask and one prompt set
    shared by the batch or one per sample."""
    from mmadapter.llama import attend, attend_one

    g = torch.Generator().manual_seed(0)
    b, h, kv_heads, s, k_prompts, d = 3, 6, 2, 7, 4, 8
    q = torch.randn(b, h, 1, d, generator=g)
    k, v = torch.randn(b, kv_heads, s, d, generator=g), torch.randn(b, kv_heads, s, d, generator=g)
    pk = torch.randn(prompt_batch, kv_heads, k_prompts, d, generator=g)
    pv = torch.randn(prompt_batch, kv_heads, k_prompts, d, generator=g)
    gate = torch.tanh(torch.randn(h, generator=g))
    mask = torch.ones(b, 1, 1, s, dtype=torch.bool)
    mask[1, ..., :3] = False  # a left-padded sample
    general = attend(q, k, v, mask, causal=False) + gate.view(1, h, 1, 1) * attend(
        q, pk.expand(b, -1, -1, -1), pv.expand(b, -1, -1, -1), None, causal=False)
    torch.testing.assert_close(attend_one(q, k, v, mask, (pk, pv, gate)), general, rtol=1e-5, atol=1e-6)
