"""JPEG (in)compressibility rewards (DDPO, Black et al. 2023, kvablack/ddpo-pytorch ``rewards.py``).

``jpeg_incompressibility(x) = size_in_bytes(JPEG(x, quality=95)) / 1000``   (kB, larger = more detail)
``jpeg_compressibility(x)   = -jpeg_incompressibility(x)``

Images are rendered to 8 bits first (``rewards.images.to_pil_list``: x*255, round, clamp). Sizes
depend on Pillow's libjpeg build, so compare exact values only under the same Pillow. An image that
cannot be decoded scores NaN.
"""

from __future__ import annotations

import io
import math

import torch

from rewards.images import ImageRewardFn, to_pil_list


def jpeg_size_kb(image, quality: int = 95) -> float:
    """Size in kB (bytes/1000) of an RGB PIL image saved as JPEG at ``quality``."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000.0


class JpegIncompressibility(ImageRewardFn):
    """JPEG q95 file size in kB; rewards detailed, hard-to-compress images."""

    name = "jpeg_incompressibility"
    differentiable = False

    def __init__(self, quality: int = 95):
        if not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"quality must be an integer in 1..100, got {quality!r} (DDPO uses 95)")
        self.quality = quality

    def _score(self, images, prompts, metadata):
        pils = to_pil_list(images)
        sizes = [math.nan if p is None else jpeg_size_kb(p, self.quality) for p in pils]
        return torch.tensor(sizes, dtype=torch.float32), {}


class JpegCompressibility(ImageRewardFn):
    """Negated JPEG q95 size in kB; composes ``JpegIncompressibility``."""

    name = "jpeg_compressibility"
    differentiable = False

    def __init__(self, quality: int = 95):
        self._inner = JpegIncompressibility(quality=quality)
        self.quality = quality

    def _score(self, images, prompts, metadata):
        scores, info = self._inner(images, prompts, metadata)
        return -scores, info


def make_jpeg_incompressibility(quality: int = 95) -> JpegIncompressibility:
    """Factory for ``jpeg_incompressibility``."""
    return JpegIncompressibility(quality=quality)


def make_jpeg_compressibility(quality: int = 95) -> JpegCompressibility:
    """Factory for ``jpeg_compressibility``."""
    return JpegCompressibility(quality=quality)
