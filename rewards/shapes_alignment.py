"""Rule-based prompt alignment for the shapes world (a GenEval-style check without a detector).

The reward reads a prompt's text and an image and checks, attribute by attribute, whether the image
shows what the prompt asks for:

    count prompt     "three green triangles"                     -> colour, shape, count
    relation prompt  "a red circle left of a blue triangle"      -> colour1, shape1, colour2, shape2, relation

``partial`` is the mean attribute accuracy of a sample, ``strict`` is 1 when every attribute is right.
``graded`` is ``partial`` with the relation attribute graded instead of right/wrong: sigmoid(margin /
``relation_scale``), where the margin is how many pixels the relation holds (or fails) by, so that an image
whose objects are nearly in place scores above one whose objects are far off (a denser training signal; report
``partial``).
As in GenEval's position task, objects beyond the two named ones are not penalised in relation prompts;
the two named objects are the largest one of each named colour.
A prompt the grammar does not cover is unscorable: its score is NaN, never 0.

Reading an image (any size; resized to 32x32 with a box filter first):
1. label every pixel with its nearest palette colour (black background, red, green, blue, yellow);
2. split each colour into 4-connected components, keep those with area >= ``min_area`` px;
3. call a component a square / circle / triangle by its fill ratio = area / bounding-box area
   (square > 0.88 > circle > 0.64 > triangle; ideal values 1, pi/4 and 1/2);
4. "A left of B" holds when B's bounding-box centre is to the right of A's by more than it is above
   or below it (image y grows downwards); likewise right of / above / below.

This module is self-contained on purpose: it knows nothing of the generator or of any trainer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

SIZE = 32
# The shapes world's colours. This is the single source of truth: the generator
# (``diffusion_rl.world.shapes.COLOURS``) imports it from here, never the other way round, so the
# reward stays standalone.
BACKGROUND: tuple[str, tuple[int, int, int]] = ("black", (0, 0, 0))
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
}
PALETTE: dict[str, tuple[int, int, int]] = {BACKGROUND[0]: BACKGROUND[1], **COLOURS}  # index 0 = background
_PALETTE_NAMES = list(PALETTE)
_PALETTE_RGB = np.array(list(PALETTE.values()), dtype=np.float32)  # [5, 3]
_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
            "seven": 7, "eight": 8, "nine": 9}
_COLOUR = "(" + "|".join(map(re.escape, COLOURS)) + ")"
_SHAPE = r"(circle|square|triangle)s?"
_RELATION = r"((?:to the |on the )?left of|(?:to the |on the )?right of|above|below)"
_COUNT_RE = re.compile(rf"^({'|'.join(_NUMBERS)}|[1-9]) {_COLOUR} {_SHAPE}$")
_RELATION_RE = re.compile(rf"^(?:a|an|one) {_COLOUR} {_SHAPE} {_RELATION} (?:a|an|one) {_COLOUR} {_SHAPE}$")
ATTRIBUTE_GROUPS = ("colour", "shape", "count", "relation")
MODES = ("partial", "strict", "graded")


@dataclass(frozen=True)
class Query:
    """What a prompt asks for."""

    kind: str  # "count" | "relation"
    colour1: str
    shape1: str
    count: int = 1
    relation: str = ""
    colour2: str = ""
    shape2: str = ""


@dataclass(frozen=True)
class Blob:
    """One detected object: a connected component of one palette colour."""

    colour: str
    shape: str
    area: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive)

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


def parse(prompt: str) -> Query | None:
    """Parse a prompt of the shapes grammar; ``None`` when it is not one."""
    text = re.sub(r"\s+", " ", prompt.strip().lower()).rstrip(".").strip()
    m = _COUNT_RE.match(text)
    if m:
        word, colour, shape = m.groups()
        return Query("count", colour, shape, int(word) if word.isdigit() else _NUMBERS[word])
    m = _RELATION_RE.match(text)
    if m:
        c1, s1, relation, c2, s2 = m.groups()
        relation = relation.removeprefix("to the ").removeprefix("on the ")
        return Query("relation", c1, s1, 1, relation, c2, s2)
    return None


# ---------------------------------------------------------------------------------------------------------
# reading images


def to_uint8_batch(images: Any) -> np.ndarray:
    """Float [B,3,H,W] in [0,1] / uint8 [B,H,W,3] / list of PIL -> uint8 [B, 32, 32, 3]."""
    if isinstance(images, torch.Tensor):
        t = images.detach().cpu()
        if t.dtype != torch.uint8:
            t = (t.float().clamp(0, 1) * 255).round().to(torch.uint8)
        arr = t.permute(0, 2, 3, 1).numpy() if t.shape[1] in (1, 3) and t.shape[-1] not in (1, 3) else t.numpy()
    elif isinstance(images, np.ndarray):
        arr = images if images.dtype == np.uint8 else (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    else:
        arr = np.stack([np.asarray(im.convert("RGB")) for im in images])
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.shape[1:3] != (SIZE, SIZE):
        arr = np.stack([np.asarray(Image.fromarray(a).resize((SIZE, SIZE), Image.BOX)) for a in arr])
    return arr


def palette_labels(batch: np.ndarray) -> np.ndarray:
    """uint8 [B,H,W,3] -> index of the nearest palette colour [B,H,W] (0 = black background)."""
    d = ((batch[..., None, :].astype(np.float32) - _PALETTE_RGB) ** 2).sum(-1)  # [B,H,W,5]
    return d.argmin(-1)


def connected_components(labels: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-zero labels, [B,H,W] -> component ids (0 = background).

    Min-label propagation: every pixel starts with its own id and repeatedly takes the smallest id
    among its same-label 4-neighbours until nothing changes (a few dozen sweeps for compact blobs)."""
    b, h, w = labels.shape
    big = b * h * w + 1
    ids = np.where(labels > 0, np.arange(1, b * h * w + 1).reshape(b, h, w), big)
    same_down = (labels[:, 1:, :] == labels[:, :-1, :]) & (labels[:, 1:, :] > 0)
    same_right = (labels[:, :, 1:] == labels[:, :, :-1]) & (labels[:, :, 1:] > 0)
    while True:
        new = ids.copy()
        new[:, 1:, :] = np.where(same_down, np.minimum(new[:, 1:, :], ids[:, :-1, :]), new[:, 1:, :])
        new[:, :-1, :] = np.where(same_down, np.minimum(new[:, :-1, :], ids[:, 1:, :]), new[:, :-1, :])
        new[:, :, 1:] = np.where(same_right, np.minimum(new[:, :, 1:], ids[:, :, :-1]), new[:, :, 1:])
        new[:, :, :-1] = np.where(same_right, np.minimum(new[:, :, :-1], ids[:, :, 1:]), new[:, :, :-1])
        if np.array_equal(new, ids):
            return np.where(labels > 0, ids, 0)
        ids = new


