"""A corpus of hostile files for every mmadapter loader: truncated, oversized, wrongly typed, malicious.

    python tests/hostile/make_corpus.py OUTDIR      # writes the files and OUTDIR/cases.json

Each case is one file or directory and the loader that reads it (see run_corpus.py): "base"
(HF safetensors / Meta .pth / GGUF), "tokenizer", "adapter" (our .safetensors), "interop"
(LLaMA-Adapter V1 .pth, PEFT), "data" (JSON/JSONL), "scienceqa" and "image". `expect` is the
error class the loader must raise (None: a valid control that must load; every hostile file is a
small mutation of one). `names` is what the message must mention: the offending file, or the
directory when the problem spans files. Pickle payloads run `exec` to create OUTDIR/PWNED-<case>:
if such a file ever appears, a loader executed code from a file.

The files are small (at most about 250 KB, 5 MB in all): every claim of a huge tensor, string,
array or image is a few header bytes that lie.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import struct
import sys
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

MARKER_PREFIX = "PWNED-"
DEEP = 100_000  # JSON nesting depth: past Python's recursion limit and serde's


@dataclass
class Case:
    name: str
    loader: str
    path: str  # relative to the corpus root
    expect: str | None  # error class name; None for a control that must load
    names: str  # what the error message must contain
    about: str


# ----------------------------------------------------------------------------------------------
# Shared pieces


class Payload:
    """Unpickling this runs `exec`, which creates the marker file: proof of code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def deep_json(depth: int = DEEP) -> str:
    return "[" * depth + "]" * depth


def huge_int_json() -> str:
    return "[" + "9" * 5000 + "]"  # Python refuses to convert ints over 4300 digits


def tiny_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """A 2-layer GQA Llama (vocab 32, dim 16, 2 heads over 1 kv head, ffn 64) in Meta naming, [out, in]."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    t = {"tok_embeddings.weight": w(32, 16), "norm.weight": np.ones(16, np.float32), "output.weight": w(32, 16)}
    for i in range(2):
        p = f"layers.{i}."
        t.update({p + "attention.wq.weight": w(16, 16), p + "attention.wk.weight": w(8, 16),
                  p + "attention.wv.weight": w(8, 16), p + "attention.wo.weight": w(16, 16),
                  p + "feed_forward.w1.weight": w(64, 16), p + "feed_forward.w2.weight": w(16, 64),
                  p + "feed_forward.w3.weight": w(64, 16), p + "attention_norm.weight": np.ones(16, np.float32),
                  p + "ffn_norm.weight": np.ones(16, np.float32)})
    return t


# ----------------------------------------------------------------------------------------------
# safetensors, written by hand so that headers can lie


def st_bytes(header: dict[str, Any] | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def st_file(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    data, offset = b"", 0
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array).tobytes()
        dtype = {np.float32: "F32", np.int32: "I32"}[array.dtype.type]
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        data, offset = data + raw, offset + len(raw)
    return st_bytes(header, data)


# ----------------------------------------------------------------------------------------------
# GGUF, written by hand for the same reason

U8, I32, U32, F32, BOOL, STRING, ARRAY, U64 = 0, 5, 4, 6, 7, 8, 9, 10
_FMT = {U8: "B", I32: "i", U32: "I", F32: "f", BOOL: "?", U64: "Q"}


def g_str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def g_value(kind: int, value: Any) -> bytes:
    if kind == STRING:
        return g_str(value)
    if kind == ARRAY:
        item_kind, items = value
        return struct.pack("<IQ", item_kind, len(items)) + b"".join(g_value(item_kind, v) for v in items)
    return struct.pack("<" + _FMT[kind], value)


def g_kv(key: str | bytes, kind: int, value: Any) -> bytes:
    return g_str(key) + struct.pack("<I", kind) + g_value(kind, value)


GGUF_TOKENS = ["<unk>", "<s>", "</s>", "▁", *"abcdefghijklmnopqrstuvwxyz", "▁a", "▁b"]  # 32


def gguf_kvs(**changes: tuple[int, Any] | None) -> list[tuple[str, int, Any]]:
    """The tiny model's metadata; a change replaces (kind, value) of a key, None drops it."""
    kvs: dict[str, tuple[int, Any]] = {
        "general.architecture": (STRING, "llama"), "general.name": (STRING, "tiny"),
        "llama.block_count": (U32, 2), "llama.embedding_length": (U32, 16),
        "llama.feed_forward_length": (U32, 64), "llama.attention.head_count": (U32, 2),
        "llama.attention.head_count_kv": (U32, 1), "llama.context_length": (U32, 64),
        "llama.attention.layer_norm_rms_epsilon": (F32, 1e-5), "llama.rope.freq_base": (F32, 10000.0),
        "tokenizer.ggml.model": (STRING, "llama"), "tokenizer.ggml.tokens": (ARRAY, (STRING, GGUF_TOKENS)),
        "tokenizer.ggml.scores": (ARRAY, (F32, [0.0, 0.0, 0.0, *(-float(i) for i in range(29))])),
        "tokenizer.ggml.token_type": (ARRAY, (I32, [2, 3, 3, *[1] * 29])),
        "tokenizer.ggml.bos_token_id": (U32, 1), "tokenizer.ggml.eos_token_id": (U32, 2),
        "tokenizer.ggml.unknown_token_id": (U32, 0),
    }
    for key, change in changes.items():
        key = key.replace("__", ".")
        if change is None:
            kvs.pop(key)
        else:
            kvs[key] = change
    return [(k, kind, v) for k, (kind, v) in kvs.items()]


