"""The shapes world: a seeded procedural generator of prompts and matching 32x32 images.

Every prompt names flat-coloured shapes on a black background, in one of two forms:

* count prompts     ``"a red circle"``, ``"three blue squares"``                 4 colours x 3 shapes x 4 counts = 48
* relation prompts  ``"a blue square left of a yellow triangle"``   4 relations x (4x3) x (3x3) other colours = 432

Images are drawn with PIL without anti-aliasing, objects 8-11 px wide, never overlapping and at
least ``GAP`` px apart, so that a rule-based checker (``rewards/shapes_alignment.py``) can read them
back exactly. Relations are defined on bounding-box centres: "A left of B" means B's centre lies to
the right of A's by more than it lies above or below it (and likewise for the other three).

The eval split holds out relation prompts (16 per relation); everything else is the train split.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

from rewards import shapes_alignment

IMAGE_SIZE = 32
# Object colours (name -> RGB); background black. Defined once, by the reward that reads images back
# (rewards may not import diffusion_rl, so the generator takes the palette from the reward).
COLOURS: dict[str, tuple[int, int, int]] = shapes_alignment.COLOURS
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("a", "two", "three", "four")  # index + 1 = number of objects
RELATIONS = ("left of", "right of", "above", "below")
MIN_SIZE, MAX_SIZE = 8, 11  # object bounding box side, px (inclusive)
GAP = 2  # minimum free pixels between two objects
EVAL_PER_RELATION = 16  # 4 x 16 = 64 held-out relation prompts

Box = tuple[int, int, int]  # (x0, y0, side)


@dataclass(frozen=True)
class PromptSpec:
    """Structured content of one prompt (empty strings / 0 where a field does not apply)."""

    prompt: str
    kind: str  # "count" | "relation"
    colour1: str
    shape1: str
    count: int  # number of objects of the first kind (1 for relation prompts)
    relation: str = ""
    colour2: str = ""
    shape2: str = ""


def _noun(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


@functools.lru_cache(maxsize=1)
def _specs() -> dict[str, PromptSpec]:
    specs: dict[str, PromptSpec] = {}
    for colour in COLOURS:
        for shape in SHAPES:
            for n, word in enumerate(COUNT_WORDS, start=1):
                p = f"{word} {colour} {_noun(shape, n)}"
                specs[p] = PromptSpec(p, "count", colour, shape, n)
    for relation in RELATIONS:
        for c1 in COLOURS:
            for s1 in SHAPES:
                for c2 in COLOURS:
                    if c2 == c1:
                        continue
                    for s2 in SHAPES:
                        p = f"a {c1} {s1} {relation} a {c2} {s2}"
                        specs[p] = PromptSpec(p, "relation", c1, s1, 1, relation, c2, s2)
    return specs


def all_prompts() -> list[str]:
    """All 480 prompts of the world, count prompts first, in a fixed order."""
    return list(_specs())


def spec(prompt: str) -> PromptSpec:
    """The structured content of a world prompt (KeyError for a prompt outside the world)."""
    return _specs()[prompt]


def split_prompts(seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, eval): eval = ``EVAL_PER_RELATION`` held-out relation prompts per relation, train = the rest."""
    rng = np.random.default_rng(seed)
    held_out: set[str] = set()
    for relation in RELATIONS:
        pool = [p for p, s in _specs().items() if s.relation == relation]
        held_out.update(pool[i] for i in rng.permutation(len(pool))[:EVAL_PER_RELATION])
    prompts = all_prompts()
    return [p for p in prompts if p not in held_out], [p for p in prompts if p in held_out]


# ---------------------------------------------------------------------------------------------------------
# layout and drawing


def _separated(a: Box, b: Box) -> bool:
    """True when the boxes are at least GAP px apart along x or along y."""
    (ax, ay, asz), (bx, by, bsz) = a, b
    return ax + asz + GAP <= bx or bx + bsz + GAP <= ax or ay + asz + GAP <= by or by + bsz + GAP <= ay


def _centre(box: Box) -> tuple[float, float]:
    x, y, s = box
    return x + (s - 1) / 2, y + (s - 1) / 2


def relation_holds(a: Box, b: Box, relation: str) -> bool:
    """Does box ``a`` stand in ``relation`` to box ``b``? (image y grows downwards)"""
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    dx, dy = bx - ax, by - ay  # offset from a to b
    return {
        "left of": dx > abs(dy),
        "right of": -dx > abs(dy),
        "above": dy > abs(dx),
        "below": -dy > abs(dx),
    }[relation]


