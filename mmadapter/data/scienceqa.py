"""ScienceQA evaluation without the model: reader, prompt formats, answer parsing, metrics, result files.

Faithful to the official repository (lupantech/ScienceQA: `models/base_prompt.py`,
`models/run_gpt3.py`, `tools/evaluate_acc.py`); the model calls live in `eval/scienceqa.py`.

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
prompts wrote "The answer is B."; `parse_answer` reads both):

    A:   The answer is (B).
    ALE: The answer is (B). BECAUSE: {lecture} {solution}

In ALE, newlines inside lecture and solution become the two characters "\\n" (as officially), an
empty explanation drops " BECAUSE:", and every double space in the text is replaced by one (once,
as officially). A training example is `build_prompt(p, fmt) + " " + build_target(p, fmt)`.
Format names: "QCM-A" (default), "QCM-ALE", "CQM-A", "CQM-ALE"; "QCM→A" and "QCM->A" spellings and
any letter case are accepted.

Metrics (`compute_metrics`, the groups of the official `evaluate_acc.py`): NAT/SOC/LAN by subject
("natural science", "social science", "language science"); TXT = non-empty hint, IMG = has an
image, NO = neither (TXT and IMG overlap); G1-6 = grade1..grade6, G7-12 = grade7..grade12; Avg over
all problems. Accuracies are percentages formatted to two decimals like the official "{:.2f}".
A prediction that is None (unparsed), out of range, or absent counts as wrong.

Result file (`write_results`): {"results": {pid: option index}, "outputs": {pid: raw text}} like
`run_gpt3.py`. The official scorer applies `int()` to every result and compares it with the
answer, so an unparsed answer is written as -1 (always wrong; the official GPT-3 script guessed a
random option instead, which would inflate scores). The official scorer also requires every test
pid (4241) to be present.
"""

from __future__ import annotations

import json
import os
import re
import string
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OPTION_LETTERS = string.ascii_uppercase
UNPARSED = -1  # written to result files for an answer that could not be parsed
SUBJECTS = {"NAT": "natural science", "SOC": "social science", "LAN": "language science"}
GRADES_1_6 = frozenset(f"grade{g}" for g in range(1, 7))
GRADES_7_12 = frozenset(f"grade{g}" for g in range(7, 13))
METRIC_COLUMNS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")  # the paper's order
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


# ----------------------------------------------------------------------------------------------
# Answer parsing

_ANSWER_PHRASE = re.compile(r"\b(?:answer|option|choice)\s+is\s*:?\s*", re.IGNORECASE)
_LEADING_LABEL = re.compile(r"^\s*(?:the\s+)?(?:correct\s+)?answer\s*:\s*", re.IGNORECASE)
_LETTER_AFTER_PHRASE = re.compile(
    r"\(\s*([A-Za-z])\s*\)"                 # (B) or (b)
    r"|([A-Z])(?![A-Za-z0-9])"              # B, B., B: ... (not the start of a word)
    r"|([a-z])(?=\s*(?:[.,;:!)]|$))")       # b. or b at the end (not the article "a")
_LEADING_LETTER = re.compile(r"\(\s*([A-Za-z])\s*\)|([A-Za-z])\s*(?:[.):]|$)")
_PAREN_LETTER = re.compile(r"\(\s*([A-Za-z])\s*\)")


def parse_answer(text: str, choices: list[str]) -> int | None:
    """The option index a model output chooses, or None when it names no valid option.

    In order: an explicit "the answer is X" phrase (the first that names a letter or an option
    wins; a letter beyond the options makes the answer invalid), a leading letter ("B", "(b)",
    "B. text", "Answer: B") or the one parenthesised letter in the text (text with several
    distinct ones, like echoed options, names none), then the option text itself (exact, or the
    one option contained as whole words).
    """
    for match in _ANSWER_PHRASE.finditer(text):
        rest = text[match.end():].lstrip(" \"'*")
        letter = _LETTER_AFTER_PHRASE.match(rest)
        if letter:
            return _letter_index(next(g for g in letter.groups() if g), choices)
        option = _option_at_start(rest, choices)
        if option is not None:
            return option
    stripped = _LEADING_LABEL.sub("", text).strip().strip("\"'*").strip()
    parenthesised = {m.upper() for m in _PAREN_LETTER.findall(text)}
    if len(parenthesised) <= 1:  # several, as in echoed options "(A) x (B) y", name no single letter
        letter = _LEADING_LETTER.match(stripped)
        if letter:
            return _letter_index(next(g for g in letter.groups() if g), choices)
        if parenthesised:
            return _letter_index(parenthesised.pop(), choices)
    return _option_in_text(stripped, choices)


