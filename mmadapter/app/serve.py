"""`mmadapter serve` / `python -m app`: the options, building the chat service and launching the page."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ..commands.common import add_vision_arg
from ..quant import DTYPE_CHOICES
from ..weights import DEFAULT_BASE


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default=DEFAULT_BASE, help=f"base model (default: {DEFAULT_BASE})")
    add_vision_arg(p, "where the image tower of the adapters trained with MODEL is, when not where their files "
                      "say (default: each adapter gets the tower its file names)")
    p.add_argument("--adapters-dir", default="adapters", help="folder of adapter .safetensors files (default: ./adapters)")
    p.add_argument("--no-demo", action="store_true",
                   help="do not load the shipped shapes-world demo (its small CLIP tower and adapter)")
    p.add_argument("--adapter", default=None, metavar="FILE",
                   help="one more adapter, selected at start: ours, PEFT, LLaMA-Adapter V1 or V2 multimodal (.pth; "
                        "V2 builds its own CLIP ViT-L/14 tower, or uses --vision); shapes-demo: the shipped demo")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="requests decoded together, joining a running batch as they arrive (default: 8; "
                        "0: each request decodes on its own)")
    p.add_argument("--prefill-chunk", type=int, default=64,
                   help="prompt tokens prefilled between two decoding steps of the batch (default: 64; 0: whole "
                        "prompts at once)")
    p.add_argument("--reuse-mb", type=float, default=128,
                   help="memory for the K/V of earlier turns, reused by a conversation's next turn (default: 128; "
                        "least recently used dropped first; 0: off)")
    p.add_argument("--packed-mb", type=float, default=1024,
                   help="memory for copies of the fp32 weights packed for batched decoding steps, the LM head "
                        "first (default: 1024, all of SmolLM2-135M; 0: off)")
    p.add_argument("--engine-profile", action="store_true",
                   help="serve the batch engine's timings and token counts (never text) at the API route "
                        "/engine_profile, for load tests (off by default: anyone who reaches the app could read them)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="requests served at the same time (default: --max-batch, or 2 without batching)")
    p.add_argument("--queue-size", type=int, default=32, help="requests waiting before new ones are refused")
    p.add_argument("--max-prompt-tokens", type=int, default=2048, help="longer chats are truncated with a note")
    p.add_argument("--max-file-size", default="20mb", help="largest upload accepted (default: 20mb)")
    p.add_argument("--dtype", choices=[d for d in DTYPE_CHOICES if d != "float16"], default=None,
                   help="base weights dtype; int8 / int4 / fp16w: a weight-only quantised base on CPU "
                        "(fp16w: fp16 weights, fp32 compute)")
    p.add_argument("--device", default=None)


def build_service(args: argparse.Namespace):
    from ..adapter_set import AdapterSet, adapter_paths
    from ..demo import ADAPTER_FILE, DEMO_ADAPTER_NAME, STATUS_NOTE
    from ..model import load_base

    from .service import ChatService

    model = load_base(args.base, dtype=args.dtype, device=args.device)
    adapters = AdapterSet(model, args.vision)
    demo_selected = args.adapter == DEMO_ADAPTER_NAME  # the shipped demo, asked for by its name
    if demo_selected:
        adapters.load(ADAPTER_FILE, DEMO_ADAPTER_NAME)
    elif args.adapter:
        adapters.load(args.adapter)  # asked for by name: a failure stops the start, with its reason
    adapters_dir = Path(args.adapters_dir)
    if adapters_dir.is_dir():
        for path in adapter_paths(adapters_dir):
            if demo_selected or path.resolve() != Path(args.adapter or "").resolve():
                adapters.try_load(path)
    engine = None
    if args.max_batch > 0:
        from ..batching import BatchEngine

        engine = BatchEngine(model, max_batch=args.max_batch, max_slots=args.max_prompt_tokens + 1024,
                             prefill_chunk=args.prefill_chunk, reuse_mb=args.reuse_mb,
                             packed_mb=args.packed_mb)
    image_adapter, notes = None, []
    if demo_selected:
        image_adapter, notes = DEMO_ADAPTER_NAME, [STATUS_NOTE]
    elif not args.no_demo:
        from ..demo import add_demo_adapter

        image_adapter, notes = add_demo_adapter(adapters)
    return ChatService(model, adapters, max_prompt_tokens=args.max_prompt_tokens, engine=engine,
                       image_adapter=image_adapter, status_notes=notes)


def launch(args: argparse.Namespace, block: bool = True):
    """Build the model and the page and start serving; returns (demo, local_url)."""
    from .ui import build_demo

    service = build_service(args)
    demo = build_demo(service, engine_profile=args.engine_profile)
    concurrency = args.concurrency or (args.max_batch if args.max_batch > 0 else 2)
    demo.queue(default_concurrency_limit=concurrency, max_size=args.queue_size)
    _, local_url, share_url = demo.launch(server_name=args.host, server_port=args.port, share=args.share,
                                          max_file_size=args.max_file_size, prevent_thread_lock=True,
                                          quiet=True)
    print(f"mmadapter app running at {local_url}" + (f" (public: {share_url})" if share_url else ""), flush=True)
    if block:
        demo.block_thread()
    return demo, local_url


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app", description="The Gradio visual question answering app.")
    add_serve_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        launch(args)
    except (ValueError, OSError) as e:
        print(f"app: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
