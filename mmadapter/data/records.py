"""Readers for instruction data: Alpaca and multimodal JSON/JSONL, and `datasets.Dataset`s.

Every reader returns `(examples, ReadStats)`. One bad record never stops a read: it is skipped and
counted by reason, so a 50k-record file with a few broken lines still trains and says what it
dropped. Problems with the file itself (missing, not JSON, an object where a list belongs) raise
`DataError` naming the file.

Record formats (one record = one JSON object):
- Alpaca: {"instruction", "input" (optional), "output"}
- question/answer: {"question", "answer"}
- LLaVA: {"conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}, ...]}
  (multi-turn; the "<image>" placeholder is removed, because the image enters through the adapter
  prompts, not as a token)
Any of them may carry "image": a path relative to `image_root` (default: the data file's folder);
it is resolved and must exist at read time. "id" is kept when present.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_PLACEHOLDER = "<image>"
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


class DataError(ValueError):
    """A data source that cannot be read at all (as opposed to single bad records, which are skipped)."""


@dataclass
class Example:
    """One training conversation: (user, assistant) turns, an optional image, the Alpaca input."""

    turns: list[tuple[str, str]]
    image: str | None = None  # resolved path, or None for text-only
    id: str | None = None
    input: str | None = None  # Alpaca "input": extra context for the first turn


@dataclass
class ReadStats:
    """What a read kept and what it skipped, by reason."""

    source: str = ""
    kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return self.kept + sum(self.skipped.values())

    def __str__(self) -> str:
        reasons = ", ".join(f"{count} {reason}" for reason, count in self.skipped.most_common())
        return f"{self.source}: kept {self.kept} of {self.total} records" + (f" (skipped: {reasons})" if reasons else "")


class _Skip(Exception):
    """A record to skip; the message is the reason counted in ReadStats."""


def read_examples(source: Any, image_root: str | os.PathLike[str] | None = None) -> tuple[list[Example], ReadStats]:
    """Read a .json/.jsonl file, a `datasets.Dataset`, or a list of record dicts."""
    if isinstance(source, (str, os.PathLike)):
        return read_json(source, image_root)
    if isinstance(source, list) or _is_hf_dataset(source):
        return read_dataset(source, image_root)
    raise DataError(f"cannot read examples from a {type(source).__name__}; "
                    "pass a .json/.jsonl path, a datasets.Dataset or a list of dicts")


def read_json(path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None
              ) -> tuple[list[Example], ReadStats]:
    """Read a JSON list or JSONL file of records (Alpaca, question/answer or LLaVA conversations)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a leading byte-order mark is dropped
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e
    records, bad_lines = _parse_json_or_jsonl(text, path)
    examples, stats = read_records(records, Path(image_root) if image_root is not None else path.parent, str(path))
    if bad_lines:
        stats.skipped["bad JSON line"] += bad_lines
    return examples, stats


def read_dataset(dataset: Iterable[dict[str, Any]], image_root: str | os.PathLike[str] | None = None
                 ) -> tuple[list[Example], ReadStats]:
    """Read a `datasets.Dataset` (or any iterable of dicts) with the columns of a record format.

    Relative image paths resolve against `image_root`, or the working directory when it is None.
    """
    return read_records(dataset, Path(image_root or "."), type(dataset).__name__)


def read_records(records: Iterable[Any], image_root: Path, source_name: str = "records"
                 ) -> tuple[list[Example], ReadStats]:
    stats = ReadStats(source=source_name)
    examples = []
    for index, record in enumerate(records):
        try:
            examples.append(parse_record(record, image_root, default_id=f"{source_name}:{index}"))
        except _Skip as skip:
            stats.skipped[str(skip)] += 1
        else:
            stats.kept += 1
    return examples, stats


def parse_record(record: Any, image_root: Path, default_id: str) -> Example:
    """One record as an Example; raises _Skip with the reason when it cannot be used."""
    if not isinstance(record, dict):
        raise _Skip("not a JSON object")
    input_text = None
    if record.get("conversations") is not None:
        turns = _conversation_turns(record["conversations"])
    elif "instruction" in record or "output" in record:
        instruction, output = _text(record, "instruction"), _text(record, "output")
        input_text = _optional_text(record, "input") or None
        turns = [(instruction, output)]
    elif "question" in record or "answer" in record:
        turns = [(_text(record, "question"), _text(record, "answer"))]
    else:
        raise _Skip("no instruction/output, question/answer or conversations")
    for user, assistant in turns:
        if not user.strip():
            raise _Skip("empty instruction")
        if not assistant.strip():
            raise _Skip("empty response")
    record_id = record.get("id")
    return Example(turns=turns, image=_resolve_image(record.get("image"), image_root), input=input_text,
                   id=str(record_id) if record_id is not None else default_id)


def _conversation_turns(conversations: Any) -> list[tuple[str, str]]:
    if not isinstance(conversations, list) or not conversations or len(conversations) % 2:
        raise _Skip("bad conversations (need a non-empty list of human/gpt pairs)")
    turns = []
    for question, answer in zip(conversations[::2], conversations[1::2]):
        if not (isinstance(question, dict) and isinstance(answer, dict)
                and question.get("from") in USER_ROLES and answer.get("from") in ASSISTANT_ROLES
                and isinstance(question.get("value"), str) and isinstance(answer.get("value"), str)):
            raise _Skip("bad conversations (need a non-empty list of human/gpt pairs)")
        turns.append((question["value"].replace(IMAGE_PLACEHOLDER, "").strip(), answer["value"]))
    return turns


def _text(record: dict[str, Any], key: str) -> str:
    if key not in record or record[key] is None:
        raise _Skip(f"missing field {key!r}")
    if not isinstance(record[key], str):
        raise _Skip(f"field {key!r} is not a string")
    return record[key]


def _optional_text(record: dict[str, Any], key: str) -> str:
    return _text(record, key) if record.get(key) is not None else ""


def _resolve_image(image: Any, image_root: Path) -> str | None:
    if image is None or image == "":
        return None
    if isinstance(image, dict) and isinstance(image.get("path"), str):  # a datasets Image() column, undecoded
        image = image["path"]
    if not isinstance(image, (str, os.PathLike)):
        raise _Skip("image is not a file path")
    try:
        path = (image_root / image).resolve()
        found = path.is_file()
    except (OSError, ValueError) as e:  # a NUL byte, a name too long for the file system
        raise _Skip("bad image path") from e
    if not found:
        raise _Skip("missing image")
    return str(path)


def _parse_json_or_jsonl(text: str, path: Path) -> tuple[list[Any], int]:
    """Records of a JSON list or JSONL text, and the number of JSONL lines that were not JSON."""
    if path.suffix != ".jsonl":
        try:
            data = json.loads(text)
        except RecursionError as e:
            raise DataError(f"{path}: not valid JSON (nested too deeply)") from e
        except ValueError as e:  # JSONDecodeError, or a number too long to convert
            if not text.lstrip().startswith("{"):
                raise DataError(f"{path}: not valid JSON ({e})") from e
            data = None  # maybe JSON Lines saved as .json
        if data is not None:
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON list of records, found a {type(data).__name__}; "
                                "wrap the records in [...] or write one record per line (.jsonl)")
            return data, 0
    records, bad_lines = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except (ValueError, RecursionError):  # not JSON, nested too deeply, a number too long to convert
            bad_lines += 1
    if bad_lines and not records:
        raise DataError(f"{path}: no line is valid JSON; expected JSON Lines (one record per line)")
    return records, bad_lines


def _is_hf_dataset(source: Any) -> bool:
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(source, (datasets.Dataset, datasets.IterableDataset))
