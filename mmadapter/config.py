"""Configuration dataclasses with named presets, and the checks that turn files and flags into them.

Every config is a plain dataclass that round-trips through JSON (`to_dict` / `from_dict`), so the
exact shapes travel inside adapter files and checkpoints. `TrainConfig` is strict instead: a
training option that is unknown or of the wrong type is an error that names it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T", bound="_Serialisable")


class _Serialisable:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        """Build from a dict, ignoring keys this version does not know (forward compatibility)."""
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class RopeScaling(_Serialisable):
    """Llama-3.1 style frequency scaling ("rope_type": "llama3" in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


@dataclass(frozen=True)
class LlamaConfig(_Serialisable):
    """Shape of a LLaMA-family decoder (RMSNorm, RoPE, GQA, SwiGLU)."""

    name: str = "custom"
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    ffn_dim: int = 11008
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    bos_id: int | None = 1
    eos_ids: tuple[int, ...] = (2,)

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling))
        object.__setattr__(self, "eos_ids", tuple(self.eos_ids))
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> LlamaConfig:
        if name not in LLAMA_PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(LLAMA_PRESETS))}")
        return cls(**{"name": name, **LLAMA_PRESETS[name], **overrides})


LLAMA_PRESETS: dict[str, dict[str, Any]] = {
    # A few-hundred-kilobyte model for tests: GQA (4 query heads over 2 kv heads), tied embeddings.
    "tiny": dict(vocab_size=256, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=160,
                 norm_eps=1e-5, max_seq_len=256, tie_embeddings=True, bos_id=1, eos_ids=(2,)),
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                         norm_eps=1e-5, rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True,
                         bos_id=1, eos_ids=(2,)),
    "llama-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
                     norm_eps=1e-6, max_seq_len=2048),
    "llama-13b": dict(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824,
                      norm_eps=1e-6, max_seq_len=2048),
    "llama2-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
                      norm_eps=1e-5, max_seq_len=4096),
    "llama2-13b": dict(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824,
                       norm_eps=1e-5, max_seq_len=4096),
    "llama3-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                      norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192,
                      bos_id=128000, eos_ids=(128001, 128009)),
    "llama3.1-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                        norm_eps=1e-5, rope_theta=500000.0, max_seq_len=131072,
                        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                 original_max_seq_len=8192),
                        bos_id=128000, eos_ids=(128001, 128008, 128009)),
}


GATE_KINDS = ("per-head", "per-layer")


@dataclass(frozen=True)
class AdapterConfig(_Serialisable):
    """Zero-init gated adaptation prompts (LLaMA-Adapter, arXiv 2303.16199).

    n_prompts is K (prompts per adapted layer); n_layers is L (the top L layers are adapted).
    None means "all but the bottom two", the reference's 30 of 32 for LLaMA-7B.
    gate: "per-head" (one gate per attention head, as in the V1 training code) or "per-layer" (one
    gate per layer, PEFT AdaptionPrompt's layout: such adapters export to PEFT).
    """

    n_prompts: int = 10
    n_layers: int | None = None
    prompt_init_std: float = 1.0
    gate: str = "per-head"
    # LLaMA-Adapter V2 (arXiv 2304.15010) tunes the base too: zero-init biases on wq/wo/w1/w2/w3 and every
    # RMSNorm weight (bias_tuning), rank-r LoRA on the seven projections (lora_rank > 0), and a per-layer
    # scale on the prompt term (new_gate). See tuning.py.
    bias_tuning: bool = False
    lora_rank: int = 0
    new_gate: bool = False

    def __post_init__(self) -> None:
        if self.gate not in GATE_KINDS:
            raise ValueError(f"AdapterConfig.gate={self.gate!r}: use one of {', '.join(GATE_KINDS)}")

    def n_gates(self, n_heads: int) -> int:
        """Gates per adapted layer."""
        return n_heads if self.gate == "per-head" else 1

    @property
    def tunes_base(self) -> bool:
        return self.bias_tuning or self.lora_rank > 0

    def adapted_layers(self, n_base_layers: int) -> int:
        n = max(n_base_layers - 2, 1) if self.n_layers is None else self.n_layers
        if not 1 <= n <= n_base_layers:
            raise ValueError(f"AdapterConfig.n_layers={n} must be between 1 and the base's {n_base_layers} layers")
        if self.n_prompts < 1:
            raise ValueError(f"AdapterConfig.n_prompts={self.n_prompts} must be at least 1")
        return n


