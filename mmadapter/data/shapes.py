"""A generated visual world: coloured circles, squares and triangles, with questions and answers.

In the spirit of Sort-of-CLEVR (Santoro et al. 2017): a light background and 1-6 non-overlapping
objects, each a circle, square or triangle, each a different colour out of six. Everything is pure
PIL + numpy and seeded: scene i of a split is the same on every machine, and renders at any size.

    scene = make_scene("test", 0)            # a Scene: objects with colour, shape, centre, radius
    image = render(scene, size=256)          # PIL RGB image
    qas = questions(scene, rng)              # [QA(kind, question, answer)], answers from the scene
    answer_question(scene, qa.question)      # parses the question text and recomputes its answer

Coordinates are fractions of the image side, x to the right and y downwards. Answers are one word or
number in lower case, except captions: the objects from left to right, "a red circle, a blue square
and a gray triangle.".
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 90, 220),
    "orange": (245, 140, 20), "yellow": (230, 200, 20), "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
QUESTION_KINDS = ("colour", "shape", "count", "position", "relational", "caption")
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}
MAX_OBJECTS = 6
MIN_RADIUS = 0.075  # half the object's extent, as a fraction of the image side
MAX_RADIUS = {1: 0.34, 2: 0.22, 3: 0.15}  # few objects may be big (a user's drawing); 4-6: at most 0.11
POSITION_MARGIN = 0.06  # left/right and top/bottom are asked only this far from the middle line
DISTANCE_MARGIN = 1.25  # closest/farthest are asked only when the runner-up is this much farther/closer


@dataclass(frozen=True)
class Thing:
    color: str
    shape: str
    x: float  # centre, fraction of the width (0 = left edge)
    y: float  # centre, fraction of the height (0 = top edge)
    r: float  # half the extent, fraction of the side


@dataclass(frozen=True)
class Scene:
    objects: tuple[Thing, ...]

    def by_color(self, color: str) -> Thing:
        return next(o for o in self.objects if o.color == color)

    def left_to_right(self) -> list[Thing]:
        return sorted(self.objects, key=lambda o: (o.x, o.y))


@dataclass(frozen=True)
class QA:
    kind: str  # one of QUESTION_KINDS
    question: str
    answer: str


def scene_rng(split: str, index: int) -> np.random.Generator:
    """The generator of scene `index` of a split: splits differ by seed, scenes by index."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLIT_SEEDS)}")
    return np.random.default_rng([SPLIT_SEEDS[split], index])


def make_scene(split: str, index: int) -> Scene:
    return sample_scene(scene_rng(split, index))


def sample_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    """1-6 objects of distinct colours, placed without overlap (rejection sampling)."""
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if n_objects is None else n_objects
    if not 1 <= n <= MAX_OBJECTS:
        raise ValueError(f"a scene holds 1 to {MAX_OBJECTS} objects, not {n}")
    colors = rng.permutation(list(COLORS))[:n]
    while True:  # a fresh layout if objects do not fit (rare)
        placed: list[Thing] = []
        for color in colors:
            for _ in range(200):
                r = float(rng.uniform(MIN_RADIUS, MAX_RADIUS.get(n, 0.11)))
                x, y = (float(v) for v in rng.uniform(r + 0.02, 1 - r - 0.02, size=2))
                if all(np.hypot(x - o.x, y - o.y) > (r + o.r) * 1.15 + 0.02 for o in placed):
                    placed.append(Thing(str(color), SHAPES[int(rng.integers(3))], x, y, r))
                    break
            else:
                break
        if len(placed) == n:
            return Scene(tuple(placed))


def hard_negative(scene: Scene, rng: np.random.Generator) -> Scene:
    """The same scene with one binding changed: an object's shape, two objects' colours swapped, or every
    object mirrored left-right or top-bottom. Its caption shares the scene's words, so telling the two
    apart needs to know which colour goes with which shape and where (hard negatives for the CLIP tower)."""
    objects = list(scene.objects)
    change = int(rng.integers(3)) if len(objects) >= 2 else int(rng.choice([0, 2]))
    if change == 0:
        i = int(rng.integers(len(objects)))
        objects[i] = replace(objects[i], shape=str(rng.choice([s for s in SHAPES if s != objects[i].shape])))
    elif change == 1:
        i, j = (int(k) for k in rng.choice(len(objects), 2, replace=False))
        objects[i], objects[j] = replace(objects[i], color=objects[j].color), replace(objects[j], color=objects[i].color)
    elif rng.random() < 0.5:
        objects = [replace(o, x=1 - o.x) for o in objects]  # mirrored: still inside the image, still apart
    else:
        objects = [replace(o, y=1 - o.y) for o in objects]
    return Scene(tuple(objects))


