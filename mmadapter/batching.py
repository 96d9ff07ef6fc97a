"""Continuous batching: requests that arrive while others decode join the running batch.

One background thread owns a static KV cache with a row per request (up to `max_batch`). A new
request is prefilled alone into a free row, exactly as it would be decoded alone, then takes part in
every following one-token step of the whole batch; a finished request frees its row at once.

Two things keep a new request from stalling the others. Prompts are prefilled at most `prefill_chunk`
tokens between two decoding steps of the running batch (a long chat history is split into chunks and no
longer holds everyone for its whole length; short ones waiting together go in the same pause). And with `reuse_mb` > 0, the K/V of the longest prefix a
finished request shares with it (same base, adapter and image: prefix_reuse.py) is copied in rather than
computed, so a conversation's next turn prefills only its new tokens. Each row
keeps its own adapter (prompt K/V with its own image tokens: V1's one token in every prompt, or one per
prompt for visual-query and spatial adapters, already added before the batch sees them), gates, sampling
settings, random generator and stop conditions, so a request gets the tokens it would get alone.

All rows decode at one shared cache slot (the cursor). A row's prompt sits at slots [0, n) and its
generated tokens at the cursor's slots, so the slots between are masked out; RoPE positions count a
row's real tokens only (the key mask), which makes the gap invisible. Every step attends the slots up
to the cursor, so when the cache would overflow, or the cursor has run COMPACT_GAP slots past the longest
row's tokens (the rows that pushed it there have left), the rows are compacted (their real slots moved to
the front, positions unchanged). A step runs over the cache rows up to the highest decoding one: rows freed
above it cost nothing (free rows below it decode padding). `stats()` says where the time went
(batch_profile.py: queueing, tower, prefill, decoding steps, per request and in all). Rows whose
adapters cover different layers share a batch (absent layers get a zero gate), and so do adapters with
different projectors and V2 bias/LoRA tuning (each row's terms come with it: tuning.RowTuning, fused for
the whole batch when every row has the same) as long as they have the same number of prompts; an adapter
with a different number of prompts waits until the batch has drained.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .batch_profile import EngineProfile, RequestTimes
from .decode_step import PACKED_MB, DecodeStep
from .generate import Sampling, decode_one_token, sample, text_pieces
from .llama import AdapterKV, KVCache
from .prefix_reuse import Context, PrefixReuse, request_context
from .tuning import RowTuning

if TYPE_CHECKING:
    from .adapter import Adapter
    from .model import MMAdapter

log = logging.getLogger(__name__)

SLOT_CHUNK = 256  # the cache grows (and is compacted) in steps of this many slots
COMPACT_GAP = 64  # compacted once the steps attend this many slots past the longest row's own tokens
_END = object()


@dataclass(eq=False)
class _Request:
    ids: list[int]
    image: Any
    adapter: Adapter | None
    sampling: Sampling
    out: queue.Queue = field(default_factory=queue.Queue)  # token ids, then _END or an exception
    cancelled: threading.Event = field(default_factory=threading.Event)
    generator: torch.Generator | None = None
    kv: AdapterKV | None = None
    row: int = -1
    generated: int = 0
    next_token: int = 0
    emitted: list[int] = field(default_factory=list)  # the tokens handed out so far
    prefilled: int = 0  # prompt tokens whose K/V are in the row (copied from the reuse cache or computed)
    decoding: bool = False  # the prompt is in: the row takes part in the batch's steps
    context: Context | None = None  # what its K/V depend on besides the tokens (None: not reusable)
    times: RequestTimes = field(init=False)  # its profile record, started when the request is made

    def __post_init__(self) -> None:
        self.times = RequestTimes(time.perf_counter(), len(self.ids), self.image is not None)

    @property
    def n_prompts(self) -> int | None:
        return None if self.adapter is None else int(self.adapter.prompts.shape[1])


class BatchEngine:
    """Decode many requests together. `submit` token ids or `stream` text, from any number of threads."""

    def __init__(self, model: MMAdapter, max_batch: int = 8, max_slots: int | None = None,
                 prefill_chunk: int = 64, reuse_mb: float = 0.0, packed_mb: float = PACKED_MB) -> None:
        """prefill_chunk: prompt tokens prefilled between two decoding steps (0: a whole prompt at once);
        reuse_mb: memory for the K/V of finished requests that later ones may start from (0: none);
        packed_mb: memory for copies of the weights packed for batched steps (decode_step.py; 0: none)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be >= 0 (0: whole prompts), got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.reuse = PrefixReuse(reuse_mb) if reuse_mb > 0 else None
        self._prefilling: deque[_Request] = deque()  # rows holding a prompt not yet fully prefilled, FIFO
        self.model, self.base, self.max_batch = model, model.base, max_batch
        self.capacity = min(max_slots or self.base.config.max_seq_len, self.base.config.max_seq_len)
        self._pending: deque[_Request] = deque()
        self._wake = threading.Condition()
        self._rows: list[_Request | None] = []
        self._storage: Tensor | None = None  # [2, n_layers, R, G, S, d]
        self._caches: list[KVCache] = []
        self._key_mask: Tensor | None = None  # [R, S]: True where a row's slot holds one of its tokens
        self._cursor = 0  # the slot the next decoding step writes
        self._batch_kv: AdapterKV | None = None
        self._decode_step = DecodeStep(self.base, packed_mb)  # one for the engine: the base never changes, rows bring the rest
        if max_batch > 1:
            self._decode_step.pack()  # the packed copies' memory is taken at start, not under load
        self._kv_stale = True
        self._step_rows = 0  # the cache rows a step runs over: up to the highest decoding row (the rest wait)
        self._step_caches: list[KVCache] = []  # views of those rows
        self.profile = EngineProfile()  # where the time goes (batch_profile.py); `stats()` reads it
        self.peak_rows = 0  # most requests decoded together so far (for tests and benchmarks)
        self.steps = 0
        self.events: list[tuple[str, int]] | None = None  # set to [] to record ("chunk"/"step", row) in order
        self._thread = threading.Thread(target=self._run, name="mmadapter-batching", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------
    # the callers' side

    def submit(self, ids: Sequence[int], image: Any = None, adapter: Adapter | None = None,
               sampling: Sampling = Sampling()) -> Iterator[int]:
        """Queue one request; yields its token ids as they are decoded (ending at EOS or max_new_tokens).

        Closing the iterator early (a stop string, a closed connection) frees the request's row.
        """
        ids = list(ids)
        if not ids:
            raise ValueError("every prompt needs at least one token")
        if len(ids) + sampling.max_new_tokens > self.capacity:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({sampling.max_new_tokens}) exceed the "
                             f"context of {self.capacity}; truncate the prompt or ask for fewer tokens")
        request = _Request(ids, image, adapter, sampling)
        if sampling.seed is not None:
            request.generator = torch.Generator(device=self.base.tok_embeddings.weight.device)
            request.generator.manual_seed(sampling.seed)
        with self._wake:
            self._pending.append(request)
            self._wake.notify()
        return self._tokens(request)

    def stream(self, prompt: str, image: Any = None, *, history: Sequence[tuple[str, str]] = (),
               adapter: Adapter | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, stop: Sequence[str] = (), seed: int | None = None,
               template: str | None = None) -> Iterator[str]:
        """`MMAdapter.stream`, decoded in the shared batch: the same text pieces."""
        tokenizer = self.model._require_tokenizer()
        ids = self.model.prompt_ids(prompt, template, history, adapter)
        tokens = self.submit(ids, image, adapter, Sampling(max_new_tokens, temperature, top_p, top_k, seed))
        try:
            yield from text_pieces(tokens, tokenizer, stop)
        finally:
            tokens.close()  # stopped early: the request leaves the batch

    def stats(self) -> dict[str, Any]:
        """The profile so far (`EngineProfile.snapshot`), with the reuse cache's counters when it has one."""
        stats = self.profile.snapshot()
        stats["reuse"] = self.reuse.stats() if self.reuse is not None else None
        return stats

    @staticmethod
    def _tokens(request: _Request) -> Iterator[int]:
        try:
            while True:
                item = request.out.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.cancelled.set()

    # ------------------------------------------------------------------------------------------
    # the decoding thread

    def _run(self) -> None:
        while True:
            with self._wake:
                if not self._pending and not self._held():
                    start = time.perf_counter()
                    while not self._pending and not self._held():
                        self._wake.wait()
                    self.profile.idle(time.perf_counter() - start)
                arrivals = self._admissible()
            for request in arrivals:
                self._admit(request)
            budget = self.prefill_chunk  # prompt tokens before the next step of the running rows (0: no limit)
            while self._prefilling and (self.prefill_chunk == 0 or budget > 0):
                budget -= self._prefill_chunk(budget if self.prefill_chunk else 0)
            try:
                if self._active():
                    self._step()
            except Exception as e:  # noqa: BLE001 - reported to every request in the batch; keep serving
                log.exception("batched decoding step failed")
                for request in self._active():
                    self._finish(request, e)

    def _active(self) -> list[_Request]:
        """The rows that decode: their prompt is in."""
        return [r for r in self._rows if r is not None and r.decoding]

    def _held(self) -> list[_Request]:
        """Every row in use: decoding, or still being prefilled."""
        return [r for r in self._rows if r is not None]

    def _others(self, request: _Request) -> list[RequestTimes]:
        """The times of the requests holding a row besides this one (they wait while it is worked on)."""
        return [r.times for r in self._rows if r is not None and r is not request]

    def _admissible(self) -> list[_Request]:
        """Pending requests that fit now (free rows, same prompt count, enough slots), in arrival order."""
        active = self._held()
        free = self.max_batch - len(active)
        n_prompts = {r.n_prompts for r in active if r.n_prompts is not None}
        admitted, cursor = [], self._cursor if active else 0
        for request in list(self._pending):
            if request.cancelled.is_set():
                self._pending.remove(request)
                continue
            if free == 0:
                break
            if request.n_prompts is not None and n_prompts - {request.n_prompts}:
                continue  # another prompt count is decoding: wait until it drains
            rows = active + admitted + [request]
            start = max(cursor, len(request.ids))
            if start + _remaining(rows) > self.capacity:
                start = max(len(r.ids) + r.generated for r in rows)  # after compaction
                if start + _remaining(rows) > self.capacity:
                    continue
            self._pending.remove(request)
            admitted.append(request)
            free -= 1
            cursor = start
            if request.n_prompts is not None:
                n_prompts.add(request.n_prompts)
        return admitted

    def _admit(self, request: _Request) -> None:
        """Give the request a free row, with the K/V of its longest reusable prefix; `_prefill_chunk` does the rest."""
        start, tower_s, others = time.perf_counter(), 0.0, self._others(request)
        try:
            with torch.inference_mode():
                features, has_image = self.model.image_features([request.image], request.adapter)
                tower_s = time.perf_counter() - start if request.image is not None else 0.0
                request.kv = self.model.adapter_kv(features, has_image, request.adapter)
                n = len(request.ids)
                if request.sampling.max_new_tokens == 0:
                    self._ended_at_admission(request, start, tower_s, others, _END)
                    return
                rows = self._held() + [request]
                if max(self._cursor, n) + _remaining(rows) > self.capacity:
                    self._compact()
                self._cursor = max(self._cursor, n)  # decoding writes past every held prompt
                row = next((i for i, r in enumerate(self._rows) if r is None), len(self._rows))
                self._reserve(row + 1, self._cursor + _remaining(rows))
                self._key_mask[row] = False
                if self.reuse is not None:
                    request.context = request_context(self.base, request.adapter, features)
                if request.context is not None:
                    m, kv = self.reuse.lookup(request.context, request.ids)  # kv [2, L, G, m, d]
                    if m:
                        self._storage[:, :, row, :, :m] = kv
                        request.prefilled = m
        except Exception as e:  # noqa: BLE001 - a bad request (image, settings) fails alone
            self._ended_at_admission(request, start, tower_s, others, e)
            return
        self.profile.admitted(request.times, start, tower_s, request.prefilled, others)
        request.row = row
        if row == len(self._rows):
            self._rows.append(request)
        else:
            self._rows[row] = request
        self._prefilling.append(request)

    def _ended_at_admission(self, request: _Request, start: float, tower_s: float, others: list[RequestTimes],
                            last: Any) -> None:
        """A request that ends before taking a row (asked for no tokens, or failed): recorded, then told."""
        self.profile.admitted(request.times, start, tower_s, 0, others)
        self.profile.finish(request.times, 0, "done" if last is _END else "failed")
        request.out.put(last)

    def _prefill_chunk(self, limit: int) -> int:
        """Prefill up to `limit` (0: all) more tokens of the oldest waiting prompt; returns how many. Its last
        chunk makes the row decode."""
        request = self._prefilling[0]
        n, start = len(request.ids), request.prefilled
        end = n if limit == 0 else min(n, start + limit)
        began = time.perf_counter()
        try:
            if request.cancelled.is_set():
                raise _Cancelled
            with torch.inference_mode():
                row, device = request.row, self._storage.device
                caches = [KVCache(c.k[row:row + 1], c.v[row:row + 1]) for c in self._caches]
                tokens = torch.tensor([request.ids[start:end]], dtype=torch.long, device=device)
                positions = torch.arange(start, end, device=device)  # slots = positions: the prompt starts at 0
                hidden = self.base(tokens, input_pos=positions, cache=caches, adapter=request.kv)  # [1, T, C]
                request.prefilled = end
                if self.events is not None:
                    self.events.append(("chunk", row))
                if end == n:  # the prompt is in: its first token's logits
                    logits = self.base.head(hidden[:, -1])  # [1, V]
                    self._key_mask[row, :n] = True
                self.profile.chunk(request.times, began, end - start, self._others(request))
                if end < n:
                    return end - start
        except Exception as e:  # noqa: BLE001 - this request fails alone (or was abandoned); the batch goes on
            self._prefilling.popleft()
            self._finish(request, _END if isinstance(e, _Cancelled) else e)
            return 0
        self._prefilling.popleft()
        request.decoding = True
        self._kv_stale = True
        self.peak_rows = max(self.peak_rows, len(self._active()))
        self._emit(request, logits[0])
        return end - start

    def _step(self) -> None:
        """One token for every active row, at the shared cursor slot."""
        with torch.inference_mode():
            if self._cursor - max(len(r.ids) + r.generated for r in self._held()) >= COMPACT_GAP:
                self._compact()  # the rows that made the cursor run ahead have left: stop attending their gap
            start, active = time.perf_counter(), self._active()
            if self._kv_stale:
                self._prepare_step(active)
            rows = self._step_rows  # rows up to the highest active one take part; free ones among them decode padding
            tokens = torch.zeros(rows, dtype=torch.long, device=self._storage.device)
            for request in active:
                tokens[request.row] = request.next_token
                self._key_mask[request.row, self._cursor] = True
            logits = decode_one_token(self.base, tokens, self._cursor, self._step_caches, self._key_mask[:rows],
                                      self._batch_kv, self._decode_step)  # [rows, V]
        self.profile.step(start, [r.times for r in active], rows, self._cursor + 1,
                          sum(len(r.ids) + r.generated for r in active))
        self._cursor += 1
        self.steps += 1
        if self.events is not None:
            self.events += [("step", r.row) for r in active]
        start = time.perf_counter()
        for request in active:
            self._emit(request, logits[request.row])
        self.profile.emitted(start)

    def _prepare_step(self, active: list[_Request]) -> None:
        """What the steps use until the batch changes: the rows they run over and the batch's prompt K/V."""
        self._step_rows = max(r.row for r in active) + 1
        self._step_caches = [KVCache(c.k[:self._step_rows], c.v[:self._step_rows]) for c in self._caches]
        self._batch_kv, self._kv_stale = self._build_batch_kv(self._step_rows), False

    def _emit(self, request: _Request, logits: Tensor) -> None:
        """Sample the request's next token from its logits [V] and hand it over; free the row when done."""
        with torch.inference_mode():
            token = int(sample(logits[None], request.sampling, request.generator)[0])
        request.generated += 1
        request.next_token = token
        request.emitted.append(token)
        if request.generated == 1:
            self.profile.first_token(request.times)
        request.out.put(token)
        eos = token in self.model.tokenizer.eos_ids if self.model.tokenizer is not None else False
        if eos or request.generated >= request.sampling.max_new_tokens or request.cancelled.is_set():
            self._finish(request, _END)

    def _finish(self, request: _Request, last: Any) -> None:
        if last is _END and request.decoding and request.context is not None:
            self._keep(request)
        outcome = "failed" if last is not _END else "cancelled" if request.cancelled.is_set() else "done"
        self.profile.finish(request.times, request.generated, outcome)
        request.out.put(last)
        if 0 <= request.row < len(self._rows) and self._rows[request.row] is request:
            self._rows[request.row] = None
            self._kv_stale = True
        if not self._held():  # drained: give the cache's memory back
            self._rows, self._storage, self._caches, self._key_mask, self._cursor = [], None, [], None, 0
            self._step_caches, self._batch_kv = [], None

    def _keep(self, request: _Request) -> None:
        """Store the K/V of the request's prompt and of the generated tokens it fed back, for later turns."""
        with torch.inference_mode():
            slots = self._key_mask[request.row].nonzero().squeeze(1)  # [n]: its real slots, in order
            fed = slots.numel() - len(request.ids)  # the last emitted token was never fed back
            kv = self._storage[:, :, request.row][:, :, :, slots]  # [2, L, G, n, d]: a copy (indexed)
            evicted = self.reuse.evicted
            self.reuse.store(request.context, request.ids + request.emitted[:fed], kv, len(request.ids))
        if self.reuse.evicted > evicted:  # the budget is full: say what it holds
            log.info("prefix reuse: evicted the least recently used; %s", self.reuse.stats())

    # ------------------------------------------------------------------------------------------
    # the cache and the batch's prompt K/V

    def _reserve(self, rows: int, slots: int) -> None:
        """Grow the cache to at least `rows` x `slots` (in SLOT_CHUNK steps, at most `capacity` slots)."""
        have_rows = 0 if self._storage is None else self._storage.shape[2]
        have_slots = 0 if self._storage is None else self._storage.shape[4]
        if rows <= have_rows and slots <= have_slots:
            return
        new_rows = max(rows, have_rows)
        new_slots = min(max(-(-slots // SLOT_CHUNK) * SLOT_CHUNK, have_slots), self.capacity)
        storage = self.base.new_cache(new_rows, new_slots)
        self.profile.cache_grew()
        self._kv_stale = True  # the steps' views are of the old cache
        key_mask = torch.zeros(new_rows, new_slots, dtype=torch.bool, device=storage.device)
        if self._storage is not None:
            storage[:, :, :have_rows, :, :have_slots] = self._storage
            key_mask[:have_rows, :have_slots] = self._key_mask
        self._storage, self._key_mask = storage, key_mask
        self._caches = self.base.layer_caches(storage)

    def _compact(self) -> None:
        """Move every row's real slots to the front (positions are counted, so nothing else changes)."""
        longest = 0
        for request in self._active():
            kept = self._key_mask[request.row, :self._cursor].nonzero().squeeze(1)  # [n]
            n = kept.numel()
            self._storage[:, :, request.row, :, :n] = self._storage[:, :, request.row, :, kept].clone()
            self._key_mask[request.row] = False
            self._key_mask[request.row, :n] = True
            longest = max(longest, n)
        self._cursor = max([longest] + [len(r.ids) for r in self._prefilling])  # still past held prompts
        self.profile.compacted()

    def _build_batch_kv(self, rows: int) -> AdapterKV | None:
        """Per-row prompt K/V [rows, G, K, d], gates [L, rows, H] (zero for rows without that layer) and V2 tuning."""
        with_kv = [r for r in self._active() if r.kv is not None]
        if not with_kv:
            return None
        c = self.base.config
        first = min(r.kv.first_layer for r in with_kv)
        k_like = with_kv[0].kv.kv[0][0]  # [1, G, K, d]
        gates = torch.zeros(c.n_layers - first, rows, c.n_heads, dtype=with_kv[0].kv.gates.dtype,
                            device=k_like.device)
        kv = []
        for layer in range(first, c.n_layers):
            pk = k_like.new_zeros(rows, *k_like.shape[1:])
            pv = torch.zeros_like(pk)
            for request in with_kv:
                j = layer - request.kv.first_layer
                if j >= 0:
                    pk[request.row], pv[request.row] = request.kv.kv[j][0][0], request.kv.kv[j][1][0]
                    gates[layer - first, request.row] = request.kv.gates[j]
            kv.append((pk, pv))
        return AdapterKV(first, kv, gates, self._batch_tuning(rows))

    def _batch_tuning(self, rows: int) -> RowTuning | None:
        """Each V2 adapter's tuning with the rows that use it; for every row when all active rows share one
        (free rows decode padding whatever they compute: the fused fast path)."""
        active = self._active()
        groups: dict[int, tuple[object, list[int]]] = {}
        for request in active:
            tuning = request.adapter.tuning if request.adapter is not None else None
            if tuning is not None:
                groups.setdefault(id(tuning), (tuning, []))[1].append(request.row)
        if not groups:
            return None
        if len(groups) == 1 and all(r.adapter is not None and r.adapter.tuning is not None for r in active):
            return RowTuning.single(next(iter(groups.values()))[0])
        device = self._storage.device
        return RowTuning([(t, torch.tensor(r, dtype=torch.long, device=device)) for t, r in groups.values()], rows)


class _Cancelled(Exception):
    """The consumer went away before the prompt was in."""


def _remaining(requests: Sequence[_Request]) -> int:
    """The most slots any of these requests may still write."""
    return max(r.sampling.max_new_tokens - r.generated for r in requests)
