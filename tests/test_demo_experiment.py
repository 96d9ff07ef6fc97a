"""The demo's learning-curve runner: a tiny run over the shipped tower writes a curve per question type
that training moves, and the curve file survives a stop (it is rewritten at every evaluation)."""

from __future__ import annotations

import json

from interop_helpers import one_thread  # noqa: F401

from mmadapter.demo.experiment import Experiment, format_curves, run


def test_a_tiny_run_writes_a_curve_that_training_moves(tmp_path, one_thread):
    e = Experiment(kinds=("colour", "count"), projector="spatial", n_layers=2, steps=4, every=2, batch_size=4,
                   train_scenes=6, questions_per_kind=1, eval_per_kind=4, lr=5e-2, warmup_steps=1)
    result = run(e, tmp_path / "exp", progress=False)
    on_disk = json.loads((tmp_path / "exp" / "curve.json").read_text())
    assert on_disk == result and [p["step"] for p in result["points"]] == [0, 2, 4]
    assert all(set(p["accuracy"]) == {"colour", "count"} for p in result["points"])
    assert all(0 <= a <= 100 for p in result["points"] for a in p["accuracy"].values())
    assert result["points"][0]["gate_max"] == 0 < result["points"][-1]["gate_max"]  # zero-init gates opened
    table = format_curves({"tiny": result})
    assert "| tiny (colour) | spatial | 2 |" in table and "| tiny (count) |" in table
