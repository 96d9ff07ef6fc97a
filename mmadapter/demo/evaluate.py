"""Accuracy of the demo adapter per question type on the fixed shapes test set, with the ablation.

Greedy decoding, exact match after lower-casing and stripping punctuation. The ablation asks the
same questions with the image token zeroed (the adapter's prompts alone, no image), which shows how
much of each answer comes from the image. "Blind best" is the accuracy of always giving the most
frequent answer of each question template: the best any image-blind answerer can do.

    python -m mmadapter.demo.evaluate                # the shipped demo model, 600 questions per type
    python -m mmadapter.demo.evaluate --per-kind 100 --adapter runs/demo/adapter.safetensors
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from ..data import shapes

if TYPE_CHECKING:
    from ..model import MMAdapter

MAX_NEW_TOKENS = {"caption": 48}  # other kinds: a word or a number
DEFAULT_MAX_NEW_TOKENS = 6


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


def answer_all(model: MMAdapter, items: list[tuple[int, shapes.QA]], with_image: bool, batch_size: int = 32,
               image_size: int = 128, progress: bool = True) -> list[str]:
    """The model's answers to test items, in order (images rendered at `image_size`)."""
    answers: list[str] = [""] * len(items)
    order = sorted(range(len(items)), key=lambda i: items[i][1].kind)  # same max_new_tokens per batch
    desc = "with image" if with_image else "image token zeroed"
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
        chunk = order[start:start + batch_size]
        kinds = {items[i][1].kind for i in chunk}
        max_new = max(MAX_NEW_TOKENS.get(k, DEFAULT_MAX_NEW_TOKENS) for k in kinds)
        prompts = [items[i][1].question for i in chunk]
        images = [shapes.render(shapes.make_scene("test", items[i][0]), image_size) for i in chunk] \
            if with_image else None
        for i, text in zip(chunk, model.generate(prompts, image=images, max_new_tokens=max_new)):
            answers[i] = text
    return answers


def evaluate(model: MMAdapter, per_kind: int = 600, ablation_per_kind: int | None = None, batch_size: int = 32,
             progress: bool = True) -> dict[str, Any]:
    """Accuracy (%) per kind with the image and with the image token zeroed, and the blind best."""
    test = shapes.test_set(per_kind)
    ablation_per_kind = per_kind if ablation_per_kind is None else min(ablation_per_kind, per_kind)
    seen: Counter = Counter()
    ablation_items = []
    for item in test:
        if seen[item[1].kind] < ablation_per_kind:
            seen[item[1].kind] += 1
            ablation_items.append(item)
    results: dict[str, Any] = {"per_kind": per_kind, "ablation_per_kind": ablation_per_kind,
                               "blind_best": blind_best(test)}
    for name, items, with_image in (("accuracy", test, True), ("ablation", ablation_items, False)):
        answers = answer_all(model, items, with_image, batch_size, progress=progress)
        hits: Counter = Counter()
        totals: Counter = Counter()
        for (_, qa), got in zip(items, answers):
            totals[qa.kind] += 1
            hits[qa.kind] += shapes.normalise_answer(got) == shapes.normalise_answer(qa.answer)
        results[name] = {kind: 100 * hits[kind] / totals[kind] for kind in shapes.QUESTION_KINDS if totals[kind]}
        if with_image:
            results["examples"] = [{"scene": i, "question": qa.question, "answer": qa.answer, "got": got}
                                   for (i, qa), got in list(zip(items, answers))[:: max(1, len(items) // 24)]]
    return results


def format_table(results: dict[str, Any]) -> str:
    """Markdown table: accuracy with the image, with the image token zeroed, and the blind best, per kind."""
    lines = ["| question type | accuracy | image token zeroed | blind best |", "|---|---:|---:|---:|"]
    for kind in shapes.QUESTION_KINDS:
        if kind in results["accuracy"]:
            lines.append(f"| {kind} | {results['accuracy'][kind]:.1f}% | {results['ablation'].get(kind, float('nan')):.1f}% "
                         f"| {results['blind_best'][kind]:.1f}% |")
    lines.append(f"\n{results['per_kind']} questions per type ({results['ablation_per_kind']} for the ablation), "
                 "greedy decoding, exact match after lower-casing and stripping punctuation.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", help="adapter file (default: the shipped demo adapter)")
    parser.add_argument("--tower", help="tower weights (default: the shipped demo tower)")
    parser.add_argument("--per-kind", type=int, default=600)
    parser.add_argument("--ablation-per-kind", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    from . import load_demo

    model = load_demo(adapter=args.adapter, tower=args.tower)
    results = evaluate(model, args.per_kind, args.ablation_per_kind, args.batch_size)
    print(format_table(results))
    if args.json:
        from ..atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
