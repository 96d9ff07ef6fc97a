"""The lean one-token step (`decode_step.DecodeStep`) against the general `Llama.forward` over one token: the same
greedy tokens with adapter and image, alone and in a left-padded batch, fp32 and bf16; fused weights that
are views (no second copy), refused when stale, and left unfused for quantised projections."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch
from PIL import Image
from test_vision import TINY_VIT, register_tiny_models, save_reference

from mmadapter import AdapterConfig, VisionConfig, build_model, load_base
from mmadapter.compiled_step import BackgroundCompile, base_signature
from mmadapter.generate import Sampling, decode_tokens, left_pad, prefill
from mmadapter.decode_step import DecodeStep
from mmadapter.llama import Linear, replace_linears
from mmadapter.quant import Int8Linear

PROMPTS = [[4, 8, 15, 16, 23, 42, 7, 9], [11, 12, 13], [200, 31, 5, 77, 1, 3]]


@pytest.fixture(scope="module")
def multimodal(tiny_hf, tmp_path_factory):
    path = tmp_path_factory.mktemp("tower")
    register_tiny_models(path)
    save_reference(TINY_VIT, path / "vit.safetensors", seed=0)
    model = build_model(str(tiny_hf[0]), AdapterConfig(n_prompts=4, n_layers=3),
                        VisionConfig(model=TINY_VIT, pretrained=str(path / "vit.safetensors"), projector_hidden=16),
                        seed=0)
    with torch.no_grad():
        model.adapter.gates.fill_(0.8)  # open: the prompt term moves the logits
    return model


def general_step(base, token, pos, cache, key_mask, adapter):
    """The reference: the general forward over one token."""
    h = base(token[:, None], input_pos=torch.tensor([pos]), cache=cache, key_mask=key_mask, adapter=adapter)
    return base.head(h[:, -1])


def greedy(base, step, prompts, adapter, n=10, forced=None):
    """Greedy tokens [B, n] and the logits of every step [n, B, V], decoding with `step` after a prefill
    (feeding the tokens `forced` [B, n] instead of its own, when given)."""
    with torch.inference_mode():
        tokens, key_mask = left_pad(prompts, max(map(len, prompts)) + n, base.device)
        cache = base.layer_caches(base.new_cache(len(prompts), tokens.shape[1] + n))
        logits, out, all_logits = prefill(base, tokens, cache, key_mask, adapter), [], []
        for i in range(n):
            out.append(logits.argmax(-1) if forced is None else forced[:, i])
            logits = step(out[-1], tokens.shape[1] + i, cache, key_mask, adapter)
            all_logits.append(logits.float())
    return torch.stack(out, 1), torch.stack(all_logits)


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["alone", "padded batch"])
def test_lean_step_equals_general_forward_with_adapter_and_image(multimodal, prompts):
    images = [Image.new("RGB", (32, 32), c) for c in ("orange", "navy", "olive")][: len(prompts)]
    feats, has = multimodal.image_features(images)
    with torch.inference_mode():
        kv = multimodal.adapter_kv(feats, has)
    base = multimodal.base
    ref, ref_logits = greedy(base, lambda *a: general_step(base, *a), prompts, kv)
    lean, lean_logits = greedy(base, DecodeStep(base), prompts, kv)
    assert lean.tolist() == ref.tolist()
    assert ref_logits.abs().max() > 1  # non-trivial logits, so the tolerance means something
    torch.testing.assert_close(lean_logits, ref_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tuning", [dict(bias_tuning=True), dict(bias_tuning=True, lora_rank=3), dict(lora_rank=2)],
                         ids=["bias", "bias + LoRA", "LoRA"])
def test_lean_step_fuses_v2_tuning_and_equals_the_general_forward(tiny_hf, tuning):
    """V2 biases and LoRA over the frozen projections: the lean step fuses q/k/v and gate/up with their terms
    stacked (zeros where a projection has none) and still gives the general forward's logits."""
    model = load_base(str(tiny_hf[0]))
    model.add_adapter(AdapterConfig(n_prompts=4, n_layers=3, **tuning), seed=0)
    with torch.no_grad():
        model.adapter.gates.fill_(0.5)
        for p in model.adapter.tuning.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # non-zero biases and LoRA B: every term moves the logits
    model.use_adapter(model.adapter)
    with torch.inference_mode():
        kv = model.adapter_kv(None, None)
    base = model.base
    ref, ref_logits = greedy(base, lambda *a: general_step(base, *a), PROMPTS, kv)
    # F.linear products, as the general forward's: what is compared here is the fused V2 terms; the packed
    # products of batched steps sum in another order (tests/test_packed_rows.py)
    step = DecodeStep(base, packed_mb=0)
    lean, lean_logits = greedy(base, step, PROMPTS, kv)
    assert lean.tolist() == ref.tolist()
    torch.testing.assert_close(lean_logits, ref_logits, atol=1e-5, rtol=0)
    signature = base_signature(base)  # after the step fused the frozen weights (views, same values)
    # trained further, the next request's state brings the new terms to the same step (no stale fused copy)
    layer = model.adapter.tuning.layers[0]
    with torch.no_grad():
        (layer.bias["wq"] if "wq" in layer.bias else layer.lora_b["wq"]).add_(0.5)
    with torch.inference_mode():
        kv2 = model.adapter_kv(None, None)
    ref2 = greedy(base, lambda *a: general_step(base, *a), PROMPTS, kv2)[1]
    lean2 = greedy(base, step, PROMPTS, kv2)[1]
    assert (ref2 - ref_logits).abs().max() > 1e-3
    torch.testing.assert_close(lean2, ref2, atol=1e-5, rtol=0)
    assert base_signature(base) == signature  # the tuning never entered the base


