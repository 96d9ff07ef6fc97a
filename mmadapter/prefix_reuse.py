"""Reuse of prompt K/V across serving requests: a conversation's earlier turns are not prefilled again.

The batch engine stores a request's base K/V (prompt + the generated tokens it fed back) when it ends. A
later request whose tokens start with the same tokens — the next turn of that conversation, whose prompt
renders the earlier turns first, or another chat sharing the template's system part — copies the K/V of
the longest common prefix and prefills only the rest. Causal attention makes the K/V of the first m tokens
depend on those tokens alone, within one context: the base, the adapter (its prompt term changes every
adapted layer's output, which feeds the layers above; a V2 tuning changes every layer) and the image
(its tokens enter the adapter's prompts). `Context` holds all of these, so an entry is only ever read back
by a request whose K/V would be the same; the template is in the tokens themselves.

Entries live in memory under a byte budget; the least recently used go first. A conversation's new turn
replaces the entry whose whole prompt it starts with (the earlier turn: its answer, re-rendered in the new
prompt, is in the new entry too), so a chat holds one entry, not one per turn.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .llama import Llama


@dataclass(frozen=True, eq=False)
class Context:
    """Everything besides the tokens that the base K/V depend on. The base and adapter objects are held
    (compared by identity, so no other object can take their place) with their parameters' versions,
    which change whenever a weight is modified in place."""

    base: Llama
    adapter: nn.Module | None
    versions: int
    layout: str  # the base's activation dtype and device
    image: str  # digest of the image features ("" without an image)

    def _fields(self) -> tuple:
        return id(self.base), id(self.adapter), self.versions, self.layout, self.image

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Context) and self.base is other.base and self.adapter is other.adapter and \
            self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())


def request_context(base: Llama, adapter: nn.Module | None, features: Tensor | None) -> Context | None:
    """The context of a request (features: its image's tower features, None without an image); None when
    its K/V cannot be keyed safely (parameters whose changes are not tracked)."""
    try:
        versions = sum(p._version for p in adapter.parameters()) if adapter is not None else 0
    except RuntimeError:  # inference tensors track no version: their changes would go unseen
        return None
    layout = f"{base.norm.weight.dtype}:{base.device}"  # the cache's dtype (`Llama.new_cache`) and place
    return Context(base, adapter, versions, layout, "" if features is None else feature_digest(features))


def feature_digest(features: Tensor) -> str:
    """A content hash of image features (shape, dtype and values)."""
    digest = hashlib.sha256(f"{tuple(features.shape)}:{features.dtype}".encode())
    digest.update(features.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(eq=False)
class _Entry:
    context: Context
    tokens: Tensor  # [n] int64: the prompt, then the generated tokens fed back
    prompt: int  # how many of them were the prompt
    kv: Tensor  # [2, n_layers, n_kv_heads, n, head_dim]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class PrefixReuse:
    """Stored K/V of token sequences per context, looked up by longest common prefix, LRU-evicted."""

    def __init__(self, max_mb: float) -> None:
        if max_mb < 0:
            raise ValueError(f"prefix reuse budget {max_mb} MiB must be >= 0 (0 turns reuse off)")
        self.max_bytes = int(max_mb * 2**20)
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self.stored_bytes = 0
        self.hits = self.misses = self.evicted = self.rejected = 0
        self.reused_tokens = self.prompt_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, context: Context, ids: list[int]) -> tuple[int, Tensor | None]:
        """(m, K/V [2, L, G, m, d]) of the longest stored prefix of `ids` in `context`; m < len(ids), so the
        request still prefills its last token (whose logits it needs). (0, None) when nothing matches."""
        wanted = torch.tensor(ids, dtype=torch.long)
        best, best_m = None, 0
        for entry in self._entries.values():
            if entry.context != context:
                continue
            m = common_prefix(entry.tokens, wanted)
            if m > best_m:
                best, best_m = entry, m
        best_m = min(best_m, len(ids) - 1)
        self.prompt_tokens += len(ids)
        if best is None or best_m <= 0:
            self.misses += 1
            return 0, None
        self.hits += 1
        self.reused_tokens += best_m
        self._entries.move_to_end(id(best))
        return best_m, best.kv[:, :, :, :best_m]

    def store(self, context: Context, ids: list[int], kv: Tensor, prompt: int) -> bool:
        """Keep the K/V [2, L, G, n, d] of the tokens `ids` (n of them, the first `prompt` the request's prompt);
        False when over the whole budget. Entries of the same context whose prompt `ids` starts with (a
        conversation's earlier turn) are dropped."""
        if kv.shape[3] != len(ids) or not 0 < prompt <= len(ids):
            raise ValueError(f"{len(ids)} tokens ({prompt} of them the prompt) but K/V for {kv.shape[3]}")
        entry = _Entry(context, torch.tensor(ids, dtype=torch.long), prompt, kv)
        if entry.nbytes > self.max_bytes:
            self.rejected += 1
            return False
        for key, old in list(self._entries.items()):
            if old.context == context and common_prefix(old.tokens, entry.tokens) >= old.prompt:
                self._drop(key)
        while self.stored_bytes + entry.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
            self.evicted += 1
        self._entries[id(entry)] = entry
        self.stored_bytes += entry.nbytes
        return True

    def stats(self) -> dict[str, Any]:
        return {"entries": len(self._entries), "stored_mb": round(self.stored_bytes / 2**20, 2),
                "max_mb": round(self.max_bytes / 2**20, 2), "hits": self.hits, "misses": self.misses,
                "evicted": self.evicted, "rejected": self.rejected, "reused_tokens": self.reused_tokens,
                "prompt_tokens": self.prompt_tokens}

    def _drop(self, key: int) -> None:
        self.stored_bytes -= self._entries.pop(key).nbytes


def common_prefix(a: Tensor, b: Tensor) -> int:
    """How many leading tokens the 1-D token tensors a and b share."""
    n = min(a.numel(), b.numel())
    differ = (a[:n] != b[:n]).nonzero()
    return n if differ.numel() == 0 else int(differ[0, 0])
