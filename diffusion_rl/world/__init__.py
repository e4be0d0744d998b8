"""The embedded shapes world: procedural prompts/images and the tiny text-to-image model trained on them.

* ``diffusion_rl.world.shapes``    - the seeded generator (prompts, splits, renders, datasets)
* ``diffusion_rl.world.tokenizer`` - the word-level CLIPTokenizer of the world's captions
* ``diffusion_rl.world.pretrain``  - the from-scratch training script of the shipped model
* ``TINY_SHAPES_MODEL``            - the shipped ``StableDiffusionPipeline`` directory

The matching rule-based reward lives in ``rewards/shapes_alignment.py`` (``rewards.load("shapes_alignment")``).
"""

from pathlib import Path

from diffusion_rl.world.shapes import (
    COLOURS,
    IMAGE_SIZE,
    RELATIONS,
    SHAPES,
    PromptSpec,
    all_prompts,
    image_dataset,
    prompt_dataset,
    render,
    render_arrays,
    spec,
    split_prompts,
)

TINY_SHAPES_MODEL = Path(__file__).resolve().parent.parent / "assets" / "tiny-shapes"

__all__ = [
    "COLOURS",
    "IMAGE_SIZE",
    "RELATIONS",
    "SHAPES",
    "TINY_SHAPES_MODEL",
    "PromptSpec",
    "all_prompts",
    "image_dataset",
    "prompt_dataset",
    "render",
    "render_arrays",
    "spec",
    "split_prompts",
]
