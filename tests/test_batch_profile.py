"""The batch engine's profile accounts for the work it did, and the steps skip rows and slots nobody needs.

On the tiny random base and tower of test_serving_reuse: a conversation about a picture and a text-only
question give tower time to the image requests alone, prompt tokens that are either prefilled or reused,
one decoding step per token after the first; two requests arriving together wait for each other's
admission and prefill, and with one row the second is queued for the whole of the first. A step runs over
the rows up to the highest decoding one, and a cursor left far past the remaining rows' tokens is compacted
away, each request still getting the tokens it gets alone. The app hands the profile to a client, and the
load benchmark (bench/serving.py) tabulates it.
"""

from __future__ import annotations

import argparse

import pytest
from test_serving_reuse import NEW, chat, picture, setup  # noqa: F401 (setup: a fixture)
from test_train import one_thread  # noqa: F401 (autouse)

from mmadapter.batch_profile import difference, summary
from mmadapter.batching import COMPACT_GAP, BatchEngine
from mmadapter.generate import Sampling


def together(engine, model, prompts: list[tuple[str, int]]) -> list[list[int]]:
    """The tokens of (question, max_new_tokens) requests that are all pending when the engine next looks."""
    with engine._wake:
        streams = [engine.submit(model.prompt_ids(q), sampling=Sampling(n)) for q, n in prompts]
    return [list(s) for s in streams]


def alone(model, question: str, n: int) -> list[int]:
    engine = BatchEngine(model, max_batch=1, max_slots=256)
    return list(engine.submit(model.prompt_ids(question), sampling=Sampling(n)))


def test_the_profile_accounts_for_tower_prefill_reuse_and_steps(setup):
    model, adapters = setup
    engine = BatchEngine(model, max_batch=2, max_slots=256, prefill_chunk=16, reuse_mb=64)
    chat(model, engine, adapters["v1"], picture("red"))  # 3 turns about a picture (chat checks the answers)
    before = engine.stats()
    assert "".join(engine.stream("Name a colour.", adapter=adapters["v1"], max_new_tokens=NEW)) == \
        model.generate("Name a colour.", adapter=adapters["v1"], max_new_tokens=NEW)
    after = engine.stats()

    records = after["requests"]
    assert [r["image"] for r in records] == [True, True, True, False]
    assert all(r["tower_s"] > 0 for r in records[:3]) and records[3]["tower_s"] == 0
    for r in records:
        assert r["outcome"] == "done" and r["new_tokens"] >= 1
        assert r["prefilled_tokens"] + r["reused_tokens"] == r["prompt_tokens"]
        assert r["decode_steps"] == r["new_tokens"] - 1  # the first token comes from the prefill
        assert 0 < r["first_token_s"] <= r["total_s"]
        assert r["queued_s"] + r["tower_s"] + r["admit_s"] + r["prefill_s"] + r["decode_s"] <= r["total_s"]
        assert r["decode_share_s"] == pytest.approx(r["decode_s"])  # alone in every step
    assert records[0]["reused_tokens"] == 0 and all(r["reused_tokens"] > 0 for r in records[1:3])
    counts, seconds = after["counts"], after["seconds"]
    assert counts["prefill_chunks"] > len(records)  # some prompt went in as several 16-token chunks
    assert counts["prefilled_tokens"] == sum(r["prefilled_tokens"] for r in records)
    assert counts["reused_tokens"] == sum(r["reused_tokens"] for r in records) == after["reuse"]["reused_tokens"]
    assert counts["steps"] == engine.steps == sum(r["decode_steps"] for r in records)
    assert counts["images"] == 3 and counts["finished"] == 4
    assert {n: b["steps"] for n, b in after["by_rows"].items()} == {"1": counts["steps"]}
    assert all(seconds[k] > 0 for k in ("idle", "tower", "admit", "prefill", "step", "emit"))
    assert seconds["other"] >= 0 and sum(seconds.values()) == pytest.approx(after["wall_s"])

    last = difference(before, after)  # the text-only question alone
    assert [r["seq"] for r in last["requests"]] == [4]
    assert last["counts"]["steps"] == records[3]["decode_steps"] and last["seconds"]["tower"] == 0
    figures = summary(last)
    assert figures["requests"] == 1 and figures["rows per step"] == 1
    assert figures["prefilled tokens"] + figures["reused tokens"] == records[3]["prompt_tokens"]
    assert figures["mean tower_s"] == 0 and summary(difference(before, before))["requests"] == 0


def test_the_load_benchmark_tabulates_a_profile(setup):
    """bench/serving.py's breakdown row of a profile: a cell per header, shares of the wall time, the steps."""
    from bench.common import sections
    from bench.serving import BREAKDOWN, breakdown_row

    model, _ = setup
    engine = BatchEngine(model, max_batch=2, max_slots=256)
    before = engine.stats()
    expected = [alone(model, q, n) for q, n in [("Name a colour.", NEW), ("Name an animal.", NEW)]]
    assert together(engine, model, [("Name a colour.", NEW), ("Name an animal.", NEW)]) == expected
    load = difference(before, engine.stats())
    row = breakdown_row("batching", "2 users", load)
    assert len(row) == len(BREAKDOWN) and row[:2] == ["batching", "2 users"]
    cells = dict(zip(BREAKDOWN, row))
    assert cells["steps"] == load["counts"]["steps"] > 0
    assert min(map(len, expected)) > 1 and "2: " in cells["ms per step, by rows decoding"]  # decoded together
    assert cells["prompt tokens prefilled / reused"] == f"{sum(r['prompt_tokens'] for r in load['requests'])} / 0"
    table = {"title": "where the time went", "headers": BREAKDOWN, "rows": [row]}
    assert "| batching | 2 users |" in sections("t", ["a"], [[1]], [table])


