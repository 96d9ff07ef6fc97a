"""`mmadapter serve`: the Gradio visual question answering app (`mmadapter.app`; `python -m app` too)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..app.serve import add_serve_args

    p = sub.add_parser("serve", help="start the Gradio app", description="Start the Gradio visual question "
                       "answering app on the base (+ adapters in --adapters-dir).")
    add_serve_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..app.serve import launch

    launch(args)
    return 0