def gguf_tensors() -> list[tuple[str, np.ndarray]]:
    names = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "output.weight": "output.weight"}
    layer = {"attention.wq.weight": "attn_q.weight", "attention.wk.weight": "attn_k.weight",
             "attention.wv.weight": "attn_v.weight", "attention.wo.weight": "attn_output.weight",
             "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w3.weight": "ffn_up.weight",
             "feed_forward.w2.weight": "ffn_down.weight", "attention_norm.weight": "attn_norm.weight",
             "ffn_norm.weight": "ffn_norm.weight"}
    return list(renamed(tiny_tensors(), names, "blk.", layer).items())


def renamed(tensors: dict[str, np.ndarray], names: dict[str, str], layer_prefix: str,
            layer_names: dict[str, str]) -> dict[str, np.ndarray]:
    """Meta-named tensors under another format's names: `names` for the top level, `layer_prefix` +
    index + `layer_names` inside layers (the mappings are restated here, not taken from the loaders)."""
    out = {}
    for key, array in tensors.items():
        if key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            out[f"{layer_prefix}{i}.{layer_names[rest]}"] = array
        else:
            out[names[key]] = array
    return out


def gguf_file(kvs: list[tuple[str, int, Any]] | None = None, tensors: list[tuple[str, np.ndarray]] | None = None,
              *, raw_kvs: bytes = b"", n_kv: int | None = None, n_tensors: int | None = None,
              dims: dict[str, list[int]] | None = None, types: dict[str, int] | None = None,
              offsets: dict[str, int] | None = None, version: int = 3) -> bytes:
    """A GGUF file (F32 tensors, alignment 32); the keyword arguments make parts of the header lie."""
    kvs = gguf_kvs() if kvs is None else kvs
    tensors = gguf_tensors() if tensors is None else tensors
    kv_bytes = b"".join(g_kv(*kv) for kv in kvs) + raw_kvs
    count = len(kvs) + (1 if raw_kvs else 0)
    infos, data, offset = b"", b"", 0
    for name, array in tensors:
        shape = (dims or {}).get(name, list(reversed(array.shape)))  # GGUF lists the fastest dimension first
        infos += g_str(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
        infos += struct.pack("<IQ", (types or {}).get(name, 0), (offsets or {}).get(name, offset))
        raw = array.astype(np.float32).tobytes()
        raw += b"\0" * (-len(raw) % 32)
        data, offset = data + raw, offset + len(raw)
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 count if n_kv is None else n_kv)
    head += kv_bytes + infos
    return head + b"\0" * (-len(head) % 32) + data


# ----------------------------------------------------------------------------------------------
# PyTorch files: zip and legacy formats, with storages that lie about their size


class _StorageRef:
    def __init__(self, pid: tuple[Any, ...]) -> None:
        self.pid = pid


class _TensorRecipe:
    """Pickles like a tensor, over a storage reference whose declared size we choose."""

    def __init__(self, storage: _StorageRef, size: tuple[int, ...]) -> None:
        self.storage, self.size = storage, size

    def __reduce__(self) -> tuple[Any, ...]:
        import torch

        stride, acc = [], 1
        for d in reversed(self.size):
            stride.insert(0, acc)
            acc *= d
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, self.size, tuple(stride), False, OrderedDict())


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        return obj.pid if isinstance(obj, _StorageRef) else None


def zip_pth_with_storage(path: Path, key: str, claimed_numel: int, size: tuple[int, ...]) -> None:
    """A zip-format .pth whose one float storage claims `claimed_numel` elements but holds 4."""
    import torch

    buf = io.BytesIO()
    ref = _StorageRef(("storage", torch.FloatStorage, "0", "cpu", claimed_numel))
    _Pickler(buf, protocol=2).dump({key: _TensorRecipe(ref, size)})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/data/0", b"\0" * 16)
        z.writestr("archive/version", "3\n")


def legacy_pth_with_storage(path: Path, key: str, claimed_numel: int) -> None:
    """A legacy (pre-zip) .pth whose storage claims `claimed_numel` floats but holds 4."""
    import torch

    with open(path, "wb") as f:
        pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)  # torch's legacy magic number
        pickle.dump(1001, f, protocol=2)
        pickle.dump({"protocol_version": 1001, "little_endian": True,
                     "type_sizes": {"short": 2, "int": 4, "long": 4}}, f, protocol=2)
        ref = _StorageRef(("storage", torch.FloatStorage, "0", "cpu", claimed_numel, None))
        _Pickler(f, protocol=2).dump({key: _TensorRecipe(ref, (4,))})
        pickle.dump(["0"], f, protocol=2)
        f.write(struct.pack("<q", claimed_numel) + b"\0" * 16)


def torch_save(obj: Any, path: Path, legacy: bool = False) -> None:
    import torch

    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)


# ----------------------------------------------------------------------------------------------
# Images


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def small_image(fmt: str, size: tuple[int, int] = (8, 8)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, fmt)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        png_chunk(b"IEND", b"")


def png_with_text_bomb(megabytes: int = 8) -> bytes:
    """A valid 8x8 PNG with a zTXt chunk that inflates to `megabytes` (PIL's cap is 1 MB)."""
    packer, zero = zlib.compressobj(9), b"\0" * (1 << 20)
    text = b"".join(packer.compress(zero) for _ in range(megabytes)) + packer.flush()
    png = small_image("PNG")
    return png[:33] + png_chunk(b"zTXt", b"Comment\0\0" + text) + png[33:]


