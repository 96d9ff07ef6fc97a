"""The shipped demo (shapes-world CLIP tower + adapter over SmolLM2): it loads, sees, and still chats."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mmadapter.adapter_set import NO_ADAPTER, AdapterSet
from mmadapter.data.shapes import COLORS, Scene, Thing, caption, normalise_answer, render
from mmadapter.demo import ADAPTER_FILE, TOWER_FILE, DemoFileError, add_demo_adapter, load_demo

EXAMPLES = Path(__file__).parents[1] / "mmadapter" / "app" / "examples"
ONE_OBJECT = [Scene((Thing(color, shape, x, y, 0.14),)) for color, shape, x, y in [
    ("red", "circle", 0.5, 0.5), ("blue", "square", 0.3, 0.6), ("green", "triangle", 0.6, 0.4),
    ("orange", "circle", 0.7, 0.3), ("yellow", "square", 0.4, 0.7), ("gray", "triangle", 0.5, 0.5),
]]


@pytest.fixture(scope="module")
def demo():
    return load_demo()


def test_the_shipped_files_fit_the_budget():
    assert TOWER_FILE.stat().st_size + ADAPTER_FILE.stat().st_size <= 12 * 2**20


def test_sees_the_colour_of_fixed_images(demo):
    """Shapes are not checked here: the shipped tower binds shape to colour weakly (see the README's table)."""
    images = [render(s, 160) for s in ONE_OBJECT]
    colours = demo.generate(["What color is this shape?"] * len(images), image=images, max_new_tokens=4)
    assert [a.strip().lower().rstrip(".") for a in colours] == [s.objects[0].color for s in ONE_OBJECT]


def test_describes_lone_objects_by_colour_and_shape(demo):
    """The caption of a one-object picture needs both its colour and its shape; the shipped files get five of
    these six right (shape is the weaker half: the README's table), an image-blind answerer one at most."""
    images = [render(s, 160) for s in ONE_OBJECT]
    captions = demo.generate(["Describe this image."] * len(images), image=images, max_new_tokens=12)
    expected = [caption(s) for s in ONE_OBJECT]
    assert sum(got.strip().lower() == want for got, want in zip(captions, expected)) >= 5, captions


def test_zeroing_the_image_token_removes_what_it_saw(demo, monkeypatch):
    """The six pictures with their image token zeroed answer exactly as the adapter's prompts alone (no
    image: the ablation `make demo-eval` reports), and those answers name no colour at all: the colours of
    the test above come through the image token."""
    questions = ["What color is this shape?"] * len(ONE_OBJECT)
    alone = demo.generate(questions, max_new_tokens=4)
    projector = demo.adapter.projector
    monkeypatch.setattr(projector, "forward", lambda features: torch.zeros(  # I_p = 0: [B, C]
        features.shape[0], projector.fc2.out_features, dtype=features.dtype))
    zeroed = demo.generate(questions, image=[render(s, 160) for s in ONE_OBJECT], max_new_tokens=4)
    assert zeroed == alone
    named = [c for a in zeroed for c in COLORS if c in normalise_answer(a).split()]
    assert not named, zeroed


def test_plain_chat_still_works_with_the_demo_adapter(demo):
    assert "Paris" in demo.generate("What is the capital of France?", max_new_tokens=24)


def test_app_example_answers_red_for_the_red_circle(demo):
    from mmadapter.app.service import ChatService

    adapters = AdapterSet(demo)
    name, notes = add_demo_adapter(adapters)
    assert name is not None and any("knows only the generated shapes world" in n for n in notes)
    service = ChatService(demo, adapters, image_adapter=name, status_notes=notes)
    assert "--vision ViT-L-14:openai" in service.status_markdown()
    replies = list(service.answer("What color is this shape?", str(EXAMPLES / "red_circle.png"), [], NO_ADAPTER,
                                  max_new_tokens=8))
    assert replies[-1].text.strip().lower().rstrip(".") == "red"
    assert "cannot see images" in replies[-1].notice  # the base alone was selected: the demo answered


def test_an_adapter_that_cannot_see_says_so_before_answering(demo):
    from mmadapter.app.service import ChatService

    service = ChatService(demo, AdapterSet(demo))  # no image adapter to fall back on
    replies = service.answer("What color is this shape?", str(EXAMPLES / "red_circle.png"), [], NO_ADAPTER,
                             max_new_tokens=4)
    first = next(replies)
    assert first.text == "" and "cannot see images" in first.render()


def test_missing_or_corrupt_shipped_files_are_named(tmp_path):
    with pytest.raises(DemoFileError, match="missing.safetensors is missing"):
        load_demo(adapter=tmp_path / "missing.safetensors")
    bad_tower = tmp_path / TOWER_FILE.name
    bad_tower.write_bytes(TOWER_FILE.read_bytes()[:1000])
    with pytest.raises(DemoFileError, match=f"{bad_tower}.*cannot be loaded"):
        load_demo(tower=bad_tower)
    bad_adapter = tmp_path / ADAPTER_FILE.name
    shutil.copyfile(ADAPTER_FILE, bad_adapter)
    with bad_adapter.open("r+b") as f:
        f.truncate(bad_adapter.stat().st_size - 100)
    with pytest.raises(DemoFileError, match=f"{bad_adapter}.*cannot be loaded"):
        load_demo(adapter=bad_adapter)


def test_the_tower_loss_is_open_clips_clip_loss_plus_hard_negative_captions():
    import open_clip
    import torch

    from mmadapter.demo.tower import contrastive_loss

    torch.manual_seed(0)
    normed = lambda n: torch.nn.functional.normalize(torch.randn(n, 16), dim=-1)  # noqa: E731
    images, texts, scale = normed(8), normed(8), torch.tensor(20.0)
    assert torch.allclose(contrastive_loss(images, texts, scale), open_clip.ClipLoss()(images, texts, scale))
    negatives = normed(24)  # three per image
    with_negatives = contrastive_loss(images, torch.cat([texts, negatives]), scale)
    assert with_negatives > contrastive_loss(images, texts, scale)  # more texts to tell apart on the image side
    aligned = contrastive_loss(images, torch.cat([images, negatives]), torch.tensor(100.0))
    assert aligned < 0.01  # each image's own caption wins against every in-batch and hard-negative text


def test_the_apps_multi_object_examples_are_the_fixed_scenes_drawn_again(demo, tmp_path):
    """The committed example pictures are what `python -m mmadapter.demo.examples` draws (a fixed seed), each
    question has one answer from its scene, and the app offers them."""
    import json

    import numpy as np
    from PIL import Image

    from mmadapter.app.service import ChatService
    from mmadapter.app.ui import build_demo
    from mmadapter.data import shapes
    from mmadapter.demo.examples import EXAMPLES_DIR, example_scenes, write_examples

    fresh = write_examples(tmp_path)
    scenes = example_scenes()
    assert [len(scene.objects) for _, scene, _ in scenes] == [3, 4, 5]
    for path, (name, scene, question) in zip(fresh, scenes):
        committed = np.asarray(Image.open(EXAMPLES_DIR / name))
        assert np.array_equal(committed, np.asarray(Image.open(path))), name
        assert shapes.answer_question(scene, question)
    assert [o.shape for o in scenes[0][1].objects].count("square") == 1  # "the square" names one object
    ui = build_demo(ChatService(demo, AdapterSet(demo)))
    offered = json.dumps([getattr(block, "samples", None) for block in ui.blocks.values()], default=str)
    assert all(question in offered and name in offered for name, _, question in scenes)
