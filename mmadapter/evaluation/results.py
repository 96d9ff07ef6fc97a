"""ScienceQA result files: the official results.json, metrics files, and the resumable prediction log.

Result file (`write_results`): {"results": {pid: option index}, "outputs": {pid: raw text}} like the
official `run_gpt3.py`. The official scorer applies `int()` to every result and compares it with the
answer, so an unparsed answer is written as -1 (always wrong; the official GPT-3 script guessed a
random option instead, which would inflate scores). The official scorer also requires every test
pid (4241) to be present.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from ..data.scienceqa import ScienceQAError
from .metrics import format_metrics_table

UNPARSED = -1  # written to result files for an answer that could not be parsed


def write_results(path: str | os.PathLike[str], results: Mapping[str, int | None],
                  outputs: Mapping[str, str]) -> None:
    """The official result file; unparsed answers (None) are written as -1."""
    data = {"results": {str(pid): UNPARSED if pred is None else int(pred) for pid, pred in results.items()},
            "outputs": {str(pid): str(text) for pid, text in outputs.items()}}
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_results(path: str | os.PathLike[str]) -> dict[str, int | None]:
    """Predictions from an official-format result file (-1 and other negatives read back as None)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # missing, unreadable, bad JSON or UTF-8
        raise ScienceQAError(f"{path} cannot be read as a ScienceQA result file ({type(err).__name__}: {err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ScienceQAError(f"{path} is not a ScienceQA result file (no \"results\" object)")
    return {str(pid): (None if int(pred) < 0 else int(pred)) for pid, pred in data["results"].items()}


def write_metrics(path: str | os.PathLike[str], metrics: Mapping[str, Any],
                  markdown_path: str | os.PathLike[str] | None = None) -> None:
    """Metrics as JSON at `path` and as a Markdown table (default: `path` with suffix .md)."""
    path = Path(path)
    atomic_write_text(path, json.dumps(metrics, indent=2) + "\n")
    atomic_write_text(Path(markdown_path) if markdown_path else path.with_suffix(".md"), format_metrics_table(metrics))


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
