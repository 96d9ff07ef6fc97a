"""How much the asked-about colour changes the queries that read the adaptation prompts, per layer.

An adapted layer's prompts (and the image tokens added to them) are read by that layer's frozen query
W_q · RMSNorm(h) of every position. To answer "Is the red object on the left or on the right?" from
spatial image tokens, some query must pick the red object's tokens, so it must differ with the colour
named. This measures, for the position question over the six colours, the spread of each layer's query
across colours (per head: |q_colour - mean| / |mean|, averaged over heads and colours) at the colour
word's own position and at the position that predicts the answer (the prompt's last).

    python -m mmadapter.demo.query_spread --out bench/results/query_spread.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_text
from ..data.shapes import COLORS

QUESTION = "Is the {} object on the left or on the right?"


def query_spread(model: Any, template: str = "chat-short") -> dict[str, Any]:
    """{"colour_position", "answer_position", "layers": [{"layer", "at_colour", "at_answer"}]} for the model's base."""
    prompts = [model.prompt_ids(QUESTION.format(c), template=template) for c in COLORS]
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("the colours' prompts differ in length; the spread needs them aligned token by token")
    at_colour = next(i for i in range(len(prompts[0])) if len({p[i] for p in prompts}) > 1)
    at_answer = len(prompts[0]) - 1
    inputs: dict[int, torch.Tensor] = {}
    hooks = [layer.attention.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
             for i, layer in enumerate(model.base.layers)]
    try:
        with torch.no_grad():
            model.base(torch.tensor(prompts))  # [colours, T] -> the attention inputs of every layer
    finally:
        for hook in hooks:
            hook.remove()
    rows = []
    with torch.no_grad():
        for i, layer in enumerate(model.base.layers):
            att = layer.attention
            spread = {}
            for name, position in (("at_colour", at_colour), ("at_answer", at_answer)):
                q = att.wq(inputs[i][:, position]).view(len(COLORS), att.n_heads, att.head_dim)  # [colours, H, d]
                mean = q.mean(0, keepdim=True)
                spread[name] = round(float(((q - mean).norm(dim=-1) / mean.norm(dim=-1)).mean()), 4)
            rows.append({"layer": i, **spread})
    return {"question": QUESTION, "template": template, "colour_position": at_colour,
            "answer_position": at_answer, "layers": rows}


def format_spread(result: dict[str, Any]) -> str:
    lines = ["| layer | " + " | ".join(str(r["layer"]) for r in result["layers"]) + " |",
             "|---|" + "---:|" * len(result["layers"])]
    for key, label in (("at_colour", "at the colour word"), ("at_answer", "at the answer position")):
        lines.append(f"| {label} | " + " | ".join(f"{100 * r[key]:.0f}%" for r in result["layers"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="result file (JSON)")
    parser.add_argument("--template", default="chat-short")
    args = parser.parse_args(argv)
    from ..model import load_base

    result = query_spread(load_base("smollm2-135m-instruct"), args.template)
    atomic_write_text(Path(args.out), json.dumps(result, indent=1))
    print(format_spread(result))


if __name__ == "__main__":
    main()
