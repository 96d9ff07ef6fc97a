"""Configuration dataclasses with named presets.

Every config is a plain dataclass that round-trips through JSON (`to_dict` / `from_dict`), so the
exact shapes travel inside adapter files and checkpoints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
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

    def __post_init__(self) -> None:
        if self.gate not in GATE_KINDS:
            raise ValueError(f"AdapterConfig.gate={self.gate!r}: use one of {', '.join(GATE_KINDS)}")

    def n_gates(self, n_heads: int) -> int:
        """Gates per adapted layer."""
        return n_heads if self.gate == "per-head" else 1

    def adapted_layers(self, n_base_layers: int) -> int:
        n = max(n_base_layers - 2, 1) if self.n_layers is None else self.n_layers
        if not 1 <= n <= n_base_layers:
            raise ValueError(f"AdapterConfig.n_layers={n} must be between 1 and the base's {n_base_layers} layers")
        if self.n_prompts < 1:
            raise ValueError(f"AdapterConfig.n_prompts={self.n_prompts} must be at least 1")
        return n


@dataclass(frozen=True)
class VisionConfig(_Serialisable):
    """A frozen open_clip image tower and the trainable projector to one image token.

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


SELF_CONTAINED_TOWERS = ("hf-hub:", "local-dir:")  # open_clip names whose weights come with the name
RANDOM_WEIGHTS = "none"
