"""Learning-curve experiments for the demo adapter: how fast each setting learns, per question kind.

Trains a fresh adapter over the shipped shapes tower on questions of the chosen kinds and scores held-out
questions ("val" scenes) every `--every` steps, so settings are compared by accuracy against question
presentations, minutes per experiment instead of a whole build. Cheap by construction: tower features
are computed once per scene, the frozen layers below the adapter once per distinct token sequence, and
answers are scored by the first answer token's log-probability among the kind's possible answers (one
forward pass, no decoding; caption questions are left out for that reason).

    python -m mmadapter.demo.experiment --kinds position --projector spatial --steps 600 --out runs/exp/pos

Writes curve.json ({"settings", "points": [{"step", "presentations", "seconds", "loss", "accuracy",
"train_accuracy"}]}; accuracy on held-out scenes, train_accuracy on as many of the training questions)
and curve.png in --out.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..atomic import atomic_write_text
from ..data import shapes

SCORED_KINDS = tuple(k for k in shapes.QUESTION_KINDS if k != "caption")


@dataclass
class Experiment:
    kinds: tuple[str, ...] = ("position",)
    projector: str = "spatial"  # mlp (V1, one token), spatial, visual-query
    spatial_grid: int | None = None  # None: one token per patch
    n_prompts: int = 10  # for mlp; spatial/visual-query use the token count
    n_layers: int = 16
    prompt_init_std: float = 1.0  # the prompts' N(0, std) start, against the image tokens added to them
    position_code: float = 0.0  # spatial: start the position embedding as a 2-D sinusoid of this RMS (0: zeros)
    template: str = "chat-short"
    tower: str = "ShapesCLIP-64:shapes-demo"
    steps: int = 600
    every: int = 100
    batch_size: int = 16
    lr: float = 5e-3
    gate_lr_scale: float = 1.0  # the gates' learning rate relative to lr
    projector_lr_scale: float = 1.0
    warmup_steps: int = 50
    train_scenes: int = 2000
    max_objects: int = 6  # scenes of 1..max_objects objects (1: lone objects, the easiest read)
    lora_rank: int = 0  # V2 LoRA of this rank, trained on the adapted layers' `lora_on` projections only
    lora_on: str = "wq"  # comma-separated of wq, wk, wv, wo, w1, w2, w3
    curriculum_steps: int = 0  # over these first steps, train on scenes of at most 1, 2, ... max_objects objects
    questions_per_kind: int = 3  # per scene and kind
    eval_per_kind: int = 200
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def build_experiment_model(e: Experiment) -> Any:
    """The embedded base with the experiment's tower and a fresh adapter."""
    from ..config import VisionConfig
    from .recipe import demo_model

    vision = VisionConfig.from_spec(e.tower, projector=e.projector, spatial_grid=e.spatial_grid)
    model = demo_model(vision, e.n_layers, e.n_prompts, e.template, e.prompt_init_std, e.seed, e.lora_rank)
    if e.lora_rank:  # LoRA only where the adapter is: the layers below stay the base (their cached output holds)
        tuned = set(e.lora_on.split(","))
        for i, layer in enumerate(model.adapter.tuning.layers):
            for name in layer.lora_a:
                train = i >= model.adapter.first_layer and name in tuned
                layer.lora_a[name].requires_grad_(train)
                layer.lora_b[name].requires_grad_(train)
    if e.position_code:
        position = model.adapter.projector.position  # [K, C]: the class token, then a g x g grid
        with torch.no_grad():
            position.copy_(sinusoid_2d(position.shape[0], position.shape[1], e.position_code))
    return model


def sinusoid_2d(n_tokens: int, dim: int, rms: float) -> torch.Tensor:
    """[K, C] codes of a class token (zeros) and a g x g grid: sines and cosines of row and column at
    several frequencies, scaled to the given root-mean-square, so every region's token differs by place."""
    side = int(round((n_tokens - 1) ** 0.5))
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")  # [g, g]
    n_freq = dim // 4
    freq = torch.pi * torch.arange(1, n_freq + 1) / (2 * side)  # [F]
    parts = [f(c.flatten()[:, None].float() * freq) for c in (rows, cols) for f in (torch.sin, torch.cos)]
    grid = torch.cat(parts, dim=1)  # [g*g, 4F]
    code = torch.zeros(n_tokens, dim)
    code[1:, :grid.shape[1]] = grid
    return code * rms / code[1:].pow(2).mean().sqrt()