def test_lean_step_bf16_as_close_to_fp32_as_the_general_path(tiny_hf):
    """In bf16 the two paths round differently; the lean one must be no further from the fp32 logits."""
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_base(str(tiny_hf[0]), dtype=dtype)
        model.add_adapter(AdapterConfig(n_prompts=4, n_layers=2), seed=0)
        with torch.no_grad():
            model.adapter.gates.fill_(0.5)
            kv = model.adapter_kv(None, None)
        base = model.base
        if dtype == torch.float32:
            tokens, logits["fp32"] = greedy(base, DecodeStep(base), PROMPTS, kv, n=6)
        else:
            logits["general"] = greedy(base, lambda *a: general_step(base, *a), PROMPTS, kv, 6, tokens)[1]
            logits["lean"] = greedy(base, DecodeStep(base), PROMPTS, kv, 6, tokens)[1]
    error = {k: float((logits[k] - logits["fp32"]).abs().max()) for k in ("general", "lean")}
    assert 0 < error["lean"] <= 1.5 * error["general"], error


def test_fused_weights_are_views_and_follow_reloads(tiny_hf):
    model = load_base(str(tiny_hf[0]))
    base = model.base
    attention = base.layers[0].attention
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ref, _ = greedy(base, lambda *a: general_step(base, *a), PROMPTS, None)
    assert greedy(base, DecodeStep(base), PROMPTS, None)[0].tolist() == ref.tolist()
    fused = attention._fused_weights[("wq", "wk", "wv")]
    for w in (attention.wq.weight, attention.wk.weight, attention.wv.weight):  # one copy of the weights
        assert w.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert not attention.wq.weight.requires_grad
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # same names, same values

    # loading other weights with assign=True replaces the views: the next step must not use the stale copy
    other = {k: v + 0.05 * torch.randn_like(v) if k.endswith(("wk.weight", "w3.weight")) else v
             for k, v in before.items()}
    base.load_state_dict(other, assign=True)
    ref2, _ = greedy(base, lambda *a: general_step(base, *a), PROMPTS, None)
    assert ref2.tolist() != ref.tolist()
    assert greedy(base, DecodeStep(base), PROMPTS, None)[0].tolist() == ref2.tolist()


def test_quantised_projections_are_left_unfused(tiny_hf):
    model = load_base(str(tiny_hf[0]))
    base = model.base
    replace_linears(base.layers[1], lambda name, linear: Int8Linear.from_float(linear.weight)
                    if name.endswith(("wk", "w1")) else linear)
    step = DecodeStep(base)
    assert isinstance(base.layers[1].attention.wq, Linear) and "_fused_weights" not in vars(base.layers[1].attention)
    ref, _ = greedy(base, lambda *a: general_step(base, *a), PROMPTS, None)
    assert greedy(base, step, PROMPTS, None)[0].tolist() == ref.tolist()