def tiff_claiming(width: int, height: int) -> bytes:
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8),
            (277, 3, 1), (278, 4, height), (279, 4, 16)]
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", t, k, 1, v) for t, k, v in tags)
    return b"II*\0" + struct.pack("<I", 24) + b"\0" * 16 + ifd + struct.pack("<I", 0)


def patched(data: bytes, offset: int, fmt: str, *values: int) -> bytes:
    raw = struct.pack(fmt, *values)
    return data[:offset] + raw + data[offset + len(raw):]


def jpeg_claiming(width: int, height: int) -> bytes:
    data = small_image("JPEG")
    sof = data.index(b"\xff\xc0")
    return patched(data, sof + 5, ">HH", height, width)


# ----------------------------------------------------------------------------------------------
# The corpus, one function per loader


class Corpus:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.cases: list[Case] = []

    def file(self, loader: str, name: str, data: bytes | str, expect: str | None, about: str,
             names: str | None = None) -> Path:
        path = self.root / loader / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        self.cases.append(Case(f"{loader}/{name}", loader, f"{loader}/{name}", expect, names or name, about))
        return path

    def folder(self, loader: str, name: str, files: dict[str, bytes | str], expect: str | None, about: str,
               names: str | None = None) -> Path:
        path = self.root / loader / name
        path.mkdir(parents=True, exist_ok=True)
        for rel, data in files.items():
            (path / rel).parent.mkdir(parents=True, exist_ok=True)
            (path / rel).write_bytes(data.encode() if isinstance(data, str) else data)
        self.cases.append(Case(f"{loader}/{name}", loader, f"{loader}/{name}", expect, names or name, about))
        return path

    def marker(self, name: str) -> Path:
        return self.root / f"{MARKER_PREFIX}{name.replace('/', '-')}"


def hf_files(tensor_changes: dict[str, np.ndarray] | None = None, **config_changes: Any) -> dict[str, bytes | str]:
    hf_names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
    layer = {"attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
             "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
             "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
             "feed_forward.w2.weight": "mlp.down_proj.weight", "attention_norm.weight": "input_layernorm.weight",
             "ffn_norm.weight": "post_attention_layernorm.weight"}
    tensors = renamed({**tiny_tensors(), **(tensor_changes or {})}, hf_names, "model.layers.", layer)
    config = {"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "intermediate_size": 64, "vocab_size": 32, "max_position_embeddings": 64,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
              **config_changes}
    return {"config.json": json.dumps(config), "model.safetensors": st_file(tensors)}


def meta_params(**changes: Any) -> str:
    return json.dumps({"dim": 16, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "vocab_size": 32,
                       "multiple_of": 32, "norm_eps": 1e-5, **changes})


