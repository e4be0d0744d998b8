"""CLIPScore (Hessel et al. 2021, arXiv 2104.08718).

score = w * max(cos(E_text(prefix + prompt), E_image(image)), 0)

``w = 2.5`` is the paper's default (torchmetrics uses 100 with ViT-L/14). The paper prefixes captions
with "A photo depicts" (``prefix="A photo depicts "``); default here is no prefix. ``clamp=False``
gives ``w * cos`` (better as a training signal: max(., 0) has zero gradient for negative cosines).
Default CLIP ``openai/clip-vit-large-patch14`` (paper: ViT-B/32) with its own processor.
"""

from __future__ import annotations

import math

import torch

from rewards.pickscore import ClipPairReward

DEFAULT_MODEL = "openai/clip-vit-large-patch14"


class ClipScoreReward(ClipPairReward):
    name = "clipscore"

    def __init__(self, *, w: float = 2.5, prefix: str = "", clamp: bool = True, **kwargs):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"clipscore weight w must be a finite number (2.5 paper, 100 torchmetrics), got {w!r}")
        self.w = float(w)
        self.prefix = str(prefix)
        self.clamp = bool(clamp)
        super().__init__(**kwargs)

    def _texts(self, prompts):
        return [self.prefix + p for p in prompts]

    def _combine(self, cos):
        return self.w * (cos.clamp(min=0) if self.clamp else cos)


def make_clipscore_reward(
    model_path: str = DEFAULT_MODEL,
    processor_path: str | None = None,
    w: float = 2.5,
    prefix: str = "",
    clamp: bool = True,
    revision: str | None = None,
    processor_revision: str | None = None,
    local_files_only: bool = False,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 16,
) -> ClipScoreReward:
    """Factory for ``clipscore`` (processor defaults to ``model_path``)."""
    return ClipScoreReward(
        w=w, prefix=prefix, clamp=clamp, model_path=model_path, processor_path=processor_path or model_path,
        revision=revision, processor_revision=processor_revision if processor_path else revision,
        local_files_only=local_files_only, dtype=dtype, device=device, batch_size=batch_size,
    )
