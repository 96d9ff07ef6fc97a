"""ScienceQA accuracies in the groups of the official `tools/evaluate_acc.py` (lupantech/ScienceQA).

NAT/SOC/LAN by subject ("natural science", "social science", "language science"); TXT = non-empty
hint, IMG = has an image, NO = neither (TXT and IMG overlap); G1-6 = grade1..grade6, G7-12 =
grade7..grade12; Avg over all problems. Accuracies are percentages formatted to two decimals like
the official "{:.2f}". A prediction that is None (unparsed), out of range, or absent counts as wrong.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..data.scienceqa import Problem

SUBJECTS = {"NAT": "natural science", "SOC": "social science", "LAN": "language science"}
GRADES_1_6 = frozenset(f"grade{g}" for g in range(1, 7))
GRADES_7_12 = frozenset(f"grade{g}" for g in range(7, 13))
METRIC_COLUMNS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")  # the paper's order


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