def _letter_index(letter: str, choices: list[str]) -> int | None:
    index = OPTION_LETTERS.index(letter.upper())
    return index if index < len(choices) else None


def _option_at_start(text: str, choices: list[str]) -> int | None:
    """The longest option that `text` starts with (as whole words)."""
    lowered = text.casefold()
    found = [(len(c), i) for i, c in enumerate(choices)
             if c.strip() and re.match(re.escape(c.strip().casefold()) + r"(?!\w)", lowered)]
    return max(found)[1] if found else None


def _option_in_text(text: str, choices: list[str]) -> int | None:
    """The option equal to `text`, else the single option found in it as whole words."""
    lowered = text.casefold().rstrip(".!").strip()
    exact = [i for i, c in enumerate(choices) if c.strip().casefold() == lowered]
    if exact:
        return exact[0] if len(exact) == 1 else None
    contained = [i for i, c in enumerate(choices) if c.strip() and
                 re.search(r"(?<!\w)" + re.escape(c.strip().casefold()) + r"(?!\w)", lowered)]
    # "cats" also contains the option "cat": keep only options not inside another found option
    outer = [i for i in contained
             if not any(j != i and choices[i].strip().casefold() in choices[j].strip().casefold()
                        and choices[i].strip().casefold() != choices[j].strip().casefold() for j in contained)]
    return outer[0] if len(outer) == 1 else None


# ----------------------------------------------------------------------------------------------
# Metrics


def compute_metrics(problems: Iterable[Problem], predictions: Mapping[str, int | None]) -> dict[str, Any]:
    """Official ScienceQA accuracies and counts over `problems` (pass only the ones you ran).

    Returns {column: percent with two decimals, or None for an empty group} for METRIC_COLUMNS, plus
    "counts" and "correct" ({column: int}), "unparsed" (predictions that are None or negative),
    "missing" (problems without a prediction) and "extra" (predictions for other pids, ignored).
    """
    groups: dict[str, list[bool]] = {name: [] for name in METRIC_COLUMNS}
    unparsed = missing = 0
    seen = set()
    for problem in problems:
        seen.add(problem.pid)
        if problem.pid not in predictions:
            missing += 1
        pred = predictions.get(problem.pid)
        if problem.pid in predictions and (pred is None or pred < 0):
            unparsed += 1
        correct = pred is not None and pred == problem.answer
        has_text = bool(problem.hint)
        for name, subject in SUBJECTS.items():
            if problem.subject == subject:
                groups[name].append(correct)
        if has_text:
            groups["TXT"].append(correct)
        if problem.has_image:
            groups["IMG"].append(correct)
        if not has_text and not problem.has_image:
            groups["NO"].append(correct)
        if problem.grade in GRADES_1_6:
            groups["G1-6"].append(correct)
        if problem.grade in GRADES_7_12:
            groups["G7-12"].append(correct)
        groups["Avg"].append(correct)
    metrics: dict[str, Any] = {name: _percent(flags) for name, flags in groups.items()}
    metrics["counts"] = {name: len(flags) for name, flags in groups.items()}
    metrics["correct"] = {name: sum(flags) for name, flags in groups.items()}
    metrics["unparsed"] = unparsed
    metrics["missing"] = missing
    metrics["extra"] = sum(pid not in seen for pid in predictions)  # predictions for other problems, ignored
    return metrics


def _percent(flags: list[bool]) -> float | None:
    return float(f"{sum(flags) / len(flags) * 100:.2f}") if flags else None