@dataclass(frozen=True)
class VisionConfig(_Serialisable):
    """A frozen open_clip image tower and the trainable projector from its features to image tokens: V1's
    MLP (one token, added to every prompt), V2's visual query or spatial tokens (one token per prompt).

    pretrained: an open_clip tag (e.g. "openai"), a local checkpoint path, or None for random
    weights (answers about images are then meaningless; a warning says so). `from_spec` reads the
    command line's `MODEL[:WEIGHTS]`.
    """

    model: str = "ViT-L-14"
    pretrained: str | None = "openai"
    n_scales: int = 4
    projector_hidden: int = 128
    weights_hash: str | None = None  # sha256 prefix of the tower's weights, filled in when built
    seed: int = 0  # random weights (pretrained=None) come from this seed, so the same tower is built again
    # "mlp": multi-scale global features -> MLP -> one image token (V1). "visual-query": every token of the
    # last layer -> K learned queries through ViT blocks -> K image tokens, one per prompt (V2, visual_query.py).
    # "spatial": the tokens after `token_depth` blocks, patches average-pooled to a spatial_grid x spatial_grid
    # grid of regions (None: one per patch), class token first, each through one shared MLP -> 1 + g*g image
    # tokens, one per prompt, so AdapterConfig.n_prompts must be 1 + g*g (spatial_tokens.py).
    projector: str = "mlp"
    clip_dim: int = 768  # width of the tower's tokens (after proj) the token projectors read; set by the tower
    query_width: int = 768
    query_depth: int = 8
    query_heads: int = 16
    spatial_grid: int | None = None
    token_depth: int | None = None  # blocks run before the tokens are read ("spatial"); None: all of them
    # Swap the image's channels before preprocessing: LLaMA-Adapter V2's reference reads images with OpenCV
    # (BGR) and feeds them as RGB, so its released weights were trained and evaluated on swapped channels.
    bgr: bool = False

    def __post_init__(self) -> None:
        if self.projector not in PROJECTORS:
            raise ValueError(f"VisionConfig.projector={self.projector!r}: use one of {', '.join(PROJECTORS)}")
        for name in ("spatial_grid", "token_depth"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"VisionConfig.{name}={value!r} must be a positive integer (or None)")
        if self.spatial_grid is not None and self.projector != "spatial":
            raise ValueError(f"VisionConfig.spatial_grid={self.spatial_grid} is an option of projector='spatial' "
                             f"(this config's projector is {self.projector!r})")
        if self.token_depth is not None and self.projector == "mlp":
            raise ValueError("VisionConfig.token_depth picks the layer whose tokens a token projector reads "
                             "('spatial', 'visual-query'); the 'mlp' projector reads n_scales global features")

    @property
    def tokens(self) -> bool:
        """Whether the projector reads the tower's token grid (not the multi-scale global features)."""
        return self.projector in ("visual-query", "spatial")

    @classmethod
    def from_spec(cls, spec: str, **fields: Any) -> VisionConfig:
        """The `MODEL[:WEIGHTS]` spelling every command takes: WEIGHTS is an open_clip tag, a local
        checkpoint file or `none` (random weights); without it, the default tag. Models named
        `hf-hub:...` or `local-dir:...` carry their own weights."""
        spec = spec.strip()
        if not spec:
            raise ValueError("empty --vision: use MODEL[:WEIGHTS], e.g. ViT-L-14:openai")
        if spec.startswith(SELF_CONTAINED_TOWERS):
            return cls(model=spec, pretrained=None, **fields)
        model, sep, weights = spec.partition(":")
        if sep and not weights:
            raise ValueError(f"--vision {spec!r}: nothing after ':'; use MODEL:TAG, MODEL:/path/to/weights or "
                             f"MODEL:{RANDOM_WEIGHTS} (random weights)")
        pretrained = None if weights.lower() == RANDOM_WEIGHTS else weights or cls.pretrained
        return cls(model=model, pretrained=pretrained, **fields)

    @property
    def spec(self) -> str:
        """This tower as `MODEL[:WEIGHTS]` (the inverse of from_spec)."""
        if self.model.startswith(SELF_CONTAINED_TOWERS):
            return self.model
        return f"{self.model}:{self.pretrained or RANDOM_WEIGHTS}"


# The image projectors: V1's MLP (the paper's method, the default), V2's visual query, spatial tokens.
PROJECTORS = ("mlp", "visual-query", "spatial")
SELF_CONTAINED_TOWERS = ("hf-hub:", "local-dir:")  # open_clip names whose weights come with the name
RANDOM_WEIGHTS = "none"


