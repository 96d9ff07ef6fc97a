"""The `mmadapter` command: one tool, one sub-command per job, consistent flags, clear exit codes."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from .weights import DEFAULT_BASE

EXIT_ERROR = 2


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default=DEFAULT_BASE,
                   help=f"base model: embedded name, local dir/.gguf, or hub id (default: {DEFAULT_BASE})")
    p.add_argument("--adapter", default=None, help="adapter file (.safetensors) to load over the base")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def _load(args: argparse.Namespace):
    import torch

    from .model import load_base

    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = load_base(args.base, dtype=dtype, device=args.device)
    if args.adapter:
        from .adapter_file import load_adapter

        load_adapter(model, args.adapter)
    return model


def cmd_chat(args: argparse.Namespace) -> int:
    model = _load(args)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, seed=args.seed)
    image = args.image
    if args.once is not None:
        for piece in model.stream(args.once, image, **sampling):
            print(piece, end="", flush=True)
        print()
        return 0
    history: list[tuple[str, str]] = []
    print("Chat with the model; an empty line or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            question = input("> ").strip()
        except EOFError:
            return 0
        if not question:
            return 0
        answer = []
        for piece in model.stream(question, image, history=history, **sampling):
            print(piece, end="", flush=True)
            answer.append(piece)
        print()
        history.append((question, "".join(answer)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmadapter", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="chat with a base (+ adapter) in the terminal")
    _add_model_args(chat)
    _add_sampling_args(chat)
    chat.add_argument("--image", default=None, help="an image file to ask about (needs a multimodal adapter)")
    chat.add_argument("--once", default=None, metavar="TEXT", help="answer one question and exit")
    chat.set_defaults(func=cmd_chat)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # our errors are ValueError subclasses with a full message
        print(f"mmadapter {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
