"""VQA evaluation end to end (mmadapter eval vqa, eval/vqa.py) on a tiny random base + tower + adapter: every
input format, hostile records counted, an interrupted run resumed to the same files, and shapes:test on the
shipped demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import draw_picture, make_text_base, make_tower_dir, one_thread, subprocess_env  # noqa: F401

from mmadapter.cli import main
from mmadapter.evaluation.results import PredictionLog
from mmadapter.evaluation.scienceqa import EvalError
from mmadapter.evaluation.vqa import DEFAULT_INSTRUCTION, answer_text, evaluate_vqa, user_turn
from mmadapter.evaluation.vqa_data import VQADataError, load_vqa, read_image, with_other_images
from mmadapter.evaluation.vqa_metrics import exact_match, vqa_accuracy

REPO = Path(__file__).resolve().parents[1]
FILES = ("predictions.jsonl", "run.json", "results.json", "metrics.json", "metrics.md")
COLOURS = ["red", "green", "blue", "yellow"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    """A tiny base folder and a multimodal adapter file over a tiny tower (gates open, so images matter)."""
    from mmadapter import AdapterConfig, VisionConfig, build_model
    from mmadapter.adapter_file import save_adapter

    root = tmp_path_factory.mktemp("vqa_tiny")
    base = make_text_base(root / "base")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    (root / "towers").mkdir()
    tower = make_tower_dir(root / "towers" / "tiny_vit")
    model = build_model(str(base), AdapterConfig(n_prompts=4, n_layers=2),
                        VisionConfig.from_spec(f"local-dir:{tower}", n_scales=2, projector_hidden=16), seed=0)
    with torch.no_grad():
        model.adapter.gates.fill_(1.0)
    save_adapter(model, root / "adapter.safetensors")
    return {"base": str(base), "adapter": str(root / "adapter.safetensors")}


@pytest.fixture(scope="module")
def model(tiny):
    from mmadapter.commands.common import add_model_args, load_model

    import argparse

    parser = argparse.ArgumentParser()
    add_model_args(parser)
    return load_model(parser.parse_args(["--base", tiny["base"], "--adapter", tiny["adapter"]]))


def write_records(folder: Path) -> Path:
    """Six good records, and hostile ones: a broken line, no question, image paths leaving the root, a missing
    image file, an image that does not decode, a record without answers."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    good = []
    for i in range(6):
        colour = COLOURS[i % 4]
        draw_picture(folder / "images" / f"{i}.png", colour, rng)
        good.append({"question_id": i, "image": f"images/{i}.png", "question": "What color is this?",
                     "answers": [colour, colour, "dark " + colour] if i % 2 else colour,
                     "category": "colour" if i < 4 else "other"})
    (folder / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut off")
    (folder.parent / "outside.png").write_bytes((folder / "images" / "0.png").read_bytes())
    hostile = [{"question_id": 10, "image": "images/nothere.png", "question": "What color is this?", "answer": "red"},
               {"question_id": 11, "image": "images/broken.png", "question": "What color is this?", "answer": "red"},
               {"question_id": 12, "image": "images/1.png", "question": "What color is this?", "answers": []},
               {"question_id": 13, "image": "../outside.png", "question": "What color is this?", "answer": "red"},
               {"question_id": 14, "image": str(folder / "images" / "0.png"), "question": "Color?", "answer": "red"},
               {"question_id": 15, "image": "images/0.png", "answer": "red"},
               {"question_id": 16, "image": "images/0.png", "question": "What color?", "answers": {"a": 1}}]
    lines = [json.dumps(r) for r in good + hostile] + ['{"question_id": 17, "question": "cut']
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "data.jsonl"


def test_records_hostile_inputs_counted_and_answers_match_single_questions(model, tmp_path: Path):
    data = load_vqa(str(write_records(tmp_path / "set")))
    assert [item.key for item in data.items] == ["0", "1", "2", "3", "4", "5", "10", "11", "12"]
    assert dict(data.skipped) == {"malformed": 3, "image_outside_root": 2}
    metrics = evaluate_vqa(model, data, batch_size=4, out=tmp_path / "out", progress=False)
    counts = metrics["counts"]
    assert (counts["missing_images"], counts["unreadable_images"], counts["without_answers"]) == (1, 1, 1)
    assert counts["skipped_records"] == {"image_outside_root": 2, "malformed": 3}
    assert metrics["metric"] == "exact" and counts["scored"] == 8
    report = (tmp_path / "out" / "metrics.md").read_text()
    assert "3 malformed" in report and "2 image outside root" in report and "1 missing and 1 unreadable" in report
    assert "metric: exact match" in report and "| colour |" in report and "| other |" in report

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["question_id"] for r in results] == [0, 1, 2, 3, 4, 5, 10, 11, 12]
    got = {str(r["question_id"]): r["answer"] for r in results}
    for item in data.items:  # the padded batch answers each question as it would be answered alone
        image = None if item.key in ("10", "11") else read_image(item)
        alone = model.generate(user_turn(item.question, DEFAULT_INSTRUCTION), image, max_new_tokens=16)
        assert got[item.key] == answer_text(alone), item.key
    scored = [exact_match(got[item.key], item.answers) for item in data.items if item.answers]
    assert metrics["overall"] == round(100 * sum(scored) / len(scored), 2)


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_to_identical_files(model, tmp_path: Path):
    data = load_vqa(str(write_records(tmp_path / "set")))
    options = dict(batch_size=4, progress=False)
    evaluate_vqa(model, data, out=tmp_path / "whole", **options)
    seen: list[str] = []

    def stop_after_five(key: str, text: str) -> None:
        seen.append(key)
        if len(seen) == 5:  # inside the second batch
            raise Interrupt

    with pytest.raises(Interrupt):
        evaluate_vqa(model, data, out=tmp_path / "cut", on_answer=stop_after_five, **options)
    assert len(PredictionLog(tmp_path / "cut" / "predictions.jsonl").outputs) == 5
    assert not (tmp_path / "cut" / "results.json").exists()
    resumed: list[str] = []
    evaluate_vqa(model, data, out=tmp_path / "cut", on_answer=lambda key, _: resumed.append(key), **options)
    assert sorted(seen + resumed) == sorted(item.key for item in data.items)  # nothing answered twice
    for name in FILES:
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    with pytest.raises(EvalError, match="other settings.*instruction"):
        evaluate_vqa(model, data, out=tmp_path / "cut", instruction="", **options)


