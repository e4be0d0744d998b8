"""PickScore (Kirstain et al. 2023, Pick-a-Pic, arXiv 2305.01569; yuvalkirstain/PickScore README).

score(prompt, image) = exp(logit_scale) * <t/||t||, i/||i||>   (per (prompt, image) pair; ~100*cos)

Model ``yuvalkirstain/PickScore_v1`` (transformers ``CLIPModel``, ViT-H/14); processor
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (short side 224 bicubic, center crop 224, OpenAI mean/std;
CLIP BPE text, padding, truncation, max_length 77). Output ~18..23 on SD images.
"""

from __future__ import annotations

import torch

from rewards.clip_models import TensorPreprocess, embed, load_clip, load_clip_processor, normalize
from rewards.model_base import ModelReward

DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class ClipPairReward(ModelReward):
    """A CLIP model scoring each (prompt, image) pair; subclasses define ``_combine(cos)``."""

    max_length = 77

    def __init__(self, *, model_path, processor_path, revision, processor_revision, local_files_only,
                 dtype, device, batch_size):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        self.model = load_clip(
            model_path, revision=revision, local_files_only=local_files_only, dtype=self.dtype,
            device=self.device, reward_name=self.name,
        )
        self.processor = load_clip_processor(
            processor_path, revision=processor_revision, local_files_only=local_files_only
        )
        self.preprocess = TensorPreprocess.from_image_processor(self.processor.image_processor)

    def _text_features(self, prompts: list[str]) -> torch.Tensor:
        tok = self.processor.tokenizer(
            self._texts(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        out = self.model.get_text_features(
            input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
        )
        return normalize(embed(out).float())

    def _texts(self, prompts: list[str]) -> list[str]:
        return prompts

    def _from_pixels(self, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        img = normalize(embed(self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.dtype))).float())
        cos = (img * self._text_features(prompts)).sum(-1)
        return self._combine(cos)

    def _combine(self, cos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _score_pils(self, images, prompts):
        px = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return self._from_pixels(px, prompts)

    def _score_tensor(self, images, prompts):
        return self._from_pixels(self.preprocess(images), prompts)


class PickScoreReward(ClipPairReward):
    name = "pickscore"

    def _combine(self, cos):
        return self.model.logit_scale.float().exp() * cos


def make_pickscore_reward(
    model_path: str = DEFAULT_MODEL,
    processor_path: str = DEFAULT_PROCESSOR,
    revision: str | None = None,
    processor_revision: str | None = None,
    local_files_only: bool = False,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 16,
) -> PickScoreReward:
    """Factory for ``pickscore``."""
    return PickScoreReward(
        model_path=model_path, processor_path=processor_path, revision=revision,
        processor_revision=processor_revision, local_files_only=local_files_only, dtype=dtype,
        device=device, batch_size=batch_size,
    )
