"""ScienceQA evaluation of a base (+ adapter): batched, resumable, deterministic.

    evaluate(model, problems, ...)      mmadapter eval scienceqa ...      python eval/scienceqa.py ...

Prompt: `build_prompt(problem, fmt)` (the official QCM layout, ending "Answer:") rendered as the user
turn of the prompt template (default: the adapter's, else the model's), with the problem's image when
the model can use images. The model is expected to answer "The answer is (X)." (`build_target`).

Modes:
- generate: greedy decoding of up to --max-new-tokens tokens per question, batched; the option is
  `parse_answer(text)` (an unparseable answer counts as wrong).
- score: one forward pass per question over the prompt followed by the answer prefix
  "The answer is (" (" The answer is (" with the raw and plain templates, as in "Answer: The
  answer is (B)."), and the option whose letter token has the highest log-probability at the next
  position wins. Only the letters of the question's options compete; nothing is sampled or parsed. The letter
  tokens are the tokenizer's own encoding of the whole text ending in "(A", "(B", ...; a tokenizer
  that does not write each letter as a single token there is refused (use generate mode).

Batching and determinism: questions are ordered by prompt length (longest first, ties in data order)
and cut into fixed batches, so a question always runs in the same batch, whether the run was
interrupted or not. Score batches are right-padded and each row is read at its own last real token;
generation left-pads (see mmadapter.generate).

Resume: with `out`, every prediction is appended to predictions.jsonl as soon as it is made; a rerun
with the same settings (run.json) skips answered questions and writes the same final files.

Outputs in `out`: predictions.jsonl, run.json, results.json (official: {"results": {pid: option
index, -1 when unparsed}, "outputs": {pid: text}}), metrics.json (`compute_metrics` + a "run"
section) and metrics.md (the table NAT SOC LAN TXT IMG NO G1-6 G7-12 Avg with counts and notes).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ..atomic import atomic_write_text
from ..data.scienceqa import OPTION_LETTERS, LoadStats, Problem, ScienceQAError, build_prompt, load_image, parse_format
from ..data.templates import TEMPLATES
from .metrics import compute_metrics, format_metrics_table
from .parsing import parse_answer
from .results import PredictionLog, write_results

if TYPE_CHECKING:
    from ..model import MMAdapter

log = logging.getLogger(__name__)

ANSWER_PREFIX = "The answer is ("  # what build_target writes before the option letter
# Templates that leave the prompt ending in "Answer:": the answer follows after a space, as in the
# official "Answer: The answer is (B)." (and in training with "plain"); chat/alpaca start a new turn.
SPACED_TEMPLATES = ("raw", "plain")
MODES = ("generate", "score")
DEFAULT_MAX_NEW_TOKENS = {"A": 16, "ALE": 512}  # "The answer is (B)." is ~7 tokens; ALE adds the explanation
PREDICTIONS, RUN, RESULTS = "predictions.jsonl", "run.json", "results.json"
METRICS, REPORT = "metrics.json", "metrics.md"

OnPrediction = Callable[[str, "int | None", str], None]


class EvalError(ValueError):
    """An evaluation that cannot run as asked; the message says what to do."""


@dataclass
class Question:
    """A problem ready for the model."""

    problem: Problem
    text: str  # build_prompt(problem, fmt): the user turn
    ids: list[int]  # generate: the prompt's ids; score: the ids up to (not including) the letter
    letter_ids: list[int]  # score: the token of each option's letter at the next position


# ----------------------------------------------------------------------------------------------
# Prompts and tokens


def scoring_ids(model: MMAdapter, text: str, template: str, n_options: int) -> tuple[list[int], list[int]]:
    """Ids ending just before the option letter, and each option's letter token after them.

    Each candidate is the tokenizer's encoding of the whole text ending in "(A", "(B", ...; the
    shared ids are the context and the one id after them is the letter (or "(A" if merged).
    """
    prefix = model.prompt_text(text, template) + (" " if template in SPACED_TEMPLATES else "") + ANSWER_PREFIX
    candidates = [model.prompt_ids(prefix + letter, template="raw") for letter in OPTION_LETTERS[:n_options]]
    shared = _common_prefix_length(candidates)
    if any(len(ids) != shared + 1 for ids in candidates):
        raise EvalError(f"this tokenizer does not encode each option letter after {ANSWER_PREFIX!r} as one token "
                        "of its own, so options cannot be scored by one next-token probability; use --mode generate")
    return candidates[0][:shared], [ids[shared] for ids in candidates]


def _common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in sequences)
    for i in range(n):
        if len({s[i] for s in sequences}) > 1:
            return i
    return n


def prepare(model: MMAdapter, problems: Sequence[Problem], mode: str, fmt: str, template: str) -> list[Question]:
    questions = []
    for problem in problems:
        text = build_prompt(problem, fmt)
        if mode == "score":
            ids, letter_ids = scoring_ids(model, text, template, len(problem.choices))
        else:
            ids, letter_ids = model.prompt_ids(text, template), []
        questions.append(Question(problem, text, ids, letter_ids))
    return questions


def fixed_batches(questions: Sequence[Question], batch_size: int) -> list[list[Question]]:
    """Longest prompts first (ties in data order), cut into batches that do not depend on what is done."""
    ordered = sorted(range(len(questions)), key=lambda i: (-len(questions[i].ids), i))
    return [[questions[i] for i in ordered[start:start + batch_size]] for start in range(0, len(ordered), batch_size)]


# ----------------------------------------------------------------------------------------------
# The two modes


def option_logprobs(model: MMAdapter, questions: Sequence[Question], images: Sequence[Any]) -> list[list[float]]:
    """Log-probability of each option's letter token, one forward pass for the batch."""
    logprobs = model.last_token_logprobs([q.ids for q in questions], images)  # [B, V]
    return [logprobs[row, q.letter_ids].tolist() for row, q in enumerate(questions)]


