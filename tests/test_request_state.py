"""A request's adapter comes whole with the request: the base is never written after loading.

Over the tiny base of the V2 fixtures (tests/fixtures/v2) with the released-format bias and LoRA + bias files
and a V1 adapter of the same prompt count: the base's tensors stay bitwise the same through V2 generation
and serving; one batch mixing no adapter, V1, V2 bias and V2 LoRA + bias (with and without images) gives
every request the tokens it gets alone; two threads with different V2 adapters on one model each get their
own answers; and the lean decode step equals the general forward with a different tuning on every row.
"""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image
from test_decode_step import general_step, greedy
from test_v2 import FIX, _byte_tokenizer, tiny_vision  # noqa: F401 (tiny_vision: a fixture)

from mmadapter import AdapterConfig, load_base
from mmadapter.adapter import Adapter
from mmadapter.batching import BatchEngine
from mmadapter.decode_step import DecodeStep
from mmadapter.llama import AdapterKV
from mmadapter.tokenizer import Tokenizer
from mmadapter.tuning import RowTuning

NEW = 10
PROMPTS = ["abcdefg", "Hello there", "xyz", "What is it", "0123"]


@pytest.fixture(scope="module")
def setup(tiny_vision):
    """(model, {kind: adapter or None}) over the fixtures' tiny base, V2 terms loud enough to change tokens."""
    from mmadapter.interop import import_adapter

    model = load_base(str(FIX / "base"), dtype=torch.float32)
    model.tokenizer = _byte_tokenizer(Tokenizer)
    adapters = {"none": None, "bias": import_adapter(model, FIX / "bias.pth", vision=tiny_vision),
                "lora": import_adapter(model, FIX / "lora.pth", vision=tiny_vision)}
    torch.manual_seed(0)
    adapters["v1"] = Adapter(AdapterConfig(n_prompts=4, n_layers=2), model.base.config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        adapters["v1"].gates.normal_(0, 1, generator=generator)
        for name in ("bias", "lora"):
            for p in adapters[name].tuning.parameters():  # the fixtures' terms are small: make them count
                p.add_(torch.randn(p.shape, generator=generator) * 0.3)
    return model, adapters


def solo(model, prompt, image, adapter) -> str:
    return model.generate(prompt, image, adapter=adapter, max_new_tokens=NEW, template="raw")


def served_together(engine, requests, adapters) -> list[str | None]:
    """The answers of (prompt, image, adapter kind) requests, all sent to the engine at once from their own threads."""
    results: list[str | None] = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def run(i: int) -> None:
        prompt, image, kind = requests[i]
        start.wait()
        results[i] = "".join(engine.stream(prompt, image, adapter=adapters[kind], max_new_tokens=NEW,
                                           template="raw"))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


def base_tensors(model) -> dict[str, torch.Tensor]:
    base = model.base
    return {name: t.detach().clone() for name, t in [*base.named_parameters(), *base.named_buffers()]}


def test_the_base_is_bitwise_unchanged_after_serving_v2(setup):
    model, adapters = setup
    before, modules = base_tensors(model), [(name, type(m)) for name, m in model.base.named_modules()]
    red = Image.new("RGB", (20, 16), (200, 30, 90))
    for kind in ("bias", "lora"):
        solo(model, PROMPTS[0], None, adapters[kind])
        solo(model, PROMPTS[1], red, adapters[kind])
    engine = BatchEngine(model, max_batch=4, max_slots=128)
    streams = [engine.stream(p, None, adapter=adapters[k], max_new_tokens=NEW, template="raw")
               for p, k in zip(PROMPTS, ("bias", "lora", "v1", "none"))]
    for stream in streams:
        "".join(stream)
    after = base_tensors(model)
    assert after.keys() == before.keys()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert not changed, changed
    assert [(name, type(m)) for name, m in model.base.named_modules()] == modules


def test_a_batch_mixing_v1_and_v2_adapters_gives_every_request_its_solo_tokens(setup):
    model, adapters = setup
    red, blue = Image.new("RGB", (20, 16), (200, 30, 90)), Image.new("RGB", (24, 24), (20, 60, 220))
    requests = [(PROMPTS[0], None, "none"), (PROMPTS[1], None, "v1"), (PROMPTS[2], None, "bias"),
                (PROMPTS[3], red, "bias"), (PROMPTS[0], None, "lora"), (PROMPTS[4], blue, "lora")]
    alone = [solo(model, p, image, adapters[k]) for p, image, k in requests]
    same_prompt = {k: solo(model, PROMPTS[0], None, adapters[k]) for k in adapters}
    assert len(set(same_prompt.values())) == len(adapters)  # every adapter answers differently: a mix-up shows

    engine = BatchEngine(model, max_batch=len(requests), max_slots=128)
    results = served_together(engine, requests, adapters)
    assert results == alone
    assert engine.peak_rows >= 4  # decoded together, V1 and both V2 tunings in one batch


@pytest.fixture(scope="module")
def five_prompts(setup, tiny_vision):
    """Adapters with 5 prompts over the same model: spatial tokens (a 2x2 grid + the class token over the
    fixtures' tower), V1, V2 bias and V2 bias + LoRA built fresh, every term non-zero."""
    import dataclasses

    from mmadapter.vision import VisionTower

    model, _ = setup
    c = model.base.config
    tower = VisionTower(dataclasses.replace(tiny_vision, projector="spatial", spatial_grid=2, projector_hidden=16))
    torch.manual_seed(2)
    made = {"spatial": Adapter(AdapterConfig(n_prompts=5, n_layers=2), c, tower.config, tower.feature_dim),
            "v1": Adapter(AdapterConfig(n_prompts=5, n_layers=3), c),
            "bias": Adapter(AdapterConfig(n_prompts=5, n_layers=2, bias_tuning=True), c),
            "lora": Adapter(AdapterConfig(n_prompts=5, n_layers=1, bias_tuning=True, lora_rank=2), c)}
    made["spatial"].use_tower(tower)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for adapter in made.values():
            adapter.gates.normal_(0, 1, generator=generator)
            if adapter.projector is not None:
                adapter.projector.fc2.weight.mul_(20)  # the image matters
            if adapter.tuning is not None:
                adapter.tuning.copy_base_norms(model.base)
                for p in adapter.tuning.parameters():
                    p.add_(torch.randn(p.shape, generator=generator) * 0.3)
    return made


def test_spatial_tokens_share_the_batch_with_v1_and_v2(setup, five_prompts):
    model, adapters = setup[0], {"none": None, **five_prompts}
    red, blue = Image.new("RGB", (20, 16), (200, 30, 90)), Image.new("RGB", (24, 24), (20, 60, 220))
    requests = [(PROMPTS[0], red, "spatial"), (PROMPTS[1], blue, "spatial"), (PROMPTS[2], None, "v1"),
                (PROMPTS[3], None, "bias"), (PROMPTS[0], None, "lora"), (PROMPTS[4], None, "none")]
    alone = [solo(model, p, image, adapters[k]) for p, image, k in requests]
    assert alone[0] != solo(model, PROMPTS[0], blue, adapters["spatial"])  # the image changes the answer
    assert len({solo(model, PROMPTS[0], None, a) for a in adapters.values()}) == len(adapters)
    engine = BatchEngine(model, max_batch=len(requests), max_slots=128)
    results = served_together(engine, requests, adapters)
    assert results == alone
    assert engine.peak_rows >= 4


def test_two_threads_with_different_v2_adapters_each_get_their_own_answer(setup):
    model, adapters = setup
    jobs = [(PROMPTS[i % len(PROMPTS)], "bias" if i % 2 else "lora") for i in range(8)]
    alone = [solo(model, p, None, adapters[k]) for p, k in jobs]
    results: dict[int, str] = {}
    start = threading.Barrier(2)

    def run(parity: int) -> None:
        start.wait()
        for round_ in range(3):  # several rounds, so the two threads' requests overlap
            for i in range(parity, len(jobs), 2):
                prompt, kind = jobs[i]
                answer = solo(model, prompt, None, adapters[kind])
                results.setdefault(i, answer)
                assert answer == alone[i], (round_, i)

    errors: list[BaseException] = []

    def guarded(parity: int) -> None:
        try:
            run(parity)
        except BaseException as e:  # noqa: BLE001 - reported below, on the test's thread
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(p,)) for p in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert [results[i] for i in range(len(jobs))] == alone


