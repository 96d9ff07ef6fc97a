"""`mmadapter convert`: import LLaMA-Adapter V1 / V2 / PEFT adapters, export ours to PEFT or V2."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..weights import DEFAULT_BASE


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="import a V1 / V2 / PEFT adapter or export one to PEFT / V2",
        description="Convert an adapter between formats: an mmadapter .safetensors file, a PEFT AdaptionPrompt "
                    "directory, a LLaMA-Adapter V1 .pth (import only), a LLaMA-Adapter V2 multimodal .pth. "
                    "Importing reads the base to check shapes and record its fingerprint (a V2 file's CLIP tower is "
                    "named, never loaded); "
                    "exporting an mmadapter file needs no base.",
        epilog="examples:\n"
               "  mmadapter convert llama_adapter_len10_layer30_release.pth alpaca.safetensors --to mmadapter "
               "--base /models/llama-7b\n"
               "  mmadapter convert peft_adapter_dir/ mine.safetensors --to mmadapter --base /models/llama-7b\n"
               "  mmadapter convert mine.safetensors peft_out/ --to peft\n"
               "  mmadapter convert LORA-BIAS-7B.pth lora-bias.safetensors --to mmadapter --base /models/llama-7b\n"
               "  mmadapter convert lora-bias.safetensors LORA-BIAS-7B.pth --to v2",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="adapter to read: .safetensors, PEFT directory, V1 / V2 .pth")
    p.add_argument("dst", help="where to write: a .safetensors file (mmadapter), a directory (peft), a .pth (v2)")
    p.add_argument("--to", required=True, choices=["mmadapter", "peft", "v2"], help="output format")
    p.add_argument("--from", dest="src_format", choices=["mmadapter", "peft", "v1", "v2"], default=None,
                   help="input format (default: detected from the path)")
    p.add_argument("--base", default=DEFAULT_BASE,
                   help=f"base model the adapter belongs to, for imports: embedded name, local dir/.gguf, or hub id "
                        f"(default: {DEFAULT_BASE})")
    p.add_argument("--n-prompts", type=int, default=None, metavar="K",
                   help="V1 only: prompts per layer (default: inferred; the official release uses 10)")
    p.add_argument("--n-layers", type=int, default=None, metavar="L",
                   help="V1 only: adapted top layers (default: inferred from the gates)")
    p.add_argument("--vision", default=None, metavar="MODEL[:WEIGHTS]",
                   help="V2 imports: the open_clip tower the file reads (default ViT-L-14:openai); only its config "
                        "is read, no weights, so converting works offline")
    p.add_argument("--template", default=None,
                   help="prompt template to record in an imported adapter (default: alpaca for V1, none for PEFT)")
    p.add_argument("--force", action="store_true", help="overwrite dst if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..adapter_file import save_adapter
    from ..interop import adapter_from_file, detect_format, import_adapter, save_peft

    src, dst = Path(args.src), Path(args.dst)
    fmt = args.src_format or detect_format(src)
    if fmt == args.to:
        raise ValueError(f"{src} is already in the {fmt} format; nothing to convert")
    if fmt != "v1" and (args.n_prompts is not None or args.n_layers is not None):
        raise ValueError(f"--n-prompts / --n-layers apply to V1 files only; a {fmt} adapter stores its shape")
    if dst.exists() and not args.force:
        raise ValueError(f"{dst} exists; pass --force to overwrite it")
    if args.template is not None:
        from ..data.templates import get_template

        get_template(args.template)  # fail before loading anything
    if fmt != "v2" and args.vision is not None:
        raise ValueError(f"--vision applies to V2 imports only; a {fmt} adapter names its tower (or has none)")
    if fmt == "v2":
        from ..interop_v2 import check_v2_file

        check_v2_file(src)  # every name and shape first: a bad file is refused before the base is read
    feature_dim = None  # V2 imports: the size of the tower the file names (which is never built)
    if fmt == "mmadapter":  # export: the file knows its base
        meta, adapter = adapter_from_file(src)
        base_name, fingerprint = meta.base_name, meta.base_fingerprint
    else:
        import torch

        from ..interop_v2 import import_v2_without_tower
        from ..model import load_base

        model = load_base(args.base, dtype=torch.bfloat16)  # read for shapes and fingerprint only
        if fmt == "v2":
            adapter, feature_dim = import_v2_without_tower(model, src, args.vision)
        else:
            adapter = import_adapter(model, src, fmt, n_prompts=args.n_prompts, n_layers=args.n_layers)
        if args.template is not None:
            adapter.template = args.template
        base_name, fingerprint = model.base_name, model.base_fingerprint
    training = {"imported_from": fmt, "source": src.name}
    if args.to == "peft":
        save_peft(adapter, dst, base_name)
    elif args.to == "v2":
        from ..interop_v2 import save_v2

        save_v2(adapter, dst)
    elif feature_dim is not None:
        from ..interop_v2 import save_v2_import

        save_v2_import(model, adapter, feature_dim, dst, training)
    else:
        save_adapter(model, dst, adapter=adapter, training=training)
    counts = adapter.parameter_counts()
    print(f"wrote {dst} ({args.to}): K={adapter.config.n_prompts} prompts x L={adapter.n_layers} layers "
          f"(layers {adapter.first_layer}-{adapter.first_layer + adapter.n_layers - 1}), "
          f"{counts['total']:,} parameters; base {base_name or '?'} (fingerprint {fingerprint or '?'})")
    return 0