def _random_box(rng: np.random.Generator) -> Box:
    side = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
    x, y = rng.integers(0, IMAGE_SIZE - side + 1, size=2)
    return int(x), int(y), side


def _layout(s: PromptSpec, rng: np.random.Generator) -> list[Box]:
    """Rejection-sample non-overlapping boxes: ``count`` boxes, or two boxes in the named relation.

    For relations the perpendicular centre offset is also kept below half the main one, so the
    relation is unambiguous to the eye, not just to the checker."""
    n = 2 if s.kind == "relation" else s.count
    for _ in range(10_000):
        boxes: list[Box] = []
        for _ in range(50 * n):
            box = _random_box(rng)
            if all(_separated(box, other) for other in boxes):
                boxes.append(box)
                if len(boxes) == n:
                    break
        if len(boxes) < n:
            continue
        if s.kind == "count":
            return boxes
        a, b = boxes
        (ax, ay), (bx, by) = _centre(a), _centre(b)
        main, perp = (bx - ax, by - ay) if s.relation in ("left of", "right of") else (by - ay, bx - ax)
        if relation_holds(a, b, s.relation) and abs(perp) <= 0.5 * abs(main):
            return boxes
    raise RuntimeError(f"could not lay out {s.prompt!r}")  # pragma: no cover - never seen


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: Box, colour: tuple[int, int, int]) -> None:
    x, y, side = box
    x1, y1 = x + side - 1, y + side - 1
    if shape == "square":
        draw.rectangle([x, y, x1, y1], fill=colour)
    elif shape == "circle":
        draw.ellipse([x, y, x1, y1], fill=colour)
    else:  # isosceles triangle, apex up
        draw.polygon([(x + (side - 1) / 2, y), (x, y1), (x1, y1)], fill=colour)


def _as_rng(rng_or_seed: np.random.Generator | int) -> np.random.Generator:
    return rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)


def render(prompt: str, rng_or_seed: np.random.Generator | int = 0) -> Image.Image:
    """A 32x32 RGB ground-truth image of ``prompt``; the same seed gives identical pixels."""
    s = spec(prompt)
    boxes = _layout(s, _as_rng(rng_or_seed))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), shapes_alignment.BACKGROUND[1])
    draw = ImageDraw.Draw(image)
    if s.kind == "count":
        for box in boxes:
            _draw(draw, s.shape1, box, COLOURS[s.colour1])
    else:
        _draw(draw, s.shape1, boxes[0], COLOURS[s.colour1])
        _draw(draw, s.shape2, boxes[1], COLOURS[s.colour2])
    return image


# ---------------------------------------------------------------------------------------------------------
# datasets


def _split(split: str, seed: int = 0) -> list[str]:
    train, eval_ = split_prompts(seed)
    if split == "train":
        return train
    if split == "eval":
        return eval_
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


def sample_prompts(n: int, seed: int, split: str = "train") -> list[str]:
    """``n`` prompts drawn with replacement: half count prompts, half relation prompts (when the split has both)."""
    rng = np.random.default_rng(seed)
    prompts = _split(split)
    by_kind = [[p for p in prompts if spec(p).kind == k] for k in ("count", "relation")]
    by_kind = [ps for ps in by_kind if ps]
    out = []
    for _ in range(n):
        pool = by_kind[int(rng.integers(len(by_kind)))]
        out.append(pool[int(rng.integers(len(pool)))])
    return out


def render_arrays(n: int, seed: int = 0, split: str = "train") -> tuple[np.ndarray, list[str]]:
    """``n`` (image, prompt) pairs as a uint8 array [n, 32, 32, 3] and a prompt list (fast path for training)."""
    prompts = sample_prompts(n, seed, split)
    rng = np.random.default_rng([seed, 1])
    images = np.stack([np.asarray(render(p, rng)) for p in prompts])
    return images, prompts


def prompt_dataset(split: str = "train"):
    """A ``datasets.Dataset`` of the split's prompts: ``prompt`` plus the metadata columns of PromptSpec."""
    import datasets

    rows = [asdict(spec(p)) for p in _split(split)]
    return datasets.Dataset.from_list(rows)


def image_dataset(n: int, seed: int = 0, split: str = "train"):
    """A ``datasets.Dataset`` of ``n`` rendered pairs with columns ``prompt`` and ``image`` (PIL)."""
    import datasets

    images, prompts = render_arrays(n, seed, split)
    features = datasets.Features({"prompt": datasets.Value("string"), "image": datasets.Image()})
    return datasets.Dataset.from_dict(
        {"prompt": prompts, "image": [Image.fromarray(im) for im in images]}, features=features
    )
