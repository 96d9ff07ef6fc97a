"""Frozen image features, computed once per (tower, picture).

The tower is frozen, so a picture's features never change: training epochs and repeated questions
about the same upload reuse them. Two levels: an in-memory LRU and an optional directory of
safetensors files that survives restarts. Keys are (tower fingerprint, image content hash): another
tower, other weights or another n_scales never read these features, and the same picture reached
by path, bytes or PIL shares one entry.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Protocol, Sequence

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .atomic import atomic_write_bytes
from .images import DEFAULT_MAX_PIXELS, ImageSource, image_hash, load_image

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (tower fingerprint, image content hash)


class Tower(Protocol):
    """What the cache needs from a tower (VisionTower provides it)."""

    fingerprint: str
    feature_dim: int

    @property
    def device(self) -> torch.device: ...

    def preprocess_batch(self, images: Sequence[Image.Image]) -> torch.Tensor: ...

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor: ...


class FeatureCache:
    """In-memory LRU of up to `max_items` feature vectors, backed by `disk_dir` when given.

    Counters, per image asked for: `hits` (found in memory or on disk, `disk_hits` of them on
    disk, or a repeat within the same call), `misses` (not found), and `tower_calls` (images
    actually encoded; below `misses` when a concurrent call encoded the same picture first).
    Safe to share between threads: lookups run concurrently, tower batches one at a time.
    """

    def __init__(self, max_items: int = 4096, disk_dir: str | os.PathLike | None = None) -> None:
        if max_items < 0:
            raise ValueError(f"max_items={max_items} must be >= 0 (0 keeps nothing in memory)")
        self.max_items = max_items
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self._memory: OrderedDict[Key, torch.Tensor] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()  # guards _memory and the counters
        self._encode_lock = threading.Lock()  # one tower batch at a time
        self.hits = self.disk_hits = self.misses = self.tower_calls = 0

    def __len__(self) -> int:
        return len(self._memory)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(items=len(self._memory), hits=self.hits, disk_hits=self.disk_hits,
                        misses=self.misses, tower_calls=self.tower_calls)

    def clear(self) -> None:
        """Forget the in-memory entries (the disk cache stays)."""
        with self._lock:
            self._memory.clear()

    def features(
        self,
        tower: Tower,
        images: Sequence[ImageSource],
        *,
        batch_size: int = 32,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> torch.Tensor:
        """Images (paths, bytes, PIL, arrays) -> [B, feature_dim] on the tower's device; encodes misses only."""
        if not images:
            raise ValueError("features() needs at least one image")
        pictures: dict[Key, Image.Image] = {}
        keys: list[Key] = []
        for source in images:
            picture = load_image(source, max_pixels=max_pixels)
            key = (tower.fingerprint, image_hash(picture))
            pictures.setdefault(key, picture)
            keys.append(key)

        found = self._lookup(list(pictures), tower.feature_dim)
        missing = [key for key in pictures if key not in found]
        with self._lock:
            self.misses += len(missing)
            self.hits += len(keys) - len(missing)
        if missing:
            with self._encode_lock:
                found.update(self._lookup(missing, tower.feature_dim, count=False))  # a concurrent call's work
                to_encode = [key for key in missing if key not in found]
                for start in range(0, len(to_encode), batch_size):
                    batch = to_encode[start:start + batch_size]
                    pixels = tower.preprocess_batch([pictures[key] for key in batch])  # [b, 3, H, W]
                    encoded = tower(pixels).float().cpu()  # [b, feature_dim]
                    with self._lock:
                        self.tower_calls += len(batch)
                    for key, row in zip(batch, encoded):
                        found[key] = row.clone()  # own storage, not a view of the batch
                        self._remember(key, found[key])
                        self._write_disk(key, found[key])
        return torch.stack([found[key] for key in keys]).to(tower.device)  # [B, feature_dim]

    # --- memory ---------------------------------------------------------------------------------

    def _lookup(self, keys: Sequence[Key], feature_dim: int, count: bool = True) -> dict[Key, torch.Tensor]:
        found: dict[Key, torch.Tensor] = {}
        with self._lock:
            for key in keys:
                if key in self._memory:
                    self._memory.move_to_end(key)
                    found[key] = self._memory[key]
        for key in keys:
            if key not in found and (row := self._read_disk(key, feature_dim)) is not None:
                found[key] = row
                self._remember(key, row)
                if count:
                    with self._lock:
                        self.disk_hits += 1
        return found

    def _remember(self, key: Key, row: torch.Tensor) -> None:
        if self.max_items == 0:
            return
        with self._lock:
            self._memory[key] = row
            self._memory.move_to_end(key)
            while len(self._memory) > self.max_items:
                self._memory.popitem(last=False)

    # --- disk -----------------------------------------------------------------------------------

    def _path(self, key: Key) -> Path:
        assert self.disk_dir is not None
        fingerprint, content = key
        # Readable directory per tower; the digest suffix keeps sanitised names from colliding.
        readable = re.sub(r"[^A-Za-z0-9._+-]", "_", fingerprint)
        folder = f"{readable}-{hashlib.sha256(fingerprint.encode()).hexdigest()[:8]}"
        return self.disk_dir / folder / f"{content}.safetensors"

    def _read_disk(self, key: Key, feature_dim: int) -> torch.Tensor | None:
        if self.disk_dir is None:
            return None
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            row = load_safetensors(data)["features"]
        except (SafetensorError, KeyError, ValueError) as e:
            log.warning("ignoring unreadable cached features %s (%s); they will be recomputed", path, e)
            return None
        if row.shape != (feature_dim,):
            log.warning("ignoring cached features %s of shape %s (expected [%d])", path, tuple(row.shape), feature_dim)
            return None
        return row

    def _write_disk(self, key: Key, row: torch.Tensor) -> None:
        """Atomically: readers see the old file or the whole new one, never half."""
        if self.disk_dir is None:
            return
        path = self._path(key)
        data = save_safetensors({"features": row.contiguous()}, metadata={"fingerprint": key[0], "image": key[1]})
        try:
            atomic_write_bytes(path, data)
        except OSError as e:  # a full or read-only disk costs speed, not correctness
            log.warning("could not write cached features to %s: %s", path, e)
