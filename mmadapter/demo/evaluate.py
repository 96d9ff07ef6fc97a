"""Accuracy of the demo adapter per question type on the fixed shapes test set, with two ablations and
the same scenes drawn differently.

The questions are `shapes:test` of the VQA evaluator (`mmadapter.evaluation.vqa`): bare questions,
greedy decoding, exact match after the VQA answer normalisation (lower case, punctuation, number
words to digits, articles dropped). The ablations ask the same questions with the image of ANOTHER
scene (a fixed derangement: a question about test scene i gets the picture of scene i + 1) and
with no image at all (the image token zeroed: the adapter's prompts alone); they show how much of
each answer comes from looking at the right picture. "Drawn differently" asks about the same scenes drawn
unlike the training pictures (other sizes up to 320 px, hard edges, jittered colours, JPEG), as a user's own
drawing would be. "Blind best" is the accuracy of always giving
the most frequent answer of each question template: the best any image-blind answerer can do.

    python -m mmadapter.demo.evaluate                # the shipped demo model, 600 questions per type
    python -m mmadapter.demo.evaluate --per-kind 100 --adapter runs/demo/adapter.safetensors --out runs/x
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data import shapes
from ..evaluation.vqa import answer_text, evaluate_vqa
from ..evaluation.vqa_data import VQAData, load_shapes_test

if TYPE_CHECKING:
    from ..model import MMAdapter

ABLATIONS = {"accuracy": "own image", "drawn_differently": "drawn differently", "other_scene": "another scene's image",
             "ablation": "image token zeroed"}


def blind_best(test: list[tuple[int, shapes.QA]]) -> dict[str, float]:
    """Per kind: accuracy of answering every question template with its most frequent answer."""
    by_template: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for _, qa in test:
        by_template[(qa.kind, re.sub(r"\b(" + "|".join(shapes.COLORS) + r")\b", "{color}", qa.question))][qa.answer] += 1
    hits: Counter = Counter()
    totals: Counter = Counter()
    for (kind, _), answers in by_template.items():
        hits[kind] += answers.most_common(1)[0][1]
        totals[kind] += sum(answers.values())
    return {kind: 100 * hits[kind] / totals[kind] for kind in totals}


def first_per_kind(data: VQAData, per_kind: int) -> VQAData:
    """The first `per_kind` questions of every kind, in test-set order."""
    seen: Counter = Counter()
    items = []
    for item in data.items:
        if seen[item.category] < per_kind:
            seen[item.category] += 1
            items.append(item)
    return replace(data, items=items)


def evaluate(model: MMAdapter, per_kind: int = 600, ablation_per_kind: int | None = None, batch_size: int = 32,
             progress: bool = True, out: Path | None = None) -> dict[str, Any]:
    """Accuracy (%) per kind with the own image, another scene's image and no image, and the blind best.

    With `out`, each run keeps its resumable VQA files in out/<own-image|other-scene|no-image>/.
    """
    data = load_shapes_test(per_kind)
    ablation_per_kind = per_kind if ablation_per_kind is None else min(ablation_per_kind, per_kind)
    ablation_data = first_per_kind(data, ablation_per_kind)
    results: dict[str, Any] = {"per_kind": per_kind, "ablation_per_kind": ablation_per_kind,
                               "blind_best": blind_best(shapes.test_set(per_kind))}
    other_scene = first_per_kind(load_shapes_test(per_kind, image_shift=1), ablation_per_kind)
    drawn = first_per_kind(load_shapes_test(per_kind, drawn_differently=True), ablation_per_kind)
    runs = (("accuracy", data, True, "own-image"), ("drawn_differently", drawn, True, "drawn-differently"),
            ("other_scene", other_scene, True, "other-scene"), ("ablation", ablation_data, False, "no-image"))
    for name, questions, use_images, folder in runs:
        if not questions.items:  # ablation_per_kind=0: the accuracy alone (e.g. at every checkpoint)
            results[name] = {}
            continue
        answers: dict[str, str] = {}
        metrics = evaluate_vqa(model, questions, metric="exact", batch_size=batch_size, use_images=use_images,
                               out=out / folder if out else None, progress=progress,
                               on_answer=lambda key, text: answers.__setitem__(key, answer_text(text)))
        results[name] = {kind: metrics["categories"][kind]["score"] for kind in shapes.QUESTION_KINDS
                         if kind in metrics["categories"]}
        if name == "accuracy":
            if out:  # a resumed run answered some questions before: all answers are in its result file
                answers = {str(a["question_id"]): a["answer"]
                           for a in json.loads((out / folder / "results.json").read_text(encoding="utf-8"))}
            results["examples"] = [{"question": item.question, "answer": item.answers[0], "got": answers[item.key]}
                                   for item in questions.items[::max(1, len(questions.items) // 24)]]
    return results


def format_table(results: dict[str, Any]) -> str:
    """Markdown table per question type: own image, drawn differently, another scene's image, image token
    zeroed, blind best."""
    lines = ["| question type | accuracy | drawn differently | another scene's image | image token zeroed | blind best |",
             "|---|---:|---:|---:|---:|---:|"]
    for kind in shapes.QUESTION_KINDS:
        if kind in results["accuracy"]:
            cells = [results.get(name, {}).get(kind) for name in ABLATIONS] + [results["blind_best"][kind]]
            lines.append(f"| {kind} | " + " | ".join("–" if c is None else f"{c:.1f}%" for c in cells) + " |")
    lines.append(f"\n{results['per_kind']} questions per type ({results['ablation_per_kind']} for the ablations), "
                 "greedy decoding, exact match after the VQA answer normalisation.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", help="adapter file (default: the shipped demo adapter)")
    parser.add_argument("--tower", help="tower weights (default: the shipped demo tower)")
    parser.add_argument("--per-kind", type=int, default=600)
    parser.add_argument("--ablation-per-kind", type=int, default=100,
                        help="questions per type for the drawn-differently and ablation runs (default: 100)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="runs/demo-eval",
                        help="folder for results.json, table.md and each run's resumable VQA files "
                             "(default: runs/demo-eval)")
    parser.add_argument("--results", help="also write the results here (make demo-eval: bench/results/demo_eval.json, "
                                          "which the README's table is checked against)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    from ..atomic import atomic_write_text
    from . import load_demo

    out = Path(args.out)
    model = load_demo(adapter=args.adapter, tower=args.tower)
    results = evaluate(model, args.per_kind, args.ablation_per_kind, args.batch_size, progress=not args.no_progress,
                       out=out)
    table = format_table(results)
    print(table)
    written = [out / "results.json", out / "table.md"] + ([Path(args.results)] if args.results else [])
    for path in written:
        atomic_write_text(path, (table if path.suffix == ".md" else json.dumps(results, indent=1)) + "\n")
    print(f"wrote {', '.join(map(str, written))}")


if __name__ == "__main__":
    main()
