"""`mmadapter eval BENCHMARK`: benchmark evaluations; `scienceqa` is eval/scienceqa.py behind this command."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a base (+ adapter) on a benchmark",
                       description="Evaluate a base (+ adapter) on a benchmark.")
    benchmarks = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    sqa = benchmarks.add_parser("scienceqa", help="ScienceQA accuracy (NAT SOC LAN TXT IMG NO G1-6 G7-12 Avg)",
                                description="ScienceQA accuracy of a base (+ adapter), batched and resumable; "
                                            "the same code as `python eval/scienceqa.py`.")
    try:
        from eval import scienceqa
    except ModuleNotFoundError as err:
        if err.name not in ("eval", "eval.scienceqa"):
            raise
        sqa.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        sqa.set_defaults(func=_missing_eval_package)
        return
    scienceqa.add_arguments(sqa)
    sqa.set_defaults(func=scienceqa.run)


def _missing_eval_package(args: argparse.Namespace) -> int:
    raise RuntimeError("the eval package (eval/scienceqa.py) is not importable here; install mmadapter from its "
                       "source tree (pip install -e .) or run `python eval/scienceqa.py` from a checkout")
