"""The demo build's stages: a finished stage is reused for the same settings, refused for others, and a
stage that did not finish runs again (so a killed build continues where it stopped)."""

from __future__ import annotations

import json

import pytest

from mmadapter.demo.stages import STAGE_FILE, StageMismatch, run_stage, stage_seconds


def test_a_finished_stage_is_reused_for_the_same_settings(tmp_path):
    calls = []

    def work():
        calls.append(1)
        return {"answer": 42, "pair": (1, 2)}

    first = run_stage(tmp_path / "s", "s", {"steps": 3, "sizes": (64, 96)}, work)
    again = run_stage(tmp_path / "s", "s", {"steps": 3, "sizes": (64, 96)}, work)  # tuples compare as JSON lists
    assert calls == [1] and first == again == {"answer": 42, "pair": [1, 2]}
    record = json.loads((tmp_path / "s" / STAGE_FILE).read_text())
    assert record["settings"] == {"steps": 3, "sizes": [64, 96]} and record["seconds"] >= 0
    assert "commit" in record and stage_seconds(tmp_path) == {"s": record["seconds"]}


def test_other_settings_are_refused_by_name(tmp_path):
    run_stage(tmp_path / "tower", "tower", {"steps": 3, "lr": 1e-3}, lambda: {})
    with pytest.raises(StageMismatch, match=r"stage 'tower' .*\(steps: \{'steps': 3\} there, \{'steps': 4\} now\)"):
        run_stage(tmp_path / "tower", "tower", {"steps": 4, "lr": 1e-3}, lambda: {})


def test_a_stage_that_failed_runs_again(tmp_path):
    def dies():
        raise KeyboardInterrupt  # a kill in the middle of the work

    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path / "adapter", "adapter", {"epochs": 1}, dies)
    assert not (tmp_path / "adapter" / STAGE_FILE).exists()
    assert run_stage(tmp_path / "adapter", "adapter", {"epochs": 1}, lambda: {"done": True}) == {"done": True}

