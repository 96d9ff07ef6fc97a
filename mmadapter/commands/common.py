"""The model flags of chat, eval and eval-vqa (add_model_args), the sampling flags of chat, `--vision`
for every command that builds towers (serve too), so those are spelled and parsed the same, and
`run_script`: the error handling of the `python eval/*.py` scripts.

Not shared yet: serve (app/serve.py) and convert declare their own --base, and serve its own --adapter
and --dtype (without float16); convert's --vision names a tower config only (no weights are read).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ..quant import DTYPE_CHOICES
from ..weights import DEFAULT_BASE

DEMO_ADAPTER = "shapes-demo"  # --adapter shapes-demo: the shipped demo tower and adapter (mmadapter.load_demo)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default=DEFAULT_BASE,
                   help=f"base model: embedded name, local dir/.gguf, or hub id (default: {DEFAULT_BASE})")
    p.add_argument("--adapter", default=None,
                   help="adapter to load over the base: ours (.safetensors), PEFT, LLaMA-Adapter V1 or V2 multimodal "
                        f"(.pth; V2 builds its CLIP ViT-L/14 tower), or {DEMO_ADAPTER}: the shipped demo tower + adapter")
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="load an adapter whose base fingerprint differs (same model, other format/quantisation)")
    add_vision_arg(p, "the image tower of a multimodal adapter, when it is not where the adapter file says "
                      "(e.g. moved weights)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                   help="weights dtype, or int8 / int4 / fp16w for a weight-only quantised base on CPU (fp16w: fp16 "
                        "weights, fp32 compute; float16 computes in fp16) "
                        "(default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument("--compile", action="store_true",
                   help="decode single prompts with a torch.compile'd step, compiled in the background (eager until "
                        "it is ready or if it fails); faster on some CPUs, not all: README, Decoding speed")


VISION_SPEC_HELP = ("MODEL[:WEIGHTS]: an open_clip model and its weights, an open_clip tag, a local checkpoint file "
                    "or 'none' for random weights (default tag: openai), e.g. ViT-L-14:openai, "
                    "ViT-B-32:/path/weights.safetensors, local-dir:/path/tower")


def add_vision_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup, purpose: str) -> None:
    """`--vision MODEL[:WEIGHTS]`, spelled and parsed the same by every command."""
    p.add_argument("--vision", default=None, metavar="MODEL[:WEIGHTS]", type=vision_spec,
                   help=f"{purpose}. {VISION_SPEC_HELP}")


def vision_spec(text: str):
    """argparse type: `MODEL[:WEIGHTS]` -> VisionConfig (a bad spelling is a usage error)."""
    from ..config import VisionConfig

    try:
        return VisionConfig.from_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed)


def load_model(args: argparse.Namespace):
    """Base (+ adapter) from the shared model flags."""
    from ..interop import import_adapter
    from ..model import load_base

    if args.vision is not None and not args.adapter:
        raise ValueError("--vision names the image tower of a multimodal adapter; pass that adapter with --adapter")
    if args.adapter == DEMO_ADAPTER:
        from ..demo import load_demo

        if args.vision is not None:
            raise ValueError(f"--adapter {DEMO_ADAPTER} brings its own tower; drop --vision")
        model = load_demo(args.base, dtype=args.dtype, device=args.device)
        if args.compile:
            model.compile_decoding()
        return model
    model = load_base(args.base, dtype=args.dtype, device=args.device)
    if args.compile:
        model.compile_decoding()
    if args.adapter:
        model.use_adapter(import_adapter(model, args.adapter, allow_base_mismatch=args.allow_base_mismatch,
                                         vision=args.vision))
    return model


def add_evaluation_outputs(p: argparse.ArgumentParser, results_format: str) -> None:
    """The template and output flags every evaluation command shares (results_format: what results.json is)."""
    p.add_argument("--template", default=None,
                   help="prompt template: chat, chat-short, alpaca, plain, raw (default: the adapter's, else the model's)")
    p.add_argument("--out", default=None, help="directory for predictions.jsonl (resumable), results.json "
                                               f"({results_format}), metrics.json and metrics.md")
    p.add_argument("--overwrite", action="store_true", help="discard earlier predictions in --out")
    p.add_argument("--no-images", action="store_true", help="answer from the text only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def print_results(report: str, out: str | None) -> None:
    """An evaluation's table on stdout and, with --out, the files it wrote on stderr."""
    from ..evaluation.scienceqa import METRICS, PREDICTIONS, REPORT, RESULTS

    print(report, end="")
    if out:
        print(f"wrote {', '.join(str(Path(out) / n) for n in (RESULTS, METRICS, REPORT, PREDICTIONS))}", file=sys.stderr)


def run_script(prog: str, description: str, add_arguments: Callable[[argparse.ArgumentParser], None],
               run: Callable[[argparse.Namespace], int], argv: Sequence[str] | None, error_name: str) -> int:
    """A command's `run(args)` as a standalone script: Ctrl-C exits 130 with a resume hint, and our errors
    (which carry the whole message) print as one `error_name: error: ...` line and exit 2."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as err:
        print(f"{error_name}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
