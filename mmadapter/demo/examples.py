"""The app's multi-object example pictures: drawn from fixed scenes, so `python -m mmadapter.demo.examples`
writes the same files every time. They ask what one object of a busy picture is, where, and how many: what the
demo is for, whatever it answers on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data import shapes

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "app" / "examples"  # the app's, beside its red circle
SEED = 20261207
SIZE = 192


def example_scenes() -> list[tuple[str, shapes.Scene, str]]:
    """(file name, scene, question) of each example: 3, 4 and 5 objects, each question with one clear answer
    (one square; an object well off the middle line)."""
    rng = np.random.default_rng(SEED)
    out = []
    while len(out) < 3:
        n = 3 + len(out)
        scene = shapes.sample_scene(rng, n)
        if n == 3:
            if [o.shape for o in scene.objects].count("square") != 1:
                continue
            question = "What color is the square?"
        elif n == 4:
            aside = [o for o in scene.objects if abs(o.x - 0.5) >= 0.2]
            if not aside:
                continue
            question = f"Is the {aside[0].color} object on the left or on the right?"
        else:
            question = "How many objects are there?"
        shapes.answer_question(scene, question)  # a template the demo was trained on
        out.append((f"{n}_objects.png", scene, question))
    return out


def write_examples(folder: Path = EXAMPLES_DIR) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, scene, _ in example_scenes():
        shapes.render(scene, SIZE).save(folder / name)
        paths.append(folder / name)
    return paths


if __name__ == "__main__":
    for path in write_examples():
        print(f"wrote {path}")