def detect(
    images: Any, min_area: int = 12, square_fill: float = 0.88, circle_fill: float = 0.64
) -> list[list[Blob]]:
    """The objects in each image, largest first."""
    labels = palette_labels(to_uint8_batch(images))
    comps = connected_components(labels)
    out: list[list[Blob]] = []
    for lab, comp in zip(labels, comps, strict=True):
        blobs = []
        for cid in np.unique(comp[comp > 0]):
            ys, xs = np.nonzero(comp == cid)
            area = len(xs)
            if area < min_area:
                continue
            x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
            fill = area / ((x1 - x0 + 1) * (y1 - y0 + 1))
            shape = "square" if fill > square_fill else "circle" if fill > circle_fill else "triangle"
            blobs.append(Blob(_PALETTE_NAMES[lab[ys[0], xs[0]]], shape, area, (x0, y0, x1, y1)))
        out.append(sorted(blobs, key=lambda bl: -bl.area))
    return out


def relation_margin(a: Blob, b: Blob, relation: str) -> float:
    """By how many pixels (at 32x32) ``a`` stands in ``relation`` to ``b``: positive when it holds, negative when
    it does not (how far the centres would have to move along the relation's axis to make it hold)."""
    (ax, ay), (bx, by) = a.centre, b.centre
    dx, dy = bx - ax, by - ay
    return {
        "left of": dx - abs(dy),
        "right of": -dx - abs(dy),
        "above": dy - abs(dx),
        "below": -dy - abs(dx),
    }[relation]


def relation_holds(a: Blob, b: Blob, relation: str) -> bool:
    """Does ``a`` stand in ``relation`` to ``b``?"""
    return relation_margin(a, b, relation) > 0


