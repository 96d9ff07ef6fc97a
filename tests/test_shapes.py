"""The generated shapes world: determinism, geometry, and every answer recomputed from the scene."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from mmadapter.data import shapes
from mmadapter.data.shapes import Scene, Thing


def hand_scene() -> Scene:
    """Three objects placed by hand; the answers below were worked out on paper."""
    return Scene((
        Thing("red", "circle", x=0.2, y=0.2, r=0.08),
        Thing("blue", "square", x=0.8, y=0.8, r=0.08),
        Thing("orange", "circle", x=0.35, y=0.75, r=0.08),
    ))


@pytest.mark.parametrize("question, answer", [
    ("What color is the square?", "blue"),
    ("What shape is the orange object?", "circle"),
    ("How many objects are there?", "3"),
    ("How many circles are there?", "2"),
    ("How many triangles are there?", "0"),
    ("Is the blue object on the left or on the right?", "right"),
    ("Is the red object at the top or at the bottom?", "top"),
    ("What shape is the object closest to the red object?", "circle"),  # orange: 0.57 away, blue: 0.85
    ("What shape is the object farthest from the red object?", "square"),
    ("How many objects have the same shape as the red object?", "2"),  # itself included, as in Sort-of-CLEVR
    ("Describe this image.", "a red circle, an orange circle and a blue square."),
])
def test_answers_of_a_hand_made_scene(question, answer):
    scene = hand_scene()
    assert shapes.answer_question(scene, question) == answer
    generated = {qa.question: qa.answer for qa in shapes.questions(scene)}
    if question in generated:
        assert generated[question] == answer


def test_every_generated_answer_is_recomputed_from_the_scene():
    kinds = Counter()
    for split in ("train", "test"):
        for index in range(150):
            scene = shapes.make_scene(split, index)
            for qa in shapes.questions(scene):
                kinds[qa.kind] += 1
                assert shapes.answer_question(scene, qa.question) == qa.answer, (split, index, qa)
                if qa.kind == "caption":  # both sides above call caption(): read it back instead
                    assert read_caption(qa.answer) == [(o.color, o.shape) for o in sorted(scene.objects,
                                                                                        key=lambda o: o.x)], qa
    assert set(kinds) == set(shapes.QUESTION_KINDS)


def read_caption(text: str) -> list[tuple[str, str]]:
    """"a red circle, an orange square and a gray triangle." -> [(colour, shape), ...], articles checked."""
    assert text.endswith(".") and text.count(" and ") <= 1, text
    parts = text[:-1].replace(" and ", ", ").split(", ")
    out = []
    for part in parts:
        article, color, shape = part.split(" ")
        assert article == ("an" if color[0] in "aeiou" else "a"), text
        assert color in shapes.COLORS and shape in shapes.SHAPES, text
        out.append((color, shape))
    assert (" and " in text) == (len(out) > 1), text
    return out


def test_scenes_follow_the_rules():
    for index in range(300):
        scene = shapes.make_scene("val", index)
        objs = scene.objects
        assert 1 <= len(objs) <= 6
        assert len({o.color for o in objs}) == len(objs)  # every object a different colour
        for a in objs:
            assert a.shape in shapes.SHAPES and 0 < a.x - a.r and a.x + a.r < 1 and 0 < a.y - a.r and a.y + a.r < 1
            for b in objs:
                if a is not b:
                    assert np.hypot(a.x - b.x, a.y - b.y) > a.r + b.r  # no overlap


def test_generation_is_deterministic_and_splits_differ():
    assert shapes.make_scene("test", 7) == shapes.make_scene("test", 7)
    assert shapes.make_scene("test", 7) != shapes.make_scene("train", 7)
    scene = shapes.make_scene("test", 7)
    a = shapes.render(scene, 96, noise=5.0, jpeg_quality=60, rng=np.random.default_rng(1))
    b = shapes.render(scene, 96, noise=5.0, jpeg_quality=60, rng=np.random.default_rng(1))
    assert a.tobytes() == b.tobytes()
    first, again = shapes.test_set(50), shapes.test_set(50)
    assert first == again


def test_fixed_test_set_has_600_questions_of_every_kind():
    test = shapes.test_set()
    counts = Counter(qa.kind for _, qa in test)
    assert all(counts[kind] == 600 for kind in shapes.QUESTION_KINDS), counts
    assert len(set(test)) == len(test)


@pytest.mark.parametrize("size", [64, 200, 512])
def test_renders_at_any_size_with_the_object_colours(size):
    scene = Scene((Thing("green", "square", 0.3, 0.3, 0.1), Thing("yellow", "triangle", 0.7, 0.7, 0.12)))
    image = shapes.render(scene, size)
    assert image.size == (size, size) and image.mode == "RGB"
    assert image.getpixel((int(0.3 * size), int(0.3 * size))) == shapes.COLORS["green"]
    assert image.getpixel((int(0.7 * size), int(0.72 * size))) == shapes.COLORS["yellow"]
    assert image.getpixel((2, 2)) == (245, 245, 240)  # background


def test_questions_outside_the_templates_are_refused_clearly():
    with pytest.raises(ValueError, match="not a shapes-world question"):
        shapes.answer_question(hand_scene(), "What is the meaning of life?")


def test_answers_compare_after_lower_casing_and_stripping_punctuation():
    assert shapes.normalise_answer(" Red.") == "red"
    assert shapes.normalise_answer("A red circle, a blue square.") == shapes.normalise_answer(
        "a red circle a blue square")


def test_hard_negatives_change_one_binding_and_keep_the_rules():
    """A hard negative keeps the scene's objects, colours and shapes as a multiset of words but changes which goes
    with which (or where): its CLIP caption differs while using the same vocabulary."""
    rng = np.random.default_rng(0)
    changed = Counter()
    for index in range(300):
        scene = shapes.make_scene("val", index)
        negative = shapes.hard_negative(scene, rng)
        assert len(negative.objects) == len(scene.objects)
        assert sorted(o.color for o in negative.objects) == sorted(o.color for o in scene.objects)
        pairs = {(a.color, a.shape, a.x, a.y) for a in scene.objects}
        moved = {(b.color, b.shape, b.x, b.y) for b in negative.objects} - pairs
        assert moved, "a hard negative must differ from its scene"
        for a in negative.objects:
            assert a.r <= a.x <= 1 - a.r and a.r <= a.y <= 1 - a.r  # still inside the image
            for b in negative.objects:
                if a is not b:
                    assert np.hypot(a.x - b.x, a.y - b.y) > a.r + b.r  # still apart
        shape_changed = sorted(o.shape for o in negative.objects) != sorted(o.shape for o in scene.objects)
        same_places = sorted((o.x, o.y) for o in negative.objects) == sorted((o.x, o.y) for o in scene.objects)
        changed["shape" if shape_changed else "colours" if same_places else "mirror"] += 1
        changed["caption differs"] += shapes.clip_caption(negative) != shapes.clip_caption(scene)
    assert min(changed["shape"], changed["colours"], changed["mirror"]) > 50, changed
    # the scene always changes; its coarse caption does not when a mirror keeps every object in the same third
    # (one object near the middle): about 1 in 11, a negative that costs nothing but is no harder
    assert changed["caption differs"] >= 0.85 * 300, changed


def test_pictures_drawn_differently_show_the_same_scene_another_way():
    import numpy as np

    from mmadapter.evaluation.vqa_data import load_shapes_test, read_image

    plain, drawn, other = load_shapes_test(2), load_shapes_test(2, drawn_differently=True), load_shapes_test(2, image_shift=1)
    assert [i.question for i in drawn.items] == [i.question for i in plain.items] == [i.question for i in other.items]
    assert {i.image_key for i in drawn.items}.isdisjoint(i.image_key for i in plain.items)  # never one cached feature
    sizes = set()
    for p, d, o in zip(plain.items, drawn.items, other.items):
        a, b = read_image(p), read_image(d)
        sizes.add(b.size[0])
        assert a.size == (128, 128) and b.size[0] in (96, 144, 224, 256, 320)
        scene = int(p.image_key.removeprefix("scene-"))
        assert np.array_equal(np.asarray(read_image(o)), np.asarray(shapes.render(shapes.make_scene("test", scene + 1), 128)))
        again = shapes.render_differently(shapes.make_scene("test", scene),
                                          np.random.default_rng([shapes.SPLIT_SEEDS["test"], scene, 99]))
        assert np.array_equal(np.asarray(b), np.asarray(again))  # seeded: the same picture every run
    hard = shapes.render(shapes.make_scene("test", 0), 96, antialias=False)
    colours = {tuple(c) for c in np.asarray(hard).reshape(-1, 3)}
    assert colours <= {(245, 245, 240), *shapes.COLORS.values()}  # hard edges: no blended pixels