@dataclass
class Questions:
    """Encoded questions of some scenes: token ids, where the answer starts, and the scene of each."""

    tokens: list[list[int]]  # prompt + answer + end of turn
    answer_at: list[int]  # index of the first answer token
    scene: list[int]  # row of the scene's features
    kind: list[str]
    answer: list[str]
    objects: list[int] = field(default_factory=list)  # objects in the question's scene

    def subset(self, rows: Any) -> Questions:
        """The questions at `rows`, their scene rows unchanged (they index the same features)."""
        return Questions(*([getattr(self, f.name)[i] for i in rows] for f in fields(self)))


def make_questions(model: Any, split: str, n_scenes: int, kinds: tuple[str, ...], per_kind: int,
                   seed: int, max_objects: int = shapes.MAX_OBJECTS) -> tuple[Questions, list[Any]]:
    """Questions of the given kinds about scenes 0..n_scenes-1 of a split, and the scenes' pictures
    (training-style renderings: sizes 64-192, tints, noise, JPEG)."""
    q = Questions([], [], [], [], [])
    images = []
    for index in range(n_scenes):
        scene = shapes.make_scene(split, index) if max_objects >= shapes.MAX_OBJECTS else \
            shapes.sample_scene(shapes.scene_rng(split, index), n_objects=1 + index % max_objects)
        rng = np.random.default_rng([shapes.SPLIT_SEEDS[split], index, seed])
        images.append(shapes.render_varied(scene, rng))
        for qa in shapes.pick_questions(scene, rng, per_kind=per_kind):
            if qa.kind not in kinds:
                continue
            prompt = model.prompt_ids(qa.question, template=model.adapter.template)
            reply = model.tokenizer.encode(qa.answer + "<|im_end|>", bos=False)
            q.tokens.append(prompt + reply)
            q.answer_at.append(len(prompt))
            q.scene.append(index)
            q.kind.append(qa.kind)
            q.answer.append(qa.answer)
            q.objects.append(len(scene.objects))
    return q, images


def tower_features(model: Any, images: list[Any], batch_size: int = 64) -> torch.Tensor:
    """[N, F] features of every picture, computed once."""
    rows = []
    with torch.no_grad():
        for start in tqdm(range(0, len(images), batch_size), desc="tower features", leave=False):
            batch = images[start:start + batch_size]
            rows.append(model.vision(model.vision.preprocess_batch(batch)))
    return torch.cat(rows)


def padded(sequences: list[list[int]]) -> torch.Tensor:
    width = max(map(len, sequences))
    return torch.tensor([s + [0] * (width - len(s)) for s in sequences])  # right padding: causal layers ignore it


class PrefixStore:
    """The frozen layers' output per distinct token sequence (questions repeat across scenes)."""

    def __init__(self, model: Any) -> None:
        self.model, self.rows = model, {}

    def batch(self, sequences: list[list[int]]) -> torch.Tensor:
        missing = sorted({tuple(s) for s in sequences} - self.rows.keys())
        if missing:
            with torch.no_grad():
                hidden = self.model.frozen_prefix(padded([list(s) for s in missing]))  # [M, T, C]
            for s, h in zip(missing, hidden):
                self.rows[s] = h[:len(s)]
        width = max(map(len, sequences))
        out = torch.zeros(len(sequences), width, self.model.base.config.dim)
        for i, s in enumerate(sequences):
            out[i, :len(s)] = self.rows[tuple(s)]
        return out


def score(model: Any, q: Questions, features: torch.Tensor, candidates: dict[str, list[str]],
          batch_size: int = 64) -> dict[str, float]:
    """Accuracy (%) per kind: the answer whose first token is most likely after the prompt."""
    first = {kind: [model.tokenizer.encode(a, bos=False)[0] for a in answers] for kind, answers in candidates.items()}
    hits: dict[str, list[int]] = {}
    with torch.no_grad():
        for start in range(0, len(q.tokens), batch_size):
            rows = range(start, min(start + batch_size, len(q.tokens)))
            prompts = [q.tokens[i][:q.answer_at[i]] for i in rows]
            feats = features[[q.scene[i] for i in rows]]
            logits = model(padded(prompts), feats, torch.ones(len(prompts), dtype=torch.bool))  # [B, T, V]
            for j, i in enumerate(rows):
                last = logits[j, len(prompts[j]) - 1]
                options = candidates[q.kind[i]]
                best = options[int(last[first[q.kind[i]]].argmax())]
                hits.setdefault(q.kind[i], []).append(int(best == q.answer[i]))
    return {kind: 100 * float(np.mean(v)) for kind, v in sorted(hits.items())}


