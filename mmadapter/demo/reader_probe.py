"""Question-conditioned tower probe: what a reader that knows the question gets out of a tower, per question type.

The linear probe (probe.py) asks what one global vector carries; this asks what an adapter could read
from the tower for each kind of shapes-world question, so a candidate tower is judged before adapter
time is spent on it. The tower's features are computed once, the way the adapter gets them
(VisionTower: multi-scale global features for the MLP projector, every last-layer token for the
visual-query projector), and cached; then small readers (readers.py) are trained on the cached
features to answer every templated question of shapes.questions() except captions:

    global     question embedding ⊕ global features -> MLP
    tokens     one question-made query, one 4-head attention read over the tokens -> MLP
    tokens-x2  two sequential reads, the second query made from the question and the first read
    blind      the most frequent training answer of each (template, colour, shape): no image at all

Trained on "val" scenes, scored on "test" scenes (never the adapter's "train" scenes).

    python -m mmadapter.demo.reader_probe --tower ShapesCLIP-64:shapes-demo --out runs/probe/shipped
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..atomic import atomic_save, atomic_write_text
from ..config import VisionConfig
from ..data import shapes
from .probe import TEST_SPLIT, TRAIN_SPLIT, featurise_scenes
from .readers import GlobalReader, QuestionEmbedding, TokenReader

# (template, question type): every question shapes.questions() asks except the caption
TEMPLATES: tuple[tuple[str, str], ...] = (
    ("what color is this shape?", "lone-colour"),
    ("what color is the {shape}?", "colour-of-shape"),
    ("what shape is the {color} object?", "shape-of-colour"),
    ("is the {color} object on the left or on the right?", "left-right"),
    ("is the {color} object at the top or at the bottom?", "top-bottom"),
    ("how many objects are there?", "count-objects"),
    ("how many {shape}s are there?", "count-shape"),
    ("how many objects have the same shape as the {color} object?", "same-shape"),
    ("what shape is the object closest to the {color} object?", "closest"),
    ("what shape is the object farthest from the {color} object?", "farthest"),
)
QUESTION_TYPES = tuple(kind for _, kind in TEMPLATES)
ANSWERS: tuple[str, ...] = (*shapes.COLORS, *shapes.SHAPES, "left", "right", "top", "bottom",
                            *(str(n) for n in range(shapes.MAX_OBJECTS + 1)))
READERS = ("global", "tokens", "tokens-x2")
CHUNK = 250  # scenes per cache file: an interrupted caching run loses at most one chunk
_COLOR_WORD = re.compile(rf"\b({'|'.join(shapes.COLORS)})\b")
_SHAPE_WORD = re.compile(rf"\b({'|'.join(shapes.SHAPES)})(?=s?\b)")


@dataclass
class ProbeTraining:
    steps: int = 3000
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    seed: int = 0


@dataclass
class ProbeSet:
    """Features of S scenes and Q questions about them."""

    global_features: torch.Tensor  # [S, G]
    tokens: torch.Tensor  # [S, T, E]
    questions: torch.Tensor  # [Q, 5] long: scene index, template, colour (0 = none), shape (0 = none), answer


# --- questions -----------------------------------------------------------------------------------


def encode_question(text: str) -> tuple[int, int, int]:
    """Question text -> (template id, colour id, shape id), ids 1-based in shapes' vocabulary, 0 if not named."""
    text = " ".join(text.lower().split())
    colour, shape = _COLOR_WORD.search(text), _SHAPE_WORD.search(text)
    template = _SHAPE_WORD.sub("{shape}", _COLOR_WORD.sub("{color}", text))
    ids = [t for t, _ in TEMPLATES]
    if template not in ids:
        raise ValueError(f"{text!r} is not a question the reader probe knows; it reads the templates of "
                         "shapes.questions() except captions")
    return (ids.index(template), 1 + list(shapes.COLORS).index(colour[1]) if colour else 0,
            1 + shapes.SHAPES.index(shape[1]) if shape else 0)


def scene_questions(scenes: list[shapes.Scene]) -> torch.Tensor:
    """Every well-posed non-caption question of every scene -> [Q, 5] rows as in ProbeSet.questions."""
    rows = []
    for index, scene in enumerate(scenes):
        for qa in shapes.questions(scene):
            if qa.kind != "caption":
                rows.append((index, *encode_question(qa.question), ANSWERS.index(qa.answer)))
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 5)


# --- features ------------------------------------------------------------------------------------


