"""Reading weight files we did not write, without trusting what their headers claim.

- PyTorch files: only the zip format (what `torch.save` has written since PyTorch 1.6), loaded with
  `weights_only=True` and memory-mapped. The legacy format is refused: its loader allocates every
  storage at the size the file declares before reading it, so a few bytes can ask for a terabyte.
- GGUF files: `check_gguf_header` walks the header with every count and length checked against the
  bytes that are really there, before `gguf.GGUFReader` (which trusts them) parses it. Without it, an
  array claiming 2^60 one-byte items makes the reader loop forever, growing memory at each step.

- JSON files: `read_json_object` turns every way a config file can be broken (unreadable, bad UTF-8,
  not JSON, nested past the recursion limit, a 5000-digit number, not an object) into one error.

All raise `ValueError` with what was wrong; callers prefix the file name and use their own error type.
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

# GGUF value types (gguf.GGUFValueType) -> struct format of one item; STRING = 8 and ARRAY = 9 vary.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
GGUF_VERSIONS = (2, 3)
GGUF_MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
# All array items of a header together. The largest real vocabularies (Gemma 3: 262k tokens, scores and
# types; Llama 3: 128k tokens + 280k merges) need under a million; gguf.GGUFReader builds one numpy
# object per item (about 1 KB each), so this also bounds its memory.
GGUF_MAX_ARRAY_ITEMS = 1 << 21
GGUF_MAX_NESTING = 4  # arrays of arrays


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says which file, what was wrong and what to do."""


