"""Visual question answering evaluation of a base (+ adapter): batched greedy answers, resumable, scored.

    evaluate_vqa(model, load_vqa(...), ...)     mmadapter eval vqa ...     python eval/vqa.py ...

Prompt: the question, then on a new line a short-answer instruction ("Answer the question using a
single word or phrase."; none for data whose model was trained on bare questions, like shapes:test),
rendered as the user turn of the prompt template (default: the adapter's, else the model's), with the
question's image when the model can use images. Answers are decoded greedily, in batches that do not
depend on what is already done, and logged as they come (predictions.jsonl: {"pid", "pred": null,
"output"}), so a rerun continues where a run stopped and writes the same final files. The answer
scored is the output's first non-empty line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from ..atomic import atomic_write_text
from .scienceqa import (METRICS, PREDICTIONS, REPORT, RESULTS, EvalError, _adapter_hash, _open_log,
                        check_generation_options, image_support)
from .vqa_data import VQAData, VQAItem, read_image
from .vqa_metrics import METRICS as METRIC_NAMES
from .vqa_report import default_metric, format_report, summarize

if TYPE_CHECKING:
    from ..model import MMAdapter

log = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = "Answer the question using a single word or phrase."
DEFAULT_MAX_NEW_TOKENS = 16
OnAnswer = Callable[[str, str], None]  # (question key, output)


@dataclass(frozen=True)
class Prompt:
    item: VQAItem
    text: str  # the user turn: question + instruction
    ids: list[int]
    max_new_tokens: int


def user_turn(question: str, instruction: str) -> str:
    """The question, and the instruction on its own line (when there is one)."""
    return question.strip() + (f"\n{instruction}" if instruction else "")


def answer_text(output: str) -> str:
    """The answer scored: the first non-empty line of the output, stripped."""
    return next((line.strip() for line in output.splitlines() if line.strip()), "")


def batches(prompts: Sequence[Prompt], batch_size: int) -> list[list[Prompt]]:
    """Same answer length together, longest prompts first (ties in data order); fixed whatever is done."""
    order = sorted(range(len(prompts)), key=lambda i: (prompts[i].max_new_tokens, -len(prompts[i].ids), i))
    out: list[list[Prompt]] = []
    for i in order:
        if out and len(out[-1]) < batch_size and out[-1][0].max_new_tokens == prompts[i].max_new_tokens:
            out[-1].append(prompts[i])
        else:
            out.append([prompts[i]])
    return out


def check_vqa_options(metric: str | None, batch_size: int, max_new_tokens: int | None, template: str | None) -> None:
    """Fail before any model work."""
    if metric is not None and metric not in METRIC_NAMES:
        raise EvalError(f"unknown metric {metric!r}; use one of: {', '.join(METRIC_NAMES)}")
    check_generation_options(batch_size, max_new_tokens, template)


def evaluate_vqa(model: MMAdapter, data: VQAData, *, metric: str | None = None, instruction: str | None = None,
                 template: str | None = None, batch_size: int = 8, max_new_tokens: int | None = None,
                 use_images: bool = True, out: str | Path | None = None, overwrite: bool = False,
                 on_answer: OnAnswer | None = None, progress: bool = True) -> dict[str, Any]:
    """Answer every question of `data` and return `summarize`'s metrics plus a "run" section.

    With `out`, answers are logged as they are made (a rerun resumes; other settings are refused) and
    predictions.jsonl, run.json, results.json, metrics.json and metrics.md are written there.
    `on_answer(key, output)` is called after each new answer is logged.
    """
    check_vqa_options(metric, batch_size, max_new_tokens, template)
    metric = metric or default_metric(data)
    if instruction is None:
        instruction = DEFAULT_INSTRUCTION if data.default_instruction else ""
    template = template or model.template_for()
    with_image = [item for item in data.items if item.image is not None and not item.image_missing]
    ignored_reason = "images turned off" if not use_images else image_support(model)
    if with_image and use_images and ignored_reason:
        log.warning("%s: %d questions with images are answered from their text only", ignored_reason, len(with_image))
    use_images = ignored_reason is None
    settings = _settings(model, data, metric, instruction, template, use_images, max_new_tokens)

    prompts = []
    for item in data.items:
        text = user_turn(item.question, instruction)
        prompts.append(Prompt(item, text, model.prompt_ids(text, template),
                              max_new_tokens or item.max_new_tokens or DEFAULT_MAX_NEW_TOKENS))
    too_long = [p.item.key for p in prompts if len(p.ids) + p.max_new_tokens > model.base.config.max_seq_len]
    if too_long:
        raise EvalError(f"{len(too_long)} prompts (e.g. question {too_long[0]}) do not fit the model's context of "
                        f"{model.base.config.max_seq_len} tokens; lower --max-new-tokens or use another base")
    run_log = _open_log(Path(out), settings, overwrite) if out is not None else None
    outputs: dict[str, str] = dict(run_log.outputs) if run_log else {}
    unreadable: set[str] = set(run_log.unreadable_images) if run_log else set()
    keys = [item.key for item in data.items]
    if len(set(keys)) != len(keys):
        raise EvalError(f"{data.source}: question ids repeat ({len(keys) - len(set(keys))} duplicates); "
                        "every question needs its own question_id")
    try:
        done = sum(key in outputs for key in keys)
        with tqdm(total=len(keys), initial=done, desc=f"VQA ({metric})", unit="q", disable=not progress) as bar:
            for batch in batches(prompts, batch_size):
                if all(p.item.key in outputs for p in batch):
                    continue
                images = [_image(p.item, unreadable) if use_images else None for p in batch]
                texts = model.generate([p.text for p in batch], images, max_new_tokens=batch[0].max_new_tokens,
                                       template=template)
                for p, text in zip(batch, texts):
                    if p.item.key in outputs:  # answered before an interruption; the batch reran as a whole
                        continue
                    outputs[p.item.key] = text
                    if run_log:
                        run_log.append(p.item.key, None, text, image_unreadable=p.item.key in unreadable)
                    if on_answer:
                        on_answer(p.item.key, text)
                    bar.update(1)
    finally:
        if run_log:
            run_log.close()

    answers = {key: answer_text(outputs[key]) for key in keys}
    metrics = summarize(data, answers, metric, unreadable)
    metrics["run"] = {"settings": settings,
                      "images": {"questions_with_image": len(with_image), "used": len(with_image) if use_images else 0,
                                 "ignored": 0 if use_images else len(with_image),
                                 "ignored_reason": None if use_images or not with_image else ignored_reason}}
    if out is not None:
        write_outputs(Path(out), data, answers, metrics)
    return metrics


def _image(item: VQAItem, unreadable: set[str]) -> Any:
    """The item's image; one that does not decode is recorded and the question answered without it."""
    try:
        return read_image(item)
    except (ValueError, OSError) as err:
        log.warning("cannot read the image of question %s (%s); answering it without the image", item.key, err)
        unreadable.add(item.key)
        return None


