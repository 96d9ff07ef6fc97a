"""`torch.compile` of the one-token decoding step, compiled in the background and used once it is ready.

A cold compile takes tens of seconds to minutes on a CPU, so it must never hold up an answer.
`BackgroundCompile` starts compiling `DecodeStep.run` on a thread at the first single-sequence request
(warming it on a scratch cache with that request's adapter prompts); until it is done, decoding runs the
eager step, and the steps after that run the compiled graph. A compile that fails (no C compiler, an op
inductor cannot lower) or is not done within its time budget leaves the eager step in place, with one
warning line. The graph covers one case: batch 1 without padding, with the adapter layout (prompts, V2
tuning) it was compiled for, on the base as it was then; anything else (a batch, another adapter shape,
reloaded weights) runs eagerly rather than recompiling on the caller's thread. Whether it pays depends on
the CPU (README, "Decoding speed").
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch
from torch import Tensor

from .decode_step import DecodeStep, Prepared
from .llama import AdapterKV, KVCache, Llama

log = logging.getLogger(__name__)


def base_signature(base: Llama) -> tuple:
    """Identity of the base's modules and weights: changes when a projection, norm or weight is replaced. (A
    request's V2 tuning is no part of the base: the step takes it, fused, as an input of every call.)"""
    return tuple(map(id, base.modules())), tuple((id(p), p.data_ptr()) for p in base.parameters())


class BackgroundCompile:
    """The compiled one-token step of `base`, built on a thread; `step()` hands each request its step."""

    def __init__(self, base: Llama, budget_s: float = 60.0, mode: str | None = None,
                 backend: str = "inductor") -> None:
        self.base, self.budget_s, self.mode, self.backend = base, budget_s, mode, backend
        self.compiled: Any = None  # the compiled DecodeStep.run, once warmed
        self.seconds: float | None = None  # wall time of the compile, once ready
        self.failure: str | None = None  # why the eager step stays (a compile error, the budget)
        self._case: tuple | None = None  # (signature, prompt layout) the graph was compiled for
        self._started: float | None = None
        self._lock = threading.Lock()

    def step(self) -> _SwitchingStep:
        """A step for one request, used like `DecodeStep`."""
        return _SwitchingStep(self, DecodeStep(self.base), base_signature(self.base))

    def compiled_for(self, eager: DecodeStep, signature: tuple, token: Tensor, key_mask: Tensor | None,
                     prepared: Prepared) -> Any:
        """The compiled `run` when it is ready and applies to this call, else None (starting the compile at
        the first call it could serve)."""
        if token.shape[0] != 1 or key_mask is not None or self.failure is not None:
            return None
        case = (signature, _layout(prepared))
        with self._lock:
            if self._started is None:
                self._started, self._case = time.monotonic(), case
                threading.Thread(target=self._compile, args=(eager, prepared), name="mmadapter-compile",
                                 daemon=True).start()
                return None
        if self.compiled is None:
            if time.monotonic() - self._started > self.budget_s:
                self._give_up(f"not compiled within {self.budget_s:.0f} s")
            return None
        return self.compiled if case == self._case else None

    def _compile(self, eager: DecodeStep, prepared: Prepared) -> None:
        try:
            fn = torch.compile(eager.run, dynamic=True, mode=self.mode, backend=self.backend)  # one object each
            with torch.inference_mode():
                storage = self.base.new_cache(1, 4)  # scratch: the request's own cache is in use
                cache, token = self.base.layer_caches(storage), torch.zeros(1, dtype=torch.long, device=storage.device)
                for pos in (1, 2):  # two lengths: the graph is the dynamic one that serves every length
                    fn(token, pos, torch.tensor([pos], device=storage.device), cache, None, prepared)
        except Exception as e:  # noqa: BLE001 - any compile failure means: stay eager, say why once
            self._give_up(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
            return
        if self.failure is None:
            self.seconds = time.monotonic() - (self._started or 0.0)
            self.compiled = fn
            log.info("decode step compiled in %.1f s", self.seconds)

    def _give_up(self, why: str) -> None:
        if self.failure is None:
            self.failure = why
            log.warning("torch.compile of the decode step unavailable (%s): decoding stays eager", why)


class _SwitchingStep:
    """One request's step: the eager `DecodeStep` until the compiled one is ready and applies, then that."""

    def __init__(self, owner: BackgroundCompile, eager: DecodeStep, signature: tuple) -> None:
        self.owner, self.eager, self.signature = owner, eager, signature

    def __call__(self, token: Tensor, pos: int, cache: list[KVCache], key_mask: Tensor | None,
                 adapter: AdapterKV | None) -> Tensor:
        prepared = self.eager.prepare(adapter, self.eager.base.norm.weight.dtype)
        compiled = self.owner.compiled_for(self.eager, self.signature, token, key_mask, prepared)
        if compiled is not None:
            try:
                with torch.compiler.set_stance("fail_on_recompile"):  # never compile on the caller's thread
                    return compiled(token, pos, torch.tensor([pos], device=token.device), cache, key_mask, prepared)
            except Exception:  # noqa: BLE001 - a call the graph does not cover: the eager step answers it
                log.debug("compiled decode step does not cover this call; eager", exc_info=True)
        return self.eager.run(token, pos, torch.tensor([pos], device=token.device), cache, key_mask, prepared)


def _layout(prepared: Prepared) -> tuple:
    """Which layers have prompts and which V2 terms: a graph compiled for one layout serves only that one."""
    def tuned(t):
        return None if t is None else (t.attention_norm is None, t.ffn_norm is None,
                                       tuple(None if p is None else (len(p.lora), p.bias is None) for p in t.products))
    return (tuple(p is None for p in prepared.prompts), tuple(map(tuned, prepared.tuning)), prepared.norm is None)