def load_torch_weights(path: str | os.PathLike) -> Any:
    """The object in a zip-format PyTorch file, unpickled weights-only and memory-mapped."""
    import torch

    if not zipfile.is_zipfile(path):
        raise ValueError("not a zip-format PyTorch file (the format torch.save writes since PyTorch 1.6): it is "
                         "truncated, or a legacy pickle file, which is never loaded (re-save it with a recent torch)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:  # torch's message goes on to explain how to load it unsafely
        detail = re.search(r"WeightsUnpickler error: ([^.\n]*)", str(e))
        raise ValueError("it holds Python objects other than tensors, which are never unpickled"
                         + (f" ({detail.group(1)})" if detail else "")) from None


def check_gguf_header(path: str | os.PathLike) -> None:
    """Raise ValueError unless the GGUF header's counts, lengths and tensor extents fit in the file."""
    path = Path(path)
    if path.stat().st_size < 24:
        raise ValueError(f"{path.stat().st_size} bytes is too short for a GGUF header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        _GGUFHeader(data).check()


class _GGUFHeader:
    """A cursor over the header that refuses to read, skip or count past the end of the file."""

    def __init__(self, data: mmap.mmap) -> None:
        self.data, self.pos, self.order = data, 0, "<"
        self.items = 0  # array items seen so far

    def check(self) -> None:
        if self.data[:4] != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        version = struct.unpack_from("<I", self.data, 4)[0]
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            self.order, version = ">", struct.unpack_from(">I", self.data, 4)[0]
        if version not in GGUF_VERSIONS:
            raise ValueError(f"GGUF version {version} is not supported (versions {GGUF_VERSIONS} are)")
        self.pos = 8
        n_tensors, n_kv = self.read("Q"), self.read("Q")
        self.check_count(n_kv, 8 + 4 + 1, "metadata entries")  # key length, type, a one-byte value
        alignment = 32
        for _ in range(n_kv):
            key = self.string()
            kind = self.read("I")
            value = self.value(kind, key, depth=0)
            if key == b"general.alignment":
                if kind != 4 or not value or value & (value - 1):
                    raise ValueError(f"general.alignment must be a power of two (uint32), got {value!r}")
                alignment = value
        self.check_count(n_tensors, 8 + 4 + 4 + 8, "tensor infos")  # name length, n_dims, type, offset
        extents = [self.tensor_info() for _ in range(n_tensors)]
        data_start = -(-self.pos // alignment) * alignment
        room = len(self.data) - data_start
        for name, offset, n_bytes in extents:
            if offset + n_bytes > room:
                raise ValueError(f"tensor {name} claims bytes {offset:,}..{offset + n_bytes:,} of the data section "
                                 f"but the file holds {max(room, 0):,}; the file is truncated or corrupt")

    def read(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, f"a {size}-byte field")
        value = struct.unpack_from(self.order + fmt, self.data, self.pos)[0]
        self.pos += size
        return value

    def need(self, n_bytes: int, what: str) -> None:
        if n_bytes > len(self.data) - self.pos:
            raise ValueError(f"{what} at offset {self.pos:,} needs {n_bytes:,} bytes but the file ends at "
                             f"{len(self.data):,}; the file is truncated or corrupt")

    def check_count(self, count: int, min_bytes_each: int, what: str) -> None:
        if count * min_bytes_each > len(self.data) - self.pos:
            raise ValueError(f"the header claims {count:,} {what}, more than the {len(self.data):,}-byte file "
                             "can hold; the file is corrupt")

    def string(self) -> bytes:
        length = self.read("Q")
        self.need(length, f"a string of {length:,} bytes")
        self.pos += length
        return self.data[self.pos - length:self.pos]

    def skip_string(self) -> None:
        length = self.read("Q")
        self.need(length, f"a string of {length:,} bytes")
        self.pos += length

    def skip_strings(self, count: int, key: bytes) -> None:
        """`skip_string` `count` times, unrolled: vocabularies hold hundreds of thousands."""
        data, pos, end = self.data, self.pos, len(self.data)
        unpack = struct.Struct(self.order + "Q").unpack_from
        for _ in range(count):
            if pos + 8 > end:
                break
            pos += 8 + unpack(data, pos)[0]
            if pos > end:
                break
        else:
            self.pos = pos
            return
        raise ValueError(f"the strings of {key[:80]!r} run past the end of the {end:,}-byte file; "
                         "the file is truncated or corrupt")

    def value(self, kind: int, key: bytes, depth: int) -> Any:
        if kind in _GGUF_SCALARS:
            return self.read(_GGUF_SCALARS[kind])
        if kind == _GGUF_STRING:
            self.skip_string()
            return None
        if kind != _GGUF_ARRAY:
            raise ValueError(f"metadata {key[:80]!r} has unknown value type {kind}")
        if depth >= GGUF_MAX_NESTING:
            raise ValueError(f"metadata {key[:80]!r} nests arrays more than {GGUF_MAX_NESTING} deep")
        item_kind, count = self.read("I"), self.read("Q")
        self.items += count
        if self.items > GGUF_MAX_ARRAY_ITEMS:
            raise ValueError(f"metadata arrays hold more than {GGUF_MAX_ARRAY_ITEMS:,} items in all "
                             f"({key[:80]!r} claims {count:,}); no real vocabulary is that large")
        if item_kind in _GGUF_SCALARS:
            n_bytes = count * struct.calcsize(_GGUF_SCALARS[item_kind])
            self.need(n_bytes, f"the {count:,} items of {key[:80]!r}")
            self.pos += n_bytes
        elif item_kind == _GGUF_STRING:
            self.check_count(count, 8, f"strings in {key[:80]!r}")
            self.skip_strings(count, key)
        elif item_kind == _GGUF_ARRAY:
            self.check_count(count, 12, f"arrays in {key[:80]!r}")
            for _ in range(count):
                self.value(_GGUF_ARRAY, key, depth + 1)
        else:
            raise ValueError(f"metadata {key[:80]!r} is an array of unknown type {item_kind}")
        return None

    def tensor_info(self) -> tuple[str, int, int]:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        name = self.string().decode("utf-8", "replace")[:200]
        n_dims = self.read("I")
        if n_dims > GGUF_MAX_DIMS:
            raise ValueError(f"tensor {name} has {n_dims} dimensions (at most {GGUF_MAX_DIMS})")
        dims = [self.read("Q") for _ in range(n_dims)]
        kind, offset = self.read("I"), self.read("Q")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise ValueError(f"tensor {name} has unknown type {kind}") from None
        n_elements = 1
        for d in dims:
            n_elements *= d
        if n_elements >= 1 << 50 or (dims and dims[0] % block):
            raise ValueError(f"tensor {name} has an impossible shape {dims} for its type")
        return name, offset, n_elements // block * type_size


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or a ValueError saying why there is none."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or UTF-8, a 5000-digit number
        raise ValueError(f"cannot read JSON ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, found a {type(data).__name__}")
    return data