def test_requests_arriving_together_wait_for_each_other_and_queue_for_a_row(setup):
    model, _ = setup
    prompts = [("Name a colour.", NEW), ("Name an animal.", NEW)]
    expected = [alone(model, q, n) for q, n in prompts]

    two_rows = BatchEngine(model, max_batch=2, max_slots=256)
    assert together(two_rows, model, prompts) == expected
    records = sorted(two_rows.stats()["requests"], key=lambda r: r["queued_s"])  # in the order admitted
    assert records[0]["waiting_admit_s"] > 0  # held while the other was admitted
    assert all(r["waiting_prefill_s"] > 0 for r in records)  # each prompt went in while the other's row was held
    assert records[1]["queued_s"] < 0.5 * records[0]["total_s"]  # not queued behind the first
    assert two_rows.stats()["by_rows"]["2"]["steps"] > 0

    one_row = BatchEngine(model, max_batch=1, max_slots=256)
    assert together(one_row, model, prompts) == expected
    first, second = one_row.stats()["requests"]
    assert second["queued_s"] > first["total_s"] - 0.005  # admitted once the first had finished
    assert second["queued_s"] > 10 * first["queued_s"]
    assert first["waiting_prefill_s"] == second["waiting_prefill_s"] == 0  # never held beside another


def test_steps_run_over_the_rows_up_to_the_highest_decoding_one(setup):
    """Rows 0, 1 and 2 decode; row 2 asked for 2 tokens and leaves: the later steps run over rows 0 and 1."""
    model, _ = setup
    prompts = [("Name a colour.", 24), ("Name an animal.", 24), ("Say hello.", 2)]
    expected = [alone(model, q, n) for q, n in prompts]
    engine = BatchEngine(model, max_batch=3, max_slots=256)
    assert together(engine, model, prompts) == expected
    stats = engine.stats()
    steps = stats["counts"]["steps"]
    long = min(len(expected[0]), len(expected[1]))
    assert long > 4 and len(expected[2]) == 2  # the random base did not end them early
    assert stats["counts"]["rows_computed"] < 3 * steps  # rows above the highest decoding one skipped
    assert stats["counts"]["rows_computed"] <= 3 * 1 + 2 * (steps - 1)  # row 2 took part in one step only


def test_a_cursor_far_past_the_remaining_rows_is_compacted(setup):
    """A long prompt sets the shared cursor; once it has left, the short request's steps would attend the long
    one's slots: the rows are compacted and the short request still gets its own tokens."""
    model, _ = setup
    long_question = " ".join(["Describe the red and blue shapes in this picture, one by one."] * 2)
    prompts = [("Say hello.", 40), (long_question, 2)]
    assert len(model.prompt_ids(long_question)) - len(model.prompt_ids("Say hello.")) > COMPACT_GAP
    expected = [alone(model, q, n) for q, n in prompts]
    assert len(expected[0]) > 10  # the short request decodes long after the long one left
    engine = BatchEngine(model, max_batch=2, max_slots=256)
    assert together(engine, model, prompts) == expected
    counts = engine.stats()["counts"]
    assert counts["compactions"] == 1
    assert counts["slots_attended"] < 1.5 * counts["real_slots"]  # without compaction: over 2x


def test_the_app_hands_out_the_profile(setup, tmp_path, monkeypatch):
    gradio_client = pytest.importorskip("gradio_client")
    from app_helpers import free_port

    from bench.serving import engine_profile

    import mmadapter.model
    from mmadapter.adapter_set import NO_ADAPTER
    from mmadapter.app.serve import add_serve_args, build_service
    from mmadapter.app.ui import build_demo

    model, _ = setup
    monkeypatch.setattr(mmadapter.model, "load_base", lambda *args, **kw: model)  # the tiny base, whatever --base
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    args = parser.parse_args(["--no-demo", "--adapters-dir", str(tmp_path / "none"), "--engine-profile"])
    service = build_service(args)
    hidden = build_demo(service)  # without --engine-profile there is no such route
    assert "engine_profile" not in {fn.api_name for fn in hidden.fns.values()}
    assert "chat" in {fn.api_name for fn in hidden.fns.values()}
    demo = build_demo(service, engine_profile=args.engine_profile)
    demo.queue(default_concurrency_limit=2)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = gradio_client.Client(url, verbose=False)
        client.predict({"text": "Name a colour.", "files": []}, [], NO_ADAPTER, 0.0, 0.9, NEW, api_name="/chat")
        profile = engine_profile(url)  # as the load benchmark fetches it
    finally:
        demo.close()
    assert [r["outcome"] for r in profile["requests"]] == ["done"]
    assert profile["counts"]["steps"] == profile["requests"][0]["decode_steps"] > 0
    assert profile["reuse"]["prompt_tokens"] == profile["requests"][0]["prompt_tokens"]
