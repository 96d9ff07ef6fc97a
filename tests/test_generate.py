"""Generation: streaming equals generate, prompt K/V once per request, sampling controls, stop strings."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from test_vision import TINY_VIT, register_tiny_models, save_reference

from mmadapter import AdapterConfig, VisionConfig, build_model
from mmadapter.generate import Sampling, TextStream, decode_tokens
from mmadapter.llama import Attention


@pytest.fixture()
def smollm_adapted(smollm):
    """The embedded model with a random adapter whose gates are open (so it changes the output)."""
    smollm.add_adapter(AdapterConfig(n_prompts=10, n_layers=4), seed=0)
    with torch.no_grad():
        smollm.adapter.gates.fill_(0.05)
    yield smollm
    smollm.use_adapter(None)


def test_stream_joined_equals_generate(smollm_adapted):
    question = "List three fruits."
    full = smollm_adapted.generate(question, max_new_tokens=40)
    pieces = list(smollm_adapted.stream(question, max_new_tokens=40))
    assert len(pieces) > 3 and "".join(pieces) == full


def test_stop_strings_cut_generation_and_stream_alike(smollm):
    question = "Describe the water cycle in two sentences."
    free = smollm.generate(question, max_new_tokens=40)
    assert len(free) > 40
    stop = free[len(free) // 2: len(free) // 2 + 4]  # a string that first appears mid-answer (or earlier)
    cut = smollm.generate(question, max_new_tokens=40, stop=[stop, "never-appears"])
    assert cut == free[: free.index(stop)]
    assert "".join(smollm.stream(question, max_new_tokens=40, stop=[stop, "never-appears"])) == cut


def test_prompt_kv_is_computed_once_per_request(smollm_adapted, monkeypatch):
    calls = []
    original = Attention.project_prompt
    monkeypatch.setattr(Attention, "project_prompt", lambda self, p: calls.append(1) or original(self, p))
    out = smollm_adapted.generate("Tell me a story about a dragon.", max_new_tokens=20)
    assert len(smollm_adapted.tokenizer.encode(out)) >= 10  # many decode steps ran
    assert len(calls) == smollm_adapted.adapter.n_layers  # one projection per adapted layer, not per token


def test_greedy_controls(smollm):
    q = "Name a planet."
    greedy = smollm.generate(q, max_new_tokens=12)
    assert smollm.generate(q, max_new_tokens=12, temperature=0.8, top_k=1, seed=3) == greedy
    assert smollm.generate(q, max_new_tokens=12, temperature=0.8, top_p=1e-6, seed=3) == greedy
    a = smollm.generate(q, max_new_tokens=12, temperature=1.0, seed=5)
    assert a == smollm.generate(q, max_new_tokens=12, temperature=1.0, seed=5)


def test_sampling_respects_top_k():
    logits = torch.tensor([[0.0, 5.0, 4.9, 4.8, -3.0]])
    g = torch.Generator().manual_seed(0)
    from mmadapter.generate import sample

    drawn = {int(sample(logits, Sampling(temperature=1.0, top_k=2), g)) for _ in range(200)}
    assert drawn == {1, 2}
    drawn = {int(sample(logits, Sampling(temperature=1.0, top_p=0.5), g)) for _ in range(200)}
    assert drawn == {1, 2}  # 1 alone holds < 0.5 of the mass; 1 and 2 together exceed it


def test_batched_generation_equals_one_by_one(smollm_adapted):
    prompts = ["What is 2 + 2?", "Write one sentence about the sea, please, in a calm tone."]
    batched = smollm_adapted.generate(prompts, max_new_tokens=16)
    assert batched == [smollm_adapted.generate(p, max_new_tokens=16) for p in prompts]


def test_text_stream_never_splits_a_character(smollm):
    tok = smollm.tokenizer
    text = "Café 😀 naïve 日本語 ok"
    ids = tok.encode(text)
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_bad_sampling_settings_are_clear_errors(smollm):
    with pytest.raises(ValueError, match="top_p"):
        smollm.generate("hi", top_p=0.0)
    with pytest.raises(ValueError, match="context"):
        smollm.generate("hi", max_new_tokens=10**6)


def test_cached_decoding_with_adapter_and_image_equals_recomputation(tiny_hf, tmp_path):
    register_tiny_models(tmp_path)
    save_reference(TINY_VIT, tmp_path / "vit.safetensors", seed=0)
    model = build_model(str(tiny_hf[0]), AdapterConfig(n_prompts=4, n_layers=3),
                        VisionConfig(model=TINY_VIT, pretrained=str(tmp_path / "vit.safetensors"),
                                     projector_hidden=16), seed=0)
    with torch.no_grad():
        model.adapter.gates.fill_(0.8)
    image = Image.new("RGB", (32, 32), "orange")
    feats, has = model.image_features([image])
    with torch.no_grad():
        kv = model.adapter_kv(feats, has)
    prompt = [4, 8, 15, 16, 23, 42]
    cached = [int(t) for t in decode_tokens(model.base, [prompt], kv, Sampling(max_new_tokens=10), eos_ids=())]
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            tokens.append(int(model(torch.tensor([tokens]), feats, has)[0, -1].argmax()))
    assert cached == tokens[len(prompt):]


def test_generate_takes_history_like_stream(smollm):
    history = [("My name is Ada.", "Nice to meet you, Ada!")]
    question = "What is my name?"
    with_history = smollm.generate(question, history=history, max_new_tokens=12)
    assert with_history == "".join(smollm.stream(question, history=history, max_new_tokens=12))
    assert "Ada" in with_history and "Ada" not in smollm.generate(question, max_new_tokens=12)
    batch = smollm.generate([question, question], history=[history, []], max_new_tokens=12)
    assert batch[0] == with_history
    with pytest.raises(ValueError, match="one list of"):
        smollm.generate([question, question], history=[history], max_new_tokens=2)
