"""The frozen-prefix cache: hidden states below the first adapted layer, stored once per sample.

Layers below the adapter are frozen and attention is causal with right padding, so their output
for a sample's real tokens depends on those tokens only — not on the batch, its padding, the step
or the adapter. The trainer stores it per sample, unpadded ([T_i, C]), the first time a sample is
seen and later starts the forward pass at the first adapted layer (`MMAdapter.loss(prefix=...)`),
skipping the bottom layers entirely.

Keys are content hashes of (base fingerprint, first adapted layer, dtype, token ids), so a stale
entry can never be served to another base, adapter depth or dataset, and a disk cache directory can
be shared by the processes of a distributed run and reused by a resumed one.
Modes: "memory" (a dict), "disk" (one safetensors file per sample under `directory`). Entries are
admitted until `max_mb` is reached; samples beyond the bound are simply recomputed every time.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from .atomic import atomic_save

log = logging.getLogger(__name__)

class PrefixCache:
    def __init__(self, mode: str, max_mb: float, namespace: str, directory: str | os.PathLike | None = None) -> None:
        if mode not in ("memory", "disk"):
            raise ValueError(f"prefix cache mode {mode!r}: use 'memory' or 'disk' ('off' means no PrefixCache)")
        if mode == "disk" and directory is None:
            raise ValueError("a disk prefix cache needs a directory")
        if max_mb < 0:
            raise ValueError(f"prefix cache size bound {max_mb} MB must be >= 0")
        self.mode, self.max_bytes, self.namespace = mode, int(max_mb * 2**20), namespace
        self.directory = Path(directory) if directory is not None else None
        self._memory: dict[str, Tensor] = {}
        self.stored_bytes = 0
        self.hits = self.misses = self.rejected = 0

    def key(self, tokens: list[int]) -> str:
        digest = hashlib.sha256(self.namespace.encode())
        digest.update(torch.tensor(tokens, dtype=torch.int64).numpy().tobytes())
        return digest.hexdigest()

    def get(self, key: str) -> Tensor | None:
        """The stored [T, C] prefix (on CPU), or None."""
        found = self._memory.get(key) if self.mode == "memory" else self._read(key)
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def put(self, key: str, hidden: Tensor) -> bool:
        """Store a [T, C] prefix if the size bound allows it; False when it did not fit."""
        size = hidden.numel() * hidden.element_size()
        if self.stored_bytes + size > self.max_bytes:
            self.rejected += 1
            return False
        hidden = hidden.detach().to("cpu").contiguous()
        if self.mode == "memory":
            self._memory[key] = hidden.clone()
        elif not self._write(key, hidden):
            return False
        self.stored_bytes += size
        return True

    def stats(self) -> dict[str, float]:
        return {"mode": self.mode, "hits": self.hits, "misses": self.misses, "rejected": self.rejected,
                "stored_mb": round(self.stored_bytes / 2**20, 2)}

    def _path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / key[:2] / f"{key}.safetensors"

    def _read(self, key: str) -> Tensor | None:
        from safetensors.torch import load_file

        path = self._path(key)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))["hidden"]
        except Exception as e:  # a torn or foreign file costs a recomputation, never a wrong result
            log.warning("ignoring unreadable prefix cache entry %s (%s)", path, e)
            return None

    def _write(self, key: str, hidden: Tensor) -> bool:
        from safetensors.torch import save_file

        path = self._path(key)
        try:  # readers see no file or a whole one; an entry lost to a power cut is recomputed
            atomic_save(path, lambda tmp: save_file({"hidden": hidden}, tmp), durable=False)
            return True
        except OSError as e:  # a full disk costs speed, not correctness
            log.warning("could not write the prefix cache entry %s: %s", path, e)
            return False


def gather_prefix(cache: PrefixCache, compute: Callable[[Tensor], Tensor], tokens: Tensor, lengths: list[int],
                  keys: list[str]) -> Tensor:
    """Prefix hidden states [B, T, C] for a right-padded batch, from the cache where possible.

    compute(tokens [b, T]) -> [b, T, C] runs the frozen bottom layers for the rows not cached; the
    new rows are stored. Padding positions of cached rows are zero: causal attention never lets a
    real position see them, and they carry no label.
    """
    found = [cache.get(key) for key in keys]
    missing = [i for i, row in enumerate(found) if row is None]
    computed = compute(tokens[missing]) if missing else None  # [m, T, C]
    if computed is not None and len(missing) == len(keys):
        hidden = computed
    else:
        reference = computed if computed is not None else next(row for row in found if row is not None)
        b, t = tokens.shape
        hidden = torch.zeros(b, t, reference.shape[-1], dtype=reference.dtype, device=tokens.device)
        for i, row in enumerate(found):
            if row is not None:
                hidden[i, :row.shape[0]] = row.to(tokens.device)
        if computed is not None:
            hidden[missing] = computed
    for j, i in enumerate(missing):
        cache.put(keys[i], computed[j, :lengths[i]])
    return hidden
