"""The visual question world: shapes-world scenes (`diffusion_rl.world.shapes`) with questions about count, colour,
shape and position, exact answers, object boxes and captions.

A scene holds 1-4 flat-coloured objects (red / green / blue / yellow circles, squares and triangles, 8-11 px,
never closer than 2 px) on a black 32x32 canvas, drawn with the shapes world's own primitives (``scale`` enlarges
the image by an integer factor, nearest-neighbour, and the boxes with it). Question types:

* ``count``    "How many objects are there?" / "How many red objects are there?" / "How many circles are there?"
  -> a digit ("1"-"4");
* ``colour``   "What colour is the square?" (the shape occurs once) -> "red";
* ``shape``    "What shape is the blue object?" (the colour occurs once) -> "circle";
* ``position`` "Is the red circle left of, right of, above or below the blue square?" (both unique, the relation
  unambiguous as in the shapes world: the perpendicular offset at most half the main one) -> "left of".

Every row carries what SATORI-style staged rewards need: ``caption`` (every object, left to right: "a red circle,
a blue square and a green triangle"), ``boxes`` (the boxes of the objects the question is about, ``[[x1, y1, x2,
y2], ...]`` in pixels of the returned image, x2/y2 exclusive), ``image`` (PIL RGB); plus ``objects`` (JSON of
every object with its box), ``solution`` (``<think>I see CAPTION.</think><answer>ANSWER</answer>``, the think /
answer format) and ``satori_solution`` (``<caption>...</caption><bbox>[[...]]</bbox><answer>...</answer>``).

Splits: a scene's split is a function of its object multiset alone (which colour-shape pairs, how many of each),
through a fixed hash (``scene_split``): ``EVAL_PERCENT`` % of the combinations are held out, so an eval scene's
combination of objects never occurs in training.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from diffusion_rl.world import shapes

QUESTION_TYPES = ("count", "colour", "shape", "position")
EVAL_PERCENT = 10
MAX_OBJECTS = 4
COUNT_WORDS = ("a", "two", "three", "four")
RELATIONS = shapes.RELATIONS  # "left of", "right of", "above", "below"


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    box: tuple[int, int, int]  # (x0, y0, side) in canvas pixels

    def name(self) -> str:
        return f"{self.colour} {self.shape}"


def signature(objects: Sequence[SceneObject]) -> str:
    """The scene's object multiset, e.g. ``"blue circle+red square+red square"``."""
    return "+".join(sorted(o.name() for o in objects))


def scene_split(sig: str) -> str:
    """``"eval"`` for ``EVAL_PERCENT`` % of object multisets (a fixed hash), else ``"train"``."""
    h = int.from_bytes(hashlib.blake2b(sig.encode(), digest_size=8).digest(), "big")
    return "eval" if h % 100 < EVAL_PERCENT else "train"


def random_scene(rng: random.Random) -> list[SceneObject]:
    """1-4 objects of random colours and shapes at random, well-separated places."""
    n = rng.randint(1, MAX_OBJECTS)
    nprng = np.random.default_rng(rng.getrandbits(63))
    while True:
        boxes: list[tuple[int, int, int]] = []
        for _ in range(50 * n):
            box = shapes._random_box(nprng)
            if all(shapes._separated(box, other) for other in boxes):
                boxes.append(box)
                if len(boxes) == n:
                    break
        if len(boxes) == n:
            break
    colours = list(shapes.COLOURS)
    return [SceneObject(rng.choice(colours), rng.choice(shapes.SHAPES), box) for box in boxes]


