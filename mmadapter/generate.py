"""KV-cache decoding in small steps (gpt-fast style): pad, prefill, decode one token, decode n
tokens, sample; and the streaming of text with stop strings.

The adapter's prompt K/V (with the image token) is computed once per request by the caller and passed
to every step; the base keeps its own static cache. Batched prompts are left-padded and the key mask
keeps padding out of attention and out of the RoPE positions, so a padded prompt decodes exactly like
the same prompt alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .decode_step import DecodeStep
from .llama import AdapterKV, KVCache, Llama
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def sample(logits: Tensor, s: Sampling, generator: torch.Generator | None) -> Tensor:
    """Next tokens [B] from logits [B, V]."""
    if s.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(-1) - probs > s.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_length(base: Llama, longest: int, max_new_tokens: int) -> int:
    """Cache length a request needs (prompt + new tokens), refused when it exceeds the model's context."""
    if longest == 0:
        raise ValueError("every prompt needs at least one token")
    total = longest + max_new_tokens
    if total > base.config.max_seq_len:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceed the model's "
                         f"context of {base.config.max_seq_len}; truncate the prompt or ask for fewer tokens")
    return total


def left_pad(prompts: Sequence[Sequence[int]], total: int, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """Prompts as one left-padded batch: tokens [B, T] and key_mask [B, total] (None without padding).

    key_mask is True at real tokens, generated slots included; it keeps padding out of attention and
    out of the RoPE positions.
    """
    longest = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
    key_mask = torch.ones(len(prompts), total, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        key_mask[i, : longest - len(p)] = False
    return tokens, key_mask if bool((~key_mask[:, :longest]).any()) else None


def prefill(base: Llama, tokens: Tensor, cache: list[KVCache], key_mask: Tensor | None,
            adapter: AdapterKV | None) -> Tensor:
    """Run the prompts [B, T] into the cache slots 0..T-1; logits [B, V] of the last position."""
    input_pos = torch.arange(tokens.shape[1], device=tokens.device)
    h = base(tokens, input_pos=input_pos, cache=cache, key_mask=key_mask, adapter=adapter)  # [B, T, C]
    return base.head(h[:, -1])


def decode_one_token(base: Llama, token: Tensor, pos: int, cache: list[KVCache], key_mask: Tensor | None,
                     adapter: AdapterKV | None, step: Callable[..., Tensor] | None = None) -> Tensor:
    """One step: the tokens [B] at cache slot `pos` in, logits [B, V] of the next token out.

    Runs the lean `DecodeStep` (pass one built for the request, or a compiled one, to skip preparing it per
    token); the general `Llama.forward` over one token is the reference it equals token for token."""
    return (step or DecodeStep(base))(token, pos, cache, key_mask, adapter)


def decode_n_tokens(base: Llama, logits: Tensor, pos: int, n: int, cache: list[KVCache], key_mask: Tensor | None,
                    adapter: AdapterKV | None, s: Sampling, eos_ids: Sequence[int],
                    step: Callable[..., Tensor] | None = None) -> Iterator[Tensor]:
    """Sample up to n tokens [B] from `logits` [B, V] onwards, the first written at cache slot `pos`.

    Stops when every sequence has ended; a finished sequence keeps yielding its eos. Inference mode is
    entered per step, never across a `yield`: the consumer may resume this generator on another thread
    (web servers do), where a mode entered here would not be active.
    """
    device = logits.device
    generator = None if s.seed is None else torch.Generator(device=device).manual_seed(s.seed)
    with torch.inference_mode():
        eos = torch.tensor(sorted(set(eos_ids)) or [-1], device=device)
        done = torch.zeros(logits.shape[0], dtype=torch.bool, device=device)
    decode_step = step or DecodeStep(base)  # or a compiled one (compiled_step.py), same signature
    for i in range(n):
        with torch.inference_mode():
            token = torch.where(done, eos[0], sample(logits, s, generator))
            done |= torch.isin(token, eos)
        yield token
        if bool(done.all()) or i == n - 1:
            return
        with torch.inference_mode():
            logits = decode_one_token(base, token, pos + i, cache, key_mask, adapter, decode_step)


def decode_tokens(base: Llama, prompts: Sequence[Sequence[int]], adapter: AdapterKV | None, s: Sampling,
                  eos_ids: Sequence[int], step: Callable[..., Tensor] | None = None) -> Iterator[Tensor]:
    """Yield the next token of every sequence [B] per step: pad, prefill, then decode n tokens."""
    total = check_length(base, max(len(p) for p in prompts), s.max_new_tokens)
    with torch.inference_mode():
        tokens, key_mask = left_pad(prompts, total, base.device)
        cache = base.layer_caches(base.new_cache(len(prompts), total))
        logits = prefill(base, tokens, cache, key_mask, adapter)  # [B, V]
    yield from decode_n_tokens(base, logits, tokens.shape[1], s.max_new_tokens, cache, key_mask, adapter, s, eos_ids,
                               step)


class TextStream:
    """Turns one sequence's tokens into text pieces: never splits a multi-byte character and holds
    back text that may be the start of a stop string, so the joined pieces equal the final text."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = 0  # characters of text already handed out
        self.stopped = False

    def text(self) -> str:
        return self.tokenizer.decode(self.ids)

    def push(self, token: int) -> str:
        """Add a token; return the newly safe text (possibly empty)."""
        self.ids.append(token)
        text = self.text()
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        for s in self.stop:
            at = text.find(s, max(0, self.emitted - len(s)))
            if at != -1:
                self.stopped = True
                return self._emit(text[:at])
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._emit(text[: len(text) - hold])

    def finish(self) -> str:
        """Text held back at the end (a partial stop string that never completed)."""
        if self.stopped:
            return ""
        return self._emit(self.text())

    def _emit(self, upto: str) -> str:
        piece = upto[self.emitted:]
        self.emitted = max(self.emitted, len(upto))
        return piece


def text_pieces(tokens: Iterable[int], tokenizer: Tokenizer, stop: Sequence[str] = ()) -> Iterator[str]:
    """One sequence's tokens as streamed text pieces, ending at EOS or a stop string (see TextStream)."""
    stream = TextStream(tokenizer, stop)
    for token in tokens:
        if token in tokenizer.eos_ids:
            break
        piece = stream.push(token)
        if piece:
            yield piece
        if stream.stopped:
            return
    tail = stream.finish()
    if tail:
        yield tail
