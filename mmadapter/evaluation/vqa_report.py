"""VQA scores from answers: the metric a data set calls for, per-category tables, and what was counted.

`summarize` returns {"metric", "overall" (percent), "categories": {name: {"score", "questions"}},
"counts": {...}} plus "mme" (per subtask acc / acc+ / score, perception / cognition totals) or "pope"
(accuracy, precision, recall, F1, yes ratio; overall and per category) for those metrics.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from .vqa_data import VQAData
from .vqa_metrics import mme_scores, parse_yes_no, pope_scores, question_score

METRIC_TITLES = {"vqa": "VQA accuracy (official, 2021 script)", "vqa2017": "VQA accuracy (official v2.0 release, 2017)",
                 "exact": "exact match after VQA normalisation", "mme": "MME (acc, acc+, score)",
                 "pope": "POPE (yes/no)"}
NO_CATEGORY = "(none)"


def default_metric(data: VQAData) -> str:
    """MME folders -> mme; yes/no answers -> pope; ten human answers -> vqa; otherwise exact match."""
    if data.format == "mme":
        return "mme"
    scored = [item.answers for item in data.items if item.answers]
    if scored and all(len(a) == 1 and a[0].strip().lower() in ("yes", "no") for a in scored):
        return "pope"
    if scored and sum(len(a) >= 10 for a in scored) * 2 > len(scored):
        return "vqa"
    return "exact"


def summarize(data: VQAData, answers: Mapping[str, str], metric: str, unreadable: set[str]) -> dict[str, Any]:
    """Scores of `answers` ({question key: answer text}) over the questions of `data` that have answers."""
    scored = [item for item in data.items if item.answers]
    by_category: dict[str, list[float]] = defaultdict(list)
    scores = []
    for item in scored:
        value = question_score(metric, answers[item.key], item.answers)
        scores.append(value)
        by_category[item.category or NO_CATEGORY].append(value)
    metrics: dict[str, Any] = {
        "metric": metric,
        "overall": _percent(scores),
        "categories": {name: {"score": _percent(values), "questions": len(values)}
                       for name, values in sorted(by_category.items())},
        "counts": {"questions": len(data.items), "scored": len(scored),
                   "without_answers": len(data.items) - len(scored),
                   "skipped_records": dict(sorted(data.skipped.items())),
                   "missing_images": sum(item.image_missing for item in data.items),
                   "unreadable_images": sum(item.key in unreadable for item in data.items),
                   "empty_answers": sum(not answers[item.key] for item in data.items)},
        "data": data.summary(),
    }
    if metric in ("mme", "pope"):
        metrics["counts"]["unparsed_yes_no"] = sum(parse_yes_no(answers[item.key]) is None for item in scored)
    if metric == "mme":
        metrics["mme"] = mme_scores((item.category or NO_CATEGORY, item.image_key or item.key,
                                     parse_yes_no(answers[item.key]) == parse_yes_no(item.answers[0]))
                                    for item in scored)
        metrics["counts"]["unknown_categories"] = len(metrics["mme"]["unknown_subtasks"])
    if metric == "pope":
        pairs: dict[str, list[tuple[str | None, str]]] = defaultdict(list)
        for item in scored:
            pairs[item.category or NO_CATEGORY].append((parse_yes_no(answers[item.key]),
                                                        parse_yes_no(item.answers[0]) or "no"))
        metrics["pope"] = {"overall": pope_scores(p for values in pairs.values() for p in values),
                           "categories": {name: pope_scores(values) for name, values in sorted(pairs.items())}}
    return metrics


def _percent(values: list[float]) -> float | None:
    return round(100 * sum(values) / len(values), 2) if values else None


def _cell(value: Any) -> str:
    return "–" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def format_table(metrics: Mapping[str, Any]) -> str:
    """The Markdown table of the metric used, per category, then the overall row."""
    metric = metrics["metric"]
    if metric == "mme":
        mme = metrics["mme"]
        lines = ["| subtask | acc | acc+ | score | questions |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {name} | {_cell(s['acc'])} | {_cell(s['acc_plus'])} | {_cell(s['score'])} | {s['questions']} |"
                  for name, s in mme["subtasks"].items()]
        lines += [f"| **perception** | | | {_cell(mme['perception'])} | |",
                  f"| **cognition** | | | {_cell(mme['cognition'])} | |"]
        return "\n".join(lines)
    if metric == "pope":
        pope = metrics["pope"]
        lines = ["| category | accuracy | precision | recall | F1 | yes ratio | questions |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        rows = [*pope["categories"].items(), ("**all**", pope["overall"])]
        lines += [f"| {name} | " + " | ".join(_cell(s[k]) for k in ("accuracy", "precision", "recall", "f1",
                                                                     "yes_ratio", "questions")) + " |"
                  for name, s in rows]
        return "\n".join(lines)
    lines = [f"| category | {metric} (%) | questions |", "|---|---:|---:|"]
    lines += [f"| {name} | {_cell(c['score'])} | {c['questions']} |" for name, c in metrics["categories"].items()]
    lines.append(f"| **all** | {_cell(metrics['overall'])} | {metrics['counts']['scored']} |")
    return "\n".join(lines)


def format_report(metrics: Mapping[str, Any]) -> str:
    """The table under a title naming the metric, and what was counted and how the answers were made."""
    counts = metrics["counts"]
    data = metrics.get("data") or {}
    lines = [f"## VQA: {data.get('source', '')} — metric: {METRIC_TITLES[metrics['metric']]}", "",
             format_table(metrics), ""]
    skipped = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in counts["skipped_records"].items())
    lines.append(f"- Questions: {counts['questions']} ({counts['scored']} scored, {counts['without_answers']} without "
                 f"answers); records skipped: {skipped or 'none'}")
    lines.append(f"- Images: {counts['missing_images']} missing and {counts['unreadable_images']} unreadable files "
                 "(answered without the image); empty answers: " + str(counts["empty_answers"]) +
                 (f"; answers not starting with yes/no: {counts['unparsed_yes_no']}" if "unparsed_yes_no" in counts
                  else "") + (f"; subtasks outside MME's lists: {', '.join(metrics['mme']['unknown_subtasks'])}"
                              if metrics.get("mme", {}).get("unknown_subtasks") else ""))
    run = metrics.get("run") or {}
    s, images = run.get("settings") or {}, run.get("images") or {}
    if s:
        lines.append(f"- Model: {s.get('base')} ({s.get('dtype')}), adapter {s.get('adapter') or 'none'}, template "
                     f"{s.get('template')!r}, instruction {s.get('instruction')!r}")
    if images.get("ignored"):
        lines.append(f"- {images['ignored']} questions with images answered without them ({images['ignored_reason']})")
    return "\n".join(lines) + "\n"