def render_scene(objects: Sequence[SceneObject], scale: int = 1) -> Image.Image:
    """The scene as an RGB image of 32 * `scale` pixels a side (the shapes world's drawing, enlarged)."""
    image = Image.new("RGB", (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for o in objects:
        shapes._draw(draw, o.shape, o.box, shapes.COLOURS[o.colour])
    if scale != 1:
        image = image.resize((shapes.IMAGE_SIZE * scale, shapes.IMAGE_SIZE * scale), Image.NEAREST)
    return image


def box_xyxy(o: SceneObject, scale: int = 1) -> list[int]:
    x, y, side = o.box
    return [x * scale, y * scale, (x + side) * scale, (y + side) * scale]


def _centre_x(o: SceneObject) -> float:
    return shapes._centre(o.box)[0]


def caption(objects: Sequence[SceneObject]) -> str:
    """Every object, left to right: "a red circle, a blue square and a green triangle"."""
    names = [f"a {o.name()}" for o in sorted(objects, key=lambda o: (_centre_x(o), o.box[1]))]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def relation_of(a: SceneObject, b: SceneObject) -> str | None:
    """The unambiguous relation of `a` to `b` (the perpendicular offset at most half the main one), else None."""
    (ax, ay), (bx, by) = shapes._centre(a.box), shapes._centre(b.box)
    for relation in RELATIONS:
        if shapes.relation_holds(a.box, b.box, relation):
            main, perp = (bx - ax, by - ay) if relation in ("left of", "right of") else (by - ay, bx - ax)
            return relation if abs(perp) <= 0.5 * abs(main) else None
    return None


def _question(rng: random.Random, objects: list[SceneObject], kind: str) -> tuple[str, str, list[SceneObject]] | None:
    """(question, answer, the objects it is about) of `kind` for the scene, or None when it admits none."""
    colours = Counter(o.colour for o in objects)
    shape_counts = Counter(o.shape for o in objects)
    if kind == "count":
        form = rng.choice(("all", "colour", "shape"))
        if form == "all":
            return "How many objects are there?", str(len(objects)), list(objects)
        if form == "colour":
            colour = rng.choice(sorted(colours))
            about = [o for o in objects if o.colour == colour]
            return f"How many {colour} objects are there?", str(len(about)), about
        shape = rng.choice(sorted(shape_counts))
        about = [o for o in objects if o.shape == shape]
        return f"How many {shape}s are there?", str(len(about)), about
    if kind == "colour":
        unique = sorted(s for s, c in shape_counts.items() if c == 1)
        if not unique:
            return None
        shape = rng.choice(unique)
        (obj,) = [o for o in objects if o.shape == shape]
        return f"What colour is the {shape}?", obj.colour, [obj]
    if kind == "shape":
        unique = sorted(c for c, n in colours.items() if n == 1)
        if not unique:
            return None
        colour = rng.choice(unique)
        (obj,) = [o for o in objects if o.colour == colour]
        return f"What shape is the {colour} object?", obj.shape, [obj]
    if kind == "position":
        names = Counter(o.name() for o in objects)
        pairs = [(a, b) for a in objects for b in objects
                 if a is not b and names[a.name()] == 1 and names[b.name()] == 1 and relation_of(a, b)]
        if not pairs:
            return None
        a, b = rng.choice(pairs)
        return (f"Is the {a.name()} left of, right of, above or below the {b.name()}?", relation_of(a, b), [a, b])
    raise ValueError(f"unknown question type {kind!r}; use one of {QUESTION_TYPES}")


@dataclass(frozen=True)
class VisualProblem:
    prompt: str
    answer: str
    question_type: str
    objects: tuple[SceneObject, ...]
    about: tuple[int, ...]  # indices of the objects the question is about, in the question's order
    signature: str
    split: str

    def row(self, scale: int = 1) -> dict:
        boxes = [box_xyxy(self.objects[i], scale) for i in self.about]
        cap = caption(self.objects)
        return {
            "prompt": self.prompt, "answer": self.answer, "question_type": self.question_type,
            "caption": cap, "boxes": boxes,
            "objects": json.dumps([{"colour": o.colour, "shape": o.shape, "box": box_xyxy(o, scale)}
                                   for o in self.objects]),
            "solution": f"<think>I see {cap}.</think><answer>{self.answer}</answer>",
            "satori_solution": f"<caption>{cap}</caption><bbox>{json.dumps(boxes)}</bbox><answer>{self.answer}</answer>",
            "signature": self.signature, "split": self.split,
            "image": render_scene(self.objects, scale),
        }


def generate_problems(n: int, split: str = "train", question_types: Sequence[str] = QUESTION_TYPES,
                      seed: int = 0) -> list[VisualProblem]:
    """`n` problems of `split`, question types in turn over `question_types`, deterministic in `seed`."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    bad = [q for q in question_types if q not in QUESTION_TYPES]
    if not question_types or bad:
        raise ValueError(f"question_types must be a non-empty list of {list(QUESTION_TYPES)}, got {list(question_types)}")
    rng = random.Random(f"shapes-vqa-{seed}-{split}")
    out: list[VisualProblem] = []
    while len(out) < n:
        kind = question_types[len(out) % len(question_types)]
        for _ in range(10_000):
            objects = random_scene(rng)
            sig = signature(objects)
            if scene_split(sig) != split:
                continue
            q = _question(rng, objects, kind)
            if q is not None:
                break
        else:  # pragma: no cover - every type is found within a few draws
            raise RuntimeError(f"could not draw a {kind} question")
        question, answer, about = q
        ids = tuple(next(i for i, o in enumerate(objects) if o is a) for a in about)  # in the question's order
        out.append(VisualProblem(question, answer, kind, tuple(objects), ids, sig, split))
    return out


def visual_rows(n: int, split: str = "train", question_types: Sequence[str] = QUESTION_TYPES, seed: int = 0,
                scale: int = 1) -> list[dict]:
    return [p.row(scale) for p in generate_problems(n, split, question_types, seed)]


def visual_dataset(n: int, split: str = "train", question_types: Sequence[str] = QUESTION_TYPES, seed: int = 0,
                   scale: int = 1):
    """A ``datasets.Dataset`` of `n` problems: ``prompt``, ``answer``, ``solution``, ``satori_solution``,
    ``question_type``, ``caption``, ``boxes``, ``objects``, ``signature``, ``split`` and ``image`` (an Image
    feature: PIL when read)."""
    import datasets

    rows = visual_rows(n, split, question_types, seed, scale)
    features = datasets.Features({
        "prompt": datasets.Value("string"), "answer": datasets.Value("string"),
        "question_type": datasets.Value("string"), "caption": datasets.Value("string"),
        "boxes": datasets.Sequence(datasets.Sequence(datasets.Value("int32"))),
        "objects": datasets.Value("string"), "solution": datasets.Value("string"),
        "satori_solution": datasets.Value("string"), "signature": datasets.Value("string"),
        "split": datasets.Value("string"), "image": datasets.Image(),
    })
    return datasets.Dataset.from_list(rows, features=features)