def batch_state(model, kinds: list[str], adapters) -> AdapterKV:
    """One AdapterKV for a batch whose row b uses adapters[kinds[b]]: per-row prompts, gates and tuning (what
    the batch engine builds)."""
    states = [model.adapter_kv(None, None, adapters[k]) if adapters[k] is not None else None for k in kinds]
    like = next(s for s in states if s is not None)
    n = len(like.kv)
    kv = [(torch.cat([s.kv[j][0] if s else torch.zeros_like(like.kv[j][0]) for s in states]),
           torch.cat([s.kv[j][1] if s else torch.zeros_like(like.kv[j][1]) for s in states])) for j in range(n)]
    gates = torch.stack([s.gates if s else torch.zeros_like(like.gates) for s in states], 1)  # [L, B, H]
    groups = {}
    for row, k in enumerate(kinds):
        if adapters[k] is not None and adapters[k].tuning is not None:
            groups.setdefault(k, []).append(row)
    tuning = RowTuning([(adapters[k].tuning, torch.tensor(rows)) for k, rows in groups.items()], len(kinds))
    return AdapterKV(like.first_layer, kv, gates, tuning)


def test_decode_step_equals_the_general_forward_with_a_tuning_per_row(setup):
    model, adapters = setup
    base, kinds = model.base, ["bias", "none", "lora", "v1", "lora"]
    ids = [model.prompt_ids(p, "raw") for p in PROMPTS]
    with torch.inference_mode():
        kv = batch_state(model, kinds, adapters)
    ref, ref_logits = greedy(base, lambda *a: general_step(base, *a), ids, kv)
    lean, lean_logits = greedy(base, DecodeStep(base), ids, kv)
    assert lean.tolist() == ref.tolist()
    assert ref_logits.abs().max() > 0.5  # logits far above the tolerance
    torch.testing.assert_close(lean_logits, ref_logits, atol=1e-5, rtol=0)
    for row, (prompt, kind) in enumerate(zip(ids, kinds)):  # and every row decodes as it does alone
        with torch.inference_mode():
            own = model.adapter_kv(None, None, adapters[kind]) if adapters[kind] is not None else None
        tokens, _ = greedy(base, DecodeStep(base), [prompt], own)
        assert tokens[0].tolist() == lean[row].tolist(), kind