def _settings(model: MMAdapter, data: VQAData, metric: str, instruction: str, template: str, use_images: bool,
              max_new_tokens: int | None) -> dict[str, Any]:
    """What decides the answers (and their scores); a resumed run must match them."""
    source = data.source
    if Path(source).expanduser().exists():
        source = str(Path(source).expanduser().resolve())
    return {"benchmark": "vqa", "metric": metric, "instruction": instruction, "template": template,
            "images": use_images, "max_new_tokens": max_new_tokens, "base": model.base_name,
            "base_fingerprint": model.base_fingerprint,
            "dtype": str(model.base.tok_embeddings.weight.dtype).removeprefix("torch."),
            "adapter": _adapter_hash(model),
            "vision": getattr(model.vision, "fingerprint", None) if use_images else None,
            "data": source, "format": data.format}


def write_outputs(out: Path, data: VQAData, answers: dict[str, str], metrics: dict[str, Any]) -> None:
    """results.json (VQAv2 submission format: [{"question_id", "answer"}]), metrics.json, metrics.md."""
    results = [{"question_id": item.question_id, "answer": answers[item.key]} for item in data.items]
    atomic_write_text(out / RESULTS, json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    atomic_write_text(out / METRICS, json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / REPORT, format_report(metrics))


__all__ = ["DEFAULT_INSTRUCTION", "PREDICTIONS", "evaluate_vqa", "user_turn", "answer_text"]
