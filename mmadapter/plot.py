"""The loss curve of a run as a PNG (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .atomic import atomic_save


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a JSONL training log; unparsable lines (a torn last line) are skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_loss_curve(records: Iterable[Mapping[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Training loss per step (raw and smoothed) and eval loss per epoch against the step axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("type") == "train" and r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("type") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="train loss")
        ax.plot(steps, _smooth(losses), color="tab:blue", linewidth=2, label="train loss (smoothed)")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, "o-", color="tab:orange", label="eval loss (per epoch)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per response token")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def _smooth(values: Iterable[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard-style, no lag at the start)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def plot_accuracy_curves(points: Iterable[Mapping[str, Any]], path: str | os.PathLike, title: str = "",
                         chance: Mapping[str, float] | None = None) -> Path:
    """Accuracy per question type (one line each) against training presentations, with optional dotted
    chance levels (e.g. the best an image-blind answerer gets), from points
    [{"presentations": n, "accuracy": {type: percent}}]; a point's "train_accuracy" (the same on training
    questions), where present, is drawn dashed beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = list(points)
    kinds = sorted({k for p in points for k in p["accuracy"]})
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for i, kind in enumerate(kinds):
        series = [(p["presentations"], p["accuracy"][kind]) for p in points if kind in p["accuracy"]]
        color = f"C{i}"
        ax.plot(*zip(*series), "o-", color=color, markersize=3, label=kind)
        seen = [(p["presentations"], p["train_accuracy"][kind]) for p in points if kind in p.get("train_accuracy", {})]
        if seen:  # the same score on training questions: far above the test line means memorised, not learnt
            ax.plot(*zip(*seen), "--", color=color, linewidth=1, label=f"{kind}, training questions")
        if chance and kind in chance:
            ax.axhline(chance[kind], color=color, linestyle=":", linewidth=1)
    ax.set_xlabel("training questions presented")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title or "accuracy per question type")
    ax.grid(alpha=0.3)
    if kinds:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
