"""ScienceQA evaluation (mmadapter.evaluation, eval/scienceqa.py) with the embedded SmolLM2 on a tiny synthetic ScienceQA: score-mode parity with
one-question forward passes, generate mode end to end, resume, the script as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmadapter.data.scienceqa import build_prompt, load_scienceqa
from mmadapter.evaluation.metrics import compute_metrics
from mmadapter.evaluation.parsing import parse_answer
from mmadapter.evaluation.results import PredictionLog
from mmadapter.evaluation.scienceqa import ANSWER_PREFIX, EvalError, evaluate, format_report, option_logprobs, prepare
from mmadapter.data.templates import get_template

REPO_ROOT = Path(__file__).resolve().parents[1]
TABLE_HEADER = "| | NAT | SOC | LAN | TXT | IMG | NO | G1-6 | G7-12 | Avg |"
TINY_VIT = "sqa-eval-tiny-vit"


def _record(question: str, choices: list[str], answer: int, hint: str, image: bool, subject: str,
            grade: str) -> dict:
    return {"question": question, "choices": choices, "answer": answer, "hint": hint,
            "image": "image.png" if image else None, "subject": subject, "grade": grade, "lecture": "A lecture.",
            "solution": "A solution.", "split": "test", "task": "closed choice"}


# Prompts of clearly different lengths (hints from none to long), 2 to 4 options, images on three
# (one of whose files is missing), every subject and both grade ranges.
RAW = {
    "11": _record("Which of these is a fish?", ["salmon", "frog"], 0, "", False, "natural science", "grade3"),
    "12": _record("What is the capital of France?", ["Berlin", "Paris", "Rome"], 1,
                  "France is a country in western Europe. Its capital is a large city on the river Seine, "
                  "famous for the Eiffel Tower and the Louvre museum.", False, "social science", "grade8"),
    "13": _record("Which color is the square?", ["red", "green", "blue"], 0, "", True, "natural science", "grade5"),
    "14": _record("Which word rhymes with cat?", ["hat", "dog", "sun", "tree"], 0, "", False,
                  "language science", "grade2"),
    "15": _record("Which state is highlighted?", ["Ohio", "Utah"], 1, "Look at the map.", True, "social science",
                  "grade10"),
    "16": _record("Is the statement true?", ["yes", "no"], 1, "Water boils at 50 degrees Celsius at sea level.",
                  False, "natural science", "grade7"),
    "17": _record("Which animal is shown?", ["cat", "cow", "owl"], 2, "", True, "natural science", "grade4"),
}
PIDS = list(RAW)
COLORS = {"13": (255, 0, 0), "15": (20, 200, 40)}  # "17" names an image whose file is missing


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The original release layout: problems.json, pid_splits.json, images/test/<pid>/image.png."""
    root = tmp_path_factory.mktemp("scienceqa")
    (root / "problems.json").write_text(json.dumps(RAW))
    (root / "pid_splits.json").write_text(json.dumps({"train": [], "val": [], "test": PIDS}))
    for pid, color in COLORS.items():
        (root / "images" / "test" / pid).mkdir(parents=True)
        Image.new("RGB", (12, 10), color).save(root / "images" / "test" / pid / "image.png")
    return root


@pytest.fixture(scope="module")
def problems(data_dir):
    loaded, stats = load_scienceqa(data_dir)
    assert [p.pid for p in loaded] == PIDS and stats.missing_images == ["17"]
    return loaded