def _score(model: MMAdapter, questions: Sequence[Question], images: Sequence[Any], template: str,
           max_new_tokens: int) -> list[tuple[int | None, str]]:
    answers = []
    for scores in option_logprobs(model, questions, images):
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # ties: the first option
        answers.append((best, f"{ANSWER_PREFIX}{OPTION_LETTERS[best]})."))
    return answers


def _generate(model: MMAdapter, questions: Sequence[Question], images: Sequence[Any], template: str,
              max_new_tokens: int) -> list[tuple[int | None, str]]:
    texts = model.generate([q.text for q in questions], list(images), max_new_tokens=max_new_tokens,
                           template=template)
    return [(parse_answer(text, q.problem.choices), text) for q, text in zip(questions, texts)]


RUNNERS = {"score": _score, "generate": _generate}


# ----------------------------------------------------------------------------------------------
# The evaluation


def image_support(model: MMAdapter) -> str | None:
    """Why this model cannot look at images, or None when it can."""
    if model.vision is None:
        return "the model has no vision tower"
    if model.adapter is None or model.adapter.projector is None:
        return "the model has no adapter with an image projector"
    return None


def evaluate(model: MMAdapter, problems: Sequence[Problem], *, mode: str = "generate", fmt: str = "QCM-A",
             template: str | None = None, batch_size: int = 8, max_new_tokens: int | None = None,
             use_images: bool = True, out: str | Path | None = None, overwrite: bool = False,
             load_stats: LoadStats | None = None, on_prediction: OnPrediction | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Answer `problems` and return `compute_metrics` plus a "run" section (settings, image counts).

    With `out`, predictions are logged as they are made (a rerun resumes) and the result files are
    written there. `on_prediction(pid, pred, output)` is called after each new prediction is logged.
    """
    input_format, output_format = check_options(mode, fmt, batch_size, max_new_tokens, template)
    fmt = f"{input_format}-{output_format}"
    template = template or model.template_for()
    max_new_tokens = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[output_format]
    with_image = [p for p in problems if p.image is not None]
    ignored_reason = "images turned off" if not use_images else image_support(model)
    if with_image and use_images and ignored_reason:
        log.warning("%s: %d questions with images are answered from their text only (counted as images ignored)",
                    ignored_reason, len(with_image))
    use_images = ignored_reason is None
    settings = _settings(model, mode, fmt, template, use_images, max_new_tokens, load_stats)

    questions = prepare(model, problems, mode, fmt, template)
    too_long = [q.problem.pid for q in questions if len(q.ids) + (max_new_tokens if mode == "generate" else 0)
                > model.base.config.max_seq_len]
    if too_long:
        raise EvalError(f"{len(too_long)} prompts (e.g. problem {too_long[0]}) do not fit the model's context of "
                        f"{model.base.config.max_seq_len} tokens; lower --max-new-tokens or use another base")
    run_log = _open_log(Path(out), settings, overwrite) if out is not None else None
    predictions: dict[str, int | None] = dict(run_log.predictions) if run_log else {}
    outputs: dict[str, str] = dict(run_log.outputs) if run_log else {}
    unreadable: set[str] = set(run_log.unreadable_images) if run_log else set()
    runner = RUNNERS[mode]
    done = sum(p.pid in predictions for p in problems)
    try:
        with tqdm(total=len(problems), initial=done, desc=f"ScienceQA {mode}", unit="q", disable=not progress) as bar:
            for batch in fixed_batches(questions, batch_size):
                if all(q.problem.pid in predictions for q in batch):
                    continue
                images = [_readable_image(q.problem, unreadable) if use_images else None for q in batch]
                for q, (pred, text) in zip(batch, runner(model, batch, images, template, max_new_tokens)):
                    pid = q.problem.pid
                    if pid in predictions:  # answered before an interruption; the batch reran as a whole
                        continue
                    predictions[pid], outputs[pid] = pred, text
                    if run_log:
                        run_log.append(pid, pred, text, image_unreadable=pid in unreadable)
                    if on_prediction:
                        on_prediction(pid, pred, text)
                    bar.update(1)
    finally:
        if run_log:
            run_log.close()

    results = {p.pid: predictions[p.pid] for p in problems}
    metrics = compute_metrics(problems, results)
    metrics["run"] = {
        "settings": settings,
        "questions": len(problems),
        "images": {"questions_with_image": sum(p.has_image for p in problems),
                   "used": len(with_image) if use_images else 0,
                   "ignored": 0 if use_images else len(with_image),
                   "ignored_reason": None if use_images or not with_image else ignored_reason,
                   "missing": sum(p.image_missing for p in problems),
                   "unreadable": sum(p.pid in unreadable for p in problems)},
        "data": load_stats.summary() if load_stats else None,
    }
    if out is not None:
        write_outputs(Path(out), results, {p.pid: outputs[p.pid] for p in problems}, metrics)
    return metrics


def _readable_image(problem: Problem, unreadable: set[str]) -> Any:
    """The problem's image; a file that does not decode is recorded in `unreadable` and the question
    is answered from its text (as a missing file is), instead of ending the evaluation."""
    try:
        return load_image(problem)
    except ScienceQAError as err:
        log.warning("%s; answering it without the image", err)
        unreadable.add(problem.pid)
        return None


def check_generation_options(batch_size: int, max_new_tokens: int | None, template: str | None) -> None:
    """The batch size, answer length and template checks every benchmark makes before any model work."""
    if batch_size < 1:
        raise EvalError(f"batch size must be at least 1, got {batch_size}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise EvalError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if template not in (None, "raw", *TEMPLATES):
        raise EvalError(f"unknown template {template!r}; use one of: raw, {', '.join(sorted(TEMPLATES))}")


def check_options(mode: str, fmt: str, batch_size: int, max_new_tokens: int | None,
                  template: str | None) -> tuple[str, str]:
    """Fail before any model work; returns the parsed format."""
    if mode not in MODES:
        raise EvalError(f"unknown mode {mode!r}; use one of: {', '.join(MODES)}")
    check_generation_options(batch_size, max_new_tokens, template)
    return parse_format(fmt)


def _settings(model: MMAdapter, mode: str, fmt: str, template: str, use_images: bool, max_new_tokens: int,
              stats: LoadStats | None) -> dict[str, Any]:
    """What decides the predictions; a resumed run must match them."""
    source = stats.source if stats else None
    if source and Path(source).expanduser().exists():
        source = str(Path(source).expanduser().resolve())
    return {"mode": mode, "format": fmt, "template": template, "images": use_images,
            "max_new_tokens": max_new_tokens if mode == "generate" else None,
            "base": model.base_name, "base_fingerprint": model.base_fingerprint,
            "dtype": str(model.base.tok_embeddings.weight.dtype).removeprefix("torch."),
            "adapter": _adapter_hash(model),
            "vision": getattr(model.vision, "fingerprint", None) if use_images else None, "data": source, "split": stats.split if stats else None}


def _adapter_hash(model: MMAdapter) -> str | None:
    if model.adapter is None:
        return None
    digest = hashlib.sha256()
    for name, tensor in sorted(model.adapter.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _open_log(out: Path, settings: dict[str, Any], overwrite: bool) -> PredictionLog:
    """The prediction log in `out`, refusing to mix predictions made with other settings."""
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out} is a file; pass a directory")
    if overwrite:
        for name in (PREDICTIONS, RUN, RESULTS, METRICS, REPORT):
            (out / name).unlink(missing_ok=True)
    if (out / PREDICTIONS).exists():
        previous = _read_settings(out / RUN)
        if previous != settings:
            keys = sorted(settings.keys() | previous.keys())
            changed = [f"{k}: {previous.get(k)!r} -> {settings.get(k)!r}" for k in keys
                       if previous.get(k) != settings.get(k)]
            raise EvalError(f"{out} holds predictions made with other settings ({'; '.join(changed)}); "
                            "pass another --out, or --overwrite to start over")
        log.info("resuming from %s", out / PREDICTIONS)
    else:
        atomic_write_text(out / RUN, json.dumps(settings, indent=2) + "\n")
    return PredictionLog(out / PREDICTIONS)


def _read_settings(path: Path) -> dict[str, Any]:
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"run.json": "missing"}
    except json.JSONDecodeError as err:
        raise EvalError(f"{path} is not valid JSON ({err}); pass --overwrite to start over") from err
    return settings if isinstance(settings, dict) else {"run.json": "not an object"}


def write_outputs(out: Path, results: dict[str, int | None], outputs: dict[str, str],
                  metrics: dict[str, Any]) -> None:
    """results.json (official format), metrics.json and metrics.md."""
    write_results(out / RESULTS, results, outputs)
    atomic_write_text(out / METRICS, json.dumps(metrics, indent=2) + "\n")
    atomic_write_text(out / REPORT, format_report(metrics))


def format_report(metrics: dict[str, Any]) -> str:
    """The Markdown table and what shaped it: settings, images used or ignored, data read."""
    run = metrics.get("run") or {}
    s, images = run.get("settings") or {}, run.get("images") or {}
    lines = [f"## ScienceQA {s.get('split') or ''} ({s.get('mode')} mode, {s.get('format')})".replace("  ", " "),
             "", format_metrics_table(metrics).rstrip(), ""]
    lines.append(f"- Model: {s.get('base')} ({s.get('dtype')}), adapter {s.get('adapter') or 'none'}, "
                 f"template {s.get('template')!r}" + (f", max {s['max_new_tokens']} new tokens"
                                                       if s.get("max_new_tokens") else ""))
    if images:
        note = f" ({images['ignored_reason']})" if images.get("ignored") else ""
        lines.append(f"- Images: {images['questions_with_image']} questions have one; {images['used']} used, "
                     f"{images['ignored']} ignored{note}, {images['missing']} missing and "
                     f"{images.get('unreadable', 0)} unreadable files (answered without the image, still scored "
                     "as IMG)")
    if run.get("data"):
        lines.append(f"- Data: {run['data']}")
    return "\n".join(lines) + "\n"