def named_objects(query: Query, blobs: list[Blob]) -> tuple[Blob | None, Blob | None]:
    """A relation prompt's two objects: the largest blob of each named colour (``blobs`` come largest first)."""
    def largest(colour: str) -> Blob | None:
        return next((blob for blob in blobs if blob.colour == colour), None)

    return largest(query.colour1), largest(query.colour2)


def check(query: Query, blobs: list[Blob]) -> dict[str, tuple[str, bool]]:
    """Per attribute: (attribute group, correct?)."""
    if query.kind == "count":
        return {
            "colour": ("colour", bool(blobs) and all(b.colour == query.colour1 for b in blobs)),
            "shape": ("shape", bool(blobs) and all(b.shape == query.shape1 for b in blobs)),
            "count": ("count", len(blobs) == query.count),
        }
    a, b = named_objects(query, blobs)
    return {
        "colour1": ("colour", a is not None),
        "shape1": ("shape", a is not None and a.shape == query.shape1),
        "colour2": ("colour", b is not None),
        "shape2": ("shape", b is not None and b.shape == query.shape2),
        "relation": ("relation", a is not None and b is not None and relation_holds(a, b, query.relation)),
    }


def graded_relation(query: Query, blobs: list[Blob], scale: float) -> float:
    """The relation attribute of a relation prompt graded by its margin: sigmoid(margin / scale) when both named
    objects are found (0.5 on the boundary, towards 1 the clearer the relation holds), 0 when either is missing."""
    a, b = named_objects(query, blobs)
    if a is None or b is None:
        return 0.0
    return 1.0 / (1.0 + math.exp(-relation_margin(a, b, query.relation) / scale))


# ---------------------------------------------------------------------------------------------------------
# the reward


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


class ShapesAlignmentReward:
    """``reward(images, prompts, metadata) -> (scores [B] float32 CPU, info)``; NaN = unscorable prompt."""

    name = "shapes_alignment"
    differentiable = False

    def __init__(
        self, mode: str = "partial", min_area: int = 12, square_fill: float = 0.88, circle_fill: float = 0.64,
        relation_scale: float = 4.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
        if not relation_scale > 0:
            raise ValueError(f"relation_scale must be > 0 (pixels at 32x32), got {relation_scale!r}")
        self.mode, self.relation_scale = mode, float(relation_scale)
        self.detect_options = {"min_area": min_area, "square_fill": square_fill, "circle_fill": circle_fill}

    @torch.no_grad()
    def __call__(
        self, images: Any, prompts: Sequence[str], metadata: Sequence[dict] | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        all_blobs = detect(images, **self.detect_options)
        if len(all_blobs) != len(prompts):
            raise ValueError(f"{len(all_blobs)} images but {len(prompts)} prompts")
        partial, strict, graded = [], [], []
        hits: dict[str, list[float]] = {g: [] for g in ATTRIBUTE_GROUPS}
        for prompt, blobs in zip(prompts, all_blobs, strict=True):
            query = parse(prompt)
            if query is None:
                partial.append(float("nan"))
                strict.append(float("nan"))
                graded.append(float("nan"))
                continue
            result = check(query, blobs)
            correct = [ok for _, ok in result.values()]
            partial.append(sum(correct) / len(correct))
            strict.append(float(all(correct)))
            if query.kind == "relation":  # the binary relation attribute swapped for its graded value
                graded_sum = sum(correct) - correct[-1] + graded_relation(query, blobs, self.relation_scale)
                graded.append(graded_sum / len(correct))
            else:
                graded.append(partial[-1])
            for group, ok in result.values():
                hits[group].append(float(ok))
        scores = {name: torch.tensor(values, dtype=torch.float32)
                  for name, values in (("partial", partial), ("strict", strict), ("graded", graded))}
        info: dict[str, Any] = {
            "partial": _nanmean(partial),
            "strict": _nanmean(strict),
            **{f"{g}_acc": _nanmean(v) for g, v in hits.items()},
            "n_unscorable": sum(math.isnan(p) for p in partial),
            "graded": _nanmean(graded),
            **{f"{name}_scores": values for name, values in scores.items()},
        }
        return scores[self.mode], info


def make_shapes_alignment_reward(mode: str = "partial", **options: Any) -> ShapesAlignmentReward:
    """Factory used by ``rewards.load("shapes_alignment")``; options: min_area, square_fill, circle_fill,
    relation_scale (mode graded)."""
    return ShapesAlignmentReward(mode=mode, **options)
