"""Continuous batching: each request gets exactly the tokens it gets alone, whoever shares its batch.

Requests join while another decodes, with different adapters (covering different layers), images,
sampling settings and lengths; the reference is `MMAdapter.generate` of each request alone.
"""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image
from test_vision import TINY_VIT, register_tiny_models, save_reference

from mmadapter import AdapterConfig, VisionConfig
from mmadapter.batching import BatchEngine
from mmadapter.generate import Sampling
from mmadapter.model import build_model

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def adapters(smollm, tmp_path_factory):
    """Three adapters over the embedded base: text over 4 layers, text over 8, multimodal over 6."""
    register_tiny_models(tmp_path_factory.mktemp("clip_cfg"))
    weights = tmp_path_factory.mktemp("clip") / "tiny_vit.safetensors"
    save_reference(TINY_VIT, weights, seed=0)
    saved = smollm.adapter, smollm.vision, smollm.feature_cache
    made = {}
    for name, layers, vision, seed in [("four", 4, None, 1), ("eight", 8, None, 2), ("vision", 6, True, 3)]:
        config = VisionConfig(model=TINY_VIT, pretrained=str(weights), projector_hidden=32) if vision else None
        build_model(smollm, AdapterConfig(n_prompts=10, n_layers=layers), config, seed=seed)
        with torch.no_grad():
            smollm.adapter.gates.fill_(0.5)
            if smollm.adapter.projector is not None:
                smollm.adapter.projector.fc2.weight.mul_(50)  # make the image token matter
        made[name] = smollm.adapter
    smollm.adapter = saved[0]
    yield made
    smollm.adapter, smollm.vision, smollm.feature_cache = saved


def test_batched_requests_get_the_tokens_they_get_alone(smollm, adapters):
    red, blue = Image.new("RGB", (40, 40), "red"), Image.new("RGB", (40, 40), "blue")
    requests = [  # (prompt, image, adapter, sampling)
        ("Write a short poem about the sea.", None, None, {}),
        ("What colour is this?", red, adapters["vision"], {}),
        ("What colour is this?", blue, adapters["vision"], {}),
        ("Name three animals that live in the jungle, please.", None, adapters["four"], {}),
        ("Hi", None, adapters["eight"], {}),
        ("Tell me a story.", None, adapters["eight"], {"temperature": 0.8, "top_p": 0.9, "seed": 7}),
    ]
    alone = [smollm.generate(p, image, adapter=a, max_new_tokens=NEW_TOKENS, **kw) for p, image, a, kw in requests]
    assert alone[1] != alone[2]  # the image changes the answer, so mixing images up would show

    engine = BatchEngine(smollm, max_batch=4, max_slots=512)  # fewer rows than requests: some wait for a row
    results: list[str | None] = [None] * len(requests)

    def run(i: int) -> None:
        prompt, image, adapter, kw = requests[i]
        results[i] = "".join(engine.stream(prompt, image, adapter=adapter, max_new_tokens=NEW_TOKENS, **kw))

    first = threading.Thread(target=run, args=(0,))
    first.start()
    while engine.steps < 2:  # the first request is decoding: the others join its batch
        threading.Event().wait(0.01)
    others = [threading.Thread(target=run, args=(i,)) for i in range(1, len(requests))]
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join(timeout=300)
    assert results == alone
    assert engine.peak_rows >= 3  # they really were decoded together


def test_stop_strings_cancel_and_bad_requests(smollm, adapters):
    engine = BatchEngine(smollm, max_batch=2, max_slots=256)
    full = smollm.generate("Count from one to ten in words.", max_new_tokens=24)
    stop = full.split()[2]
    assert "".join(engine.stream("Count from one to ten in words.", max_new_tokens=24, stop=[stop])) == \
        smollm.generate("Count from one to ten in words.", max_new_tokens=24, stop=[stop])
    tokens = engine.submit(smollm.prompt_ids("Say hello."), sampling=Sampling(64))
    next(tokens)
    tokens.close()  # a consumer that goes away frees its row
    with pytest.raises(ValueError, match="exceed the context"):
        engine.submit([1] * 250, sampling=Sampling(16))
    with pytest.raises(ValueError, match="no vision tower|has no image pathway|projector"):
        list(engine.submit(smollm.prompt_ids("Hi"), image=Image.new("RGB", (8, 8)), sampling=Sampling(8)))
    assert "".join(engine.stream("What is the capital of France?", max_new_tokens=12)) == \
        smollm.generate("What is the capital of France?", max_new_tokens=12)  # still serving


def test_another_prompt_count_waits_until_the_batch_drains(smollm, adapters):
    """A request whose adapter has another number of prompts than the running batch is not admitted while
    that batch decodes; it starts once the batch has drained, and still gets the tokens it gets alone."""
    saved = smollm.adapter
    build_model(smollm, AdapterConfig(n_prompts=5, n_layers=4), None, seed=4)
    five, smollm.adapter = smollm.adapter, saved
    with torch.no_grad():
        five.gates.fill_(0.5)
    requests = [("Write a short poem about the sea.", adapters["four"], 24), ("Hi", five, NEW_TOKENS)]
    alone = [smollm.generate(p, adapter=a, max_new_tokens=n) for p, a, n in requests]
    engine = BatchEngine(smollm, max_batch=4, max_slots=512)
    admitted = []  # (prompt count, prompt counts decoding at that moment, step)
    admit = engine._admit

    def recording(request) -> None:
        admitted.append((request.n_prompts, [r.n_prompts for r in engine._active()], engine.steps))
        admit(request)

    engine._admit = recording
    results: list[str | None] = [None] * len(requests)

    def run(i: int) -> None:
        prompt, adapter, n = requests[i]
        results[i] = "".join(engine.stream(prompt, adapter=adapter, max_new_tokens=n))

    first = threading.Thread(target=run, args=(0,))
    first.start()
    while engine.steps < 2:
        threading.Event().wait(0.01)
    submitted_at = engine.steps
    second = threading.Thread(target=run, args=(1,))
    second.start()
    for t in (first, second):
        t.join(timeout=300)
    assert results == alone
    assert [(k, active) for k, active, _ in admitted] == [(10, []), (5, [])]  # admitted alone, after the drain
    assert admitted[1][2] > submitted_at + 1  # it waited while the first request went on decoding


def test_a_next_turn_reuses_its_answer_s_k_v(smollm):
    """The history carries an answer as text, so turn 2 reuses the K/V of turn 1's prompt and of every generated
    token up to where re-tokenising the answer's text first gives another id: all of it for the words the
    embedded model answers with."""
    engine = BatchEngine(smollm, max_batch=1, max_slots=512, reuse_mb=64)
    question, follow_up = "Name three fruits.", "Which of them is the sweetest?"
    first = smollm.prompt_ids(question, adapter=None)
    generated = list(engine.submit(first, sampling=Sampling(max_new_tokens=NEW_TOKENS)))
    answer = smollm.tokenizer.decode(generated)
    history = [(question, answer)]
    second = smollm.prompt_ids(follow_up, history=history, adapter=None)
    fed = first + generated[:-1]  # the last token was handed out, never fed back: it has no K/V
    assert second[:len(fed)] == fed  # ordinary words re-tokenise to the ids generated
    reused = engine.reuse.reused_tokens
    text = "".join(engine.stream(follow_up, history=history, max_new_tokens=NEW_TOKENS))
    assert text == smollm.generate(follow_up, history=history, adapter=None, max_new_tokens=NEW_TOKENS)
    assert engine.reuse.reused_tokens - reused == len(fed)  # only the new message was prefilled
