"""VQA metrics (mmadapter.evaluation.vqa_metrics): per-question parity with the official VQA scorer on a
committed fixture (tests/fixtures/vqa, expected.json written by the official script, make_expected.py),
and MME / POPE / exact match against hand-computed values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmadapter.evaluation.vqa_data import VQAData, VQAItem, load_vqa
from mmadapter.evaluation.vqa_metrics import (exact_match, mme_scores, normalize_answer, parse_yes_no, pope_scores,
                                              process_punctuation, vqa_accuracy)
from mmadapter.evaluation.vqa_report import default_metric, summarize

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "vqa"


def _fixture() -> tuple[dict[int, list[str]], dict[int, str], dict]:
    annotations = json.loads((FIXTURE / "annotations.json").read_text())["annotations"]
    humans = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in annotations}
    predictions = {p["question_id"]: p["answer"] for p in json.loads((FIXTURE / "predictions.json").read_text())}
    return humans, predictions, json.loads((FIXTURE / "expected.json").read_text())


@pytest.mark.parametrize("version", ["vqa", "vqa2017"])
def test_every_question_scores_exactly_as_the_official_script(version: str):
    humans, predictions, expected = _fixture()
    official = expected["per_question"][version]
    assert len(official) == len(humans) >= 40 and expected["commits"][version]
    for qid, answers in humans.items():
        assert vqa_accuracy(predictions[qid], answers, version) == official[str(qid)], (version, qid, predictions[qid])
    mine = [vqa_accuracy(predictions[q], humans[q], version) for q in humans]
    assert round(100 * sum(mine) / len(mine), 2) == expected["overall"][version]


def test_the_two_releases_differ_where_documented():
    _, _, expected = _fixture()
    per = expected["per_question"]
    # all humans said "one": the 2017 release turns the model's "one" into "1" but leaves the humans' alone
    assert vqa_accuracy("one", ["one"] * 10, "vqa2017") == 0.0 == per["vqa2017"]["1009"]
    assert vqa_accuracy("one", ["one"] * 10, "vqa") == 1.0 == per["vqa"]["1009"]
    # all humans said "yes": the 2021 script leaves an agreeing answer set and the model's "Yes" untouched
    assert vqa_accuracy("Yes", ["yes"] * 10, "vqa") == 0.0 == per["vqa"]["1001"]
    assert vqa_accuracy("Yes", ["yes"] * 10, "vqa2017") == 1.0 == per["vqa2017"]["1001"]
    assert len({k for k in per["vqa"] if per["vqa"][k] != per["vqa2017"][k]}) >= 5  # the fixture tells them apart
    # leave-one-out: 2 of 10 humans agree -> 8 subsets see 2 matches, 2 see 1
    assert vqa_accuracy("no", ["no"] * 2 + ["yes"] * 8) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)


def test_normalisation_steps():
    assert process_punctuation("yes.") == "yes"
    assert process_punctuation("3.5") == "3.5"
    assert process_punctuation("1,000") == "1000"  # a digit,digit comma: marks are deleted, not spaced
    assert process_punctuation("red,white") == "red white"
    assert normalize_answer("Two dogs") == "2 dogs"
    assert normalize_answer("the  dont") == "don't"
    assert normalize_answer("An Apple!") == "apple"
    assert exact_match("A red circle.", ["red circle"]) == 1.0
    assert exact_match("three", ["3"]) == 1.0 and exact_match("4", ["3"]) == 0.0


@pytest.mark.parametrize("text, expected", [
    ("yes", "yes"), ("Yes.", "yes"), ("No, there is not.", "no"), ("  yes, it is", "yes"), ("'No'", "no"),
    ("yesterday", None), ("I think yes", None), ("", None), ("Nope", None), ("**Yes**", "yes")])
def test_yes_no_is_the_first_word(text: str, expected: str | None):
    assert parse_yes_no(text) == expected


def test_mme_acc_acc_plus_score_and_totals_by_hand():
    rows = [("existence", "e1", True), ("existence", "e1", True), ("existence", "e2", True), ("existence", "e2", False),
            ("count", "c1", False), ("count", "c1", False),
            ("commonsense_reasoning", "r1", True), ("commonsense_reasoning", "r1", True),
            ("mystery", "m1", True), ("mystery", "m1", True)]
    scores = mme_scores(rows)
    assert scores["subtasks"]["existence"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0, "questions": 4,
                                               "images": 2}
    assert scores["subtasks"]["count"]["score"] == 0.0
    assert scores["subtasks"]["commonsense_reasoning"]["score"] == 200.0
    assert scores["perception"] == 125.0 and scores["cognition"] == 200.0  # the unknown subtask is in neither
    assert scores["unknown_subtasks"] == ["mystery"]


def test_pope_by_hand():
    gold = ["yes", "yes", "yes", "no", "no"]
    pred = ["yes", "no", None, "yes", "no"]
    scores = pope_scores(zip(pred, gold))
    # tp 1, fn 2 (one of them unparsed), fp 1, tn 1
    assert (scores["tp"], scores["fn"], scores["fp"], scores["tn"], scores["unparsed"]) == (1, 2, 1, 1, 1)
    assert scores["accuracy"] == 40.0 and scores["precision"] == 50.0 and scores["recall"] == 33.33
    assert scores["f1"] == 40.0 and scores["yes_ratio"] == 40.0


def test_default_metric_follows_the_answers():
    def data(*answers: tuple[str, ...], fmt: str = "records") -> VQAData:
        return VQAData([VQAItem(i, "q?", a) for i, a in enumerate(answers)], "x", fmt)

    assert default_metric(data(("yes",), ("No",))) == "pope"
    assert default_metric(data(("yes",), ("no",), fmt="mme")) == "mme"
    assert default_metric(data(("cat",) * 10, ("dog",) * 10)) == "vqa"
    assert default_metric(data(("cat",), ("dog", "puppy"))) == "exact"
    assert default_metric(data((), ())) == "exact"


def test_the_fixture_read_as_vqav2_scores_like_the_official_overall():
    data = load_vqa(str(FIXTURE / "questions.json"), annotations=str(FIXTURE / "annotations.json"))
    assert data.format == "vqav2" and len(data.items) == 42 and default_metric(data) == "vqa"
    assert all(item.image_missing for item in data.items)  # no COCO images here: counted, not fatal
    predictions = {str(p["question_id"]): p["answer"] for p in json.loads((FIXTURE / "predictions.json").read_text())}
    expected = json.loads((FIXTURE / "expected.json").read_text())["overall"]
    for version in ("vqa", "vqa2017"):
        metrics = summarize(data, predictions, version, set())
        assert metrics["overall"] == expected[version]
        assert metrics["counts"]["missing_images"] == 42 and set(metrics["categories"]) == {"yes/no", "number", "other"}
