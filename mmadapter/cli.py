"""The `mmadapter` command: one tool, one sub-command per job, consistent flags, clear exit codes.

Exit codes: 0 success, 2 bad input or a failed load (the message says what to do), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from .commands import COMMANDS

EXIT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmadapter", description="Multimodal LLaMA-Adapter: chat, train, "
                                     "evaluate, serve and convert adapters over a frozen LLaMA-family model.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f".commands.{name}", __package__).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:  # our errors carry a full message; no traceback for users
        if args.verbose:
            raise
        print(f"mmadapter {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
