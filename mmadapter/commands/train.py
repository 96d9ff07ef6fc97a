"""`mmadapter train`: instruction-tune an adapter; flags are generated from TrainConfig and ModelOptions.

Precedence: dataclass defaults < `--config file.{yaml,json}` (one flat mapping of option names) <
flags. The effective options are saved to <output_dir>/config.json, which `--config` reads back.
Under `torchrun --nproc_per_node N -m mmadapter train ...` every process runs this command.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..config import GATE_KINDS, TrainConfig, coerce_fields, field_type, load_config_file, option
from ..quant import DTYPE_CHOICES, SCHEMES
from ..train_log import CONFIG_FILE
from ..weights import DEFAULT_BASE


@dataclass
class ModelOptions:
    """How the CLI builds the model that the Python API receives ready-made."""

    base: str = option(DEFAULT_BASE, "base model: embedded name, preset, local dir/.gguf, or hub id")
    dtype: str | None = option(None, "base weights dtype, or int8 / int4 / fp16w for a weight-only quantised base on "
                               "CPU (fp16w: fp16 weights, fp32 compute; float16 computes in fp16) "
                               "(default: float32 on CPU, bfloat16 on GPU)",
                               choices=DTYPE_CHOICES)
    device: str | None = option(None, "cpu, cuda, cuda:1 ... (default: cuda if available, per local rank)")
    n_prompts: int = option(10, "adaptation prompts per layer (K)")
    n_layers: int | None = option(None, "adapted top layers (L; default: all but the bottom two)")
    gate: str = option("per-head", "one gate per attention head (the V1 method) or per layer (exports to PEFT)",
                       choices=GATE_KINDS)
    vision: str | None = option(None, "image tower for multimodal data, MODEL[:WEIGHTS] (WEIGHTS: open_clip tag, "
                                      "local file or none for random weights; default tag openai), e.g. "
                                      "ViT-L-14:openai or local-dir:<dir> (default: text-only)")
    vision_scales: int = option(4, "depths whose global features feed the projector (M)")
    projector_hidden: int = option(128, "hidden width of the projector MLP")
    projector: str = option("mlp", "image projector: mlp (LLaMA-Adapter V1: one image token from the global "
                                   "features, added to every prompt) or spatial (one token per region of the "
                                   "tower's patch grid, token k added to prompt k; needs --n-prompts 1 + g*g)",
                            choices=("mlp", "spatial"))
    spatial_grid: int | None = option(None, "spatial: pool the patch tokens to a g x g grid of regions "
                                            "(default: one token per patch)")
    token_depth: int | None = option(None, "spatial: read the tokens after this many tower blocks "
                                           "(default: the last)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an adapter (text-only or multimodal)",
                       description="Instruction-tune a LLaMA-Adapter over a frozen base. Every option can also "
                                   "come from --config FILE (flags win).")
    p.add_argument("--config", default=None, metavar="FILE", help="options from a .yaml/.yml or .json file")
    add_dataclass_flags(p.add_argument_group("model"), ModelOptions)
    add_dataclass_flags(p.add_argument_group("training"), TrainConfig)
    p.set_defaults(func=run)


def add_dataclass_flags(group: argparse._ArgumentGroup, cls: type) -> None:
    """One flag per field: type, default, choices and help come from the dataclass."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, optional = field_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help = f.metadata.get("help", "")
        if "default" not in help:
            help += f" (default: {f.default})"
        common = dict(dest=f.name, default=argparse.SUPPRESS, help=help)
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        else:
            choices = f.metadata.get("choices")
            metavar = "{" + ",".join(choices) + "}" if choices else None
            group.add_argument(flag, type=_parse(kind, optional, choices), metavar=metavar, **common)


def _parse(kind: type, optional: bool, choices: Sequence[str] | None = None) -> Any:
    def parse(text: str) -> Any:
        if optional and text.strip().lower() in ("none", "null"):
            return None
        value = kind(text)
        if choices and value not in choices:
            raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(choices)})")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def resolve_options(args: argparse.Namespace) -> tuple[ModelOptions, TrainConfig]:
    """Defaults < config file < flags, checked field by field."""
    given = {k: v for k, v in vars(args).items() if k not in ("config", "func", "command", "verbose")}
    values = {**(load_config_file(args.config) if args.config else {}), **given}
    if values.get("resume") and not args.config:
        values = _run_settings(values)
    model_keys = {f.name for f in dataclasses.fields(ModelOptions)}
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - model_keys - train_keys)
    if unknown:
        raise ValueError(f"unknown option(s) in {args.config}: {', '.join(unknown)}; "
                         "see `mmadapter train --help` for the names (underscores, not dashes)")
    options = ModelOptions(**coerce_fields(ModelOptions, {k: v for k, v in values.items() if k in model_keys}))
    config = TrainConfig.from_dict({k: v for k, v in values.items() if k in train_keys})
    return options, config


