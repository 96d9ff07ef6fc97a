"""Serving many chats: prefix reuse across turns and chunked prefill give the tokens of a plain prefill.

On a tiny random base with a tiny random tower: every adapter kind (none, V1 text, V1 multimodal, V2 bias +
LoRA, spatial tokens), with and without images, answers a 3-turn chat through a batch engine that reuses the
K/V of earlier turns and prefills in small chunks, and gets exactly what `MMAdapter.generate` gives each turn
alone. Conversations with another image never read each other's K/V; the byte budget evicts the least
recently used entries; a long prompt prefilled in chunks lets the running request decode between chunks.
"""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image
from test_train import COLOURS, make_text_base, make_tower_dir, one_thread  # noqa: F401 (one_thread: autouse)

from mmadapter import AdapterConfig, VisionConfig
from mmadapter.adapter import Adapter
from mmadapter.batching import BatchEngine
from mmadapter.generate import Sampling
from mmadapter.model import load_base
from mmadapter.prefix_reuse import PrefixReuse, request_context
from mmadapter.vision import VisionTower

NEW = 10
QUESTIONS = ["What color is this?", "Tell me more about the picture.", "Say it in one word."]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model, {kind: adapter or None}) over one tiny base; each adapter with open gates and a loud image."""
    base_dir = make_text_base(tmp_path_factory.mktemp("text_base"))
    tower_dir = make_tower_dir(tmp_path_factory.mktemp("towers") / "tiny_vit")
    model = load_base(str(base_dir))
    c = model.base.config
    v1_tower = VisionTower(VisionConfig(model=f"local-dir:{tower_dir}", pretrained=None, n_scales=2,
                                        projector_hidden=16))
    spatial_tower = VisionTower(VisionConfig(model=f"local-dir:{tower_dir}", pretrained=None, projector="spatial",
                                             spatial_grid=2, projector_hidden=16))
    torch.manual_seed(0)
    adapters = {
        "none": None,
        "v1 text": Adapter(AdapterConfig(n_prompts=4, n_layers=3), c),
        "v1": Adapter(AdapterConfig(n_prompts=4, n_layers=2), c, v1_tower.config, v1_tower.feature_dim),
        "v2": Adapter(AdapterConfig(n_prompts=4, n_layers=3, bias_tuning=True, lora_rank=4), c, v1_tower.config,
                      v1_tower.feature_dim),
        "spatial": Adapter(AdapterConfig(n_prompts=5, n_layers=3), c, spatial_tower.config,
                           spatial_tower.feature_dim),
    }
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, adapter in adapters.items():
            if adapter is None:
                continue
            adapter.gates.normal_(0, 1, generator=generator)
            if adapter.projector is not None:
                adapter.use_tower(spatial_tower if name == "spatial" else v1_tower)
                adapter.projector.fc2.weight.mul_(20)
            if adapter.tuning is not None:  # V2: biases and LoRA that really change the base
                adapter.tuning.copy_base_norms(model.base)
                for p in adapter.tuning.parameters():
                    p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model, adapters


def picture(colour: str) -> Image.Image:
    img = Image.new("RGB", (32, 32), (128, 128, 128))
    img.paste(COLOURS[colour], (4, 6, 26, 28))
    return img


def chat(model, engine, adapter, image, questions=QUESTIONS) -> list[str]:
    """A conversation through the engine: each turn sends the history so far, as the app does."""
    history, answers = [], []
    for q in questions:
        answer = "".join(engine.stream(q, image, history=history, adapter=adapter, max_new_tokens=NEW))
        assert answer == model.generate(q, image, history=history, adapter=adapter, max_new_tokens=NEW)
        history.append((q, answer))
        answers.append(answer)
    return answers


@pytest.mark.parametrize("kind,colour", [("none", None), ("v1 text", None), ("v1", None), ("v1", "red"),
                                         ("v2", None), ("v2", "blue"), ("spatial", None), ("spatial", "red")])
def test_reused_turns_give_the_tokens_of_a_full_prefill(setup, kind, colour):
    model, adapters = setup
    engine = BatchEngine(model, max_batch=2, max_slots=256, prefill_chunk=16, reuse_mb=64)
    chat(model, engine, adapters[kind], picture(colour) if colour else None)
    stats = engine.reuse.stats()
    assert stats["hits"] >= 2  # turns 2 and 3 started from the turn before
    assert stats["reused_tokens"] > stats["prompt_tokens"] / 3  # most of turn 2's and 3's prompts were reused
    assert stats["entries"] == 1  # one conversation, one entry (each turn replaced the one it extends)


def test_another_image_never_reads_the_k_v_of_a_shared_text_prefix(setup):
    model, adapters = setup
    engine = BatchEngine(model, max_batch=2, max_slots=256, reuse_mb=64)
    for kind in ("v1", "spatial"):
        adapter, red, blue = adapters[kind], picture("red"), picture("blue")
        answers = {c: model.generate(QUESTIONS[0], picture(c), adapter=adapter, max_new_tokens=NEW)
                   for c in ("red", "blue")}
        assert answers["red"] != answers["blue"]  # the image changes the answer: a mix-up would show
        assert "".join(engine.stream(QUESTIONS[0], red, adapter=adapter, max_new_tokens=NEW)) == answers["red"]
        hits, reused = engine.reuse.hits, engine.reuse.reused_tokens
        assert "".join(engine.stream(QUESTIONS[0], blue, adapter=adapter, max_new_tokens=NEW)) == answers["blue"]
        assert (engine.reuse.hits, engine.reuse.reused_tokens) == (hits, reused)  # same text, other image: no hit
        again = picture("red")  # another object with the same pixels: the same K/V, reused
        assert "".join(engine.stream(QUESTIONS[0], again, adapter=adapter, max_new_tokens=NEW)) == answers["red"]
        assert engine.reuse.hits == hits + 1
    features = model.image_features([picture("red")], adapters["v1"])[0]
    red_v1 = request_context(model.base, adapters["v1"], features)
    assert red_v1 != request_context(model.base, adapters["v2"], features)  # same image, another adapter
    assert red_v1 != request_context(model.base, adapters["v1"], None)  # the same adapter without the image
    with torch.no_grad():
        adapters["v1"].gates.mul_(1.0)  # a weight changed in place (same values): another context all the same
    assert red_v1 != request_context(model.base, adapters["v1"], features)


def test_the_byte_budget_evicts_the_least_recently_used(setup):
    model, adapters = setup
    probe = BatchEngine(model, max_batch=1, max_slots=256, reuse_mb=64)
    chat(model, probe, None, None, QUESTIONS[:1])
    one_entry = probe.reuse.stored_bytes / 2**20  # MiB of one 1-turn chat
    engine = BatchEngine(model, max_batch=1, max_slots=256, reuse_mb=2.5 * one_entry)
    colours = ["red", "blue", "green", "red"]  # the last is the first again, evicted by then
    for colour in colours:
        chat(model, engine, adapters["v1"], picture(colour), QUESTIONS[:1])
    stats = engine.reuse.stats()
    assert stats["entries"] == 2 and stats["evicted"] == 2  # red went for green, blue for red's return
    assert engine.reuse.stored_bytes <= engine.reuse.max_bytes
    assert stats["hits"] == 0  # red had been evicted: computed again, and still right (chat() checks)
    chat(model, engine, adapters["v1"], picture("red"), QUESTIONS[:1])  # the most recent one is still there
    assert engine.reuse.hits == 1
    tiny = BatchEngine(model, max_batch=1, max_slots=256, reuse_mb=one_entry / 4)  # no entry fits at all
    chat(model, tiny, None, None, QUESTIONS[:2])
    assert tiny.reuse.stats()["rejected"] == 2 and len(tiny.reuse) == 0


def test_reuse_budget_is_checked():
    with pytest.raises(ValueError, match="must be >= 0"):
        PrefixReuse(-1)


def test_chunked_prefill_interleaves_with_decoding_and_gives_the_same_tokens(setup):
    model, adapters = setup
    adapter = adapters["v1"]
    long_question = " ".join(["Describe the red and blue shapes in this picture, one by one."] * 3)
    ids = model.prompt_ids(long_question, adapter=adapter)
    assert len(ids) > 100
    short = "Say hello."
    expected = [model.generate(short, adapter=adapter, max_new_tokens=60),
                model.generate(long_question, picture("red"), adapter=adapter, max_new_tokens=NEW)]
    unchunked = BatchEngine(model, max_batch=2, max_slots=256, prefill_chunk=0)
    assert "".join(unchunked.stream(long_question, picture("red"), adapter=adapter, max_new_tokens=NEW)) == \
        expected[1]

    chunk = 16
    engine = BatchEngine(model, max_batch=2, max_slots=256, prefill_chunk=chunk)
    results: list[str | None] = [None, None]

    def run(i: int, question: str, image) -> None:
        results[i] = "".join(engine.stream(question, image, adapter=adapter, max_new_tokens=60 if i == 0 else NEW))

    first = threading.Thread(target=run, args=(0, short, None))
    first.start()
    while engine.steps < 2:  # the short request is decoding
        threading.Event().wait(0.005)
    engine.events = []
    second = threading.Thread(target=run, args=(1, long_question, picture("red")))
    second.start()
    for t in (first, second):
        t.join(timeout=300)
    assert results == expected
    events = engine.events
    long_row = next(row for kind, row in events if kind == "chunk")
    chunks = [i for i, (kind, row) in enumerate(events) if kind == "chunk"]
    assert len(chunks) == -(-len(ids) // chunk)  # the prompt went in chunk by chunk
    assert all(row == long_row for kind, row in events if kind == "chunk")
    for a, b in zip(chunks, chunks[1:]):  # between two chunks the running request decoded a token
        assert any(kind == "step" and row != long_row for kind, row in events[a + 1:b]), events[a:b + 1]


def test_requests_sharing_the_template_s_first_part_reuse_it(setup):
    model, _ = setup
    engine = BatchEngine(model, max_batch=1, max_slots=256, prefill_chunk=4, reuse_mb=64)
    one, two = model.prompt_ids("Name a colour."), model.prompt_ids("Name an animal.")
    shared = next(i for i, (a, b) in enumerate(zip(one, two)) if a != b)
    assert shared > 5  # the template's instruction part
    assert "".join(engine.stream("Name a colour.", max_new_tokens=NEW)) == \
        model.generate("Name a colour.", max_new_tokens=NEW)
    assert "".join(engine.stream("Name an animal.", max_new_tokens=NEW)) == \
        model.generate("Name an animal.", max_new_tokens=NEW)
    assert engine.reuse.reused_tokens == shared and engine.reuse.hits == 1
    assert len(engine.reuse) == 2  # neither extends the other: both kept


def test_the_app_status_reports_the_reuse_budget_and_its_use(setup, tmp_path, monkeypatch):
    import argparse

    import mmadapter.model
    from mmadapter.app.serve import add_serve_args, build_service

    model, _ = setup
    monkeypatch.setattr(mmadapter.model, "load_base", lambda *args, **kw: model)  # the tiny base, whatever --base
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    options = ["--no-demo", "--adapters-dir", str(tmp_path / "none")]
    service = build_service(parser.parse_args(options + ["--reuse-mb", "3", "--prefill-chunk", "8"]))
    assert (service.engine.prefill_chunk, service.engine.reuse.max_bytes) == (8, 3 * 2**20)
    assert "prompts prefilled 8 tokens at a time; K/V of earlier turns reused (0.0 of 3 MiB, 0 of 0 prompt tokens" \
        in service.status_markdown()
    replies = list(service.answer("Name a colour.", None, [], max_new_tokens=NEW))
    assert replies[-1].note is None
    list(service.answer("Name an animal.", None, [("Name a colour.", replies[-1].text)], max_new_tokens=NEW))
    stats = service.engine.reuse.stats()
    assert stats["reused_tokens"] > 0
    assert f"{stats['reused_tokens']:,} of {stats['prompt_tokens']:,} prompt tokens so far" in service.status_markdown()
    off = build_service(parser.parse_args(options + ["--reuse-mb", "0", "--prefill-chunk", "0"]))
    assert "whole prompts prefilled; K/V of earlier turns not reused" in off.status_markdown()


def test_short_prompts_waiting_together_are_prefilled_in_one_pause(setup):
    """The chunk is a budget per pause of the batch: two short prompts that arrive together both go in before
    the running request's next step."""
    model, _ = setup
    engine = BatchEngine(model, max_batch=3, max_slots=256, prefill_chunk=96)
    running = engine.submit(model.prompt_ids("Say hello."), sampling=Sampling(40))
    next(running)
    while engine.steps < 2:
        threading.Event().wait(0.005)
    questions = ["Name a colour.", "Name an animal."]
    assert sum(len(model.prompt_ids(q)) for q in questions) <= 96
    with engine._wake:  # both are pending when the engine next looks
        engine.events = []
        streams = [engine.submit(model.prompt_ids(q), sampling=Sampling(NEW)) for q in questions]
    answers = [model.tokenizer.decode([t for t in s if t not in model.tokenizer.eos_ids]) for s in streams]
    assert answers == [model.generate(q, max_new_tokens=NEW) for q in questions]
    list(running)
    kinds = [kind for kind, _ in engine.events]
    first = kinds.index("chunk")
    assert kinds[first:first + 2] == ["chunk", "chunk"]  # no step between the two prefills


def test_whole_prompts_waiting_together_are_all_prefilled(setup):
    """prefill_chunk=0 (whole prompts, no budget): several prompts that arrive together each go in whole and
    answer as alone (a spent budget once handed the second prompt a negative chunk)."""
    model, _ = setup
    engine = BatchEngine(model, max_batch=4, max_slots=256, prefill_chunk=0)
    questions = ["Name a colour.", "Name an animal.", "Name a fruit."]
    with engine._wake:  # all pending when the engine next looks
        engine.events = []
        streams = [engine.submit(model.prompt_ids(q), sampling=Sampling(NEW)) for q in questions]
    answers = [model.tokenizer.decode([t for t in s if t not in model.tokenizer.eos_ids]) for s in streams]
    assert answers == [model.generate(q, max_new_tokens=NEW) for q in questions]
    kinds = [kind for kind, _ in engine.events]
    assert kinds[:3] == ["chunk", "chunk", "chunk"]  # each prompt in one piece, before the first step
