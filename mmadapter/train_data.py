"""Training data as the loop needs it: any source -> encoded samples, their label counts and image
rows, image features computed once per unique image, and a count of everything dropped.

Sources: a .json/.jsonl path (Alpaca, question/answer or LLaVA records; images relative to
`image_root`), "scienceqa:<dir>" (the official prompt and target, with images), a
`datasets.Dataset`, a list of record dicts or a list of `Example`s. Nothing here raises for one bad
record: malformed records, missing or unreadable images and samples without a response token
within max_seq_len are skipped and counted; over-long samples are truncated and counted.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .config import TrainConfig
from .data.encode import IGNORE_INDEX, EncodedExample, encode_dataset
from .data.records import Example, read_examples
from .distributed import Distributed

if TYPE_CHECKING:
    from .model import MMAdapter

SCIENCEQA_PREFIX = "scienceqa:"


@dataclass
class PreparedData:
    samples: list[EncodedExample]
    label_counts: list[int]  # positions the loss sees per sample (labels shifted by one)
    image_rows: list[int]  # row of `features`, -1 without an image
    features: Tensor | None  # [n_images, F] on the model's device
    summary: dict[str, Any]  # counts for the run summary
    fingerprint: str  # of tokens, labels and images: a resumed run must see the same data


def prepare_data(model: MMAdapter, source: Any, config: TrainConfig, template: str, dist: Distributed,
                 eval_split: bool = False, known_images: dict[str, Tensor | None] | None = None) -> PreparedData:
    """Read, encode, and encode every unique image once (processes share the work).

    known_images: features by image key from an earlier call (None: unreadable); new ones are added,
    so training and eval data never encode the same picture twice.
    """
    examples, read = read_training_source(source, config, template, eval_split)
    encoded, stats = encode_dataset(examples, model.tokenizer, template, config.max_seq_len,
                                    progress=config.progress and dist.main)
    skipped = Counter(read["skipped"])
    skipped.update(stats.dropped)
    keys = [None if s.image is None else _image_key(s.image) for s in encoded]
    first_source = {k: s.image for k, s in zip(keys, encoded) if k is not None}
    unique = list(first_source)  # in order of first appearance
    readable: list[bool] = []
    features = None
    if unique:
        if model.vision is None or model.adapter.projector is None:
            raise ValueError(f"{read['source']} has samples with images but the model has no vision tower/projector; "
                             "build it with vision=VisionConfig(...) (CLI: --vision MODEL) or drop the images")
        known = {} if known_images is None else known_images
        todo = [k for k in unique if k not in known]
        if todo:
            table, ok = image_feature_table(model, [first_source[k] for k in todo], config, dist)
            known.update({k: row if good else None for k, row, good in zip(todo, table, ok)})
        readable = [known[k] is not None for k in unique]
        zeros = torch.zeros(model.vision.feature_dim, device=model.device)
        features = torch.stack([zeros if known[k] is None else known[k] for k in unique])  # [n_images, F]
    row_of = {k: i for i, k in enumerate(unique)}
    samples, rows = [], []
    for key, sample in zip(keys, encoded):
        row = -1 if key is None else row_of[key]
        if row >= 0 and not readable[row]:
            skipped["unreadable image"] += 1
            continue
        samples.append(sample)
        rows.append(row)
    if not samples:
        raise ValueError(f"{read['source']}: no usable sample (read {read['records']} records; skipped: "
                         f"{dict(skipped) or 'none'}); check the data format and max_seq_len")
    label_counts = [sum(label != IGNORE_INDEX for label in s.labels[1:]) for s in samples]
    digest = hashlib.sha256()
    for s, row in zip(samples, rows):
        digest.update(json.dumps([s.tokens, s.labels, unique[row] if row >= 0 else None]).encode())
    summary = {"source": read["source"], "records": read["records"], "samples": len(samples),
               "truncated": sum(s.truncated for s in samples), "skipped": dict(skipped),
               "images": sum(readable), "samples_with_image": sum(r >= 0 for r in rows),
               "tokens": sum(len(s) for s in samples), "label_tokens": sum(label_counts)}
    return PreparedData(samples, label_counts, rows, features, summary, digest.hexdigest()[:16])


def read_training_source(source: Any, config: TrainConfig, template: str, eval_split: bool = False
                         ) -> tuple[list[Example], dict[str, Any]]:
    """Examples and read counts ({source, records, skipped: {reason: n}}) from any supported source."""
    if isinstance(source, (str, os.PathLike)) and str(source).startswith(SCIENCEQA_PREFIX):
        split = config.scienceqa_eval_split if eval_split else config.scienceqa_split
        return read_scienceqa(str(source)[len(SCIENCEQA_PREFIX):], split, config.scienceqa_format, template)
    if isinstance(source, Sequence) and source and all(isinstance(x, Example) for x in source):
        return list(source), {"source": "examples", "records": len(source), "skipped": {}}
    examples, stats = read_examples(source, config.image_root)
    return examples, {"source": stats.source, "records": stats.total, "skipped": dict(stats.skipped)}


def read_scienceqa(root: str, split: str, fmt: str, template: str) -> tuple[list[Example], dict[str, Any]]:
    """ScienceQA problems as (build_prompt, build_target) turns with their images.

    With the "plain" template the target gets a leading space, so the text is the official
    `prompt + " " + target`. Problems whose image file is missing are skipped (and counted).
    """
    from .data.scienceqa import build_prompt, build_target, load_scienceqa

    problems, stats = load_scienceqa(root, split=split)
    skipped = Counter(stats.skipped.values())
    examples = []
    for p in problems:
        if p.image_missing:
            skipped["missing image"] += 1
            continue
        target = (" " if template == "plain" else "") + build_target(p, fmt)
        examples.append(Example(turns=[(build_prompt(p, fmt), target)], image=p.image, id=p.pid))
    return examples, {"source": f"{SCIENCEQA_PREFIX}{root} ({split})", "records": stats.rows,
                      "skipped": dict(skipped)}


def image_feature_table(model: MMAdapter, images: list[Any], config: TrainConfig, dist: Distributed
                        ) -> tuple[Tensor, list[bool]]:
    """Features [n, F] of unique images through the FeatureCache, and whether each could be read.

    Process r encodes every world-th image; one all-reduce assembles the table (each row is filled
    by exactly one process, so the sum is exact).
    """
    from .images import ImageError

    if config.feature_cache_dir:
        from .feature_cache import FeatureCache

        model.use_feature_cache(FeatureCache(disk_dir=config.feature_cache_dir))
    cache, tower = model.feature_cache, model.vision
    n, dim = len(images), tower.feature_dim
    table = torch.zeros(n, dim + 1)  # the last column is 1 where the image could be read
    mine = list(range(dist.rank, n, dist.world))
    bar = tqdm(total=n, desc="image features", unit="img", disable=not (config.progress and dist.main))
    for start in range(0, len(mine), config.feature_batch_size):
        chunk = mine[start:start + config.feature_batch_size]
        try:
            table[chunk, :dim] = cache.features(tower, [images[i] for i in chunk]).float().cpu()
            table[chunk, dim] = 1.0
        except (ImageError, OSError):  # find the bad ones; the others still count
            for i in chunk:
                try:
                    table[i, :dim] = cache.features(tower, [images[i]])[0].float().cpu()
                    table[i, dim] = 1.0
                except (ImageError, OSError) as e:
                    tqdm.write(f"skipping the samples of an unreadable image: {e}", file=sys.stderr)
        bar.update(min(len(chunk) * dist.world, n - bar.n))
    bar.close()
    table = dist.all_reduce(table)
    return table[:, :dim].to(model.device), [bool(x > 0) for x in table[:, dim]]


def format_data_summary(name: str, s: Mapping[str, Any]) -> str:
    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(s["skipped"].items(), key=lambda kv: -kv[1]))
    images = f", {s['samples_with_image']} with images ({s['images']} unique)" if s["images"] else ""
    return (f"{name} data {s['source']}: {s['samples']} samples from {s['records']} records{images}, "
            f"{s['truncated']} truncated at max_seq_len, skipped: {skipped or 'none'}; "
            f"{s['tokens']} tokens, {s['label_tokens']} with loss")


def _image_key(image: Any) -> str:
    """Identity of an image source for de-duplication (the FeatureCache keys by pixels besides)."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return "sha256:" + hashlib.sha256(bytes(image)).hexdigest()
    return f"object:{id(image)}"