# What a resumed run may change: how it is shown, saved, cached and guarded, never what it computes.
RESUME_MAY_CHANGE = ("output_dir", "resume", "device", "progress", "plot", "save_every", "keep_last", "on_nonfinite",
                     "allow_base_mismatch", "prefix_cache", "prefix_cache_mb", "prefix_cache_dir", "feature_cache_dir",
                     "eval_data")


def _run_settings(given: dict[str, Any]) -> dict[str, Any]:
    """`--resume` without `--config`: the run's own settings from <output_dir>/config.json, with the
    explicit flags that are safe to change on top; a flag that would change the run is refused."""
    from pathlib import Path

    output_dir = given.get("output_dir", TrainConfig.output_dir)
    saved_file = Path(output_dir) / CONFIG_FILE
    if not saved_file.is_file():
        return given  # nothing to continue: the trainer says so and starts from scratch
    saved = load_config_file(saved_file)
    changed = sorted(k for k, v in given.items() if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != v)
    if changed:
        shown = "; ".join(f"--{k.replace('_', '-')} {given[k]!r} (the run has {saved[k]!r})" for k in changed)
        raise ValueError(f"--resume continues {output_dir} with its own settings ({saved_file}), but {shown}. "
                         f"On resume only {', '.join(RESUME_MAY_CHANGE)} may change; start a new run in another "
                         "--output-dir to change the others")
    return {**saved, **given}


def check_inputs(options: ModelOptions, config: TrainConfig) -> None:
    """What can be checked before the (slow) model load: data files, template, tower spelling."""
    from pathlib import Path

    from ..config import VisionConfig
    from ..data.templates import get_template
    from ..train_data import SCIENCEQA_PREFIX

    if config.data is None:
        raise ValueError("no training data: pass --data FILE (or scienceqa:<dir>), or set data in --config")
    for flag, source in (("--data", config.data), ("--eval-data", config.eval_data)):
        if source is not None and not str(source).startswith(SCIENCEQA_PREFIX) and not Path(source).is_file():
            raise ValueError(f"{flag} {source}: no such data file (a .json/.jsonl file, or scienceqa:<dir>)")
    if config.template is not None:
        get_template(config.template)
    if options.vision:
        VisionConfig.from_spec(options.vision, **vision_fields(options))
    elif options.projector != "mlp" or options.spatial_grid is not None or options.token_depth is not None:
        raise ValueError("--projector, --spatial-grid and --token-depth shape the image path: pass --vision too")


def vision_fields(options: ModelOptions) -> dict[str, Any]:
    """The VisionConfig fields the model options set (besides the tower itself)."""
    return dict(n_scales=options.vision_scales, projector_hidden=options.projector_hidden,
                projector=options.projector, spatial_grid=options.spatial_grid, token_depth=options.token_depth)


def build_training_model(options: ModelOptions, seed: int, fsdp: bool = False) -> Any:
    """The model on its device. With --fsdp on GPUs under torchrun the base is read into host memory and
    only what stays whole (embeddings, norms, adapter, tower) moves to the GPU here; the trainer moves
    each process's 1/N share of the layer weights there, so the base never has to fit one GPU."""
    import torch

    if fsdp and options.dtype in SCHEMES:
        raise ValueError(f"--fsdp shards float weights and cannot shard a quantised base (--dtype {options.dtype}); "
                         "drop --fsdp (an int8/int4/fp16w base is already 2-8x smaller) or use a float dtype")

    from ..config import AdapterConfig, VisionConfig
    from ..model import build_model

    device = options.device
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"  # one GPU per torchrun process
    vision = None
    if options.vision:
        vision = VisionConfig.from_spec(options.vision, **vision_fields(options))
    dtype = options.dtype
    shard_later = fsdp and torch.device(device).type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1
    model = build_model(options.base, AdapterConfig(n_prompts=options.n_prompts, n_layers=options.n_layers,
                                                      gate=options.gate),
                        vision, dtype=dtype or (torch.bfloat16 if shard_later else None),
                        device="cpu" if shard_later else device, seed=seed)
    if shard_later:
        for name, part in [*model.base.named_children(), ("adapter", model.adapter), ("vision", model.vision)]:
            if name != "layers" and part is not None:
                part.to(device)
    return model


def run(args: argparse.Namespace) -> int:
    from ..train import train

    options, config = resolve_options(args)
    check_inputs(options, config)
    model = build_training_model(options, config.seed, fsdp=config.fsdp)
    result = train(model, config.data, config, config.eval_data, extra_config=dataclasses.asdict(options))
    return 130 if result.interrupted else 0
