"""ScienceQA data: the reader and the prompt formats.

Faithful to the official repository (lupantech/ScienceQA: `models/base_prompt.py`); answer parsing,
metrics, result files and the model calls live in `mmadapter.evaluation`.

Sources (`load_scienceqa`):
- the original release: a directory with `problems.json` ({pid: problem}), `pid_splits.json`
  ({"train"|"val"|"test"|"minival"|...: [pid, ...]}) and images at `images/<split>/<pid>/<image>`
  (`<split>/<pid>/<image>` directly under the directory is accepted too);
- a local copy of the Hugging Face dataset `derek-thomas/ScienceQA`: a directory of parquet files
  (as on the hub: `data/test-00000-of-00001.parquet`, or `test/*.parquet`) or a
  `datasets.save_to_disk` directory;
- a hub id such as "derek-thomas/ScienceQA" (downloaded with `datasets.load_dataset`; offline this
  fails at once, asking for a local copy).

Ids: the original release has string pids ("1", "5", ...), which are what the official scorer
expects. The HF dataset has no pid column: unless it carries a "pid" (or "id") column, the pid of a
row is "<split>-<row index>" (e.g. "test-17", the row's position in `load_dataset(...)[split]`).
These ids are not official pids (the HF row order is not documented to follow `pid_splits.json`):
score HF runs with `compute_metrics`, not with the official script.
Split names "val" and "validation" are interchangeable.

Records: "question" (non-empty text), "choices" (two or more strings) and "answer" (an index into
choices) are required; a record without them is skipped and counted, never fatal. "hint",
"subject", "grade", "lecture", "solution" and "image" default to ""/None when absent (counted per
field). An image that the record names but that cannot be found is counted and the problem is kept
with `image=None, image_missing=True`: it still belongs to the IMG group, as in the official scorer,
which reads the annotation, not the file.

Prompt (`build_prompt`, the official QCM input with `use_caption=False`, test example):

    Question: {question}
    Context: {hint, or "N/A" when empty}
    Options: (A) {choice 0} (B) {choice 1} ...
    Answer:

("CQM" swaps the first two lines.) Target (`build_target`), what the model should write after
"Answer:"; the letter is parenthesised as in MM-CoT's fine-tuning pairs (the official few-shot
prompts wrote "The answer is B."; `mmadapter.evaluation.parsing.parse_answer` reads both):

    A:   The answer is (B).
    ALE: The answer is (B). BECAUSE: {lecture} {solution}

In ALE, newlines inside lecture and solution become the two characters "\\n" (as officially), an
empty explanation drops " BECAUSE:", and every double space in the text is replaced by one (once,
as officially). A training example is `build_prompt(p, fmt) + " " + build_target(p, fmt)`.
Format names: "QCM-A" (default), "QCM-ALE", "CQM-A", "CQM-ALE"; "QCM→A" and "QCM->A" spellings and
any letter case are accepted.
"""

from __future__ import annotations

import json
import os
import re
import string
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OPTION_LETTERS = string.ascii_uppercase
OPTIONAL_TEXT_FIELDS = ("hint", "subject", "grade", "lecture", "solution")
INPUT_FORMATS = ("QCM", "CQM")
OUTPUT_FORMATS = ("A", "ALE")
HF_SPLITS = {"val": "validation"}  # original split name -> HF split name


class ScienceQAError(ValueError):
    """A ScienceQA source, format or file that cannot be used as given."""


@dataclass
class Problem:
    """One multiple-choice question. `image` is None, a file path, encoded bytes or a PIL image."""

    pid: str
    question: str
    choices: list[str]
    answer: int
    hint: str = ""
    image: Any = None
    subject: str = ""
    grade: str = ""
    lecture: str = ""
    solution: str = ""
    split: str = ""
    image_missing: bool = False  # the record names an image that was not found

    @property
    def has_image(self) -> bool:
        """Whether the question has image context (the annotation, even when the file is missing)."""
        return self.image is not None or self.image_missing


