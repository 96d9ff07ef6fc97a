"""`mmadapter eval vqa`: visual question answering benchmarks (`mmadapter.evaluation.vqa`); `python eval/vqa.py`
(from a checkout) is the same command."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..evaluation.scienceqa import EvalError
from ..evaluation.vqa import DEFAULT_INSTRUCTION, DEFAULT_MAX_NEW_TOKENS, check_vqa_options, evaluate_vqa
from ..evaluation.vqa_data import SHAPES_TEST, load_vqa
from ..evaluation.vqa_metrics import METRICS as METRIC_NAMES
from ..evaluation.vqa_report import format_report
from .common import add_evaluation_outputs, add_model_args, load_model, print_results, run_script

VQA_DESCRIPTION = ("Visual question answering accuracy of a base (+ adapter): VQAv2, GQA-style exact match, MME, "
                   "POPE or your own JSON/JSONL, batched and resumable.")


def add_vqa_parser(benchmarks: argparse._SubParsersAction) -> None:
    p = benchmarks.add_parser("vqa", help="VQA benchmarks: VQAv2 accuracy, exact match, MME, POPE",
                              description=VQA_DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--data", required=True,
                   help="a JSON list / JSONL of {question_id, image, question, answers | answer, category?}; the "
                        "official VQAv2 questions JSON (with --annotations); a local `datasets` copy (save_to_disk "
                        f"folder or .parquet); an MME folder; or {SHAPES_TEST} (the shapes demo's test set)")
    p.add_argument("--image-root", default=None,
                   help="folder the records' image paths are relative to (default: the data file's folder); paths "
                        "may not leave it. VQAv2: the COCO image folder")
    p.add_argument("--annotations", default=None, help="VQAv2: the annotations JSON (without it nothing is scored)")
    p.add_argument("--split", default=None, help="VQAv2: the COCO split in image names (default: the questions "
                                                  "file's data_subtype, e.g. val2014)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--metric", choices=METRIC_NAMES, default=None,
                   help="vqa (official VQA accuracy), vqa2017 (its 2017 release), exact (GQA-style), mme, pope "
                        "(default: from the data: MME folder -> mme, yes/no answers -> pope, ten answers -> vqa, "
                        "else exact)")
    p.add_argument("--instruction", default=None,
                   help=f"appended to each question on its own line (default: {DEFAULT_INSTRUCTION!r}; none for "
                        f"{SHAPES_TEST}); '' disables it")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"answer length (default: {DEFAULT_MAX_NEW_TOKENS}; {SHAPES_TEST}: 48 for captions, 6 else)")
    add_evaluation_outputs(p, "submission format")


def run(args: argparse.Namespace) -> int:
    check_vqa_options(args.metric, args.batch_size, args.max_new_tokens, args.template)
    data = load_vqa(args.data, image_root=args.image_root, annotations=args.annotations, split=args.split,
                    limit=args.limit)  # before the slow model load
    if not data.items:
        raise EvalError(f"no questions to evaluate in {args.data} (records skipped: {dict(data.skipped) or 'none'})")
    model = load_model(args)
    metrics = evaluate_vqa(model, data, metric=args.metric, instruction=args.instruction, template=args.template,
                           batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                           use_images=not args.no_images, out=args.out, overwrite=args.overwrite,
                           progress=not args.no_progress)
    print_results(format_report(metrics), args.out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python eval/vqa.py ...`: the `mmadapter eval vqa` command as a script."""
    return run_script("python eval/vqa.py", VQA_DESCRIPTION, add_arguments, run, argv, "vqa")
