"""`mmadapter info`: what an adapter file or a base checkpoint holds, read from headers only.

Adapters: ours (.safetensors), PEFT AdaptionPrompt (directory or weights file), LLaMA-Adapter V1 and V2
multimodal (.pth).
Bases: Hugging Face directory, Meta directory, .gguf. Nothing is dequantised or loaded into a model
unless --fingerprint asks for the base fingerprint (which needs the weights).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show what an adapter or base checkpoint contains",
                       description="Show the format, shapes, configs, parameter counts and base fingerprint of an "
                                   "adapter (mmadapter .safetensors, PEFT directory, V1 .pth) or a base checkpoint "
                                   "(Hugging Face directory, Meta directory, .gguf), from headers only.")
    p.add_argument("path", help="adapter file/directory or base checkpoint")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--fingerprint", action="store_true",
                   help="bases: load the weights to compute the fingerprint adapters record (slow for big models)")
    p.add_argument("--strict", action="store_true",
                   help="V2 files: exit with status 1 when a tensor is unexpected, missing or misshapen (default: a "
                        "warning naming them)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    info = describe(Path(args.path), fingerprint=args.fingerprint)
    print(json.dumps(info, indent=2) if args.json else render(info))
    check = info.get("tensor_check")
    if isinstance(check, dict):  # a V2 file whose names or shapes do not fit its variant: loading it will fail
        named = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in check.items())
        print(f"mmadapter info: {'error' if args.strict else 'warning'}: {args.path} does not load as a "
              f"LLaMA-Adapter V2 checkpoint: {named}", file=sys.stderr)
        return 1 if args.strict else 0
    return 0


def describe(path: Path, fingerprint: bool = False) -> dict[str, Any]:
    """A JSON-able summary of `path`."""
    kind, path = _kind(path)
    info = {"path": str(path), **_DESCRIBE[kind](path)}
    if kind in ("hf", "gguf") and (per_token := _bytes_per_token(info)):
        info["decode_bytes_per_token"] = per_token
    if kind in ("hf", "meta", "gguf") and fingerprint:
        from ..weights import load_base_checkpoint

        info["fingerprint"] = load_base_checkpoint(path, dtype=torch.bfloat16).fingerprint
    return info


def _kind(path: Path) -> tuple[str, Path]:
    from ..adapter_file import METADATA_KEY
    from ..interop import detect_format, safetensors_header
    from ..weights import EMBEDDED, embedded_path

    if str(path) in EMBEDDED and not path.exists():  # the embedded model, named as other commands name it
        return "gguf", embedded_path(str(path))
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            return "hf", path
        if (path / "params.json").exists():
            return "meta", path
        return detect_format(path), path  # a PEFT directory, or a clear error
    if path.suffix == ".gguf":
        return "gguf", path
    if path.suffix == ".safetensors" and (path.parent / "config.json").exists():
        keys, metadata = safetensors_header(path)
        if METADATA_KEY not in metadata and not any(".adaption_" in k for k in keys):
            return "hf", path.parent  # a weights shard inside a model directory
    if path.suffix == ".pth" and (path.parent / "params.json").exists():
        return "meta", path.parent
    return detect_format(path), path


# ----------------------------------------------------------------------------------------------
# Adapters


def _mmadapter(path: Path) -> dict[str, Any]:
    from ..adapter_file import read_adapter

    meta, tensors = read_adapter(path)
    n_layers, n_prompts, dim = tensors["prompts"].shape
    first = meta.base_config.n_layers - n_layers
    counts: dict[str, int] = {}
    for name, t in tensors.items():  # V1 parts, then V2's tuned biases / norms / LoRA and new_gate scales
        part = (name if name in ("prompts", "gates") else "gates" if name == "gate_scale"
                else "projector" if name.startswith("projector.") else "lora" if ".lora_" in name
                else "bias" if ".bias." in name else "norms")
        counts[part] = counts.get(part, 0) + t.numel()
    counts["total"] = sum(counts.values())
    gates = torch.tanh(tensors["gates"].float())
    from ..adapter import describe_image_path, variant_name

    return {
        "format": f"mmadapter adapter (version {meta.version})",
        "variant": variant_name(meta.adapter, meta.vision),
        "adapter": {"n_prompts": n_prompts, "n_layers": n_layers, "layers": f"{first}-{first + n_layers - 1}",
                    "dim": dim, "gates": meta.adapter.gate, "tanh_gates": _range(gates)},
        "parameters": counts,
        "base": {"name": meta.base_name, "fingerprint": meta.base_fingerprint, "config": meta.base_config.to_dict()},
        "image_tokens": describe_image_path(meta.vision, meta.feature_dim, n_prompts) if meta.vision else None,
        "vision": {**meta.vision.to_dict(), "feature_dim": meta.feature_dim} if meta.vision else None,
        "template": meta.template,
        "training": meta.training or None,
        "tensors": _shapes(tensors),
    }


def _peft(path: Path) -> dict[str, Any]:
    from ..interop import read_peft

    config, tensors = read_peft(path)
    prompts = {k: v for k, v in tensors.items() if k.endswith("adaption_prompt")}
    gates = [float(v.reshape(-1)[0]) for k, v in sorted(tensors.items(), key=lambda kv: _layer(kv[0]))
             if k.endswith("adaption_gate")]
    layers = sorted(_layer(k) for k in prompts)
    shape = tuple(next(iter(prompts.values())).shape) if prompts else ()
    return {
        "format": "PEFT AdaptionPrompt",
        "config": config or None,
        "adapter": {"n_prompts": shape[-2] if len(shape) >= 2 else None, "n_layers": len(layers),
                    "layers": f"{layers[0]}-{layers[-1]}" if layers else None,
                    "dim": shape[-1] if shape else None, "gates": "one per layer, used without tanh",
                    "gate_values": [round(g, 6) for g in gates]},
        "parameters": {"prompts": sum(v.numel() for v in prompts.values()), "gates": len(gates),
                       "total": sum(v.numel() for v in tensors.values())},
        "dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in tensors.values()}),
    }


def _v1(path: Path) -> dict[str, Any]:
    from ..interop import V1_QUERY_KEY, InteropError, read_v1, v1_gates, v1_shape

    state = read_v1(path)
    query = state[V1_QUERY_KEY]
    gates = v1_gates(state)
    trained = sorted(i for i, g in gates.items() if bool(g.float().ne(0).any()))
    shape: dict[str, Any] = {}
    if gates:
        try:  # the base is unknown here: assume the gates cover every layer, as the release's do
            k, n, how = v1_shape(state, max(gates) + 1)
            shape = {"n_prompts": k, "n_layers": n, "inferred_from": how}
        except InteropError as e:
            shape = {"inferred_from": str(e)}
    per_layer = {g.numel() for g in gates.values()}
    info = {
        "format": "LLaMA-Adapter V1",
        "adapter_query": {"shape": list(query.shape), "dtype": str(query.dtype).removeprefix("torch.")},
        "gates": {"layers": f"{min(gates)}-{max(gates)}" if gates else None,
                  "kind": "scalar (older V1)" if per_layer == {1} else f"per head ({', '.join(map(str, per_layer))})",
                  "non_zero_layers": f"{trained[0]}-{trained[-1]}" if trained else None},
        "adapter": shape or None,
        "parameters": {"adapter_query": query.numel(), "gates": sum(gates[i].numel() for i in trained)},
    }
    known = {V1_QUERY_KEY, *(f"layers.{i}.attention.gate" for i in gates)}
    other = sorted(k for k in state if k not in known)
    if other:
        info["other_tensors"] = f"{len(other)} (e.g. {', '.join(other[:3])}), ignored on import"
    return info


# ----------------------------------------------------------------------------------------------
# Bases


def _hf(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    from ..weights import hf_config

    raw = json.loads((path / "config.json").read_text())
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else [p.name for p in sorted(path.glob("*.safetensors"))]
    n_params, dtypes, n_tensors = 0, Counter(), 0
    for name in files:
        try:
            with safe_open(path / name, framework="pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    n_params += _numel(piece.get_shape())
                    dtypes[piece.get_dtype()] += 1
                    n_tensors += 1
        except Exception as e:
            raise ValueError(f"{path / name}: cannot read the safetensors header ({type(e).__name__}: {e})") from e
    return {
        "format": "Hugging Face",
        "model_type": raw.get("model_type"),
        "config": hf_config(raw, str(path / "config.json")).to_dict(),
        "weights": {"files": files, "tensors": n_tensors, "parameters": n_params, "dtypes": dict(dtypes)},
        "tokenizer": next((n for n in ("tokenizer.json", "tokenizer.model") if (path / n).exists()), None),
    }


def _meta(path: Path) -> dict[str, Any]:
    shards = sorted(path.glob("consolidated.*.pth"))
    n_params, dtypes = 0, Counter()
    for shard in shards:
        try:
            state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)  # headers only: mmap
        except Exception as e:
            raise ValueError(f"{shard}: cannot read it as a weights-only PyTorch file ({type(e).__name__})") from e
        for tensor in state.values():
            n_params += tensor.numel()
            dtypes[str(tensor.dtype).removeprefix("torch.")] += 1
    return {
        "format": "Meta",
        "params": json.loads((path / "params.json").read_text()),
        "weights": {"shards": [s.name for s in shards], "parameters": n_params, "dtypes": dict(dtypes)},
        "tokenizer": "tokenizer.model" if (path / "tokenizer.model").exists() else None,
    }


def _gguf(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)  # memory-maps the file; tensors are not decoded
    except Exception as e:
        raise ValueError(f"{path}: cannot parse GGUF ({type(e).__name__}: {e}); truncated or not a GGUF file") from e
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key.startswith("tokenizer.ggml.") and key.endswith(("merges", "token_type")):
            continue
        value = field.contents()
        if key == "tokenizer.ggml.tokens":
            metadata["tokenizer.ggml.tokens"] = f"{len(value)} tokens"
        elif isinstance(value, str) and len(value) > 120:
            metadata[key] = f"{value[:60]!r}... ({len(value)} characters)"
        else:
            metadata[key] = value
    types = Counter(t.tensor_type.name for t in reader.tensors)
    return {
        "format": "GGUF",
        "version": reader.fields["GGUF.version"].contents() if "GGUF.version" in reader.fields else None,
        "metadata": metadata,
        "weights": {"tensors": len(reader.tensors), "parameters": sum(int(t.n_elements) for t in reader.tensors),
                    "types": dict(types), "file_bytes": path.stat().st_size},
    }


def _bytes_per_token(info: dict[str, Any]) -> dict[str, int]:
    """Weight bytes one decoded token reads, per dtype mmadapter can load the base in (`--dtype`)."""
    from ..config import LlamaConfig
    from ..quant import SCHEMES, bytes_per_token

    if "config" in info:
        config = LlamaConfig.from_dict(info["config"])
    else:
        meta = info["metadata"]
        shape = ("llama.attention.head_count", "llama.embedding_length", "llama.block_count",
                 "llama.feed_forward_length")
        if not all(k in meta for k in shape):
            return {}  # a GGUF without the model's shape: nothing to compute (info still describes it)
        heads = int(meta["llama.attention.head_count"])
        config = LlamaConfig(dim=int(meta["llama.embedding_length"]), n_layers=int(meta["llama.block_count"]),
                             n_heads=heads, n_kv_heads=int(meta.get("llama.attention.head_count_kv", heads)),
                             ffn_dim=int(meta["llama.feed_forward_length"]),
                             vocab_size=int(meta.get("llama.vocab_size", 0)) or
                             int(str(meta["tokenizer.ggml.tokens"]).split()[0]))
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, **{scheme: scheme for scheme in SCHEMES}}
    return {name: bytes_per_token(config, dtype) for name, dtype in dtypes.items()}


def _v2(path: Path) -> dict[str, Any]:
    from ..interop_v2 import describe_v2

    return describe_v2(path)


_DESCRIBE = {"mmadapter": _mmadapter, "peft": _peft, "v1": _v1, "v2": _v2, "hf": _hf, "meta": _meta, "gguf": _gguf}


# ----------------------------------------------------------------------------------------------
# Output


def render(info: dict[str, Any], indent: int = 0) -> str:
    """Nested dicts as indented `key: value` lines."""
    lines = []
    for key, value in info.items():
        if isinstance(value, dict):
            lines.append(f"{' ' * indent}{key}:")
            lines.append(render(value, indent + 2))
        else:
            shown = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            if isinstance(shown, int) and not isinstance(shown, bool):
                shown = f"{shown:,}"
            lines.append(f"{' ' * indent}{key}: {shown}")
    return "\n".join(line for line in lines if line)


def _range(values: torch.Tensor) -> str:
    return f"{float(values.min()):.4g} to {float(values.max()):.4g}"


def _shapes(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {k: f"{list(v.shape)} {str(v.dtype).removeprefix('torch.')}" for k, v in tensors.items()}


def _layer(key: str) -> int:
    return int(key.split("layers.")[1].split(".")[0])


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