class Sampler:
    """Which training questions each step trains on: epochs of shuffled questions, after a curriculum whose
    stage s (of max_objects equal stages over the first curriculum_steps steps) draws only questions about
    scenes of at most s objects, lone objects first."""

    def __init__(self, objects: list[int], batch_size: int, curriculum_steps: int, max_objects: int,
                 seed: int) -> None:
        self.objects, self.batch_size, self.seed = np.array(objects), batch_size, seed
        self.curriculum_steps, self.max_objects = curriculum_steps, max_objects
        self.rng = np.random.default_rng(seed)
        self.order, self.cursor = self.rng.permutation(len(objects)), 0

    def allowed_objects(self, step: int) -> int:
        if step > self.curriculum_steps:
            return self.max_objects
        return 1 + (step - 1) * self.max_objects // self.curriculum_steps

    def rows(self, step: int) -> np.ndarray:
        """Question rows [batch_size] of step 1, 2, ..."""
        if step <= self.curriculum_steps:
            pool = np.flatnonzero(self.objects <= self.allowed_objects(step))
            if not len(pool):
                raise ValueError(f"the curriculum's stage {self.allowed_objects(step)} has no training questions; "
                                 "generate more training scenes (--train-scenes)")
            return self.rng.choice(pool, self.batch_size)
        if self.cursor + self.batch_size > len(self.order):
            self.order, self.cursor = self.rng.permutation(len(self.objects)), 0
        rows = self.order[self.cursor:self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return rows


def run(e: Experiment, out: Path, progress: bool = True) -> dict[str, Any]:
    torch.manual_seed(e.seed)
    model = build_experiment_model(e)
    train_q, train_images = make_questions(model, "train", e.train_scenes, e.kinds, e.questions_per_kind, e.seed,
                                           e.max_objects)
    eval_scenes = max(1, e.eval_per_kind)  # one question per kind per scene at most
    eval_q, eval_images = make_questions(model, "val", eval_scenes, e.kinds, 1, e.seed + 1, e.max_objects)
    candidates: dict[str, list[str]] = {}
    for kind, answer in zip(train_q.kind + eval_q.kind, train_q.answer + eval_q.answer):
        candidates.setdefault(kind, [])
        if answer not in candidates[kind]:
            candidates[kind].append(answer)
    train_features, eval_features = tower_features(model, train_images), tower_features(model, eval_images)
    # as many training questions as held-out ones, scored alike: learnt (both rise) or memorised (only this one)?
    n_seen = min(len(train_q.tokens), len(eval_q.tokens))
    seen = train_q.subset(np.random.default_rng(e.seed).choice(len(train_q.tokens), n_seen, replace=False))
    prefix = PrefixStore(model)
    adapter = model.adapter
    groups = {"gates": [adapter.gates], "projector": list(adapter.projector.parameters()),
              "prompts": [p for n, p in adapter.named_parameters() if not n.startswith(("gates", "projector"))]}
    scale = {"gates": e.gate_lr_scale, "projector": e.projector_lr_scale, "prompts": 1.0}
    optimizer = torch.optim.AdamW([{"params": ps, "lr": e.lr * scale[g], "base_lr": e.lr * scale[g],
                                    "weight_decay": 0.0 if g == "gates" else 0.02} for g, ps in groups.items()],
                                  betas=(0.9, 0.95))
    sampler = Sampler(train_q.objects, e.batch_size, e.curriculum_steps, e.max_objects, e.seed)
    points: list[dict[str, Any]] = []
    t0, losses = time.time(), []

    def record(step: int) -> None:
        accuracy = score(model, eval_q, eval_features, candidates)
        points.append({"step": step, "presentations": step * e.batch_size, "seconds": round(time.time() - t0, 1),
                       "loss": float(np.mean(losses[-e.every:])) if losses else None, "accuracy": accuracy,
                       "train_accuracy": score(model, seen, train_features, candidates),
                       "gate_max": float(adapter.gates.detach().tanh().abs().max())})
        if progress:
            print(json.dumps(points[-1]))
        out.mkdir(parents=True, exist_ok=True)  # the curve so far: a stopped run keeps what it measured
        atomic_write_text(out / "curve.json", json.dumps({"settings": asdict(e), "train_questions": len(train_q.tokens),
                                                          "points": points}, indent=1))

    record(0)
    for step in tqdm(range(1, e.steps + 1), desc="steps", disable=not progress):
        rows = sampler.rows(step)
        sequences = [train_q.tokens[i] for i in rows]
        tokens = padded(sequences)
        labels = torch.full_like(tokens, -100)
        for j, i in enumerate(rows):
            labels[j, train_q.answer_at[i]:len(sequences[j])] = tokens[j, train_q.answer_at[i]:len(sequences[j])]
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * min(1.0, step / max(1, e.warmup_steps))
        loss = model.loss(tokens, labels, train_features[[train_q.scene[i] for i in rows]],
                          torch.ones(len(rows), dtype=torch.bool), prefix=prefix.batch(sequences))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % e.every == 0 or step == e.steps:
            record(step)
    from ..plot import plot_accuracy_curves

    plot_accuracy_curves(points, out / "curve.png", f"{', '.join(e.kinds)}: held-out accuracy")
    return json.loads((out / "curve.json").read_text(encoding="utf-8"))


def describe_settings(settings: dict[str, Any]) -> str:
    """The settings that differ from the defaults, in words (older curve files lack the newer knobs)."""
    defaults = asdict(Experiment())
    words = {"projector": "{} projector", "spatial_grid": "{0}x{0} regions", "n_layers": "{} adapted layers",
             "n_prompts": "{} prompts", "prompt_init_std": "prompt init std {}", "position_code": "position code {}",
             "gate_lr_scale": "gate lr ×{}", "projector_lr_scale": "projector lr ×{}", "lr": "lr {}",
             "batch_size": "batch {}", "max_objects": "scenes of ≤ {} objects",
             "curriculum_steps": "curriculum over {} steps", "lora_rank": "LoRA rank {}", "lora_on": "LoRA on {}",
             "template": "template {}", "train_scenes": "{} training scenes"}
    parts = [f"{settings['projector']} projector", f"{settings['n_layers']} adapted layers"]
    for key, form in words.items():
        if key in ("projector", "n_layers") or key not in settings:
            continue
        shown = settings.get("lora_rank") if key == "lora_on" else settings[key] != defaults[key]
        if not shown:
            continue
        parts.append(form.format(f"{settings[key]:g}" if isinstance(settings[key], float) else settings[key]))
    return ", ".join(parts)


def format_curves(curves: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per experiment and question type, held-out accuracy at each evaluation."""
    lines = ["| experiment | settings (besides the defaults) | accuracy (%) at presentations |", "|---|---|---|"]
    for name, curve in curves.items():
        e = curve["settings"]
        for kind in e["kinds"]:
            points = ", ".join(f"{p['accuracy'][kind]:.0f} @ {p['presentations']:,}" for p in curve["points"])
            lines.append(f"| {name} ({kind}) | {describe_settings(e)} | {points} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Experiment()
    for name, value in asdict(defaults).items():
        if name == "extra":
            continue
        flag = "--" + name.replace("_", "-")
        if name == "kinds":
            parser.add_argument(flag, default=",".join(value), help=f"comma-separated, of {', '.join(SCORED_KINDS)}")
        elif name == "spatial_grid":
            parser.add_argument(flag, type=int, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    parser.add_argument("--out", required=True)
    args = vars(parser.parse_args(argv))
    out = Path(args.pop("out"))
    args["kinds"] = tuple(k for k in args["kinds"].split(",") if k)
    unknown = set(args["kinds"]) - set(SCORED_KINDS)
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)}; use {', '.join(SCORED_KINDS)}")
    run(Experiment(**args), out)


if __name__ == "__main__":
    main()