@pytest.fixture(scope="module")
def multimodal(smollm, tmp_path_factory):
    """SmolLM2 + a tiny random CLIP tower + an adapter with open gates (the base is shared, not copied)."""
    import open_clip

    from mmadapter import AdapterConfig, MMAdapter, VisionConfig
    from mmadapter.vision import VisionTower

    if TINY_VIT not in open_clip.list_models():
        configs = tmp_path_factory.mktemp("open_clip_configs")
        (configs / f"{TINY_VIT}.json").write_text(json.dumps({
            "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                                            "head_width": 32},
            "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}))
        open_clip.add_model_config(configs)
    torch.manual_seed(0)
    tower = VisionTower(VisionConfig(model=TINY_VIT, pretrained=None, n_scales=2))
    model = MMAdapter(smollm.base, smollm.tokenizer, vision=tower, base_name=smollm.base_name,
                      base_fingerprint=smollm.base_fingerprint)
    adapter = model.add_adapter(AdapterConfig(n_prompts=4, n_layers=3), seed=0)
    with torch.no_grad():
        adapter.gates.fill_(1.0)
        adapter.prompts.mul_(0.05)  # keep the answer distribution informative, not swamped by the prompts
    return model


# ---------------------------------------------------------------------------------------------- tokens


@pytest.mark.parametrize("template", ["chat", "alpaca", "plain", "raw"])
def test_letter_tokens_are_the_tokenizers_own_encoding(smollm, problems, template: str):
    tok = smollm.tokenizer
    for question in prepare(smollm, problems, "score", "QCM-A", template):
        text = build_prompt(question.problem, "QCM-A")
        rendered = text if template == "raw" else get_template(template).prompt(text, tokenizer=tok)
        prefix = rendered + (" " if template in ("plain", "raw") else "") + ANSWER_PREFIX  # "Answer: The answer"
        letters = "ABCD"[:len(question.problem.choices)]
        for letter, letter_id in zip(letters, question.letter_ids, strict=True):
            assert question.ids + [letter_id] == tok.encode(prefix + letter, bos=tok.add_bos)
            assert tok.decode([letter_id]) == letter
        # the scoring context is the generation prompt followed by the answer prefix
        prompt = smollm.prompt_ids(text, template)
        assert question.ids[:len(prompt)] == prompt
        assert tok.decode(question.ids[len(prompt):]) == prefix[len(rendered):]


# ---------------------------------------------------------------------------------------------- score mode


def _reference_logprobs(model, problem, image) -> list[float]:
    """One question alone, the whole logits tensor from model.forward, read at the last position."""
    tok = model.tokenizer
    prefix = get_template("chat").prompt(build_prompt(problem), tokenizer=tok) + "The answer is ("
    encoded = [tok.encode(prefix + letter, bos=tok.add_bos) for letter in "ABCD"[:len(problem.choices)]]
    context = encoded[0][:-1]
    assert all(ids[:-1] == context for ids in encoded)
    with torch.no_grad():
        features, has_image = model.image_features([image])
        logits = model(torch.tensor([context]), features, has_image)  # [1, T, V]
    logprobs = logits[0, -1].log_softmax(-1)
    return [float(logprobs[ids[-1]]) for ids in encoded]


def _image(problem):
    from mmadapter.data.scienceqa import load_image

    return load_image(problem)


@pytest.mark.parametrize("which", ["base", "multimodal"])
def test_score_mode_batched_matches_one_question_forward(request, problems, which: str):
    model = request.getfixturevalue("smollm" if which == "base" else which)
    subset = problems[:3]  # 11, 12 (long hint), 13 (image): prompts of different lengths in one padded batch
    images = [_image(p) if which == "multimodal" else None for p in subset]
    questions = prepare(model, subset, "score", "QCM-A", "chat")
    assert len({len(q.ids) for q in questions}) == 3

    batched = option_logprobs(model, questions, images)
    reference = [_reference_logprobs(model, p, image) for p, image in zip(subset, images)]
    for got, want in zip(batched, reference):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=2e-4, rtol=0)

    if which == "multimodal":  # evaluate() passes each question its own image
        metrics = evaluate(model, subset, mode="score", batch_size=3, progress=False)
        expected = {p.pid: max(range(len(r)), key=r.__getitem__) for p, r in zip(subset, reference)}
        assert metrics == {**compute_metrics(subset, expected), "run": metrics["run"]}
        assert metrics["run"]["images"] == {"questions_with_image": 1, "used": 1, "ignored": 0, "missing": 0,
                                            "unreadable": 0, "ignored_reason": None}
        # the image reaches its own row only: without it, the rows that have none do not change
        blind = option_logprobs(model, questions, [None] * 3)
        for row in (0, 1):
            torch.testing.assert_close(torch.tensor(blind[row]), torch.tensor(batched[row]), atol=2e-4, rtol=0)
        assert max(abs(a - b) for a, b in zip(blind[2], batched[2])) > 1e-3


def test_a_corrupt_image_is_answered_text_only_counted_and_reported(multimodal, data_dir, tmp_path: Path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data_dir, root)
    (root / "images" / "test" / "15" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n cut off")
    subset = [p for p in load_scienceqa(root)[0] if p.pid in ("13", "15")]
    metrics = evaluate(multimodal, subset, mode="score", batch_size=2, out=tmp_path / "out", progress=False)
    images = metrics["run"]["images"]
    assert (images["used"], images["unreadable"], images["missing"]) == (2, 1, 0)
    assert "1 unreadable files" in (tmp_path / "out" / "metrics.md").read_text()
    text_only = option_logprobs(multimodal, prepare(multimodal, subset[1:], "score", "QCM-A", "chat"), [None])[0]
    want = max(range(len(text_only)), key=text_only.__getitem__)
    assert metrics["counts"]["IMG"] == 2 and json.loads((tmp_path / "out" / "results.json").read_text())[
        "results"]["15"] == want
    again = evaluate(multimodal, subset, mode="score", batch_size=2, out=tmp_path / "out", progress=False)
    assert again == metrics  # resumed from the log: the unreadable image is still counted


# ---------------------------------------------------------------------------------------------- generate mode


def test_generate_mode_writes_official_results_and_metrics(smollm, problems, tmp_path: Path):
    subset = problems[:3]  # prompts of three lengths in one left-padded batch
    metrics = evaluate(smollm, subset, mode="generate", batch_size=3, max_new_tokens=6, out=tmp_path,
                       progress=False)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"results", "outputs"} and list(results["results"]) == [p.pid for p in subset]
    logged = PredictionLog(tmp_path / "predictions.jsonl")
    assert logged.predictions.keys() == {p.pid for p in subset}
    for problem in subset:
        output = results["outputs"][problem.pid]
        # the padded batch decodes each question like the question alone
        assert output == smollm.generate(build_prompt(problem), max_new_tokens=6)
        parsed = parse_answer(output, problem.choices)
        assert results["results"][problem.pid] == (-1 if parsed is None else parsed)
        assert logged.predictions[problem.pid] == parsed and logged.outputs[problem.pid] == output

    expected = compute_metrics(subset, logged.predictions)
    assert {k: v for k, v in metrics.items() if k != "run"} == expected
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    report = (tmp_path / "metrics.md").read_text()
    assert report == format_report(metrics) and TABLE_HEADER in report
    assert metrics["run"]["settings"]["max_new_tokens"] == 6 and metrics["run"]["images"]["ignored"] == 1


# ---------------------------------------------------------------------------------------------- resume


class Interrupt(Exception):
    pass


def test_resumed_run_writes_the_same_files_as_an_uninterrupted_one(smollm, problems, tmp_path: Path):
    options = dict(mode="score", batch_size=2, progress=False)
    whole = evaluate(smollm, problems, out=tmp_path / "whole", **options)
    assert whole["run"]["images"] == {"questions_with_image": 3, "used": 0, "ignored": 2, "missing": 1,
                                      "unreadable": 0, "ignored_reason": "the model has no vision tower"}
    assert whole["counts"]["IMG"] == 3  # the question whose image file is missing still counts as IMG

    seen: list[str] = []

    def stop_after_three(pid, pred, output):
        seen.append(pid)
        if len(seen) == 3:  # in the middle of the second batch
            raise Interrupt

    with pytest.raises(Interrupt):
        evaluate(smollm, problems, out=tmp_path / "cut", on_prediction=stop_after_three, **options)
    assert len((tmp_path / "cut" / "predictions.jsonl").read_text().splitlines()) == 3
    assert not (tmp_path / "cut" / "results.json").exists()

    resumed: list[str] = []
    evaluate(smollm, problems, out=tmp_path / "cut", on_prediction=lambda pid, *_: resumed.append(pid), **options)
    assert sorted(seen + resumed) == sorted(PIDS)  # nothing answered twice
    for name in ("predictions.jsonl", "results.json", "metrics.json", "metrics.md", "run.json"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name

    with pytest.raises(EvalError, match="other settings.*mode: 'score' -> 'generate'"):
        evaluate(smollm, problems, out=tmp_path / "cut", **{**options, "mode": "generate"})


# ---------------------------------------------------------------------------------------------- command line


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_script_prints_the_category_table_and_writes_files(data_dir: Path, tmp_path: Path):
    result = _run("eval/scienceqa.py", "--data", str(data_dir), "--limit", "4", "--mode", "score",
                  "--out", str(tmp_path), "--no-progress")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert TABLE_HEADER in lines
    assert "| Questions | 2 | 1 | 1 | 1 | 1 | 2 | 3 | 1 | 4 |" in lines
    assert "1 ignored (the model has no vision tower)" in result.stdout
    assert "no vision tower" in result.stderr  # the warning
    assert list(json.loads((tmp_path / "results.json").read_text())["results"]) == PIDS[:4]
    assert (tmp_path / "metrics.md").read_text() in result.stdout


@pytest.mark.parametrize("command, expected", [
    (["-m", "eval.scienceqa", "--data", "{missing}"], "does not exist"),
    (["-m", "mmadapter", "eval", "scienceqa", "--data", "{data}", "--split", "minival"], "split 'minival' not in"),
])
def test_bad_input_exits_non_zero_with_one_line(data_dir: Path, tmp_path: Path, command: list[str], expected: str):
    args = [a.format(missing=tmp_path / "nowhere", data=data_dir) for a in command]
    result = _run(*args)
    assert result.returncode == 2
    message = result.stderr.strip()
    assert expected in message and len(message.splitlines()) == 1, message


def test_bad_options_fail_before_any_model_work(smollm, problems):
    for options, message in [(dict(batch_size=0), "batch size"), (dict(mode="sample"), "unknown mode"),
                             (dict(fmt="QCM-XYZ"), "unknown ScienceQA prompt format"),
                             (dict(template="vicuna"), "unknown template"), (dict(max_new_tokens=0), "max_new_tokens")]:
        with pytest.raises(ValueError, match=message):
            evaluate(smollm, problems, **options)