@dataclass
class LoadStats:
    """What `load_scienceqa` read, kept and skipped."""

    source: str = ""
    layout: str = ""  # "original" | "parquet" | "arrow" | "hub"
    split: str = ""
    rows: int = 0  # records considered (after `limit`)
    loaded: int = 0
    with_image: int = 0  # loaded problems whose image is available
    missing_images: list[str] = field(default_factory=list)  # pids
    missing_fields: Counter[str] = field(default_factory=Counter)  # optional field -> records without it
    skipped: dict[str, str] = field(default_factory=dict)  # pid -> reason

    def summary(self) -> str:
        parts = [f"{self.loaded}/{self.rows} problems from {self.layout} source {self.source} ({self.split})",
                 f"{self.with_image} with images"]
        if self.missing_images:
            parts.append(f"{len(self.missing_images)} images missing")
        if self.missing_fields:
            parts.append("missing fields: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.missing_fields.items())))
        if self.skipped:
            reasons = Counter(self.skipped.values())
            parts.append("skipped: " + ", ".join(f"{n} {reason}" for reason, n in reasons.most_common()))
        return "; ".join(parts)


# ----------------------------------------------------------------------------------------------
# Reading


def load_scienceqa(source: str | os.PathLike[str], split: str = "test",
                   limit: int | None = None) -> tuple[list[Problem], LoadStats]:
    """Read one split from the original release, a local HF copy, or the hub (see module docstring)."""
    if limit is not None and limit < 0:
        raise ScienceQAError(f"limit must be None or >= 0, got {limit}")
    path = Path(source).expanduser()
    stats = LoadStats(source=str(source), split=split)
    if path.is_dir():
        if (path / "problems.json").is_file():
            stats.layout = "original"
            return _load_original(path, split, limit, stats), stats
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            stats.layout = "arrow"
            rows = _arrow_rows(path, split, limit)
        else:
            stats.layout = "parquet"
            rows = _parquet_rows(path, split, limit)
        return _problems_from_rows(rows, path, _hf_split(split), stats), stats
    if path.exists():
        raise ScienceQAError(f"{source} is a file; pass the ScienceQA directory (with problems.json or parquet files)")
    if _looks_like_hub_id(str(source)):
        stats.layout = "hub"
        rows = _hub_rows(str(source), split, limit)
        return _problems_from_rows(rows, None, _hf_split(split), stats), stats
    raise ScienceQAError(f"ScienceQA source {source} does not exist: pass a directory in the original layout "
                         "(problems.json, pid_splits.json, images/), a local copy of the HF dataset, "
                         "or a hub id such as derek-thomas/ScienceQA")


def load_image(problem: Problem) -> Any:
    """The problem's image as an RGB PIL image, or None when it has none."""
    from PIL import Image

    from ..images import load_image as load_any_image  # format allowlist, size cap before decoding

    if problem.image is None:
        return None
    if isinstance(problem.image, Image.Image):
        return problem.image.convert("RGB")
    try:
        return load_any_image(problem.image)
    except ValueError as err:  # ImageError: not an image, truncated, a decompression bomb
        raise ScienceQAError(f"cannot read the image of problem {problem.pid}: {err}") from err


def _load_original(root: Path, split: str, limit: int | None, stats: LoadStats) -> list[Problem]:
    problems_by_pid = _read_json(root / "problems.json")
    splits = _read_json(root / "pid_splits.json")
    if not isinstance(problems_by_pid, dict) or not isinstance(splits, dict):
        raise ScienceQAError(f"{root}: problems.json and pid_splits.json must both hold JSON objects")
    name = split if split in splits else {"validation": "val"}.get(split, split)
    if name not in splits:
        raise ScienceQAError(f"split {split!r} not in {root / 'pid_splits.json'}; available: {', '.join(splits)}")
    if not isinstance(splits[name], list):
        raise ScienceQAError(f"{root / 'pid_splits.json'}: split {name!r} should be a list of pids, "
                             f"found a {type(splits[name]).__name__}")
    pids = [str(pid) for pid in splits[name]][:limit]
    problems = []
    for pid in pids:
        stats.rows += 1
        record = problems_by_pid.get(pid)
        if not isinstance(record, dict):
            stats.skipped[pid] = "not in problems.json"
            continue
        record_split = record.get("split")
        if not isinstance(record_split, str) or not record_split:
            record_split = name
        problem = _make_problem(pid, record, record_split, stats)
        if problem is None:
            continue
        image_name = record.get("image")
        if image_name:
            found = None
            if all(map(_is_plain_name, (record_split, pid, image_name))):  # never a path out of root
                candidates = [root / "images" / record_split / pid / image_name, root / record_split / pid / image_name]
                found = next((p for p in candidates if p.is_file()), None)
            _attach_image(problem, str(found) if found else None, stats)
        problems.append(problem)
    return problems


def _problems_from_rows(rows: Iterable[tuple[int, dict[str, Any]]], root: Path | None, split: str,
                        stats: LoadStats) -> list[Problem]:
    problems = []
    for index, row in rows:
        stats.rows += 1
        given = next((row[key] for key in ("pid", "id") if row.get(key) is not None), None)
        pid = str(given) if given is not None else f"{split}-{index}"
        problem = _make_problem(pid, row, split, stats)
        if problem is None:
            continue
        image = row.get("image")
        if image is not None:
            _attach_image(problem, _hf_image(image, root), stats)
        problems.append(problem)
    return problems


def _make_problem(pid: str, record: Mapping[str, Any], split: str, stats: LoadStats) -> Problem | None:
    """A Problem from a record, or None (counted in `stats.skipped`) when a required field is bad."""
    question, choices, answer = record.get("question"), record.get("choices"), record.get("answer")
    reason = None
    if not isinstance(question, str) or not question.strip():
        reason = "missing question"
    elif not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        reason = "missing or invalid choices"
    elif len(choices) > len(OPTION_LETTERS):
        reason = f"more than {len(OPTION_LETTERS)} choices"
    elif isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        reason = "missing or invalid answer"
    if reason:
        stats.skipped[pid] = reason
        return None
    for name in (*OPTIONAL_TEXT_FIELDS, "image"):
        if record.get(name) is None and not (name == "image" and name in record):
            stats.missing_fields[name] += 1
    texts = {name: str(record.get(name) or "") for name in OPTIONAL_TEXT_FIELDS}
    stats.loaded += 1
    return Problem(pid=pid, question=question, choices=list(choices), answer=answer, split=split, **texts)


def _attach_image(problem: Problem, image: Any, stats: LoadStats) -> None:
    if image is None:
        problem.image_missing = True
        stats.missing_images.append(problem.pid)
    else:
        problem.image = image
        stats.with_image += 1


def _hf_image(value: Any, root: Path | None) -> Any:
    """The image of an HF row: encoded bytes, an existing path, a PIL image, or None if unavailable."""
    if isinstance(value, dict):  # datasets.Image storage: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return value["bytes"]
        path = value.get("path")
        for candidate in ([Path(path), *([root / path] if root else [])] if path else []):
            if candidate.is_file():
                return str(candidate)
        return None
    return value  # already decoded (PIL)


def _hf_split(split: str) -> str:
    return HF_SPLITS.get(split, split)


def _parquet_rows(root: Path, split: str, limit: int | None) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    files = sorted(root.rglob("*.parquet"))
    if not files:
        raise ScienceQAError(f"{root} holds neither problems.json, a save_to_disk dataset, nor parquet files")
    wanted = _hf_split(split)
    chosen = [f for f in files if f.name.startswith((f"{wanted}-", f"{wanted}.", f"{wanted}_"))
              or wanted in f.relative_to(root).parts[:-1]]
    if not chosen:
        raise ScienceQAError(f"no parquet file for split {wanted!r} under {root} "
                             f"(found: {', '.join(f.name for f in files[:10])})")
    index = 0
    for file in chosen:
        for batch in pq.ParquetFile(file).iter_batches(batch_size=256):
            for row in batch.to_pylist():
                if limit is not None and index >= limit:
                    return
                yield index, row
                index += 1


def _arrow_rows(root: Path, split: str, limit: int | None) -> Iterator[tuple[int, dict[str, Any]]]:
    import datasets

    loaded = datasets.load_from_disk(str(root))
    if isinstance(loaded, datasets.DatasetDict):
        wanted = _hf_split(split)
        name = wanted if wanted in loaded else split
        if name not in loaded:
            raise ScienceQAError(f"split {split!r} not in {root}; available: {', '.join(loaded)}")
        loaded = loaded[name]
    return _dataset_rows(loaded, limit)


def _hub_rows(repo_id: str, split: str, limit: int | None) -> Iterator[tuple[int, dict[str, Any]]]:
    import datasets

    advice = (f"no local directory {repo_id!r} exists either; pass a local copy instead: the original release "
              f"directory (problems.json, pid_splits.json, images/), a directory of the HF parquet files "
              f"(huggingface-cli download {repo_id} --repo-type dataset --local-dir DIR), "
              f"or a datasets.save_to_disk directory")
    if not _hub_offline():  # a quick probe: datasets itself retries for half a minute when offline
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            HfApi().dataset_info(repo_id, timeout=10)
        except RepositoryNotFoundError as err:
            raise ScienceQAError(f"dataset {repo_id!r} not found on the Hugging Face Hub; {advice}") from err
        except Exception as err:  # network errors come from requests or httpx, depending on the version
            raise ScienceQAError(f"cannot reach the Hugging Face Hub for {repo_id!r} ({type(err).__name__}: {err}); "
                                 f"{advice} (or set HF_HUB_OFFLINE=1 to use a copy in the datasets cache)") from err
    try:
        loaded = datasets.load_dataset(repo_id, split=_hf_split(split))
    except OSError as err:  # ConnectionError, DatasetNotFoundError
        raise ScienceQAError(f"cannot load {repo_id!r} from the Hugging Face Hub or the datasets cache "
                             f"({err}); {advice}") from err
    return _dataset_rows(loaded, limit)


def _dataset_rows(dataset: Any, limit: int | None) -> Iterator[tuple[int, dict[str, Any]]]:
    import datasets

    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    if isinstance(dataset.features.get("image"), datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image(decode=False))  # keep the encoded bytes
    return enumerate(dataset)


def _hub_offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _looks_like_hub_id(text: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) is not None and not text.startswith(".")


def _is_plain_name(name: Any) -> bool:
    """One file or folder name, without separators, NUL or "..": names in problems.json are untrusted."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ScienceQAError(f"{path} not found: the original ScienceQA layout needs problems.json "
                             "and pid_splits.json side by side") from err
    except (ValueError, RecursionError) as err:  # bad JSON or UTF-8, nested too deeply, a 5000-digit number
        raise ScienceQAError(f"{path} is not valid JSON ({type(err).__name__}: {err})") from err
    except OSError as err:
        raise ScienceQAError(f"{path} cannot be read ({err})") from err


# ----------------------------------------------------------------------------------------------
# Prompts


def parse_format(fmt: str) -> tuple[str, str]:
    """("QCM", "A") from "QCM-A", "QCM->A", "QCM→A" or "qcm-a"."""
    parts = re.split(r"\s*(?:->|→|-)\s*", fmt.strip().upper())
    if len(parts) != 2 or parts[0] not in INPUT_FORMATS or parts[1] not in OUTPUT_FORMATS:
        known = ", ".join(f"{i}-{o}" for i in INPUT_FORMATS for o in OUTPUT_FORMATS)
        raise ScienceQAError(f"unknown ScienceQA prompt format {fmt!r}; known formats: {known}")
    return parts[0], parts[1]


def build_prompt(problem: Problem, fmt: str = "QCM-A") -> str:
    """The text the model reads, ending with "Answer:" (see the module docstring for the template)."""
    input_format, _ = parse_format(fmt)
    context = problem.hint.strip() or "N/A"
    options = " ".join(f"({OPTION_LETTERS[i]}) {choice}" for i, choice in enumerate(problem.choices))
    first, second = f"Question: {problem.question}", f"Context: {context}"
    if input_format == "CQM":
        first, second = second, first
    return f"{first}\n{second}\nOptions: {options}\nAnswer:".replace("  ", " ").strip()


def build_target(problem: Problem, fmt: str = "QCM-A") -> str:
    """What the model should write after "Answer:"."""
    _, output_format = parse_format(fmt)
    target = f"The answer is ({OPTION_LETTERS[problem.answer]})."
    if output_format == "ALE":
        explanation = " ".join([problem.lecture.replace("\n", "\\n"), problem.solution.replace("\n", "\\n")])
        target = f"{target} BECAUSE: {explanation}"
    target = target.replace("  ", " ").strip()
    return target.removesuffix("BECAUSE:").strip()