class TowerFeatures:
    """A tower's features as the adapter gets them: global (MLP projector) and all last-layer tokens
    (visual-query projector), from two VisionTowers over the same weights."""

    def __init__(self, config: VisionConfig) -> None:
        from ..vision import VisionTower

        self.global_tower = VisionTower(dataclasses.replace(config, projector="mlp"))
        self.token_tower = VisionTower(dataclasses.replace(config, projector="visual-query"))
        self.global_dim = self.global_tower.feature_dim
        self.token_dim = self.token_tower.config.clip_dim
        self.n_tokens = self.token_tower.feature_dim // self.token_dim
        self.fingerprint = f"{self.global_tower.fingerprint}+{self.token_tower.fingerprint}"

    def __call__(self, images: list) -> torch.Tensor:
        """PIL images -> [B, G + T*E]: global features, then the flattened tokens."""
        pixels = self.global_tower.preprocess_batch(images)
        return torch.cat([self.global_tower(pixels), self.token_tower(pixels)], dim=-1)


def cache_features(tower: TowerFeatures, folder: Path, split: str, n_scenes: int, progress: bool = True,
                   chunk_size: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Global [N, G] and token [N, T, E] features of scenes 0..N-1 of a split, computed once per chunk of
    scenes into folder/{split}-{start}-{end}.safetensors; chunks already there are read back."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    parts_global, parts_tokens = [], []
    for start in tqdm(range(0, n_scenes, chunk_size), desc=f"{split} features", disable=not progress):
        end = min(start + chunk_size, n_scenes)
        path = folder / f"{split}-{start:06d}-{end:06d}.safetensors"
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("tower") != tower.fingerprint:
                    raise ValueError(f"{path} holds features of another tower ({(f.metadata() or {}).get('tower')}, "
                                     f"not {tower.fingerprint}); give this tower its own --out folder")
                chunk = {k: f.get_tensor(k) for k in ("global", "tokens")}
        else:
            flat = featurise_scenes(tower, [shapes.make_scene(split, i) for i in range(start, end)])
            chunk = {"global": flat[:, :tower.global_dim].contiguous(),  # [n, G]
                     "tokens": flat[:, tower.global_dim:].reshape(end - start, tower.n_tokens, tower.token_dim).contiguous()}
            atomic_save(path, lambda tmp: save_file(chunk, str(tmp), metadata={"tower": tower.fingerprint}))
        parts_global.append(chunk["global"])
        parts_tokens.append(chunk["tokens"])
    return torch.cat(parts_global), torch.cat(parts_tokens)


def probe_set(tower: TowerFeatures, folder: Path, split: str, n_scenes: int, progress: bool = True) -> ProbeSet:
    if n_scenes < 1:
        raise ValueError(f"{split}: the probe needs at least one scene, not {n_scenes}")
    global_features, tokens = cache_features(tower, folder, split, n_scenes, progress)
    return ProbeSet(global_features, tokens, scene_questions([shapes.make_scene(split, i) for i in range(n_scenes)]))


# --- readers -------------------------------------------------------------------------------------


def make_reader(name: str, train: ProbeSet, width: int = 64) -> torch.nn.Module:
    embed = QuestionEmbedding(len(TEMPLATES), len(shapes.COLORS), len(shapes.SHAPES), width)
    n_tokens, token_dim = train.tokens.shape[1:]
    if name == "global":
        return GlobalReader(embed, train.global_features.shape[1], len(ANSWERS), width)
    if name in ("tokens", "tokens-x2"):
        return TokenReader(embed, n_tokens, token_dim, len(ANSWERS), width, reads=2 if name == "tokens-x2" else 1)
    raise ValueError(f"unknown reader {name!r}; use one of {', '.join(READERS)}")


def standardised(train: ProbeSet, test: ProbeSet) -> tuple[ProbeSet, ProbeSet]:
    """Both sets with every feature channel scaled by the training set's mean and std."""
    g_mean, g_std = train.global_features.mean(0), train.global_features.std(0) + 1e-6  # [G]
    t_mean, t_std = train.tokens.mean((0, 1)), train.tokens.std((0, 1)) + 1e-6  # [E]
    return tuple(ProbeSet((s.global_features - g_mean) / g_std, (s.tokens - t_mean) / t_std, s.questions)
                 for s in (train, test))


def train_reader(reader: torch.nn.Module, train: ProbeSet, test: ProbeSet, config: ProbeTraining,
                 progress: bool = True, desc: str = "reader") -> dict[str, float]:
    """Train on (standardised) `train` with AdamW and a cosine schedule; accuracy (%) per question type on `test`."""
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(reader.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    warmup = max(1, min(config.warmup_steps, config.steps // 10))
    reader.train()
    bar = tqdm(range(config.steps), desc=desc, disable=not progress)
    for step in bar:
        lr = config.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = train.questions[torch.randint(len(train.questions), (config.batch_size,), generator=generator)]
        logits = reader(*_features(reader, train, rows[:, 0]), rows[:, 1:4])  # [B, A]
        loss = torch.nn.functional.cross_entropy(logits, rows[:, 4])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    reader.eval()
    with torch.no_grad():
        predicted = torch.cat([reader(*_features(reader, test, rows[:, 0]), rows[:, 1:4]).argmax(-1)
                               for rows in test.questions.split(1024)])
    return per_type_accuracy(test.questions, predicted)


def _features(reader: torch.nn.Module, data: ProbeSet, scenes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The global features [B, G] and tokens [B, T, E] of the scenes; tokens only for a reader that reads them."""
    tokens = data.tokens[scenes] if reader.reads_tokens else data.tokens[:0]
    return data.global_features[scenes], tokens


def blind_answers(train: ProbeSet, test: ProbeSet) -> dict[str, float]:
    """Accuracy (%) per type of answering every (template, colour, shape) with its most frequent training answer."""
    counts: dict[tuple[int, ...], Counter] = defaultdict(Counter)
    for row in train.questions.tolist():
        counts[tuple(row[1:4])][row[4]] += 1
    predicted = torch.tensor([counts[tuple(row[1:4])].most_common(1)[0][0] if counts[tuple(row[1:4])] else -1
                              for row in test.questions.tolist()], dtype=torch.long)
    return per_type_accuracy(test.questions, predicted)


def per_type_accuracy(questions: torch.Tensor, predicted: torch.Tensor) -> dict[str, float]:
    right = predicted == questions[:, 4]
    return {kind: round(100 * float(right[questions[:, 1] == t].float().mean()), 1)
            for t, kind in enumerate(QUESTION_TYPES) if bool((questions[:, 1] == t).any())}


# --- the whole probe -----------------------------------------------------------------------------


def run_probe(config: VisionConfig, out: Path, train_scenes: int = 3000, test_scenes: int = 600,
              training: ProbeTraining | None = None, readers: tuple[str, ...] = READERS,
              progress: bool = True) -> dict[str, Any]:
    """Cache the tower's features in out/features, train every reader, write out/reader_probe.json; the results."""
    training = training or ProbeTraining()
    t0 = time.time()
    tower = TowerFeatures(config)
    train = probe_set(tower, out / "features", TRAIN_SPLIT, train_scenes, progress)
    test = probe_set(tower, out / "features", TEST_SPLIT, test_scenes, progress)
    feature_seconds = time.time() - t0
    train, test = standardised(train, test)
    accuracy = {"blind": blind_answers(train, test)}
    for name in readers:
        torch.manual_seed(training.seed)
        accuracy[name] = train_reader(make_reader(name, train), train, test, training, progress, desc=name)
    results = {
        "tower": config.spec, "fingerprint": tower.fingerprint,
        "splits": {"train": TRAIN_SPLIT, "test": TEST_SPLIT}, "train_scenes": train_scenes, "test_scenes": test_scenes,
        "train_questions": len(train.questions),
        "test_questions": {kind: int((test.questions[:, 1] == t).sum()) for t, kind in enumerate(QUESTION_TYPES)},
        "training": dataclasses.asdict(training), "accuracy": accuracy,
        "feature_seconds": round(feature_seconds, 1), "seconds": round(time.time() - t0, 1),
    }
    atomic_write_text(out / "reader_probe.json", json.dumps(results, indent=1))
    return results


def format_table(results: dict[str, Any]) -> str:
    """Markdown: accuracy (%) per question type (rows) and reader (columns)."""
    readers = list(results["accuracy"])
    lines = ["| question type | test questions | " + " | ".join(readers) + " |",
             "|---|---:|" + "---:|" * len(readers)]
    for kind in QUESTION_TYPES:
        cells = [results["accuracy"][r].get(kind) for r in readers]
        lines.append(f"| {kind} | {results['test_questions'].get(kind, 0)} | "
                     + " | ".join("–" if c is None else f"{c:.1f}" for c in cells) + " |")
    lines.append(f"\n{results['tower']}: {results['train_scenes']} training scenes ({results['train_questions']} "
                 f"questions), {results['test_scenes']} test scenes, {results['training']['steps']} steps; "
                 f"{results['seconds']:.0f} s in all.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tower", default="ShapesCLIP-64:shapes-demo",
                        help="MODEL[:WEIGHTS] as --vision takes it (default: the shipped demo tower)")
    parser.add_argument("--out", required=True, help="folder for the feature cache and reader_probe.json")
    parser.add_argument("--train-scenes", type=int, default=3000)
    parser.add_argument("--test-scenes", type=int, default=600)
    parser.add_argument("--steps", type=int, default=ProbeTraining.steps)
    parser.add_argument("--readers", default=",".join(READERS), help=f"comma-separated subset of {','.join(READERS)}")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    readers = tuple(r.strip() for r in args.readers.split(",") if r.strip())
    for name in readers:
        if name not in READERS:
            parser.error(f"--readers: unknown reader {name!r}; use some of {', '.join(READERS)}")
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: train for at least one step")
    results = run_probe(VisionConfig.from_spec(args.tower), Path(args.out), args.train_scenes, args.test_scenes,
                        ProbeTraining(steps=args.steps), readers, progress=not args.no_progress)
    print(format_table(results))
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
