"""Visual question answering inputs, read into one list of `VQAItem`s whatever the source.

    load_vqa("questions.jsonl", image_root="images/")                    JSON list / JSONL of records
    load_vqa("v2_OpenEnded_mscoco_val2014_questions.json",              the official VQAv2 pair
             annotations="v2_mscoco_val2014_annotations.json", image_root="val2014/")
    load_vqa("vqav2_local/")  or  load_vqa("vqav2.parquet")             a local `datasets` copy
    load_vqa("MME_Benchmark_release_version/")                          MME's folders
    load_vqa("shapes:test")                                             the shapes demo's fixed test set

A record is {question_id, image, question, answers: [...] | answer, category?}. Image paths are
resolved inside the image root (default: the data file's folder) and may not leave it. Bad records
(malformed, an image path outside the root) are skipped and counted; a missing image file is counted
and its question answered without the image; a question without answers is answered (for the result
file) but not scored.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..data import shapes
from ..images import load_image

SHAPES_TEST = "shapes:test"
FORMATS = ("a JSON list or JSONL file of {question_id, image, question, answers | answer, category?} records",
           "the official VQAv2 questions JSON (with --annotations for the answers)",
           "a local `datasets` copy (save_to_disk folder or .parquet file) with those columns",
           "an MME folder (subtask folders of images and question<TAB>answer .txt files)",
           SHAPES_TEST)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
SHAPES_IMAGE_SIZE = 128
SHAPES_MAX_NEW_TOKENS = {"caption": 48}  # the other kinds answer a word or a number
SHAPES_SHORT_ANSWER_TOKENS = 6


class VQADataError(ValueError):
    """The data cannot be read; the message says what was wrong and what to do."""


@dataclass(frozen=True)
class VQAItem:
    question_id: Any  # as the source spells it (VQAv2: an int), written back in results.json
    question: str
    answers: tuple[str, ...]  # empty: answered but not scored
    image: Any = None  # a Path, a PIL image, encoded bytes, a zero-argument function returning one, or None
    category: str | None = None
    image_key: str | None = None  # questions about the same picture share it (MME's acc+, swapped images)
    image_missing: bool = False  # the record names an image whose file is not there
    max_new_tokens: int | None = None  # a source's own answer length (shapes captions are long)

    @property
    def key(self) -> str:
        return str(self.question_id)


@dataclass
class VQAData:
    items: list[VQAItem]
    source: str
    format: str  # records, vqav2, datasets, mme, shapes
    skipped: Counter = field(default_factory=Counter)  # reason -> records left out
    default_instruction: bool = True  # False: the model was trained on bare questions (shapes)

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "format": self.format, "questions": len(self.items),
                "skipped": dict(sorted(self.skipped.items())),
                "missing_images": sum(item.image_missing for item in self.items),
                "without_answers": sum(not item.answers for item in self.items)}


def load_vqa(data: str, *, image_root: str | None = None, annotations: str | None = None,
             split: str | None = None, limit: int | None = None) -> VQAData:
    """Read `data` (see the module docstring); `limit` keeps the first N questions."""
    if data == SHAPES_TEST or data.startswith(SHAPES_TEST + ":"):
        per_kind = data.removeprefix(SHAPES_TEST).removeprefix(":") or "600"
        if not per_kind.isdigit() or int(per_kind) < 1:
            raise VQADataError(f"{data}: write {SHAPES_TEST} (600 questions per type) or {SHAPES_TEST}:N (N per type)")
        loaded = load_shapes_test(int(per_kind))
    else:
        path = Path(data).expanduser()
        if not path.exists():
            raise VQADataError(f"{data} does not exist; pass one of: {'; '.join(FORMATS)}")
        root = Path(image_root).expanduser() if image_root else (path if path.is_dir() else path.parent)
        if image_root and not root.is_dir():
            raise VQADataError(f"--image-root {image_root} is not a folder")
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()):
            loaded = _from_datasets(path, root)
        elif path.is_dir() and _mme_subtasks(path):
            loaded = load_mme(path)
        elif path.is_file() and path.suffix == ".parquet":
            loaded = _from_datasets(path, root)
        elif path.is_file() and path.suffix in (".json", ".jsonl"):
            loaded = _from_json(path, root, annotations, split)
        else:
            raise VQADataError(f"{data} is not a known VQA input; pass one of: {'; '.join(FORMATS)}")
    if annotations and loaded.format != "vqav2":
        raise VQADataError("--annotations applies to the official VQAv2 questions file only")
    if limit is not None:
        loaded.items = loaded.items[:max(limit, 0)]
    return loaded


# ----------------------------------------------------------------------------------------------
# Records: JSON list / JSONL, and `datasets` rows


def _from_json(path: Path, root: Path, annotations: str | None, split: str | None) -> VQAData:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows: list[Any] = []
        skipped: Counter = Counter()
        for line in text.splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    skipped["malformed"] += 1
        data = _from_records(rows, root, str(path))
        data.skipped.update(skipped)
        return data
    try:
        content = json.loads(text)
    except json.JSONDecodeError as err:
        raise VQADataError(f"{path} is not valid JSON ({err}); pass one of: {'; '.join(FORMATS)}") from err
    if isinstance(content, dict) and isinstance(content.get("questions"), list):
        return load_vqav2(path, content, root, annotations, split)
    if isinstance(content, list):
        return _from_records(content, root, str(path))
    raise VQADataError(f"{path} is neither a list of records nor a VQAv2 questions file; "
                       f"pass one of: {'; '.join(FORMATS)}")


def _from_records(rows: list[Any], root: Path | None, source: str, fmt: str = "records") -> VQAData:
    data = VQAData([], source, fmt)
    for row in rows:
        item, problem = _record_item(row, root)
        if problem:
            data.skipped[problem] += 1
        else:
            data.items.append(item)
    return data


def _record_item(row: Any, root: Path | None) -> tuple[VQAItem | None, str | None]:
    """The item of one record, or the reason it is skipped."""
    if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
        return None, "malformed"
    qid = row.get("question_id", row.get("id"))
    if not isinstance(qid, (str, int)) or isinstance(qid, bool):
        return None, "malformed"
    answers = _answers(row)
    if answers is None:
        return None, "malformed"
    category = row.get("category")
    image, missing = row.get("image"), False
    if isinstance(image, str) and image:
        if root is None:
            return None, "malformed"
        resolved = _inside(root, image)
        if resolved is None:
            return None, "image_outside_root"
        image, missing = resolved, not resolved.is_file()
    elif isinstance(image, dict) and isinstance(image.get("bytes"), bytes):  # a `datasets` Image not decoded
        image = image["bytes"]  # decoded when used, like a path
    elif image is not None and not hasattr(image, "convert") and not callable(image):  # no path, PIL image or loader
        return None, "malformed"
    key = str(row.get("image_id", image if isinstance(image, Path) else qid))
    return VQAItem(qid, row["question"], answers, image or None, str(category) if category is not None else None,
                   key, missing), None


def _answers(row: dict[str, Any]) -> tuple[str, ...] | None:
    """The reference answers; () when there are none; None when they are malformed."""
    answers = row.get("answers", row.get("answer"))
    if answers is None:
        return ()
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list):
        return None
    out = []
    for answer in answers:
        if isinstance(answer, dict):  # the VQAv2 annotation and HF layouts: {"answer": ..., ...}
            answer = answer.get("answer")
        if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
            return None
        out.append(str(answer))
    return tuple(out) if any(a.strip() for a in out) else ()


def _inside(root: Path, name: str) -> Path | None:
    """root/name when it stays inside root (no absolute paths, no `..` escapes, no links out)."""
    if Path(name).is_absolute() or Path(name).drive:
        return None
    base = root.resolve()
    resolved = (base / name).resolve()
    return resolved if resolved.is_relative_to(base) else None


def _from_datasets(path: Path, root: Path) -> VQAData:
    try:
        import datasets
    except ImportError as err:
        raise VQADataError(f"reading {path} needs the `datasets` package: pip install datasets "
                           "(or pip install 'mmadapter[data]')") from err
    try:
        if path.is_dir():
            table = datasets.load_from_disk(str(path))
            if isinstance(table, datasets.DatasetDict):
                raise VQADataError(f"{path} holds several splits ({', '.join(table)}); pass the folder of one")
        else:
            table = datasets.Dataset.from_parquet(str(path))
    except VQADataError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets raises many types for an unreadable copy
        raise VQADataError(f"{path} cannot be read as a `datasets` copy ({type(err).__name__}: {err})") from err
    missing = {"question"} - set(table.column_names)
    if missing or not {"question_id", "id"} & set(table.column_names):
        raise VQADataError(f"{path} has columns {table.column_names}; a VQA copy needs question_id, question, "
                           "image and answers or answer (category optional)")
    lazy = isinstance(table.features.get("image"), datasets.Image)  # decoded on use, not all held in memory
    rows = table.remove_columns("image") if lazy else table
    return _from_records([{**row, "image": _dataset_image(table, i)} if lazy else row for i, row in enumerate(rows)],
                         root, str(path), "datasets")


def _dataset_image(table: Any, index: int) -> Callable[[], Any]:
    def decode() -> Any:
        return table[index]["image"]

    return decode


# ----------------------------------------------------------------------------------------------
# The official VQAv2 files


def load_vqav2(path: Path, questions: dict[str, Any], root: Path, annotations: str | None,
               split: str | None) -> VQAData:
    """Questions (+ annotations) in the official layout; images are COCO_{split}_{image_id:012d}.jpg in
    the image root (or its {split} subfolder). Without annotations (test splits) nothing is scored."""
    split = split or questions.get("data_subtype")
    if not split:
        raise VQADataError(f"{path} names no data_subtype (e.g. val2014); pass --split")
    answers: dict[Any, dict[str, Any]] = {}
    if annotations:
        try:
            content = json.loads(Path(annotations).expanduser().read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise VQADataError(f"--annotations {annotations} cannot be read ({err})") from err
        if not isinstance(content, dict) or not isinstance(content.get("annotations"), list):
            raise VQADataError(f"--annotations {annotations} is not a VQAv2 annotations file (no \"annotations\" list)")
        answers = {a.get("question_id"): a for a in content["annotations"] if isinstance(a, dict)}
    data = VQAData([], str(path), "vqav2")
    for question in questions["questions"]:
        if not isinstance(question, dict) or not isinstance(question.get("image_id"), int):
            data.skipped["malformed"] += 1
            continue
        annotation = answers.get(question.get("question_id"), {})
        name = f"COCO_{split}_{question['image_id']:012d}.jpg"
        image = root / name if (root / name).is_file() or not (root / split / name).is_file() else root / split / name
        row = {"question_id": question.get("question_id"), "question": question.get("question"),
               "answers": annotation.get("answers"), "category": annotation.get("answer_type"),
               "image_id": question["image_id"]}
        item, problem = _record_item(row, None)
        if problem:
            data.skipped[problem] += 1
        else:
            data.items.append(replace(item, image=image, image_missing=not image.is_file()))
    return data


# ----------------------------------------------------------------------------------------------
# MME


def _mme_subtasks(path: Path) -> list[Path]:
    """Subtask folders: each holds question .txt files beside its images or in questions_answers_YN/."""
    return [d for d in sorted(path.iterdir()) if d.is_dir() and (any(d.glob("*.txt")) or
                                                                  (d / "questions_answers_YN").is_dir())]


def load_mme(path: Path) -> VQAData:
    """MME's release layout: <subtask>/images/*.jpg with <subtask>/questions_answers_YN/*.txt, or the
    images and .txt files side by side; each .txt (named like its image) holds `question<TAB>answer` lines."""
    data = VQAData([], str(path), "mme")
    for subtask in _mme_subtasks(path):
        text_dir = subtask / "questions_answers_YN" if (subtask / "questions_answers_YN").is_dir() else subtask
        image_dir = subtask / "images" if (subtask / "images").is_dir() else subtask
        for text_file in sorted(text_dir.glob("*.txt")):
            image = next((image_dir / (text_file.stem + s) for s in IMAGE_SUFFIXES
                          if (image_dir / (text_file.stem + s)).is_file()), None)
            try:
                lines = text_file.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError):
                data.skipped["malformed"] += 1
                continue
            for number, line in enumerate(lines):
                if not line.strip():
                    continue
                question, tab, answer = line.rpartition("\t")
                if not tab or not question.strip() or not answer.strip():
                    data.skipped["malformed"] += 1
                    continue
                data.items.append(VQAItem(f"{subtask.name}/{text_file.stem}/{number}", question.strip(),
                                          (answer.strip(),), image, subtask.name, f"{subtask.name}/{text_file.stem}",
                                          image is None))
    return data


# ----------------------------------------------------------------------------------------------
# The shapes demo's test set


def load_shapes_test(per_kind: int = 600, image_shift: int = 0, drawn_differently: bool = False) -> VQAData:
    """`shapes.test_set(per_kind)`: bare questions (as the demo adapter was trained), images rendered on use.

    image_shift: each question about scene i gets the picture of test scene i + image_shift instead (1: a
    fixed derangement, the picture of ANOTHER scene, however few scenes the set spans).
    drawn_differently: the same scenes drawn unlike the training pictures (`shapes.render_differently`:
    other sizes, hard edges, jittered colours, JPEG), seeded by the scene.
    """
    items = []
    for number, (scene, qa) in enumerate(shapes.test_set(per_kind)):
        image = _scene_image(scene + image_shift, drawn_differently)
        items.append(VQAItem(f"shapes-test-{number}", qa.question, (qa.answer,), image,
                             qa.kind, f"scene-{scene}" + ("-drawn" if drawn_differently else ""),
                             max_new_tokens=SHAPES_MAX_NEW_TOKENS.get(qa.kind, SHAPES_SHORT_ANSWER_TOKENS)))
    source = SHAPES_TEST if per_kind == 600 else f"{SHAPES_TEST}:{per_kind}"
    source += f" (pictures of scene i+{image_shift})" if image_shift else ""
    source += " (drawn differently)" if drawn_differently else ""
    return VQAData(items, source, "shapes", default_instruction=False)


def _scene_image(index: int, drawn_differently: bool = False) -> Callable[[], Any]:
    def render() -> Any:
        scene = shapes.make_scene("test", index)
        if drawn_differently:
            return shapes.render_differently(scene, np.random.default_rng([shapes.SPLIT_SEEDS["test"], index, 99]))
        return shapes.render(scene, SHAPES_IMAGE_SIZE)

    return render


def with_other_images(data: VQAData) -> VQAData:
    """Every question gets the picture of ANOTHER scene: the image keys in order of first appearance,
    each item takes the image of the next key (cyclically), a fixed derangement of the pictures."""
    keys = list(dict.fromkeys(item.image_key for item in data.items if item.image is not None))
    if len(keys) < 2:
        raise VQADataError("swapping images needs questions about at least two different images")
    first = {}
    for item in data.items:
        first.setdefault(item.image_key, item)
    shifted = {key: first[keys[(i + 1) % len(keys)]] for i, key in enumerate(keys)}
    items = [replace(item, image=shifted[item.image_key].image, image_missing=shifted[item.image_key].image_missing)
             if item.image_key in shifted else item for item in data.items]
    return replace(data, items=items, source=data.source + " (images of other scenes)")


def read_image(item: VQAItem) -> Any:
    """The item's image as an RGB PIL image, or None when it has none (or its file is missing).

    Raises ImageError (a ValueError) for a file that is not a decodable image of an allowed format.
    """
    if item.image is None or item.image_missing:
        return None
    return load_image(item.image() if callable(item.image) else item.image)
