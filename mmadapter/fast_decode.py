"""Compiled one-token decoding: the hot loop of generation as one torch.compile graph.

Eager PyTorch spends a decode step in per-op overhead and in slow matrix-vector kernels; inductor
with weight freezing and max-autotune fuses the step and packs the frozen weights, which is what
brings CPU decoding near the memory-bandwidth bound (DESIGN.md §6, README "Benchmarks").

Shapes are fixed per key (batch, cache length bucket, adapter shape): the cache storage and the
adapter's prompt K/V are graph *inputs*, so one graph serves every request of that shape. Compiling
takes a minute or more on a CPU, so `FastDecoder` compiles in a background thread and generation
decodes eagerly until the graph is ready: no request ever waits for compilation. Inductor keeps
compiled code in its on-disk cache, so later processes start faster.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .llama import AdapterKV, Llama

log = logging.getLogger(__name__)

MIN_BUCKET = 256
# freezing: weights become constants (packed for fast GEMV); max_autotune: benchmark kernel choices.
COMPILE_OPTIONS = {"freezing": True, "max_autotune": True, "triton.cudagraphs": False}

StepFn = Callable[..., Tensor]


@dataclass(frozen=True)
class StepKey:
    batch: int
    max_len: int
    adapter: tuple[int, int, int] | None  # (first adapted layer, n adapted layers, n prompts)


def bucket(length: int, limit: int) -> int:
    """The cache length to compile for: the next power of two >= length (at least MIN_BUCKET), capped."""
    size = MIN_BUCKET
    while size < length:
        size *= 2
    return min(size, max(limit, length))


def adapter_key(kv: AdapterKV | None) -> tuple[int, int, int] | None:
    if kv is None:
        return None
    return kv.first_layer, len(kv.kv), kv.kv[0][0].shape[2]


def stack_adapter(kv: AdapterKV, batch: int) -> tuple[Tensor, Tensor, Tensor]:
    """Prompt K/V as two fixed-shape tensors [L, B, G, K, d] (broadcast over the batch) and gates [L, H]."""
    k = torch.stack([k.expand(batch, -1, -1, -1) for k, _ in kv.kv])
    v = torch.stack([v.expand(batch, -1, -1, -1) for _, v in kv.kv])
    return k, v, kv.gates


def make_step(base: Llama, first_layer: int | None) -> StepFn:
    """A fresh decode-step function (each compiled variant needs its own function object)."""

    def step(tokens: Tensor, input_pos: Tensor, storage: Tensor, key_mask: Tensor,
             prompt_k: Tensor | None = None, prompt_v: Tensor | None = None, gates: Tensor | None = None) -> Tensor:
        adapter = None
        if first_layer is not None:
            adapter = AdapterKV(first_layer, [(prompt_k[i], prompt_v[i]) for i in range(prompt_k.shape[0])], gates)
        h = base(tokens, input_pos=input_pos, cache=base.layer_caches(storage), key_mask=key_mask,
                 adapter=adapter, static=True)
        return base.head(h[:, -1])  # [B, V]

    return step


class FastDecoder:
    """Compiled decode steps of one base, built on demand in the background."""

    def __init__(self, base: Llama, options: dict | None = None, background: bool = True) -> None:
        self.base, self.options, self.background = base, dict(options or COMPILE_OPTIONS), background
        self._ready: dict[StepKey, StepFn] = {}
        self._failed: set[StepKey] = set()
        self._queued: set[StepKey] = set()
        self._queue: queue.Queue[StepKey] = queue.Queue()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self.compile_seconds: dict[StepKey, float] = {}

    def step_for(self, batch: int, max_len: int, kv: AdapterKV | None) -> StepFn | None:
        """The compiled step for this shape if ready; otherwise queue its compilation and return None."""
        key = StepKey(batch, max_len, adapter_key(kv))
        with self._lock:
            if key in self._ready or key in self._failed:
                return self._ready.get(key)
            if key in self._queued:
                return None
            self._queued.add(key)
        if not self.background:
            self._compile(key)
            return self._ready.get(key)
        self._queue.put(key)
        with self._lock:  # one worker compiles shapes one at a time (parallel compiles thrash a small CPU)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, daemon=True, name="mmadapter-compile")
                self._worker.start()
        return None

    def _work(self) -> None:
        while True:
            self._compile(self._queue.get())

    def compile_now(self, batch: int, max_len: int, kv: AdapterKV | None) -> float:
        """Compile one shape synchronously (benchmarks, warm-up at start); returns the seconds it took."""
        key = StepKey(batch, max_len, adapter_key(kv))
        with self._lock:
            self._queued.add(key)
        self._compile(key)
        if key not in self._ready:
            raise RuntimeError(f"compiling the decode step for {key} failed; see the log")
        return self.compile_seconds[key]

    def _compile(self, key: StepKey) -> None:
        start = time.perf_counter()
        self.base.rope(key.max_len)  # build the RoPE table eagerly: the graph must not own its creation
        try:
            fn = torch.compile(make_step(self.base, key.adapter[0] if key.adapter else None),
                               fullgraph=True, dynamic=False, options=self.options)
            with torch.inference_mode():  # inputs and call as in generation, so the guards match
                fn(*self._example_inputs(key))  # compilation happens on this first call
        except Exception:  # compilation is an optimisation: decoding stays eager for this shape
            log.exception("could not compile the decode step for %s; decoding eagerly", key)
            with self._lock:
                self._failed.add(key)
            return
        seconds = time.perf_counter() - start
        with self._lock:
            self._ready[key] = fn
            self.compile_seconds[key] = seconds
        log.info("decode step for %s compiled in %.1f s", key, seconds)

    def _example_inputs(self, key: StepKey) -> tuple[Tensor, ...]:
        base, c = self.base, self.base.config
        device = base.tok_embeddings.weight.device
        tokens = torch.zeros(key.batch, 1, dtype=torch.long, device=device)
        input_pos = torch.zeros(1, dtype=torch.long, device=device)
        storage = base.new_cache(key.batch, key.max_len)
        key_mask = torch.ones(key.batch, key.max_len, dtype=torch.bool, device=device)
        if key.adapter is None:
            return tokens, input_pos, storage, key_mask
        _, n_layers, n_prompts = key.adapter
        dtype = base.tok_embeddings.weight.dtype
        kv = torch.zeros(n_layers, key.batch, c.n_kv_heads, n_prompts, c.head_dim, dtype=dtype, device=device)
        gates = torch.zeros(n_layers, c.n_heads, device=device)
        return tokens, input_pos, storage, key_mask, kv, kv.clone(), gates