def _coco(folder: Path, rng) -> tuple[Path, Path]:
    (folder / "val2014").mkdir(parents=True)
    for image_id, colour in ((7, "red"), (42, "blue")):
        draw_picture(folder / "val2014" / f"COCO_val2014_{image_id:012d}.jpg", colour, rng)
    meta = {"info": {}, "license": {}, "data_subtype": "val2014", "data_type": "mscoco", "task_type": "Open-Ended"}
    questions = [{"image_id": 7, "question": "What color is this?", "question_id": 70},
                 {"image_id": 7, "question": "How many shapes?", "question_id": 71},
                 {"image_id": 42, "question": "What color is this?", "question_id": 420}]
    humans = {70: ["red"] * 8 + ["dark red"] * 2, 71: ["1"] * 5 + ["one"] * 5, 420: ["blue"] * 10}
    annotations = [{"question_id": q, "image_id": q // 10, "answer_type": "number" if q == 71 else "other",
                    "question_type": "what", "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(h)]}
                   for q, h in humans.items()]
    (folder / "questions.json").write_text(json.dumps({**meta, "questions": questions}))
    (folder / "annotations.json").write_text(json.dumps({**meta, "annotations": annotations}))
    return folder / "questions.json", folder / "annotations.json"


def test_vqav2_pair_through_the_cli(tiny, tmp_path: Path, capsys):
    questions, annotations = _coco(tmp_path / "coco", np.random.default_rng(1))
    argv = ["eval", "vqa", "--base", tiny["base"], "--adapter", tiny["adapter"], "--data", str(questions),
            "--annotations", str(annotations), "--image-root", str(tmp_path / "coco"), "--out", str(tmp_path / "out"),
            "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "metric: VQA accuracy (official, 2021 script)" in printed and "| number |" in printed
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [set(r) for r in results] == [{"question_id", "answer"}] * 3 and results[0]["question_id"] == 70
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["counts"]["missing_images"] == 0  # the images were found in the val2014/ subfolder
    humans = {70: ["red"] * 8 + ["dark red"] * 2, 71: ["1"] * 5 + ["one"] * 5, 420: ["blue"] * 10}
    accs = [vqa_accuracy(r["answer"], humans[r["question_id"]]) for r in results]
    assert metrics["overall"] == round(100 * sum(accs) / 3, 2)
    assert main(argv[:-3] + ["--out", str(tmp_path / "out2"), "--no-progress", "--metric", "vqa2017"]) == 0


def test_mme_folder_both_layouts(model, tmp_path: Path):
    rng = np.random.default_rng(2)
    root = tmp_path / "MME"
    for subtask, side_by_side in (("existence", False), ("code_reasoning", True), ("mystery", True)):
        images = root / subtask if side_by_side else root / subtask / "images"
        texts = root / subtask if side_by_side else root / subtask / "questions_answers_YN"
        images.mkdir(parents=True, exist_ok=True)
        texts.mkdir(parents=True, exist_ok=True)
        for n in range(2):
            draw_picture(images / f"{n:03d}.png", COLOURS[n], rng)
            (texts / f"{n:03d}.txt").write_text(f"Is it {COLOURS[n]}?\tYes\nIs it {COLOURS[n + 1]}?\tNo\n"
                                                 "a line without a tab\n")
    data = load_vqa(str(root))
    assert data.format == "mme" and len(data.items) == 12 and data.skipped["malformed"] == 6
    assert all(not item.image_missing for item in data.items)
    metrics = evaluate_vqa(model, data, batch_size=6, out=tmp_path / "out", progress=False)
    assert metrics["metric"] == "mme" and set(metrics["mme"]["subtasks"]) == {"existence", "code_reasoning", "mystery"}
    assert metrics["counts"]["unknown_categories"] == 1 and metrics["mme"]["unknown_subtasks"] == ["mystery"]
    from mmadapter.evaluation.vqa_metrics import mme_scores, parse_yes_no

    got = {str(r["question_id"]): r["answer"] for r in json.loads((tmp_path / "out" / "results.json").read_text())}
    rows = [(item.category, item.image_key, parse_yes_no(got[item.key]) == item.answers[0].lower())
            for item in data.items]
    assert metrics["mme"] == mme_scores(rows)
    assert "| **perception** |" in (tmp_path / "out" / "metrics.md").read_text()


def test_datasets_copy_answers_like_the_same_records(model, tmp_path: Path):
    datasets = pytest.importorskip("datasets")
    records = load_vqa(str(write_records(tmp_path / "set")))
    rows = [{"question_id": int(item.key), "question": item.question, "answers": list(item.answers),
             "category": item.category or "", "image": Image.open(item.image).convert("RGB")}
            for item in records.items[:6]]
    table = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    table.save_to_disk(str(tmp_path / "copy"))
    table.to_parquet(str(tmp_path / "copy.parquet"))
    for source in (tmp_path / "copy", tmp_path / "copy.parquet"):
        data = load_vqa(str(source))
        assert data.format == "datasets" and len(data.items) == 6
        mine = evaluate_vqa(model, data, batch_size=3, out=tmp_path / f"out-{source.name}", progress=False)
        theirs = evaluate_vqa(model, load_vqa(str(tmp_path / "set" / "data.jsonl"), limit=6), batch_size=3,
                              out=tmp_path / "out-records", progress=False)
        assert json.loads((tmp_path / f"out-{source.name}" / "results.json").read_text()) == \
            json.loads((tmp_path / "out-records" / "results.json").read_text())
        assert mine["overall"] == theirs["overall"]
    answers = {r["answer"] for r in json.loads((tmp_path / "out-records" / "results.json").read_text())}
    assert len(answers) > 1  # the same question about different pictures: the images reach the answers


def test_unknown_formats_and_bad_options_are_clear(model, tmp_path: Path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(VQADataError, match="not a known VQA input.*JSON list or JSONL.*VQAv2.*datasets.*MME"):
        load_vqa(str(tmp_path / "notes.txt"))
    (tmp_path / "obj.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(VQADataError, match="neither a list of records nor a VQAv2 questions file"):
        load_vqa(str(tmp_path / "obj.json"))
    with pytest.raises(VQADataError, match="does not exist"):
        load_vqa(str(tmp_path / "nowhere.json"))
    data = load_vqa(str(write_records(tmp_path / "set")))
    for options, message in [(dict(metric="bleu"), "unknown metric"), (dict(batch_size=0), "batch size"),
                             (dict(template="vicuna"), "unknown template")]:
        with pytest.raises(ValueError, match=message):
            evaluate_vqa(model, data, **options)


def test_script_prints_the_table_and_bad_input_is_one_line(tiny, tmp_path: Path):
    data = write_records(tmp_path / "set")
    run = subprocess.run([sys.executable, "eval/vqa.py", "--base", tiny["base"], "--adapter", tiny["adapter"],
                          "--data", str(data), "--limit", "3", "--no-progress"], cwd=REPO, env=subprocess_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "| **all** |" in run.stdout and "Questions: 3 (3 scored" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "mmadapter", "eval", "vqa", "--data", str(tmp_path / "nowhere.json")],
                         cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------- the shipped demo


@pytest.fixture(scope="module")
def demo():
    import mmadapter

    return mmadapter.load_demo()


def test_shapes_test_on_the_shipped_demo(demo, tmp_path: Path):
    from mmadapter.data import shapes

    data = load_vqa("shapes:test", limit=5)  # no caption among the first five: short answers
    assert [item.category for item in data.items] == ["colour", "shape", "count", "position", "relational"]
    metrics = evaluate_vqa(demo, data, batch_size=5, out=tmp_path, progress=False)
    assert metrics["metric"] == "exact" and metrics["run"]["settings"]["instruction"] == ""  # bare questions
    got = [r["answer"] for r in json.loads((tmp_path / "results.json").read_text())]
    test = shapes.test_set(600)[:5]
    alone = demo.generate([qa.question for _, qa in test],
                          [shapes.render(shapes.make_scene("test", scene), 128) for scene, _ in test], max_new_tokens=6)
    assert got == [answer_text(a) for a in alone]
    assert metrics["overall"] == 100 * sum(exact_match(g, [qa.answer]) for g, (_, qa) in zip(got, test)) / 5


def test_other_images_are_a_derangement_of_the_scenes():
    data = load_vqa("shapes:test:3")
    swapped = with_other_images(data)
    scenes = list(dict.fromkeys(item.image_key for item in data.items))
    first = {}
    for item in data.items:
        first.setdefault(item.image_key, item.image)
    assert len(scenes) >= 3
    for before, after in zip(data.items, swapped.items):
        following = scenes[(scenes.index(before.image_key) + 1) % len(scenes)]
        assert following != before.image_key and after.image is first[following]
        assert after.question == before.question and after.answers == before.answers
    pixels = [np.asarray(read_image(item)) for item in (data.items[0], swapped.items[0])]
    assert not np.array_equal(*pixels)


def test_shapes_pictures_of_the_next_scene():
    from mmadapter.data import shapes
    from mmadapter.evaluation.vqa_data import load_shapes_test

    shifted = load_shapes_test(1, image_shift=1)  # one question per type: all about scene 0
    assert {item.image_key for item in shifted.items} == {"scene-0"} and "scene i+1" in shifted.source
    want = np.asarray(shapes.render(shapes.make_scene("test", 1), 128))
    assert all(np.array_equal(np.asarray(read_image(item)), want) for item in shifted.items)


def test_adapter_shapes_demo_in_chat_and_serve(capsys):
    assert main(["chat", "--adapter", "shapes-demo", "--once", "What color is this shape?", "--image",
                 str(REPO / "mmadapter" / "app" / "examples" / "red_circle.png"), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() == "red"

    import argparse

    from mmadapter.app.serve import add_serve_args, build_service

    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    service = build_service(parser.parse_args(["--adapter", "shapes-demo", "--max-batch", "0",
                                               "--adapters-dir", "/nonexistent"]))
    assert service.image_adapter == "shapes-demo" and service.adapters.names().count("shapes-demo") == 1
    assert not service.adapters.errors
