"""The image really reaches the LM.

A task where only the picture decides the answer: "What color is this?" over drawn shapes in four
colours, answered with the colour word. Training only the adapter (prompts, gates, projector) over
the frozen SmolLM2-135M and a frozen, randomly initialised tiny CLIP tower must reach >= 95% on
held-out pictures (the answer token's argmax over the whole vocabulary), while the same training
with the image token zeroed cannot beat guessing one colour (<= 40%).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmadapter import AdapterConfig, VisionConfig, build_model, load_base  # noqa: E402
from mmadapter.adapter import Adapter  # noqa: E402
from mmadapter.data.records import Example  # noqa: E402
from mmadapter.train import TrainConfig, train  # noqa: E402
from test_train import COLOURS, draw_picture, one_thread  # noqa: E402,F401
from test_vision import TINY_VIT, register_tiny_models  # noqa: E402

QUESTION = "What color is this?"


@pytest.fixture(scope="module")
def base():
    return load_base("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[str, str]]]:
    root = tmp_path_factory.mktemp("colours")
    register_tiny_models(root)
    names = list(COLOURS)
    sets = {}
    for split, n, seed in (("train", 32, 0), ("test", 32, 1)):
        rng = np.random.default_rng(seed)
        (root / split).mkdir()
        sets[split] = [(draw_picture(root / split / f"{i}.png", names[i % 4], rng), names[i % 4]) for i in range(n)]
    return sets


def train_and_score(base, pictures, output_dir: Path) -> float:
    """Fresh tower (seed 0) and adapter over the shared frozen base; held-out accuracy."""
    torch.manual_seed(0)
    vision = VisionConfig(model=TINY_VIT, pretrained=None, n_scales=2, projector_hidden=64)
    model = build_model(base, AdapterConfig(n_prompts=4, n_layers=4), vision, seed=0)
    examples = [Example(turns=[(QUESTION, " " + colour)], image=path) for path, colour in pictures["train"]]
    config = TrainConfig(output_dir=str(output_dir), template="plain", epochs=8, batch_size=8, lr=1e-2,
                         warmup_epochs=1.0, prefix_cache="memory", save_every=0, progress=False, plot=False)
    train(model, examples, config)

    answer_ids = {colour: model.tokenizer.encode(" " + colour)[0] for colour in COLOURS}
    prompt = model.tokenizer.encode(QUESTION, bos=model.tokenizer.add_bos)
    paths, colours = zip(*pictures["test"])
    with torch.no_grad():
        features, has_image = model.image_features(list(paths))
        logits = model(torch.tensor([prompt] * len(paths)), features, has_image)[:, -1]  # [N, vocab]
    predicted = logits.argmax(-1).tolist()
    return sum(p == answer_ids[c] for p, c in zip(predicted, colours)) / len(colours)


def test_image_decides_the_answer(base, pictures, tmp_path: Path) -> None:
    assert train_and_score(base, pictures, tmp_path / "with_image") >= 0.95


def test_zeroed_image_token_cannot_learn_the_task(base, pictures, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real = Adapter.image_tokens
    monkeypatch.setattr(Adapter, "image_tokens", lambda self, features, has_image=None:
                        real(self, features, has_image) * 0)
    assert train_and_score(base, pictures, tmp_path / "zeroed") <= 0.40
