"""ScienceQA reader, prompts, answer parsing, metrics and result files (no model involved)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmadapter.data.scienceqa import (
    Problem,
    ScienceQAError,
    build_prompt,
    build_target,
    load_image,
    load_scienceqa,
    parse_format,
)
from mmadapter.evaluation.metrics import compute_metrics, format_metrics_table
from mmadapter.evaluation.parsing import parse_answer
from mmadapter.evaluation.results import PredictionLog, read_results, write_metrics, write_results

REPO_ROOT = Path(__file__).resolve().parents[1]
COLORS = {"101": (255, 0, 0), "103": (0, 255, 0), "107": (0, 0, 255), "201": (9, 9, 9)}


def _record(subject: str, grade: str, hint: str, image: bool, choices: list[str], answer: int,
            split: str = "test") -> dict:
    """A problems.json record, with every field the original release has."""
    return {"question": f"Which one ({subject}, {grade})?", "choices": choices, "answer": answer, "hint": hint,
            "image": "image.png" if image else None, "task": "closed choice", "grade": grade, "subject": subject,
            "topic": "t", "category": "c", "skill": "s", "lecture": "Lecture line 1.\nLine 2.",
            "solution": "Because.", "split": split}


# pid: subject, grade, text hint, image, choices, answer -- every subject, grades in both ranges
RAW = {
    "101": _record("natural science", "grade3", "", True, ["bilberry", "mushroom"], 1),
    "102": _record("natural science", "grade8", "Read the passage.", False, ["yes", "no"], 0),
    "103": _record("social science", "grade5", "Look at the map.", True, ["Ohio", "Iowa", "Utah"], 2),
    "104": _record("social science", "grade10", "", False, ["left", "right"], 0),
    "105": _record("language science", "grade2", "", False, ["cat", "cats"], 1),
    "106": _record("language science", "grade12", "A poem.\nTwo lines.", False, ["rhyme", "no rhyme"], 0),
    "107": _record("natural science", "grade6", "", True, ["a", "b", "c", "d"], 3),
    "201": _record("natural science", "grade4", "", True, ["x", "y"], 0, split="train"),
}
TEST_PIDS = ["101", "102", "103", "104", "105", "106", "107"]
HF_COLUMNS = ("question", "choices", "answer", "hint", "task", "grade", "subject", "topic", "category",
              "skill", "lecture", "solution")


def _image(pid: str) -> Image.Image:
    return Image.new("RGB", (6, 4), COLORS[pid])


@pytest.fixture
def original_dir(tmp_path: Path) -> Path:
    root = tmp_path / "scienceqa"
    root.mkdir()
    (root / "problems.json").write_text(json.dumps(RAW))
    (root / "pid_splits.json").write_text(json.dumps({"train": ["201"], "val": [], "test": TEST_PIDS}))
    for pid, record in RAW.items():
        if record["image"]:
            folder = root / "images" / record["split"] / pid
            folder.mkdir(parents=True)
            _image(pid).save(folder / "image.png")
    return root


def _hf_dataset(pids: list[str]):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "choices": datasets.Sequence(datasets.Value("string")),
                                  "answer": datasets.Value("int8"),
                                  **{c: datasets.Value("string") for c in HF_COLUMNS if c not in
                                     ("question", "choices", "answer")}})
    rows = {"image": [_image(pid) if RAW[pid]["image"] else None for pid in pids]}
    rows |= {column: [RAW[pid][column] for pid in pids] for column in HF_COLUMNS}
    return datasets.Dataset.from_dict(rows, features=features)


@pytest.fixture
def parquet_dir(tmp_path: Path) -> Path:
    """The hub layout of derek-thomas/ScienceQA: data/<split>-00000-of-00001.parquet."""
    root = tmp_path / "hf"
    (root / "data").mkdir(parents=True)
    _hf_dataset(TEST_PIDS).to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    _hf_dataset(["201"]).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    return root


def _content(problem: Problem) -> tuple:
    pixels = load_image(problem)
    return (problem.question, problem.choices, problem.answer, problem.hint, problem.subject, problem.grade,
            problem.lecture, problem.solution, problem.has_image,
            None if pixels is None else np.asarray(pixels).tolist())


def _expected_content(pid: str) -> tuple:
    r = RAW[pid]
    pixels = np.asarray(_image(pid)).tolist() if r["image"] else None
    return (r["question"], r["choices"], r["answer"], r["hint"], r["subject"], r["grade"], r["lecture"],
            r["solution"], r["image"] is not None, pixels)


# ---------------------------------------------------------------------------------------------- reading


def test_original_layout_loads_the_test_split(original_dir: Path):
    problems, stats = load_scienceqa(original_dir, split="test")
    assert [p.pid for p in problems] == TEST_PIDS
    assert [_content(p) for p in problems] == [_expected_content(pid) for pid in TEST_PIDS]
    assert problems[0].image == str(original_dir / "images" / "test" / "101" / "image.png")
    assert (stats.layout, stats.rows, stats.loaded, stats.with_image) == ("original", 7, 7, 3)
    assert not stats.missing_images and not stats.skipped and not stats.missing_fields
    train, _ = load_scienceqa(original_dir, split="train")
    assert [p.pid for p in train] == ["201"] and train[0].has_image
    assert load_scienceqa(original_dir, split="validation")[0] == []  # "validation" means "val"
    assert [p.pid for p in load_scienceqa(original_dir, limit=2)[0]] == ["101", "102"]
    with pytest.raises(ScienceQAError, match="minival"):
        load_scienceqa(original_dir, split="minival")


def test_parquet_copy_loads_the_same_problems(original_dir: Path, parquet_dir: Path):
    original, _ = load_scienceqa(original_dir)
    hf, stats = load_scienceqa(parquet_dir)
    assert [p.pid for p in hf] == [f"test-{i}" for i in range(7)]  # no pid column: <split>-<row>
    assert [_content(p) for p in hf] == [_content(p) for p in original]
    assert isinstance(hf[0].image, bytes) and hf[1].image is None
    assert (stats.layout, stats.loaded, stats.with_image) == ("parquet", 7, 3)
    assert not stats.missing_images and not stats.skipped and not stats.missing_fields
    train, _ = load_scienceqa(parquet_dir, split="train")
    assert [p.pid for p in train] == ["train-0"] and train[0].split == "train"
    with pytest.raises(ScienceQAError, match="validation"):
        load_scienceqa(parquet_dir, split="val")


def test_save_to_disk_copy_loads_the_same_problems(original_dir: Path, tmp_path: Path):
    import datasets

    datasets.DatasetDict({"train": _hf_dataset(["201"]), "test": _hf_dataset(TEST_PIDS)}).save_to_disk(
        str(tmp_path / "arrow"))
    problems, stats = load_scienceqa(tmp_path / "arrow", limit=5)
    assert stats.layout == "arrow" and [p.pid for p in problems] == [f"test-{i}" for i in range(5)]
    assert [_content(p) for p in problems] == [_expected_content(pid) for pid in TEST_PIDS[:5]]


def test_missing_image_and_fields_are_counted_not_fatal(original_dir: Path):
    (original_dir / "images" / "test" / "107" / "image.png").unlink()
    raw = json.loads((original_dir / "problems.json").read_text())
    del raw["104"]["subject"]               # optional: kept, counted
    del raw["102"]["choices"]               # required: skipped
    raw["105"]["answer"] = 2                # out of range for two choices: skipped
    raw["106"]["question"] = ""             # required: skipped
    (original_dir / "problems.json").write_text(json.dumps(raw))
    splits = json.loads((original_dir / "pid_splits.json").read_text())
    splits["test"].append("999")            # listed but absent from problems.json
    (original_dir / "pid_splits.json").write_text(json.dumps(splits))

    problems, stats = load_scienceqa(original_dir)
    assert [p.pid for p in problems] == ["101", "103", "104", "107"]
    assert stats.skipped == {"102": "missing or invalid choices", "105": "missing or invalid answer",
                             "106": "missing question", "999": "not in problems.json"}
    assert stats.missing_fields == {"subject": 1}
    assert stats.missing_images == ["107"] and (stats.rows, stats.loaded, stats.with_image) == (8, 4, 2)
    lost = problems[-1]
    assert lost.image is None and lost.image_missing and lost.has_image  # still an IMG question
    assert problems[2].subject == ""
    assert stats.summary().startswith("4/8 problems") and "1 images missing" in stats.summary()


def test_parquet_without_columns_and_with_dangling_image(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "image": pa.array([None, {"bytes": None, "path": "gone.png"}], type=image_type),
        "question": ["Q1?", "Q2?"], "choices": [["a", "b"], ["c", "d"]], "answer": [0, 1],
        "pid": ["7", "8"],
    })
    (tmp_path / "test").mkdir()
    pq.write_table(table, tmp_path / "test" / "0000.parquet")  # refs/convert/parquet layout
    problems, stats = load_scienceqa(tmp_path)
    assert [p.pid for p in problems] == ["7", "8"]  # a pid column is used when present
    assert stats.missing_fields == {name: 2 for name in ("hint", "subject", "grade", "lecture", "solution")}
    assert stats.missing_images == ["8"] and problems[1].has_image and not problems[0].has_image


def test_bad_sources_fail_clearly(tmp_path: Path):
    with pytest.raises(ScienceQAError, match="does not exist"):
        load_scienceqa(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScienceQAError, match="parquet"):
        load_scienceqa(tmp_path / "empty")
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(ScienceQAError, match="is a file"):
        load_scienceqa(tmp_path / "file.json")


def test_hub_id_offline_fails_fast_with_advice(tmp_path: Path):
    # a fresh process, so that datasets reads HF_HUB_OFFLINE at import; the call is timed without imports
    code = ("import time, datasets\n"
            "from mmadapter.data.scienceqa import load_scienceqa, ScienceQAError\n"
            "start = time.monotonic()\n"
            "try:\n    load_scienceqa('derek-thomas/ScienceQA')\n"
            "except ScienceQAError as err:\n    print('ERROR:', err)\n"
            "print('SECONDS:', time.monotonic() - start)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}  # an empty cache
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert "ERROR:" in result.stdout, result.stderr
    assert "local copy" in result.stdout and "derek-thomas/ScienceQA" in result.stdout
    seconds = float(result.stdout.split("SECONDS:")[1])
    assert seconds < 10, f"took {seconds:.1f}s"


# ---------------------------------------------------------------------------------------------- prompts

FISH = Problem(pid="1", question="Which  of these is a fish?", choices=["salmon", "frog"], answer=0, hint="",
               lecture="Fish live in water.\nThey have fins.", solution="A salmon is a fish.")


def test_prompt_templates_match_the_official_layout():
    assert build_prompt(FISH) == (
        "Question: Which of these is a fish?\nContext: N/A\nOptions: (A) salmon (B) frog\nAnswer:")
    hinted = Problem(pid="2", question="Which is a state?", choices=["Ohio", "Paris", "Nile"], answer=2,
                     hint="Look at the map. ")
    assert build_prompt(hinted, "CQM-A") == (
        "Context: Look at the map.\nQuestion: Which is a state?\nOptions: (A) Ohio (B) Paris (C) Nile\nAnswer:")
    assert build_target(hinted) == "The answer is (C)."
    assert build_target(FISH, "QCM-A") == "The answer is (A)."
    assert build_target(FISH, "QCM-ALE") == (
        "The answer is (A). BECAUSE: Fish live in water.\\nThey have fins. A salmon is a fish.")
    assert build_target(hinted, "QCM-ALE") == "The answer is (C)."  # no explanation: no "BECAUSE:"
    assert build_prompt(FISH, "QCM-ALE") == build_prompt(FISH, "QCM-A")


@pytest.mark.parametrize("name, expected", [("QCM-A", ("QCM", "A")), ("QCM→A", ("QCM", "A")),
                                            ("QCM->ALE", ("QCM", "ALE")), ("qcm-ale", ("QCM", "ALE")),
                                            ("CQM - A", ("CQM", "A"))])
def test_format_spellings(name: str, expected: tuple[str, str]):
    assert parse_format(name) == expected


@pytest.mark.parametrize("name", ["QCM-LEA", "QCM", "QCMA", "XYZ-A"])
def test_unknown_format_is_rejected(name: str):
    with pytest.raises(ScienceQAError, match="QCM-ALE"):
        build_prompt(FISH, name)


# ---------------------------------------------------------------------------------------------- parsing

FOOD = ["bilberry", "mushroom", "lichen"]


@pytest.mark.parametrize("text, choices, expected", [
    ("The answer is B", FOOD, 1),
    ("The answer is (B).", FOOD, 1),
    (" The answer is (C).", FOOD, 2),
    ("the answer is (b).", FOOD, 1),
    ("The answer is b.", FOOD, 1),
    ("The correct answer is B.", FOOD, 1),
    ("(B)", FOOD, 1),
    ("B.", FOOD, 1),
    ("B", FOOD, 1),
    ("b", FOOD, 1),
    ("**B**", FOOD, 1),
    ("B) mushroom", FOOD, 1),
    ("Answer: C", FOOD, 2),
    ("Answer: The answer is (C). BECAUSE: A food web is a model.", FOOD, 2),
    ("The answer is (A). BECAUSE: follow the arrows; the answer is (B) for the other web.", FOOD, 0),
    ("The answer is (B) because the bilberry is not eaten.", FOOD, 1),  # the phrase beats option text
    ("I would pick (C) here.", FOOD, 2),
    ("mushroom", FOOD, 1),
    ("Mushroom.", FOOD, 1),
    ("I think it is the lichen.", FOOD, 2),
    ("The answer is mushroom.", FOOD, 1),
    ("The answer is a bilberry", FOOD, 0),          # "a" is an article, not option A
    ("A food web shows how matter moves.", FOOD, None),
    ("The answer is (D).", FOOD, None),              # beyond the three options
    ("The answer is (D). It is the mushroom.", FOOD, None),
    ("D", FOOD, None),
    ("(A) bilberry (B) mushroom (C) lichen", FOOD, None),  # echoed options: ambiguous
    ("bilberry or mushroom", FOOD, None),
    ("asdf qwerty 1234", FOOD, None),
    ("", FOOD, None),
    ("cats", ["cat", "cats"], 1),
    ("The cat sat.", ["cat", "cats"], 0),
    ("No.", ["yes", "no"], 1),
    ("Yes", ["yes", "no"], 0),
    ("I do not know", ["yes", "no"], None),          # whole words only: "not", "know" are not "no"
    ("The answer is C", ["True", "False"], None),
])
def test_parse_answer(text: str, choices: list[str], expected: int | None):
    assert parse_answer(text, choices) == expected


# ---------------------------------------------------------------------------------------------- metrics

# pid -> prediction: 101 right, 102 wrong, 103 right, 104 unparsed, 105 right, 106 right, 107 absent
PREDICTIONS = {"101": 1, "102": 1, "103": 2, "104": None, "105": 1, "106": 0, "999": 0}
# Worked by hand from RAW:
#   NAT 101 ok, 102 x, 107 x -> 1/3      SOC 103 ok, 104 x -> 1/2      LAN 105 ok, 106 ok -> 2/2
#   TXT 102 x, 103 ok, 106 ok -> 2/3     IMG 101 ok, 103 ok, 107 x -> 2/3      NO 104 x, 105 ok -> 1/2
#   G1-6 101 ok, 103 ok, 105 ok, 107 x -> 3/4      G7-12 102 x, 104 x, 106 ok -> 1/3      Avg 4/7
HAND = {"NAT": 33.33, "SOC": 50.0, "LAN": 100.0, "TXT": 66.67, "IMG": 66.67, "NO": 50.0,
        "G1-6": 75.0, "G7-12": 33.33, "Avg": 57.14}
HAND_COUNTS = {"NAT": 3, "SOC": 2, "LAN": 2, "TXT": 3, "IMG": 3, "NO": 2, "G1-6": 4, "G7-12": 3, "Avg": 7}


def test_metrics_equal_the_hand_computation(original_dir: Path, parquet_dir: Path):
    problems, _ = load_scienceqa(original_dir)
    metrics = compute_metrics(problems, PREDICTIONS)
    assert {k: metrics[k] for k in HAND} == HAND
    assert metrics["counts"] == HAND_COUNTS
    assert (metrics["unparsed"], metrics["missing"], metrics["extra"]) == (1, 1, 1)
    hf, _ = load_scienceqa(parquet_dir)  # same numbers through the HF ids
    hf_predictions = {f"test-{TEST_PIDS.index(pid)}": p for pid, p in PREDICTIONS.items() if pid in TEST_PIDS}
    assert {k: compute_metrics(hf, hf_predictions)[k] for k in HAND} == HAND


def test_metrics_missing_image_file_stays_in_img_group(original_dir: Path):
    (original_dir / "images" / "test" / "101" / "image.png").unlink()
    problems, _ = load_scienceqa(original_dir)
    assert compute_metrics(problems, PREDICTIONS)["counts"] == HAND_COUNTS


def test_empty_groups_report_none(original_dir: Path):
    problems, _ = load_scienceqa(original_dir)
    natural = [p for p in problems if p.subject == "natural science"]
    metrics = compute_metrics(natural, {"101": 1, "102": 0, "107": 0})
    assert metrics["SOC"] is None and metrics["counts"]["SOC"] == 0 and metrics["LAN"] is None
    assert metrics["NAT"] == 66.67 and metrics["Avg"] == 66.67
    table = format_metrics_table(metrics)
    assert "| – |" in table
    assert compute_metrics([], {})["Avg"] is None


def test_metrics_table_has_the_paper_column_order():
    metrics = {**HAND, "counts": HAND_COUNTS, "unparsed": 1, "missing": 1}
    lines = format_metrics_table(metrics).splitlines()
    assert lines[0] == "| | NAT | SOC | LAN | TXT | IMG | NO | G1-6 | G7-12 | Avg |"
    assert lines[2] == "| Accuracy (%) | 33.33 | 50.00 | 100.00 | 66.67 | 66.67 | 50.00 | 75.00 | 33.33 | 57.14 |"
    assert lines[3] == "| Questions | 3 | 2 | 2 | 3 | 3 | 2 | 4 | 3 | 7 |"


# ---------------------------------------------------------------------------------------------- files


def test_results_file_has_the_official_structure(tmp_path: Path):
    results = {"101": 1, "102": 1, "103": 2, "104": None, "105": 1, "106": 0, "107": 0}
    outputs = {pid: f"output {pid}" for pid in results}
    path = tmp_path / "out" / "results.json"
    write_results(path, results, outputs)
    data = json.loads(path.read_text())
    assert set(data) == {"results", "outputs"}
    assert data["results"] == {"101": 1, "102": 1, "103": 2, "104": -1, "105": 1, "106": 0, "107": 0}
    assert data["outputs"]["104"] == "output 104"
    # the official scorer does int(results[pid]) == answer for every test pid
    correct = sum(int(data["results"][pid]) == RAW[pid]["answer"] for pid in TEST_PIDS)
    assert correct == 4
    assert read_results(path) == results
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]  # no temporary files left


def test_write_metrics_writes_json_and_markdown(tmp_path: Path, original_dir: Path):
    problems, _ = load_scienceqa(original_dir)
    metrics = compute_metrics(problems, PREDICTIONS)
    write_metrics(tmp_path / "metrics.json", metrics)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert (tmp_path / "metrics.md").read_text() == format_metrics_table(metrics)


def test_prediction_log_resumes_after_a_truncated_line(tmp_path: Path):
    path = tmp_path / "preds.jsonl"
    with PredictionLog(path) as log:
        log.append("101", 1, "The answer is (B).")
        log.append("102", None, "no idea")
        log.append("103", 2, "The answer is (C).\nBECAUSE: ...")
    with open(path, "a") as f:
        f.write('{"pid": "104", "pred": nu')  # killed mid-write
    log = PredictionLog(path)
    assert log.done == {"101", "102", "103"} and log.dropped_partial_line
    assert log.predictions == {"101": 1, "102": None, "103": 2}
    assert log.outputs["103"] == "The answer is (C).\nBECAUSE: ..."
    log.append("104", 0, "A")
    log.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line)["pid"] for line in lines] == ["101", "102", "103", "104"]
    assert PredictionLog(path).predictions == {"101": 1, "102": None, "103": 2, "104": 0}


def test_prediction_log_rejects_a_broken_middle_line(tmp_path: Path):
    path = tmp_path / "preds.jsonl"
    path.write_text('{"pid": "1", "pred": 0, "output": "A"}\nnot json\n{"pid": "2", "pred": 1, "output": "B"}\n')
    with pytest.raises(ScienceQAError, match=r"preds.jsonl:2"):
        PredictionLog(path)