def format_metrics_table(metrics: Mapping[str, Any]) -> str:
    """A Markdown table in the paper's column order, with question counts and parse failures."""
    def cell(value: Any) -> str:
        return "–" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| | " + " | ".join(METRIC_COLUMNS) + " |",
             "|---|" + "---:|" * len(METRIC_COLUMNS),
             "| Accuracy (%) | " + " | ".join(cell(metrics.get(c)) for c in METRIC_COLUMNS) + " |",
             "| Questions | " + " | ".join(cell(metrics["counts"][c]) for c in METRIC_COLUMNS) + " |",
             "",
             f"Unparsed answers: {metrics['unparsed']}; missing predictions: {metrics['missing']}."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Files


def write_results(path: str | os.PathLike[str], results: Mapping[str, int | None],
                  outputs: Mapping[str, str]) -> None:
    """The official result file; unparsed answers (None) are written as -1."""
    data = {"results": {str(pid): UNPARSED if pred is None else int(pred) for pid, pred in results.items()},
            "outputs": {str(pid): str(text) for pid, text in outputs.items()}}
    _write_atomic(Path(path), json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_results(path: str | os.PathLike[str]) -> dict[str, int | None]:
    """Predictions from an official-format result file (-1 and other negatives read back as None)."""
    data = _read_json(Path(path))
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ScienceQAError(f"{path} is not a ScienceQA result file (no \"results\" object)")
    return {str(pid): (None if int(pred) < 0 else int(pred)) for pid, pred in data["results"].items()}


def write_metrics(path: str | os.PathLike[str], metrics: Mapping[str, Any],
                  markdown_path: str | os.PathLike[str] | None = None) -> None:
    """Metrics as JSON at `path` and as a Markdown table (default: `path` with suffix .md)."""
    path = Path(path)
    _write_atomic(path, json.dumps(metrics, indent=2) + "\n")
    _write_atomic(Path(markdown_path) if markdown_path else path.with_suffix(".md"), format_metrics_table(metrics))


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class PredictionLog:
    """Append-only JSONL of {"pid", "pred", "output"} records (plus "image_unreadable": true for a question
    answered without its image because the file would not decode), so an interrupted evaluation resumes.

    Opening an existing log reads it back; a truncated last line (the run was killed mid-write) is
    cut off so that new records start on a clean line. A broken line elsewhere is an error. When a
    pid appears twice, the later record wins.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.predictions: dict[str, int | None] = {}
        self.outputs: dict[str, str] = {}
        self.unreadable_images: set[str] = set()  # pids answered text-only because their image would not decode
        self.dropped_partial_line = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._read_back()
        self._file = open(self.path, "a", encoding="utf-8")

    @property
    def done(self) -> set[str]:
        return set(self.predictions)

    def append(self, pid: str, pred: int | None, output: str, image_unreadable: bool = False) -> None:
        record = {"pid": str(pid), "pred": pred, "output": output}
        if image_unreadable:
            record["image_unreadable"] = True
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        self._add(record)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> PredictionLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_back(self) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]  # tail: text after the last newline ("" if none)
        for number, line in enumerate(complete, 1):
            if line.strip():
                self._add(self._parse(line, number))
        if tail.strip():
            try:
                self._add(self._parse(tail, len(complete) + 1))
                with open(self.path, "ab") as f:  # a whole record that only lacks its newline
                    f.write(b"\n")
            except ScienceQAError:
                with open(self.path, "r+b") as f:
                    f.truncate(len(data) - len(tail))
                self.dropped_partial_line = True

    def _parse(self, line: bytes, number: int) -> dict[str, Any]:
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ScienceQAError(f"{self.path}:{number}: not a JSON record ({err}); "
                                 "fix or delete the line to resume") from err
        pred = record.get("pred") if isinstance(record, dict) else None
        if not isinstance(record, dict) or "pid" not in record or not (pred is None or type(pred) is int):
            raise ScienceQAError(f"{self.path}:{number}: expected {{\"pid\", \"pred\", \"output\"}}, got {line[:80]!r}")
        return record

    def _add(self, record: dict[str, Any]) -> None:
        pid = str(record["pid"])
        self.predictions[pid] = record["pred"]
        self.outputs[pid] = str(record.get("output", ""))
        if record.get("image_unreadable") is True:
            self.unreadable_images.add(pid)
        else:
            self.unreadable_images.discard(pid)
