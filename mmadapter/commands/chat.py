"""`mmadapter chat`: talk to a base (+ adapter) in the terminal, optionally about an image."""

from __future__ import annotations

import argparse
import sys

from .common import add_model_args, add_sampling_args, load_model, sampling_kwargs


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a base (+ adapter) in the terminal",
                       description="Chat in the terminal. Streams answers; keeps the conversation history.")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--image", default=None, help="an image file to ask about (needs a multimodal adapter)")
    p.add_argument("--once", default=None, metavar="TEXT", help="answer one question and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = load_model(args)
    sampling = sampling_kwargs(args)
    if args.once is not None:
        for piece in model.stream(args.once, args.image, **sampling):
            print(piece, end="", flush=True)
        print()
        return 0
    history: list[tuple[str, str]] = []
    print("Chat with the model; an empty line or Ctrl-D quits, Ctrl-C stops an answer.", file=sys.stderr)
    while True:
        try:
            question = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not question:
            return 0
        answer = []
        try:
            for piece in model.stream(question, args.image, history=history, **sampling):
                print(piece, end="", flush=True)
                answer.append(piece)
        except KeyboardInterrupt:  # stop this answer, keep the conversation (with the answer so far)
            print(" [stopped]", end="", file=sys.stderr, flush=True)
        print()
        history.append((question, "".join(answer)))
