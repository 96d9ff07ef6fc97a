"""Examples to token ids with loss masks, batches with dynamic padding, length-grouped batching.

Labels are aligned with tokens (labels[i] is tokens[i] or IGNORE_INDEX); the model shifts them.
Only response segments carry labels, including the EOS / end-of-turn token that ends each
response, so the model learns to answer and to stop, never to write prompts.

Tokenising: the text up to the end of each segment is encoded as a whole and the new tokens are
attributed to that segment, so the token sequence is the tokenizer's own encoding of the full text
(as at inference, where the prompt is encoded in one piece). Where a tokenizer merges characters
across a segment boundary into one token, that segment is encoded on its own instead, so every
token still belongs to exactly one segment and the masks stay exact.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Sampler
from tqdm.auto import tqdm

from mmadapter.data.records import Example
from mmadapter.data.templates import ChatTokenizer, Segment, Template, get_template

IGNORE_INDEX = -100
DROPPED_NO_RESPONSE = "no response token within max_seq_len"


class EncodingTokenizer(ChatTokenizer, Protocol):
    """The part of `mmadapter.tokenizer.Tokenizer` that encoding uses."""

    add_bos: bool

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...


@dataclass
class EncodedExample:
    tokens: list[int]
    labels: list[int]  # tokens[i] where the model learns tokens[i], else IGNORE_INDEX
    image: str | None = None
    id: str | None = None
    truncated: bool = False  # the sample was cut at max_seq_len

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class EncodeStats:
    encoded: int = 0
    truncated: int = 0  # encoded, but cut at max_seq_len
    dropped: Counter[str] = field(default_factory=Counter)
    tokens: int = 0
    label_tokens: int = 0

    def __str__(self) -> str:
        dropped = ", ".join(f"{count} {reason}" for reason, count in self.dropped.items())
        return (f"encoded {self.encoded} examples ({self.tokens} tokens, {self.label_tokens} with loss), "
                f"{self.truncated} truncated" + (f", dropped {dropped}" if dropped else ""))


def tokenize_segments(segments: Sequence[Segment], tokenizer: EncodingTokenizer,
                      max_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids and labels of rendered segments; stops once more than max_tokens are produced."""
    tokens: list[int] = []
    labels: list[int] = []
    text = ""
    for segment in segments:
        text += segment.text
        whole = tokenizer.encode(text, bos=tokenizer.add_bos)
        if whole[:len(tokens)] == tokens:
            new = whole[len(tokens):]
        else:  # a token spans the boundary: keep the earlier tokens, encode this segment alone
            new = tokenizer.encode(segment.text)
        tokens += new
        labels += new if segment.loss else [IGNORE_INDEX] * len(new)
        if max_tokens is not None and len(tokens) > max_tokens:
            break
    return tokens, labels


def encode_example(example: Example, tokenizer: EncodingTokenizer, template: Template | str,
                   max_seq_len: int) -> EncodedExample | None:
    """Tokens and labels of one example, cut to max_seq_len; None when no labelled token is left."""
    segments = get_template(template).render(example.turns, tokenizer, input=example.input)
    tokens, labels = tokenize_segments(segments, tokenizer, max_tokens=max_seq_len)
    truncated = len(tokens) > max_seq_len
    tokens, labels = tokens[:max_seq_len], labels[:max_seq_len]
    while labels and labels[-1] == IGNORE_INDEX:  # trailing prompt tokens predict nothing
        labels.pop()
        tokens.pop()
    if all(label == IGNORE_INDEX for label in labels[1:]):  # position 0 has no context to predict it
        return None
    return EncodedExample(tokens=tokens, labels=labels, image=example.image, id=example.id, truncated=truncated)


def encode_dataset(examples: Sequence[Example], tokenizer: EncodingTokenizer, template: Template | str,
                   max_seq_len: int, progress: bool = True) -> tuple[list[EncodedExample], EncodeStats]:
    template = get_template(template)
    stats = EncodeStats()
    encoded = []
    for example in tqdm(examples, desc="encoding", unit="ex", disable=not progress):
        item = encode_example(example, tokenizer, template, max_seq_len)
        if item is None:
            stats.dropped[DROPPED_NO_RESPONSE] += 1
            continue
        encoded.append(item)
        stats.encoded += 1
        stats.truncated += item.truncated
        stats.tokens += len(item.tokens)
        stats.label_tokens += sum(label != IGNORE_INDEX for label in item.labels)
    return encoded, stats


def collate(batch: Sequence[EncodedExample], pad_id: int, pad_to_multiple: int | None = None) -> dict[str, Any]:
    """Right-pad to the longest sample in the batch (rounded up to pad_to_multiple)."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    lengths = [len(item.tokens) for item in batch]
    width = max(lengths)
    if pad_to_multiple:
        width = math.ceil(width / pad_to_multiple) * pad_to_multiple
    tokens = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [B, T]
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    for row, item in enumerate(batch):
        tokens[row, :len(item.tokens)] = torch.tensor(item.tokens, dtype=torch.long)
        labels[row, :len(item.labels)] = torch.tensor(item.labels, dtype=torch.long)
    return {"tokens": tokens, "labels": labels, "images": [item.image for item in batch],
            "lengths": torch.tensor(lengths, dtype=torch.long), "ids": [item.id for item in batch]}


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of similar length, in random order, reproducible per (seed, epoch).

    Each epoch: shuffle all indices, cut them into mega-chunks of batch_size * group_factor, sort
    each chunk by length (longest first) and cut it into batches, then shuffle the batch order.
    Batches stay random in content and order while padding shrinks to a few percent.
    For resuming mid-epoch, `batches(epoch)[n:]` or `set_epoch(epoch, skip_batches=n)`.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, group_factor: int = 50) -> None:
        if batch_size < 1 or group_factor < 1:
            raise ValueError(f"batch_size ({batch_size}) and group_factor ({group_factor}) must be at least 1")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.group_factor = group_factor
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch that iteration yields, starting after its first skip_batches batches."""
        self.epoch = epoch
        self.skip_batches = skip_batches

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """All batches of an epoch, in order."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.lengths)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        chunk = self.batch_size * self.group_factor
        batches = []
        for start in range(0, n, chunk):
            indices = order[start:start + chunk]
            indices = indices[np.argsort(-self.lengths[indices], kind="stable")]
            batches += [indices[i:i + self.batch_size].tolist() for i in range(0, len(indices), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()  # chunks are whole batches, so only the very last can be short
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()[self.skip_batches:]

    def __len__(self) -> int:
        n = len(self.lengths)
        full = n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        return max(full - self.skip_batches, 0)