def test_training_after_decoding_moves_only_the_adapter(multimodal):
    """Fused weights are plain (not inference) tensors: autograd through them works after a decode."""
    base = multimodal.base
    greedy(base, DecodeStep(base), PROMPTS[:1], None, n=2)
    tokens = torch.tensor([PROMPTS[0]])
    loss = multimodal.loss(tokens, tokens)
    loss.backward()
    trained = [p for p in multimodal.adapter.parameters() if p.grad is not None]
    assert trained and all(p.grad is None for p in base.parameters())
    for p in multimodal.adapter.parameters():
        p.grad = None


def _wait(condition, seconds=600.0):  # generous: a busy CI machine traces slowly
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert condition()


def test_background_compile_switches_to_the_compiled_step_and_keeps_the_tokens(multimodal):
    """The machinery with dynamo's own "eager" backend (inductor's codegen is measured in bench/, not here):
    the first request decodes eagerly while the step compiles, later ones run the compiled graph."""
    base, prompt, s = multimodal.base, PROMPTS[:1], Sampling(max_new_tokens=8)
    with torch.inference_mode():
        kv = multimodal.adapter_kv(None, None)
    reference = torch.stack(list(decode_tokens(base, prompt, kv, s, eos_ids=())), 1)
    compiler = BackgroundCompile(base, backend="eager")
    first = torch.stack(list(decode_tokens(base, prompt, kv, s, eos_ids=(), step=compiler.step())), 1)
    _wait(lambda: compiler.compiled is not None or compiler.failure is not None)
    assert compiler.failure is None and compiler.seconds is not None
    calls = []
    compiled = compiler.compiled
    compiler.compiled = lambda *a: calls.append(1) or compiled(*a)
    second = torch.stack(list(decode_tokens(base, prompt, kv, s, eos_ids=(), step=compiler.step())), 1)
    assert len(calls) == 7 and first.tolist() == second.tolist() == reference.tolist()
    # a padded batch is not the compiled case: it decodes eagerly, with the same tokens as without compiling
    batch = torch.stack(list(decode_tokens(base, PROMPTS, kv, s, eos_ids=(), step=compiler.step())), 1)
    assert len(calls) == 7 and batch.tolist() == torch.stack(list(decode_tokens(base, PROMPTS, kv, s, eos_ids=())), 1).tolist()


def test_a_failing_compile_falls_back_to_eager_with_one_warning(multimodal, caplog, monkeypatch):
    def compile_without_a_c_compiler(fn, **options):
        def compiled(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C compiler found")  # what inductor raises

        return compiled

    monkeypatch.setattr(torch, "compile", compile_without_a_c_compiler)
    base, s = multimodal.base, Sampling(max_new_tokens=6)
    compiler = BackgroundCompile(base)
    with caplog.at_level(logging.WARNING, logger="mmadapter.compiled_step"):
        first = list(decode_tokens(base, PROMPTS[:1], None, s, eos_ids=(), step=compiler.step()))
        _wait(lambda: compiler.failure is not None)
        again = list(decode_tokens(base, PROMPTS[:1], None, s, eos_ids=(), step=compiler.step()))
    assert "No working C compiler" in compiler.failure and compiler.compiled is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "stays eager" in warnings[0].getMessage()
    assert [int(t) for t in first] == [int(t) for t in again] == [
        int(t) for t in decode_tokens(base, PROMPTS[:1], None, s, eos_ids=())]


def test_a_compile_over_its_budget_leaves_decoding_eager(multimodal, monkeypatch):
    release = threading.Event()

    def slow_compile(fn, **options):
        release.wait(30)
        return fn

    monkeypatch.setattr(torch, "compile", slow_compile)
    base, s = multimodal.base, Sampling(max_new_tokens=4)
    compiler = BackgroundCompile(base, budget_s=0.0)
    first = list(decode_tokens(base, PROMPTS[:1], None, s, eos_ids=(), step=compiler.step()))
    assert "not compiled within 0 s" in compiler.failure
    release.set()
    _wait(lambda: not any(t.name == "mmadapter-compile" for t in threading.enumerate()))
    assert compiler.compiled is None  # finished late: discarded
    assert [int(t) for t in first] == [int(t) for t in decode_tokens(base, PROMPTS[:1], None, s, eos_ids=())]
