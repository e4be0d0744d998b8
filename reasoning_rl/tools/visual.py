"""Tools on the embedded visual world (`reasoning_rl.world.visual`): the OpenThinkIMG toolbox in miniature.

The state of one rollout is a `VisualState`: the scene's image, its objects (colour, shape, box ``[x1, y1, x2,
y2]`` in image pixels, x2/y2 exclusive) and a canvas the drawing aid writes on. It is built from a problem's
metadata row (``objects`` JSON and ``image``, as `reasoning_rl.world.visual.visual_rows` and `count_rows` give).

* ``crop``     {box, zoom}: the region, enlarged ``zoom`` times (image), and the objects inside it (text)
               (OpenThinkIMG's Crop / ZoomInSubplot);
* ``count``    {colour?, shape?}: how many objects match (a detector's count, GroundingDINO-style);
* ``locate``   {shape, colour?}: the boxes of the matching objects (GroundingDINO's boxes);
* ``draw_box`` {box, colour?}: draws a rectangle outline on the canvas and returns it (the drawing aid,
               OpenThinkIMG's DrawHorizontalLineByY / Point family), with the number of objects it encloses.

Text observations are short and fixed-format (``count: 3``, ``boxes: [[1,2,5,6]]``) so that a text-only policy,
for which the tools are the only view of the image, can read them.

`count_rows` generates the crowded counting problems of the tool benchmark: 5-9 small objects (4-5 px) on the
32x32 canvas, "How many red objects are there?" / "How many circles are there?", held-out object multisets as in
the visual world, with an expert tool trace (count; then a thought restating the observation and terminate) and a tool-free
trace (terminate at once).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from diffusion_rl.world import shapes
from reasoning_rl.tools.actions import format_action
from reasoning_rl.tools.base import Observation, Tool
from reasoning_rl.world.visual import SceneObject, render_scene, scene_split, signature

COLOURS = sorted(shapes.COLOURS)
SHAPE_NAMES = list(shapes.SHAPES)
_BOX = {"type": "array", "items": {"type": "integer"}, "minItems": 4, "maxItems": 4,
        "description": "[x1, y1, x2, y2] in image pixels (x2, y2 exclusive)"}


@dataclass
class VisualState:
    """One rollout's scene: the image, the objects [{colour, shape, box}] and the drawing canvas."""

    image: Image.Image
    objects: list[dict]
    canvas: Image.Image = field(default=None)

    def __post_init__(self):
        if self.canvas is None:
            self.canvas = self.image.copy()

    @classmethod
    def from_metadata(cls, meta: dict) -> VisualState:
        """From a problem row: ``objects`` (a JSON string or a list) and ``image`` (else drawn from the objects)."""
        objects = meta.get("objects")
        if objects is None:
            raise ValueError("the visual tools need the problem's 'objects' column (JSON list of {colour, shape, "
                             "box}); use prompts.source=world with world shapes_vqa, or count_rows")
        objects = json.loads(objects) if isinstance(objects, str) else list(objects)
        image = meta.get("image")
        if image is None:
            size = int(meta.get("image_size", shapes.IMAGE_SIZE))
            image = Image.new("RGB", (size, size), (0, 0, 0))
            draw = ImageDraw.Draw(image)
            for o in objects:
                x1, y1, x2, _ = o["box"]
                shapes._draw(draw, o["shape"], (x1, y1, x2 - x1), shapes.COLOURS[o["colour"]])
        return cls(image=image.convert("RGB"), objects=objects)


def _matching(state: VisualState, colour: str | None, shape: str | None) -> list[dict]:
    return [o for o in state.objects if (colour is None or o["colour"] == colour) and (shape is None or o["shape"] == shape)]


def _inside(o: dict, box: list[int]) -> bool:
    """The object's centre lies in the box."""
    cx, cy = (o["box"][0] + o["box"][2]) / 2, (o["box"][1] + o["box"][3]) / 2
    return box[0] <= cx < box[2] and box[1] <= cy < box[3]


def _check_box(state: VisualState, box: list[int]) -> list[int]:
    w, h = state.image.size
    x1, y1, x2, y2 = box
    if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
        raise ValueError(f"box {box} is not inside the {w}x{h} image with x1 < x2 and y1 < y2")
    return box


class CountTool(Tool):
    name = "count"
    description = "Count the objects of a colour and/or a shape (both empty: every object)."
    parameters = {"type": "object", "properties": {"colour": {"type": "string", "enum": COLOURS},
                                                   "shape": {"type": "string", "enum": SHAPE_NAMES}},
                  "additionalProperties": False}

    def run(self, state: VisualState, args: dict) -> Observation:
        return Observation(text=f"count: {len(_matching(state, args.get('colour'), args.get('shape')))}")


class LocateTool(Tool):
    name = "locate"
    description = "The boxes [x1, y1, x2, y2] of every object of a shape (and optionally a colour), left to right."
    parameters = {"type": "object", "properties": {"shape": {"type": "string", "enum": SHAPE_NAMES},
                                                   "colour": {"type": "string", "enum": COLOURS}},
                  "required": ["shape"], "additionalProperties": False}

    def run(self, state: VisualState, args: dict) -> Observation:
        found = sorted(_matching(state, args.get("colour"), args["shape"]), key=lambda o: (o["box"][0], o["box"][1]))
        return Observation(text="boxes: " + json.dumps([o["box"] for o in found], separators=(",", ":")))


