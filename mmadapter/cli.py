"""The `mmadapter` command: one tool, one sub-command per job, consistent flags, clear exit codes.

Exit codes: 0 success, 2 bad input or a failed load (the message says what to do), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
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


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """parse_args, but an unknown flag is reported with the usage of the command it was given to."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = _subcommands(parser)[args.command]
        if getattr(args, "benchmark", None):  # `eval BENCHMARK`: one level deeper
            command = _subcommands(command)[args.benchmark]
        command.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`mmadapter info ... | head`): not an error of ours
        with contextlib.suppress(OSError, ValueError):  # no second complaint when Python flushes at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError, RuntimeError) as e:  # our errors carry a full message; no traceback for users
        if args.verbose:
            raise
        print(f"mmadapter {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
