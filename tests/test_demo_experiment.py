"""The demo's learning-curve runner: a tiny run over the shipped tower writes a curve per question type
that training moves, and the curve file survives a stop (it is rewritten at every evaluation)."""

from __future__ import annotations

import json

from interop_helpers import one_thread  # noqa: F401

import numpy as np
import pytest

from mmadapter.demo.experiment import Experiment, Sampler, format_curves, run, sinusoid_2d
from mmadapter.demo.experiment_plot import main as plot_main


def test_a_tiny_run_writes_a_curve_that_training_moves(tmp_path, one_thread):
    e = Experiment(kinds=("colour", "count"), projector="spatial", n_layers=2, steps=4, every=2, batch_size=4,
                   train_scenes=6, questions_per_kind=1, eval_per_kind=4, lr=5e-2, warmup_steps=1,
                   position_code=1.0)
    result = run(e, tmp_path / "exp", progress=False)
    on_disk = json.loads((tmp_path / "exp" / "curve.json").read_text())
    assert on_disk == result and [p["step"] for p in result["points"]] == [0, 2, 4]
    assert all(set(p["accuracy"]) == {"colour", "count"} for p in result["points"])
    assert all(0 <= a <= 100 for p in result["points"] for a in p["accuracy"].values())
    assert all(set(p["train_accuracy"]) == {"colour", "count"} for p in result["points"])  # training questions too
    assert result["points"][0]["gate_max"] == 0 < result["points"][-1]["gate_max"]  # zero-init gates opened
    table = format_curves({"tiny": result})
    assert "| tiny (colour) | spatial projector, 2 adapted layers, position code 1," in table
    assert "| tiny (count) |" in table
    assert (tmp_path / "exp" / "curve.png").read_bytes().startswith(b"\x89PNG")
    plot_main([str(tmp_path / "exp"), str(tmp_path / "all.png")])  # the folder's curve.json, as a comparison
    assert (tmp_path / "all.png").read_bytes().startswith(b"\x89PNG")


def test_the_curriculum_trains_on_lone_objects_first_then_on_every_scene():
    objects = [1, 2, 3] * 20
    sampler = Sampler(objects, batch_size=8, curriculum_steps=6, max_objects=3, seed=0)
    seen = {step: {objects[i] for i in sampler.rows(step)} for step in range(1, 7)}
    assert seen[1] == seen[2] == {1} and seen[3] | seen[4] == {1, 2} and max(seen[5] | seen[6]) == 3
    after = [i for step in range(7, 7 + 60 // 8) for i in sampler.rows(step)]  # then shuffled epochs
    assert len(set(after)) == len(after) and {objects[i] for i in after} == {1, 2, 3}
    with pytest.raises(ValueError, match="no training questions"):
        Sampler([2, 3], batch_size=2, curriculum_steps=3, max_objects=3, seed=0).rows(1)


def test_the_position_code_tells_every_region_apart_at_the_requested_scale():
    code = sinusoid_2d(1 + 8 * 8, 576, rms=1.0)  # [K, C]: the class token, then an 8 x 8 grid
    assert not code[0].any() and float(code[1:].pow(2).mean().sqrt()) == pytest.approx(1.0)
    distances = np.array(np.linalg.norm(code[1:, None] - code[None, 1:], axis=-1))
    assert (distances + np.eye(64) * 1e9).min() > 1.0  # no two regions share a code


def test_lora_trains_only_the_chosen_projections_of_the_adapted_layers():
    from mmadapter.demo.experiment import build_experiment_model

    model = build_experiment_model(Experiment(n_layers=2, lora_rank=2, lora_on="wq,wv"))
    first = model.adapter.first_layer
    trained = {(i, name) for i, layer in enumerate(model.adapter.tuning.layers)
               for name, a in layer.lora_a.items() if a.requires_grad and layer.lora_b[name].requires_grad}
    assert trained == {(i, name) for i in (first, first + 1) for name in ("wq", "wv")}
    assert model.adapter.projector.position.detach().abs().sum() == 0  # no position code unless asked for


def test_query_spread_sees_the_colour_only_where_it_has_reached():
    from mmadapter.demo.query_spread import format_spread, query_spread
    from mmadapter.model import load_base

    result = query_spread(load_base("smollm2-135m-instruct"))
    first = result["layers"][0]
    assert result["colour_position"] < result["answer_position"]
    assert first["at_answer"] == 0 < first["at_colour"]  # layer 0 sees only the token itself at each position
    assert all(r["at_answer"] > 0 for r in result["layers"][1:])  # attention carries the colour onwards
    assert "| at the colour word |" in format_spread(result)