class CropTool(Tool):
    name = "crop"
    description = "Zoom into a region: the crop enlarged `zoom` times, and the objects whose centre lies in it."
    parameters = {"type": "object", "properties": {"box": _BOX, "zoom": {"type": "integer", "minimum": 1,
                                                                          "maximum": 8}},
                  "required": ["box"], "additionalProperties": False}

    def run(self, state: VisualState, args: dict) -> Observation:
        box, zoom = _check_box(state, args["box"]), args.get("zoom", 2)
        crop = state.image.crop(tuple(box))
        crop = crop.resize((crop.width * zoom, crop.height * zoom), Image.NEAREST)
        inside = [f"{o['colour']} {o['shape']}" for o in sorted(state.objects, key=lambda o: o["box"][0])
                  if _inside(o, box)]
        return Observation(text="objects: " + (", ".join(inside) if inside else "none"), image=crop)


class DrawBoxTool(Tool):
    name = "draw_box"
    description = "Draw a rectangle outline on the image (it stays for later calls) and count the objects inside."
    parameters = {"type": "object", "properties": {"box": _BOX, "colour": {"type": "string",
                                                                            "enum": ["white", *COLOURS]}},
                  "required": ["box"], "additionalProperties": False}

    def run(self, state: VisualState, args: dict) -> Observation:
        box = _check_box(state, args["box"])
        colour = (255, 255, 255) if args.get("colour", "white") == "white" else shapes.COLOURS[args["colour"]]
        ImageDraw.Draw(state.canvas).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], outline=colour)
        n = sum(_inside(o, box) for o in state.objects)
        return Observation(text=f"drawn; inside: {n}", image=state.canvas.copy())


VISUAL_TOOLS = (CountTool(), LocateTool(), CropTool(), DrawBoxTool())


# ------------------------------------------------------------------------------------------------
# crowded counting problems (the tool benchmark's world)
# ------------------------------------------------------------------------------------------------

COUNT_MIN_OBJECTS, COUNT_MAX_OBJECTS = 5, 9


def _crowded_scene(rng: random.Random) -> list[SceneObject]:
    n = rng.randint(COUNT_MIN_OBJECTS, COUNT_MAX_OBJECTS)
    while True:
        boxes: list[tuple[int, int, int]] = []
        for _ in range(200 * n):
            side = rng.randint(4, 5)
            box = (rng.randint(0, shapes.IMAGE_SIZE - side), rng.randint(0, shapes.IMAGE_SIZE - side), side)
            if all(shapes._separated(box, b) for b in boxes):
                boxes.append(box)
                if len(boxes) == n:
                    return [SceneObject(rng.choice(COLOURS), rng.choice(SHAPE_NAMES), b) for b in boxes]


def count_rows(n: int, split: str = "train", seed: int = 0) -> list[dict]:
    """`n` crowded counting problems of `split` (held-out object multisets, as the visual world splits): rows with
    ``prompt``, ``answer``, ``objects`` (JSON), ``image``, ``solution`` (the expert tool trace: a JSON list of
    the policy's turns), ``direct_solution`` (terminate at once), ``signature``, ``split``."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"tool-count-{seed}-{split}")
    rows = []
    while len(rows) < n:
        objects = _crowded_scene(rng)
        sig = signature(objects)
        if scene_split(sig) != split:
            continue
        if len(rows) % 2 == 0:
            colour = rng.choice(sorted({o.colour for o in objects}))
            question, args = f"How many {colour} objects are there?", {"colour": colour}
            answer = sum(o.colour == colour for o in objects)
        else:
            shape = rng.choice(sorted({o.shape for o in objects}))
            question, args = f"How many {shape}s are there?", {"shape": shape}
            answer = sum(o.shape == shape for o in objects)
        turns = [format_action("count", "count", args),  # the thought restates the observation, then answers
                 format_action(f"count: {answer}", "terminate", {"ans": str(answer)})]
        rows.append({
            "prompt": question, "answer": str(answer),
            "objects": json.dumps([{"colour": o.colour, "shape": o.shape,
                                    "box": [o.box[0], o.box[1], o.box[0] + o.box[2], o.box[1] + o.box[2]]}
                                   for o in objects]),
            "image": render_scene(objects), "solution": json.dumps(turns),
            "direct_solution": json.dumps([format_action("answer", "terminate", {"ans": str(answer)})]),
            "signature": sig, "split": split,
        })
    return rows


def answer_prior(rows: list[dict]) -> float:
    """The accuracy of always answering each question's most frequent answer (the best a policy that cannot see
    the image can do), measured on `rows`."""
    by_question = Counter((r["prompt"], r["answer"]) for r in rows)
    best = Counter()
    for (question, _), c in by_question.items():
        best[question] = max(best[question], c)
    return sum(best.values()) / max(len(rows), 1)
