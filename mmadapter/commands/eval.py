"""`mmadapter eval BENCHMARK`: benchmark evaluations. `scienceqa` runs `mmadapter.evaluation.scienceqa`;
`python eval/scienceqa.py` (from a checkout) is the same command. `vqa`: `mmadapter.commands.eval_vqa`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..data.scienceqa import load_scienceqa
from ..evaluation.scienceqa import DEFAULT_MAX_NEW_TOKENS, MODES, EvalError, check_options, evaluate, format_report
from .common import add_evaluation_outputs, add_model_args, load_model, print_results, run_script

SCIENCEQA_DESCRIPTION = "ScienceQA accuracy of a base (+ adapter), batched and resumable."


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a base (+ adapter) on a benchmark",
                       description="Evaluate a base (+ adapter) on a benchmark.")
    benchmarks = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    sqa = benchmarks.add_parser("scienceqa", help="ScienceQA accuracy (NAT SOC LAN TXT IMG NO G1-6 G7-12 Avg)",
                                description=SCIENCEQA_DESCRIPTION)
    add_arguments(sqa)
    sqa.set_defaults(func=run)
    from .eval_vqa import add_vqa_parser

    add_vqa_parser(benchmarks)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--model", dest="base", default=argparse.SUPPRESS, help="alias of --base")
    p.add_argument("--data", required=True,
                   help="ScienceQA: the original release dir (problems.json, pid_splits.json, images/), a local "
                        "copy of the HF dataset (parquet or save_to_disk dir), or the hub id derek-thomas/ScienceQA")
    p.add_argument("--split", default="test", help="test (default), val/validation, train, minival, ...")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems of the split")
    p.add_argument("--format", default="QCM-A", help="prompt format: QCM-A (default), QCM-ALE, CQM-A, CQM-ALE")
    p.add_argument("--mode", choices=MODES, default="generate",
                   help="generate: greedy answer, parsed (default); score: rank the option letters by log-probability")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"generate mode (default: {DEFAULT_MAX_NEW_TOKENS['A']} for -A, "
                        f"{DEFAULT_MAX_NEW_TOKENS['ALE']} for -ALE formats)")
    add_evaluation_outputs(p, "official format")


def run(args: argparse.Namespace) -> int:
    check_options(args.mode, args.format, args.batch_size, args.max_new_tokens, args.template)
    problems, stats = load_scienceqa(args.data, split=args.split, limit=args.limit)  # before the slow model load
    print(stats.summary(), file=sys.stderr)
    if not problems:
        raise EvalError(f"no problems to evaluate in split {args.split!r} of {args.data}")
    model = load_model(args)
    metrics = evaluate(model, problems, mode=args.mode, fmt=args.format, template=args.template,
                       batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, use_images=not args.no_images,
                       out=args.out, overwrite=args.overwrite, load_stats=stats, progress=not args.no_progress)
    print_results(format_report(metrics), args.out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python eval/scienceqa.py ...`: the `mmadapter eval scienceqa` command as a script."""
    return run_script("python eval/scienceqa.py", SCIENCEQA_DESCRIPTION, add_arguments, run, argv, "scienceqa")