PREFIX_CACHE_MODES = ("off", "memory", "disk")


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with the help text (and choices) its command-line flag shows."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class TrainConfig:
    """Every training option; `mmadapter train --help` lists the same fields as flags."""

    # data
    data: str | None = option(None, "training data: a .json/.jsonl file (Alpaca, question/answer or LLaVA "
                                    "conversations; optional \"image\" paths) or scienceqa:<dir>")
    eval_data: str | None = option(None, "held-out data (same forms); its loss is logged after every epoch")
    image_root: str | None = option(None, "folder that relative image paths start from (default: the data file's)")
    template: str | None = option(None, "prompt template: alpaca, chat, chat-short (no default system prompt) or plain (default: the model's)")
    max_seq_len: int = option(512, "longer samples are truncated (and counted)")
    scienceqa_format: str = option("QCM-A", "ScienceQA prompt format: QCM-A, QCM-ALE, CQM-A, CQM-ALE")
    scienceqa_split: str = option("train", "ScienceQA split used for training")
    scienceqa_eval_split: str = option("val", "ScienceQA split used for eval_data")
    # optimisation
    epochs: int = option(5, "passes over the training data")
    batch_size: int = option(4, "samples per micro-batch on each process")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float | None = option(None, "peak learning rate (default: blr x effective batch / 256)")
    blr: float = option(9e-3, "base learning rate for an effective batch of 256")
    min_lr: float = option(0.0, "learning rate at the end of the cosine")
    warmup_epochs: float = option(2.0, "linear warm-up length in (fractional) epochs")
    weight_decay: float = option(0.02, "AdamW weight decay of prompts and projector weights (not gates, biases)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    loss_per: str = option("token", "average the loss per answer token (long answers weigh more) or per sample "
                                    "(each answer counts once, whatever its length)", choices=("token", "sample"))
    clip_grad: float | None = option(None, "clip the gradient norm to this value (default: no clipping)")
    on_nonfinite: str = option("stop", "a NaN/inf loss or gradient: stop (with a checkpoint of the state before "
                                       "that batch) or skip the batch", choices=("stop", "skip"))
    seed: int = option(0, "seed of the adapter initialisation and the batch order")
    fsdp: bool = option(False, "under torchrun: shard the frozen layers across processes (FSDP) instead of a "
                               "whole base per process, for bases too big for one device")
    precision: str = option("auto", "auto: bf16 autocast on GPU, fp32 on CPU; or fp32 / bf16",
                            choices=("auto", "fp32", "bf16"))
    group_by_length: bool = option(True, "batch samples of similar length together (less padding)")
    # efficiency
    prefix_cache: str = option("off", "cache the frozen layers' output per sample: off, memory or disk",
                               choices=PREFIX_CACHE_MODES)
    prefix_cache_mb: float = option(2048.0, "size bound of the prefix cache in MB (beyond it: recomputed)")
    prefix_cache_dir: str | None = option(None, "directory of the disk prefix cache (default: <output_dir>/prefix_cache)")
    feature_cache_dir: str | None = option(None, "keep image features on disk here (reused by later runs)")
    feature_batch_size: int = option(32, "images per vision-tower batch when precomputing features")
    # outputs
    output_dir: str = option("runs/adapter", "adapter, logs, plot and checkpoints go here")
    save_every: int = option(200, "write a checkpoint every N optimizer steps (0: only at the end)")
    keep_last: int = option(2, "checkpoints kept on disk")
    resume: bool = option(False, "continue from the latest checkpoint in output_dir (fresh start if none)")
    allow_base_mismatch: bool = option(False, "resume a checkpoint whose base fingerprint differs")
    progress: bool = option(True, "show progress bars")
    plot: bool = option(True, "draw loss_curve.png at the end")

    def __post_init__(self) -> None:
        positive = ("max_seq_len", "epochs", "batch_size", "grad_accum", "feature_batch_size", "keep_last")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be at least 1")
        for name in ("save_every", "blr", "min_lr", "warmup_epochs", "weight_decay", "prefix_cache_mb"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be >= 0")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"TrainConfig.lr={self.lr} must be positive (or None for blr scaling)")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"TrainConfig.clip_grad={self.clip_grad} must be positive (or None: no clipping)")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"TrainConfig.{f.name}={getattr(self, f.name)!r}: choose one of {', '.join(choices)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build from a config file's mapping; unknown keys and wrong types are errors that name them."""
        return cls(**coerce_fields(cls, values))


def coerce_fields(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """Check a mapping against a dataclass's fields: known names, matching types (int accepted as float)."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    out = {}
    for name, value in values.items():
        kind, optional = field_type(hints[name])
        if value is None and optional:
            out[name] = None
        elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            out[name] = value
        else:
            raise ValueError(f"{cls.__name__}.{name}: expected {kind.__name__}{' or null' if optional else ''}, "
                             f"got {value!r}")
    return out


def field_type(hint: Any) -> tuple[type, bool]:
    """(base type, optional?) of a field annotation such as `float | None`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args:
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A flat mapping of options from a .json or .yaml/.yml file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as e:
        raise ValueError(f"{path}: cannot parse the config ({e})") from e
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config file holds one mapping of option names to values")
    return values