def test_one_tuning_for_every_row_equals_the_same_tuning_per_row(setup):
    """The fused fast path (one V2 adapter on every row) and the per-row path compute the same logits."""
    model, adapters = setup
    base, ids = model.base, [model.prompt_ids(p, "raw") for p in PROMPTS[:3]]
    with torch.inference_mode():
        every = model.adapter_kv(None, None, adapters["lora"])
        per_row = batch_state(model, ["lora"] * 3, adapters)
    assert every.tuning.every_row and not per_row.tuning.every_row
    tokens, fused = greedy(base, DecodeStep(base), ids, every)
    _, rows = greedy(base, DecodeStep(base), ids, per_row, forced=tokens)
    torch.testing.assert_close(rows, fused, atol=1e-5, rtol=0)


def test_the_compiled_step_takes_the_tuning_as_an_input(setup):
    """A graph compiled with one V2 request's terms (dynamo's own "eager" backend, as in test_decode_step) runs
    the next request's terms too, with the tokens of the eager step; an adapter with other terms decodes eagerly."""
    import time

    from mmadapter.compiled_step import BackgroundCompile
    from mmadapter.generate import Sampling, decode_tokens

    model, adapters = setup
    base, prompt, s = model.base, [model.prompt_ids(PROMPTS[0], "raw")], Sampling(max_new_tokens=8)

    def tokens(kind, step=None):
        with torch.inference_mode():
            kv = model.adapter_kv(None, None, adapters[kind])
        return torch.stack(list(decode_tokens(base, prompt, kv, s, eos_ids=(), step=step)), 1).tolist()

    compiler = BackgroundCompile(base, backend="eager")
    assert tokens("lora", compiler.step()) == tokens("lora")
    deadline = time.monotonic() + 600
    while compiler.compiled is None and compiler.failure is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert compiler.failure is None and compiler.compiled is not None
    calls, compiled = [], compiler.compiled
    compiler.compiled = lambda *a: calls.append(1) or compiled(*a)
    assert tokens("lora", compiler.step()) == tokens("lora")
    assert len(calls) == 7  # every step after the prefill ran the graph, with this request's terms
    assert tokens("bias", compiler.step()) == tokens("bias")  # no LoRA: another layout, decoded eagerly
    assert len(calls) == 7


def test_the_training_prefix_of_a_v2_adapter_carries_its_tuning_below_the_prompts(setup):
    """The frozen-prefix cache stores the layers below the adapter's prompts, which V2 tuning reaches too: the
    loss from the cached prefix equals the full forward's (and would not without the tuning)."""
    model, adapters = setup
    adapter = adapters["lora"]
    assert adapter.first_layer > 0
    saved = model.adapter
    model.use_adapter(adapter)
    try:
        tokens = torch.tensor([model.prompt_ids(PROMPTS[1], "raw")])
        with torch.no_grad():
            full = model.loss(tokens, tokens)
            cached = model.loss(tokens, tokens, prefix=model.frozen_prefix(tokens))
            untuned = model.loss(tokens, tokens, prefix=model.base.prefix(tokens, adapter.first_layer))
    finally:
        model.use_adapter(saved)
    torch.testing.assert_close(cached, full, atol=1e-6, rtol=0)
    assert (untuned - full).abs() > 1e-4