def base_cases(c: Corpus) -> None:
    import torch

    # Hugging Face directories
    ok = hf_files()
    c.folder("base", "hf-ok", ok, None, "valid tiny Llama (control)")
    weights = ok["model.safetensors"]
    assert isinstance(weights, bytes)

    def hf(name: str, about: str, names: str = "model.safetensors", expect: str = "CheckpointError",
           **files: bytes | str) -> None:
        c.folder("base", name, {**ok, **{k.replace("__", "."): v for k, v in files.items()}}, expect, about, names)

    hf("hf-truncated", "model.safetensors cut in half", model__safetensors=weights[: len(weights) // 2])
    hf("hf-empty", "model.safetensors of 0 bytes", model__safetensors=b"")
    hf("hf-header-length-2e62", "header length field 2^62", model__safetensors=st_bytes(b"{}", length=1 << 62))
    hf("hf-header-length-past-eof", "header length 50 MB in a 100-byte file",
       model__safetensors=st_bytes(b"{}" + b" " * 90, length=50_000_000))
    huge = {"model.embed_tokens.weight": {"dtype": "F32", "shape": [1 << 20, 1 << 18], "data_offsets": [0, 1 << 40]}}
    hf("hf-tensor-1tb", "a tensor claiming 1 TiB", model__safetensors=st_bytes(huge, b"\0" * 64))
    overflow = {"w": {"dtype": "F32", "shape": [1 << 62, 1 << 62], "data_offsets": [0, 16]}}
    hf("hf-shape-overflow", "shape whose size overflows 64 bits", model__safetensors=st_bytes(overflow, b"\0" * 16))
    hf("hf-header-not-json", "header of random bytes",
       model__safetensors=st_bytes(bytes(range(256)) * 4, b""))
    hf("hf-header-nested", "header nested 100k deep", model__safetensors=st_bytes(deep_json().encode()))
    bad_dtype = {"w": {"dtype": "F99", "shape": [4], "data_offsets": [0, 16]}}
    hf("hf-unknown-dtype", "dtype F99", model__safetensors=st_bytes(bad_dtype, b"\0" * 16))
    hf("hf-wrong-shape", "w1 of layer 1 with 63 rows instead of 64", names="hf-wrong-shape",
       model__safetensors=hf_files({"layers.1.feed_forward.w1.weight": np.zeros((63, 16), np.float32)})[
           "model.safetensors"])
    for name, about, config in [
        ("hf-config-not-json", "config.json is not JSON", "{'hidden_size': 16"),
        ("hf-config-list", "config.json is a list", "[1, 2, 3]"),
        ("hf-config-nested", "config.json nested 100k deep", deep_json()),
        ("hf-config-huge-int", "a 5000-digit number in config.json", '{"hidden_size": ' + "9" * 5000 + "}"),
        ("hf-config-string-dim", "hidden_size is a string", json.dumps({**json.loads(ok["config.json"]),
                                                                         "hidden_size": "16"})),
        ("hf-config-zero-heads", "num_attention_heads 0", json.dumps({**json.loads(ok["config.json"]),
                                                                      "num_attention_heads": 0})),
        ("hf-config-negative-vocab", "vocab_size -32", json.dumps({**json.loads(ok["config.json"]),
                                                                  "vocab_size": -32})),
        ("hf-config-rope-list", "rope_scaling is a list", json.dumps({**json.loads(ok["config.json"]),
                                                                    "rope_scaling": [1, 2]})),
    ]:
        hf(name, about, names="config.json", config__json=config)
    hf("hf-config-invalid-utf8", "config.json is not UTF-8", names="config.json", config__json=b'{"a": "\xff\xfe"}')
    hf("hf-config-billion-layers", "num_hidden_layers 10^9 (must not build them)", names="hf-config-billion-layers",
       config__json=json.dumps({**json.loads(ok["config.json"]), "num_hidden_layers": 10**9}))
    for name, about, target in [("hf-index-traversal", "index names ../hf-ok/model.safetensors",
                                 "../hf-ok/model.safetensors"),
                                ("hf-index-absolute", "index names /etc/passwd", "/etc/passwd")]:
        index = json.dumps({"weight_map": {"model.embed_tokens.weight": target}})
        c.folder("base", name, {"config.json": ok["config.json"], "model.safetensors.index.json": index},
                 "CheckpointError", about, "model.safetensors.index.json")

    # GGUF files
    good = gguf_file()
    c.file("base", "ok.gguf", good, None, "valid tiny Llama GGUF (control)")

    def gg(name: str, about: str, data: bytes, expect: str = "CheckpointError") -> None:
        c.file("base", name, data, expect, about)

    gg("gguf-empty.gguf", "0 bytes", b"")
    gg("gguf-truncated-data.gguf", "cut inside the tensor data", good[: len(good) - 1000])
    gg("gguf-truncated-header.gguf", "cut inside the metadata", good[:300])
    gg("gguf-bad-magic.gguf", "magic GGUX", b"GGUX" + good[4:])
    gg("gguf-version-99.gguf", "version 99", gguf_file(version=99))
    gg("gguf-string-length-2e62.gguf", "first key claims 2^62 bytes",
       b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 62) + b"general.name")
    gg("gguf-tensor-count-2e60.gguf", "2^60 tensors", gguf_file(n_tensors=1 << 60))
    gg("gguf-kv-count-2e60.gguf", "2^60 metadata entries", gguf_file(n_kv=1 << 60))
    gg("gguf-array-count-2e60.gguf", "a uint8 array claiming 2^60 items (gguf's reader loops forever)",
       b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + g_str("k") + struct.pack("<IIQ", ARRAY, U8, 1 << 60) + b"\1" * 64)
    gg("gguf-string-array-past-eof.gguf", "a string array running past the end",
       gguf_file(raw_kvs=g_str("x") + struct.pack("<IIQ", ARRAY, STRING, 1000) + g_str("a") * 3))
    gg("gguf-tensor-1tb.gguf", "a tensor claiming 2^20 x 2^20 floats", gguf_file(dims={"token_embd.weight": [1 << 20,
                                                                                                           1 << 20]}))
    gg("gguf-offset-past-eof.gguf", "a tensor offset past the end", gguf_file(offsets={"output.weight": 1 << 40}))
    gg("gguf-too-many-dims.gguf", "a tensor with 1000 dimensions",
       gguf_file(dims={"output_norm.weight": [1] * 1000}))
    gg("gguf-unknown-tensor-type.gguf", "tensor type 999", gguf_file(types={"output_norm.weight": 999}))
    gg("gguf-unknown-value-type.gguf", "metadata value type 99",
       gguf_file(raw_kvs=g_str("x") + struct.pack("<I", 99) + b"\0" * 16))
    nested = struct.pack("<IIQ", ARRAY, ARRAY, 1) + struct.pack("<IQ", ARRAY, 1) * 20 + struct.pack("<IQ", U8, 0)
    gg("gguf-nested-arrays.gguf", "arrays nested 20 deep", gguf_file(raw_kvs=g_str("x") + nested))
    gg("gguf-bad-alignment.gguf", "general.alignment 3", gguf_file(gguf_kvs(general__alignment=(U32, 3))))
    gg("gguf-duplicate-key.gguf", "a key written twice", gguf_file(gguf_kvs() + [("general.name", STRING, "x")]))
    gg("gguf-arch-gpt2.gguf", "architecture gpt2", gguf_file(gguf_kvs(general__architecture=(STRING, "gpt2"))))
    gg("gguf-block-count-string.gguf", "llama.block_count is a string",
       gguf_file(gguf_kvs(llama__block_count=(STRING, "two"))))
    gg("gguf-billion-layers.gguf", "llama.block_count 10^9 (must not build them)",
       gguf_file(gguf_kvs(llama__block_count=(U32, 10**9))))
    gg("gguf-zero-heads.gguf", "head_count 0", gguf_file(gguf_kvs(llama__attention__head_count=(U32, 0))))
    gg("gguf-name-not-utf8.gguf", "general.name is not UTF-8", gguf_file(gguf_kvs(general__name=(STRING, b"\xff\xfe"))))
    gg("gguf-tokens-are-ints.gguf", "tokenizer.ggml.tokens holds integers",
       gguf_file(gguf_kvs(tokenizer__ggml__tokens=(ARRAY, (U32, list(range(32)))))), "TokenizerError")
    gg("gguf-wrong-shape.gguf", "token_embd of the wrong shape",
       gguf_file(dims={"token_embd.weight": [16, 31]}))

    # Meta directories
    state = {k: torch.from_numpy(v) for k, v in tiny_tensors().items()}
    meta_dir = c.folder("base", "meta-ok", {"params.json": meta_params()}, None, "valid Meta checkpoint (control)")
    torch_save(state, meta_dir / "consolidated.00.pth")
    valid_pth = (meta_dir / "consolidated.00.pth").read_bytes()

    def meta(name: str, about: str, shard: bytes | None = None, names: str = "consolidated.00.pth",
             params: str | None = None) -> Path:
        files: dict[str, bytes | str] = {"params.json": params or meta_params()}
        if shard is not None:
            files["consolidated.00.pth"] = shard
        return c.folder("base", name, files, "CheckpointError", about, names)

    torch_save({"w": Payload(c.marker("meta-pickle"))}, meta(
        "meta-pickle", "a __reduce__ payload in a zip .pth") / "consolidated.00.pth")
    torch_save({"w": Payload(c.marker("meta-legacy-pickle"))}, meta(
        "meta-legacy-pickle", "a __reduce__ payload in a legacy .pth") / "consolidated.00.pth", legacy=True)
    meta("meta-raw-pickle", "a bare pickle with a __reduce__ payload",
         pickle.dumps({"w": Payload(c.marker("meta-raw-pickle"))}))
    torch_save(state, meta("meta-legacy-format", "a valid state dict in the legacy format") / "consolidated.00.pth",
               legacy=True)
    zip_pth_with_storage(meta("meta-storage-1tb", "a zip storage claiming 2^38 floats") / "consolidated.00.pth",
                         "tok_embeddings.weight", 1 << 38, (1 << 38,))
    legacy_pth_with_storage(meta("meta-legacy-storage-1tb", "a legacy storage claiming 2^38 floats")
                            / "consolidated.00.pth", "tok_embeddings.weight", 1 << 38)
    meta("meta-truncated", "consolidated.00.pth cut in half", valid_pth[: len(valid_pth) // 2])
    torch_save(list(state.values()), meta("meta-list", "a list of tensors, not a dict") / "consolidated.00.pth")
    torch_save({**state, "norm.weight": 3}, meta("meta-int-value", "an int where a tensor belongs")
               / "consolidated.00.pth")
    for name, about, params in [("meta-params-nested", "params.json nested 100k deep", deep_json()),
                                ("meta-params-string", "n_layers is a string", meta_params(n_layers="2")),
                                ("meta-params-zero-multiple", "multiple_of 0", meta_params(multiple_of=0))]:
        shard_dir = meta(name, about, names="params.json", params=params)
        (shard_dir / "consolidated.00.pth").write_bytes(valid_pth)
    shard_dir = meta("meta-billion-layers", "n_layers 10^9 (must not build them)", names="meta-billion-layers",
                     params=meta_params(n_layers=10**9))
    (shard_dir / "consolidated.00.pth").write_bytes(valid_pth)
    two = meta("meta-shards-disagree", "two shards with different tensors", names="meta-shards-disagree")
    torch_save(state, two / "consolidated.00.pth")
    torch_save({k: v for k, v in state.items() if k != "norm.weight"}, two / "consolidated.01.pth")


def tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


def sentencepiece_model() -> bytes:
    import sentencepiece as spm

    lines = ["the quick brown fox jumps over the lazy dog", "hello world", "a model of words"] * 20
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, vocab_size=40,
                                   model_type="bpe", hard_vocab_limit=False, minloglevel=2)
    return out.getvalue()


def tokenizer_cases(c: Corpus) -> None:
    good_json, good_model = tokenizer_json(), sentencepiece_model()
    c.file("tokenizer", "ok.json", good_json, None, "valid tokenizer.json (control)")
    c.file("tokenizer", "ok.model", good_model, None, "valid SentencePiece model (control)")
    c.file("tokenizer", "ok.gguf", gguf_file(tensors=[]), None, "valid GGUF vocabulary (control)")
    bad = "TokenizerError"
    c.file("tokenizer", "truncated.json", good_json[: len(good_json) // 2], bad, "tokenizer.json cut in half")
    c.file("tokenizer", "binary.json", bytes(range(256)) * 8, bad, "random bytes")
    c.file("tokenizer", "nested.json", deep_json(), bad, "nested 100k deep")
    c.file("tokenizer", "model-is-int.json", json.dumps({**json.loads(good_json), "model": 5}), bad,
           "the model field is a number")
    c.file("tokenizer", "garbage.model", bytes(range(256)) * 8, bad, "random bytes as a SentencePiece model")
    c.file("tokenizer", "truncated.model", good_model[: len(good_model) // 2], bad, "SentencePiece model cut in half")
    c.file("tokenizer", "empty.model", b"", bad, "0 bytes")
    for name, about, extra in [
        ("config-nested", "tokenizer_config.json nested 100k deep", {"tokenizer_config.json": deep_json()}),
        ("config-not-utf8", "tokenizer_config.json is not UTF-8", {"tokenizer_config.json": b'{"a": "\xff"}'}),
        ("config-huge-int", "a 5000-digit number", {"tokenizer_config.json": '{"a": ' + "9" * 5000 + "}"}),
        ("template-not-utf8", "chat_template.jinja is not UTF-8", {"chat_template.jinja": b"{{ '\xff' }}"}),
    ]:
        c.folder("tokenizer", name, {"tokenizer.json": good_json, **extra}, bad, about, next(iter(extra)))
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    c.folder("tokenizer", "template-sandbox-escape", {"tokenizer.json": good_json, "tokenizer_config.json":
             json.dumps({"chat_template": escape})}, bad, "a chat template reaching for Python internals",
             "tokenizer.json")
    c.file("tokenizer", "bogus-string.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 62),
           bad, "a string claiming 2^62 bytes")
    c.file("tokenizer", "array-bomb.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + g_str("tokenizer.ggml.tokens")
           + struct.pack("<IIQ", ARRAY, U8, 1 << 60), bad, "an array claiming 2^60 items")
    c.file("tokenizer", "tokens-are-ints.gguf", gguf_file(gguf_kvs(tokenizer__ggml__tokens=(ARRAY, (U32, [1, 2]))),
                                                          tensors=[]), bad, "tokens are integers")
    c.file("tokenizer", "scores-short.gguf", gguf_file(gguf_kvs(tokenizer__ggml__scores=(ARRAY, (F32, [0.0]))),
                                                       tensors=[]), bad, "one score for 32 tokens")
    c.file("tokenizer", "bos-is-string.gguf", gguf_file(gguf_kvs(tokenizer__ggml__bos_token_id=(STRING, "1")),
                                                        tensors=[]), bad, "bos_token_id is a string")
    gpt2 = gguf_kvs(tokenizer__ggml__model=(STRING, "gpt2"), tokenizer__ggml__scores=None,
                    tokenizer__ggml__merges=(ARRAY, (STRING, ["zz qq", "q r"])))
    c.file("tokenizer", "merges-unknown.gguf", gguf_file(gpt2, tensors=[]), bad,
           "merges of tokens not in the vocabulary")


def adapter_cases(c: Corpus) -> None:
    import torch
    from safetensors.torch import save_file

    from mmadapter import load_base
    from mmadapter.adapter_file import METADATA_KEY, save_adapter

    model = load_base("tiny")
    model.add_adapter(seed=0)
    path = c.root / "adapter" / "ok.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_adapter(model, path)
    c.cases.append(Case("adapter/ok.safetensors", "adapter", "adapter/ok.safetensors", None, "ok.safetensors",
                        "valid adapter (control)"))
    good = path.read_bytes()
    meta = json.loads(json.loads(good[8: 8 + struct.unpack("<Q", good[:8])[0]])["__metadata__"][METADATA_KEY])
    tensors = {k: v.detach().clone() for k, v in model.adapter.state_dict().items()}
    bad = "AdapterFileError"

    def with_meta(name: str, about: str, metadata: str, changed: dict[str, torch.Tensor] | None = None) -> None:
        target = c.root / "adapter" / name
        save_file({**tensors, **(changed or {})}, target, metadata={METADATA_KEY: metadata})
        c.cases.append(Case(f"adapter/{name}", "adapter", f"adapter/{name}", bad, name, about))

    c.file("adapter", "truncated.safetensors", good[: len(good) // 2], bad, "cut in half")
    c.file("adapter", "empty.safetensors", b"", bad, "0 bytes")
    c.file("adapter", "text.safetensors", "this is not a safetensors file", bad, "plain text")
    c.file("adapter", "header-length-2e62.safetensors", st_bytes(b"{}", length=1 << 62), bad, "header length 2^62")
    c.file("adapter", "no-metadata.safetensors", st_file({"prompts": np.zeros((2, 10, 64), np.float32)}), bad,
           "a safetensors file without our metadata")
    with_meta("metadata-not-json.safetensors", "metadata is not JSON", "{not json")
    with_meta("metadata-list.safetensors", "metadata is a JSON list", "[1, 2]")
    with_meta("metadata-nested.safetensors", "metadata nested 100k deep", deep_json())
    with_meta("metadata-huge-int.safetensors", "a 5000-digit number", '{"version": ' + "9" * 5000 + "}")
    with_meta("newer-version.safetensors", "format version 99", json.dumps({**meta, "version": 99}))
    with_meta("billion-prompts.safetensors", "n_prompts 10^9 (must not allocate)",
              json.dumps({**meta, "adapter": {**meta["adapter"], "n_prompts": 10**9}}))
    with_meta("huge-dim.safetensors", "base dim 2^40 (must not allocate)",
              json.dumps({**meta, "base": {**meta["base"], "config": {**meta["base"]["config"], "dim": 1 << 40,
                                                                      "n_heads": 1, "n_kv_heads": 1}}}))
    with_meta("negative-dim.safetensors", "base dim -64",
              json.dumps({**meta, "base": {**meta["base"], "config": {**meta["base"]["config"], "dim": -64}}}))
    with_meta("zero-heads.safetensors", "base n_heads 0",
              json.dumps({**meta, "base": {**meta["base"], "config": {**meta["base"]["config"], "n_heads": 0}}}))
    with_meta("config-is-string.safetensors", "adapter config is a string", json.dumps({**meta, "adapter": "big"}))
    with_meta("nan-prompts.safetensors", "prompts hold NaN", json.dumps(meta),
              {"prompts": torch.full_like(tensors["prompts"], float("nan"))})
    with_meta("int-gates.safetensors", "gates stored as integers", json.dumps(meta),
              {"gates": torch.zeros(tensors["gates"].shape, dtype=torch.int32)})
    with_meta("wrong-shape.safetensors", "prompts of the wrong shape", json.dumps(meta),
              {"prompts": torch.zeros(1, 1, 64)})


def interop_cases(c: Corpus) -> None:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    v1 = {"adapter_query.weight": torch.randn(20, 64, generator=gen)}  # tiny preset: 4 layers, dim 64, 4 heads
    for i in range(4):
        v1[f"layers.{i}.attention.gate"] = torch.full((1, 4, 1, 1), 0.1 if i >= 2 else 0.0)
    ok = c.file("interop", "v1-ok.pth", b"", None, "valid LLaMA-Adapter V1 file (control)")
    torch_save(v1, ok)
    bad = "InteropError"

    def v1_file(name: str, about: str) -> Path:
        return c.file("interop", name, b"", bad, about)

    torch_save({**v1, "extra": Payload(c.marker("v1-pickle"))}, v1_file("v1-pickle.pth", "a __reduce__ payload"))
    torch_save({**v1, "extra": Payload(c.marker("v1-legacy-pickle"))},
               v1_file("v1-legacy-pickle.pth", "a payload in the legacy format"), legacy=True)
    v1_file("v1-raw-pickle.pth", "a bare pickle payload").write_bytes(
        pickle.dumps({"adapter_query.weight": Payload(c.marker("v1-raw-pickle"))}))
    zip_pth_with_storage(v1_file("v1-storage-1tb.pth", "a storage claiming 2^38 floats"),
                         "adapter_query.weight", 1 << 38, (1 << 19, 1 << 19))
    legacy_pth_with_storage(v1_file("v1-legacy-storage-1tb.pth", "a legacy storage claiming 2^38 floats"),
                            "adapter_query.weight", 1 << 38)
    v1_file("v1-truncated.pth", "cut in half").write_bytes(ok.read_bytes()[: ok.stat().st_size // 2])
    torch_save({**v1, "adapter_query.weight": 5}, v1_file("v1-query-is-int.pth", "adapter_query is an int"))
    torch_save({**v1, "adapter_query.weight": torch.zeros(20, 64, dtype=torch.int64)},
               v1_file("v1-query-int-tensor.pth", "adapter_query holds integers"))
    torch_save([v1["adapter_query.weight"]], v1_file("v1-list.pth", "a list, not a dict"))

    peft_tensors = {f"base_model.model.model.layers.{i}.self_attn.{part}": value
                    for i in (2, 3) for part, value in (("adaption_prompt", torch.randn(1, 10, 64, generator=gen)),
                                                        ("adaption_gate", torch.full((1,), 0.1)))}
    peft_config = json.dumps({"peft_type": "ADAPTION_PROMPT", "adapter_len": 10, "adapter_layers": 2,
                              "target_modules": "self_attn"})
    ok_dir = c.folder("interop", "peft-ok", {"adapter_config.json": peft_config}, None, "valid PEFT adapter (control)")
    save_file(peft_tensors, ok_dir / "adapter_model.safetensors")
    good = (ok_dir / "adapter_model.safetensors").read_bytes()

    def peft(name: str, about: str, names: str, **files: bytes | str) -> Path:
        return c.folder("interop", name, {k.replace("__", "."): v for k, v in files.items()}, bad, about, names)

    for name, about, config in [("peft-config-nested", "adapter_config.json nested 100k deep", deep_json()),
                                ("peft-config-list", "adapter_config.json is a list", "[1]"),
                                ("peft-config-not-utf8", "adapter_config.json is not UTF-8", b'{"\xff": 1}')]:
        peft(name, about, "adapter_config.json", adapter_config__json=config, adapter_model__safetensors=good)
    peft("peft-truncated", "adapter_model.safetensors cut in half", "adapter_model.safetensors",
         adapter_config__json=peft_config, adapter_model__safetensors=good[: len(good) // 2])
    peft("peft-wrong-keys", "a tensor that is no adaption prompt", "peft-wrong-keys", adapter_config__json=peft_config,
         adapter_model__safetensors=st_file({"lm_head.weight": np.zeros((4, 4), np.float32)}))
    folder = peft("peft-bin-pickle", "adapter_model.bin with a __reduce__ payload", "adapter_model.bin",
                  adapter_config__json=peft_config)
    torch_save({**peft_tensors, "x": Payload(c.marker("peft-bin-pickle"))}, folder / "adapter_model.bin")
    folder = peft("peft-bin-ints", "adapter_model.bin holding ints", "adapter_model.bin",
                  adapter_config__json=peft_config)
    torch_save({k: 1 for k in peft_tensors}, folder / "adapter_model.bin")


def data_cases(c: Corpus) -> None:
    record = {"instruction": "Say hi.", "output": "Hi!"}
    c.file("data", "ok.json", json.dumps([record]), None, "valid JSON list (control)")
    c.file("data", "ok.jsonl", json.dumps(record) + "\n", None, "valid JSON Lines (control)")
    c.file("data", "bom.json", "\ufeff" + json.dumps([record]), None, "valid, with a UTF-8 byte-order mark")
    hostile_records = [{"instruction": ["a"], "output": "b"}, {"instruction": "a", "output": "b", "image": "x\0y.png"},
                       {"instruction": "a", "output": "b", "image": "x" * 5000 + ".png"}, {"conversations": "no"},
                       {"question": "q", "answer": "a", "image": {"path": 5}}, [1, 2], None, "text"]
    c.file("data", "hostile-records.jsonl", "\n".join(map(json.dumps, hostile_records)), None,
           "wrongly typed records: skipped and counted, never fatal")
    bad = "DataError"
    c.file("data", "not-utf8.json", b'[{"instruction": "\xff"}]', bad, "not UTF-8")
    c.file("data", "nested.json", deep_json(), bad, "nested 100k deep")
    c.file("data", "huge-int.json", huge_int_json(), bad, "a 5000-digit number")
    c.file("data", "object.json", '{"instruction": "a", "output": "b", "x": ', bad, "a truncated object")
    c.file("data", "binary.jsonl", bytes(range(256)) * 8, bad, "random bytes")
    c.file("data", "all-lines-nested.jsonl", "\n".join([deep_json(5000)] * 3), bad, "every line nested too deep")
    c.file("data", "empty.json", b"", bad, "0 bytes")
    c.file("data", "number.json", "42", bad, "a JSON number, not a list of records")
    (c.root / "data" / "folder.json").mkdir()
    c.cases.append(Case("data/folder.json", "data", "data/folder.json", bad, "folder.json", "a directory"))


def scienceqa_cases(c: Corpus) -> None:
    problem = {"question": "Which colour?", "choices": ["red", "blue"], "answer": 0, "hint": "", "image": "image.png",
               "subject": "natural science", "grade": "grade1", "split": "test"}
    splits = json.dumps({"test": ["1"]})
    png = small_image("PNG")

    def sqa(name: str, expect: str | None, about: str, names: str, problems: str | bytes, pid_splits: str = splits,
            image: bytes = png) -> None:
        c.folder("scienceqa", name, {"problems.json": problems, "pid_splits.json": pid_splits,
                                     "images/test/1/image.png": image}, expect, about, names)

    sqa("ok", None, "valid release layout (control)", "ok", json.dumps({"1": problem}))
    bad = "ScienceQAError"
    sqa("problems-not-json", bad, "problems.json is not JSON", "problems.json", "{'1': ")
    sqa("problems-nested", bad, "problems.json nested 100k deep", "problems.json", deep_json())
    sqa("problems-not-utf8", bad, "problems.json is not UTF-8", "problems.json", b'{"1": "\xff"}')
    sqa("problems-huge-int", bad, "a 5000-digit number", "problems.json", '{"1": ' + "9" * 5000 + "}")
    sqa("problems-list", bad, "problems.json is a list", "problems.json", "[1, 2]")
    sqa("splits-not-list", bad, "a split that is a number", "pid_splits.json", json.dumps({"1": problem}),
        pid_splits=json.dumps({"test": 5}))
    sqa("image-bomb", bad, "the problem's image claims 100k x 100k pixels", "image.png",
        json.dumps({"1": problem}), image=png_claiming(100_000, 100_000))
    sqa("image-not-image", bad, "the problem's image is text", "image.png", json.dumps({"1": problem}), image=b"hello")
    sqa("image-traversal", None, "image names ../../../ok/images/test/1/image.png: treated as missing", "",
        json.dumps({"1": {**problem, "image": "../../../ok/images/test/1/image.png"}}))
    sqa("split-traversal", None, "the record's split is ../../ok/images/test: treated as missing", "",
        json.dumps({"1": {**problem, "split": "../../ok/images/test"}}))
    sqa("split-is-list", None, "the record's split is a list: the requested split is used", "",
        json.dumps({"1": {**problem, "split": ["x"]}}))


def image_cases(c: Corpus) -> None:
    c.file("image", "ok.png", small_image("PNG"), None, "valid PNG (control)")
    bad = "ImageError"
    png = small_image("PNG")
    c.file("image", "truncated.png", png[: len(png) // 2], bad, "cut in half")
    c.file("image", "empty.png", b"", bad, "0 bytes")
    c.file("image", "text.jpg", "this is not an image", bad, "text")
    c.file("image", "pickle.png", pickle.dumps({"x": Payload(c.marker("image-pickle"))}), bad, "a pickle payload")
    c.file("image", "bomb.png", png_claiming(100_000, 100_000), bad, "PNG header claiming 10^10 pixels")
    c.file("image", "bomb.gif", patched(small_image("GIF"), 6, "<HH", 65535, 65535), bad,
           "GIF screen of 65535 x 65535")
    c.file("image", "bomb.bmp", patched(small_image("BMP"), 18, "<ii", 100_000, 100_000), bad,
           "BMP header claiming 10^10 pixels")
    c.file("image", "bomb.jpg", jpeg_claiming(65_000, 65_000), bad, "JPEG frame of 65000 x 65000")
    c.file("image", "bomb.tif", tiff_claiming(100_000, 100_000), bad, "TIFF tags claiming 10^10 pixels")
    c.file("image", "bomb.ppm", b"P6 100000 100000 255\n" + b"\0" * 30, bad, "PPM header claiming 10^10 pixels")
    c.file("image", "text-bomb.png", png_with_text_bomb(), bad, "a zTXt chunk inflating to 8 MB")
    c.file("image", "postscript.eps", "%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", bad,
           "EPS (would run Ghostscript): not an allowed format")
    c.file("image", "svg.png", '<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>', bad,
           "SVG with a script")
    (c.root / "image" / "folder.png").mkdir()
    c.cases.append(Case("image/folder.png", "image", "image/folder.png", bad, "folder.png", "a directory"))


BUILDERS = (base_cases, tokenizer_cases, adapter_cases, interop_cases, data_cases, scienceqa_cases, image_cases)


def build(root: str | Path) -> list[Case]:
    """Write the corpus under `root` (emptied first) and return its cases; also writes root/cases.json."""
    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    corpus = Corpus(root)
    for builder in BUILDERS:
        builder(corpus)
    (root / "cases.json").write_text(json.dumps([asdict(case) for case in corpus.cases], indent=1))
    return corpus.cases


def load_cases(root: str | Path) -> list[Case]:
    return [Case(**d) for d in json.loads((Path(root) / "cases.json").read_text())]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUTDIR")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for `mmadapter`
    cases = build(sys.argv[1])
    print(f"wrote {len(cases)} cases ({sum(c.expect is None for c in cases)} controls) to {sys.argv[1]}")
