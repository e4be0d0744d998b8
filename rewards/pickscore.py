"""PickScore (Kirstain et al. 2023, Pick-a-Pic, arXiv 2305.01569; yuvalkirstain/PickScore README).

score(prompt, image) = exp(logit_scale) * <t/||t||, i/||i||>   (per (prompt, image) pair; ~100*cos)

Model ``yuvalkirstain/PickScore_v1`` (transformers ``CLIPModel``, ViT-H/14); processor
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (short side 224 bicubic, center crop 224, OpenAI mean/std;
CLIP BPE text, padding, truncation, max_length 77). Output ~18..23 on SD images.

Processor choice: an explicit ``processor_path`` wins. Otherwise, when ``model_path`` is a local
directory that holds a processor (``preprocessor_config.json`` or ``processor_config.json``, or
tokenizer files), that directory's processor is used, so a local copy works offline; a hub id or a
directory without one falls back to the laion hub processor above.

Precision: ``logit_scale`` is read and kept in float32 and exponentiated in float32 whatever the model
``dtype`` (in bf16 ln 100 = 4.60517 rounds to 4.59375 and every score came out 1.1 % low). For a
bf16/fp16 model the weights are therefore loaded in float32 on the CPU, the scalar is copied, and the
model is cast to ``dtype`` before it moves to ``device`` (peak host memory: the float32 model).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rewards.base import RewardError
from rewards.clip_models import TensorPreprocess, embed, load_clip, load_clip_processor, normalize
from rewards.model_base import ModelReward

DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def has_processor(path: str) -> bool:
    """Whether ``path`` is a local directory holding a saved processor (image processor or tokenizer files)."""
    d = Path(path).expanduser()
    return d.is_dir() and any((d / f).is_file() for f in PROCESSOR_FILES + TOKENIZER_FILES)


class ClipPairReward(ModelReward):
    """A CLIP model scoring each (prompt, image) pair; subclasses define ``_combine(cos)``.

    ``fp32_logit_scale``: subclasses that use ``logit_scale`` set it; the scalar is then kept in float32
    (``self.logit_scale``) even when the model runs in bf16/fp16.
    """

    max_length = 77
    fp32_logit_scale = False

    def __init__(self, *, model_path, processor_path, revision, processor_revision, local_files_only,
                 dtype, device, batch_size):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        reduced = self.dtype.itemsize < 4
        load_fp32 = self.fp32_logit_scale and reduced
        model = load_clip(
            model_path, revision=revision, local_files_only=local_files_only,
            dtype=torch.float32 if load_fp32 else self.dtype,
            device=torch.device("cpu") if load_fp32 else self.device, reward_name=self.name,
        )
        if self.fp32_logit_scale:
            self.logit_scale = model.logit_scale.detach().to(torch.float32).clone().to(self.device)
        if load_fp32:
            model = model.to(dtype=self.dtype).to(self.device)
        self.model = model
        try:
            self.processor = load_clip_processor(
                processor_path, revision=processor_revision, local_files_only=local_files_only
            )
        except Exception as exc:
            raise RewardError(
                f"reward {self.name!r}: could not load the CLIP processor from {processor_path!r}: "
                f"{type(exc).__name__}: {exc}. Fix: pass processor_path=<local directory with "
                f"preprocessor_config.json and tokenizer files>, or save the processor next to the model"
            ) from exc
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
    fp32_logit_scale = True

    def _combine(self, cos):
        return self.logit_scale.exp() * cos.float()  # float32 scalar, exp in float32


def make_pickscore_reward(
    model_path: str = DEFAULT_MODEL,
    processor_path: str | None = None,
    revision: str | None = None,
    processor_revision: str | None = None,
    local_files_only: bool = False,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 16,
) -> PickScoreReward:
    """Factory for ``pickscore``.

    ``processor_path=None``: the processor saved in a local ``model_path`` directory when it has one,
    else ``DEFAULT_PROCESSOR`` (the laion ViT-H-14 processor on the hub, as in the PickScore README).
    """
    if processor_path is None:
        if has_processor(model_path):
            processor_path = str(Path(model_path).expanduser())  # a local directory: no revision applies
        else:
            processor_path = DEFAULT_PROCESSOR
    return PickScoreReward(
        model_path=model_path, processor_path=processor_path, revision=revision,
        processor_revision=processor_revision, local_files_only=local_files_only, dtype=dtype,
        device=device, batch_size=batch_size,
    )