def render(scene: Scene, size: int = 128, *, background: tuple[int, int, int] | None = None,
           noise: float = 0.0, jpeg_quality: int | None = None, rng: np.random.Generator | None = None,
           antialias: bool = True, color_jitter: float = 0.0) -> Image.Image:
    """Draw a scene as an RGB image of size x size pixels (anti-aliased by 4x supersampling unless
    antialias=False: hard pixel edges).

    background: light RGB (default a fixed off-white); noise: std of Gaussian pixel noise (0-255 scale);
    jpeg_quality: re-encode as JPEG at this quality; color_jitter: std of a per-object shift of each colour
    channel (0-255 scale). Noise and jitter need `rng` (seeded) to stay reproducible.
    """
    if size < 16:
        raise ValueError(f"image size {size} is too small; use at least 16 pixels")
    if (noise > 0 or color_jitter > 0) and rng is None:
        raise ValueError("noise and colour jitter need a seeded rng")
    scale = max(2, min(4, 1024 // size)) if antialias else 1  # supersampling factor, bounded for big sizes
    side = size * scale
    image = Image.new("RGB", (side, side), background or (245, 245, 240))
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        cx, cy, r = o.x * side, o.y * side, o.r * side
        fill = COLORS[o.color]
        if color_jitter > 0:
            fill = tuple(int(np.clip(v + rng.normal(0, color_jitter), 0, 255)) for v in fill)
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            h = r * 0.88  # a square of the same area feel as the circle
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    if scale > 1:
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    if noise > 0:
        pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, noise, (size, size, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if jpeg_quality is not None:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=jpeg_quality)
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image


def render_varied(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """A training-time rendering: random size 64-192, light background tint, sometimes noise or JPEG."""
    size = int(rng.choice([64, 96, 128, 160, 192]))
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    noise = float(rng.uniform(2, 10)) if rng.random() < 0.3 else 0.0
    quality = int(rng.integers(40, 90)) if rng.random() < 0.3 else None
    return render(scene, size, background=background, noise=noise, jpeg_quality=quality, rng=rng)


def render_differently(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """A picture drawn unlike any training picture, as a user might draw one: 96-320 px (beyond the training
    sizes), hard edges or anti-aliased, each object's colour jittered, often saved as JPEG."""
    size = int(rng.choice([96, 144, 224, 256, 320]))
    return render(scene, size, antialias=bool(rng.random() < 0.5), color_jitter=float(rng.uniform(5, 20)),
                  jpeg_quality=int(rng.integers(50, 90)) if rng.random() < 0.5 else None, rng=rng)


# --- language ------------------------------------------------------------------------------------


def describe(things: list[Thing]) -> str:
    """"a red circle, a blue square and a gray triangle." in the given order."""
    parts = [f"{'an' if o.color[0] in 'aeiou' else 'a'} {o.color} {o.shape}" for o in things]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return body + "."


def caption(scene: Scene) -> str:
    """The caption answer: every object, left to right."""
    return describe(scene.left_to_right())


def coarse_position(o: Thing) -> str:
    vertical = "top" if o.y < 1 / 3 else "middle" if o.y < 2 / 3 else "bottom"
    horizontal = "left" if o.x < 1 / 3 else "center" if o.x < 2 / 3 else "right"
    return f"{vertical} {horizontal}"


def clip_caption(scene: Scene) -> str:
    """The image-text training caption of the CLIP tower: colour, shape and coarse position of each object."""
    return ", ".join(f"{o.color} {o.shape} {coarse_position(o)}" for o in scene.left_to_right())


def _distances(scene: Scene, target: Thing) -> list[tuple[float, Thing]]:
    return sorted((float(np.hypot(o.x - target.x, o.y - target.y)), o) for o in scene.objects if o is not target)


def _count(n: int) -> str:
    return str(n)


def questions(scene: Scene, rng: np.random.Generator | None = None) -> list[QA]:
    """Every templated question that is well posed for this scene, with its answer.

    Well posed: "the {shape}" names a unique object; left/right and top/bottom are asked only away
    from the middle line; closest/farthest only when there is no near tie.
    """
    out: list[QA] = []
    objs = scene.objects
    if len(objs) == 1:
        out.append(QA("colour", "What color is this shape?", objs[0].color))
    for shape in SHAPES:
        same = [o for o in objs if o.shape == shape]
        if len(same) == 1:
            out.append(QA("colour", f"What color is the {shape}?", same[0].color))
        out.append(QA("count", f"How many {shape}s are there?", _count(len(same))))
    out.append(QA("count", "How many objects are there?", _count(len(objs))))
    for o in objs:
        out.append(QA("shape", f"What shape is the {o.color} object?", o.shape))
        if abs(o.x - 0.5) >= POSITION_MARGIN:
            out.append(QA("position", f"Is the {o.color} object on the left or on the right?",
                          "left" if o.x < 0.5 else "right"))
        if abs(o.y - 0.5) >= POSITION_MARGIN:
            out.append(QA("position", f"Is the {o.color} object at the top or at the bottom?",
                          "top" if o.y < 0.5 else "bottom"))
        out.append(QA("relational", f"How many objects have the same shape as the {o.color} object?",
                      _count(sum(p.shape == o.shape for p in objs))))
        near = _distances(scene, o)
        if len(near) == 1:
            out.append(QA("relational", f"What shape is the object closest to the {o.color} object?", near[0][1].shape))
            out.append(QA("relational", f"What shape is the object farthest from the {o.color} object?", near[0][1].shape))
        elif len(near) > 1:
            if near[1][0] >= near[0][0] * DISTANCE_MARGIN:
                out.append(QA("relational", f"What shape is the object closest to the {o.color} object?",
                              near[0][1].shape))
            if near[-1][0] >= near[-2][0] * DISTANCE_MARGIN:
                out.append(QA("relational", f"What shape is the object farthest from the {o.color} object?",
                              near[-1][1].shape))
    out.append(QA("caption", "Describe this image.", caption(scene)))
    return out


def pick_questions(scene: Scene, rng: np.random.Generator, per_kind: int = 1) -> list[QA]:
    """Up to `per_kind` random questions of every kind the scene allows (balances the kinds)."""
    by_kind: dict[str, list[QA]] = {}
    for qa in questions(scene):
        by_kind.setdefault(qa.kind, []).append(qa)
    out = []
    for kind in QUESTION_KINDS:
        pool = by_kind.get(kind, [])
        for i in rng.permutation(len(pool))[:per_kind]:
            out.append(pool[int(i)])
    return out


def test_set(per_kind: int = 600) -> list[tuple[int, QA]]:
    """The fixed test set: (scene index of the "test" split, QA), `per_kind` questions of every kind.

    Deterministic: scenes 0, 1, 2, ... of the test split, one random question per kind per scene
    (seeded by the scene index), until every kind has `per_kind`.
    """
    counts = dict.fromkeys(QUESTION_KINDS, 0)
    out: list[tuple[int, QA]] = []
    index = 0
    while min(counts.values()) < per_kind:
        scene = make_scene("test", index)
        rng = np.random.default_rng([SPLIT_SEEDS["test"], index, 1])
        for qa in pick_questions(scene, rng):
            if counts[qa.kind] < per_kind:
                counts[qa.kind] += 1
                out.append((index, qa))
        index += 1
    return out


# --- answers recomputed from the question text ---------------------------------------------------

_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"what color is this shape\?"), "only"),
    (re.compile(rf"what color is the ({_SHAPE})\?"), "color_of_shape"),
    (re.compile(rf"what shape is the object (closest to|farthest from) the ({_COLOR}) object\?"), "near_far"),
    (re.compile(rf"what shape is the ({_COLOR}) object\?"), "shape_of_color"),
    (re.compile(r"how many objects are there\?"), "count_all"),
    (re.compile(rf"how many ({_SHAPE})s are there\?"), "count_shape"),
    (re.compile(rf"is the ({_COLOR}) object on the left or on the right\?"), "left_right"),
    (re.compile(rf"is the ({_COLOR}) object at the top or at the bottom\?"), "top_bottom"),
    (re.compile(rf"how many objects have the same shape as the ({_COLOR}) object\?"), "same_shape"),
    (re.compile(r"describe this image\."), "caption"),
]


def answer_question(scene: Scene, question: str) -> str:
    """The answer to a templated question, computed from the scene (ValueError if not a template)."""
    text = " ".join(question.lower().split())
    for pattern, rule in _PATTERNS:
        m = pattern.fullmatch(text)
        if m:
            return _apply(rule, m.groups(), scene)
    raise ValueError(f"not a shapes-world question template: {question!r}")


def _apply(rule: str, args: tuple[str, ...], scene: Scene) -> str:
    objs = scene.objects
    if rule == "only":
        return objs[0].color
    if rule == "color_of_shape":
        return next(o.color for o in objs if o.shape == args[0])
    if rule == "shape_of_color":
        return scene.by_color(args[0]).shape
    if rule == "count_all":
        return str(len(objs))
    if rule == "count_shape":
        return str(sum(o.shape == args[0] for o in objs))
    if rule == "left_right":
        return "left" if scene.by_color(args[0]).x < 0.5 else "right"
    if rule == "top_bottom":
        return "top" if scene.by_color(args[0]).y < 0.5 else "bottom"
    if rule == "same_shape":
        target = scene.by_color(args[0])
        return str(sum(o.shape == target.shape for o in objs))
    if rule == "near_far":
        target = scene.by_color(args[1])
        others = [o for o in objs if o is not target]
        dist = [np.hypot(o.x - target.x, o.y - target.y) for o in others]
        pick = int(np.argmin(dist)) if args[0] == "closest to" else int(np.argmax(dist))
        return others[pick].shape
    return caption(scene)


def normalise_answer(text: str) -> str:
    """Lower case, punctuation stripped, whitespace collapsed: how answers are compared."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())
