"""LAION aesthetic predictor v2 (christophschuhmann/improved-aesthetic-predictor, "sac+logos+ava1-l14-linearMSE").

score = MLP(e / ||e||_2),  e = CLIP ViT-L/14 image embedding (``get_image_features``)

MLP: Linear(768,1024) Dropout(0.2) Linear(1024,128) Dropout(0.2) Linear(128,64) Dropout(0.1)
Linear(64,16) Linear(16,1), no activations; keys ``layers.{0,2,4,6,7}``. Head file
``aesthetic-model.pth`` from ``trl-lib/ddpo-aesthetic-predictor`` (plain state dict, loaded with
``weights_only=True``); CLIP ``openai/clip-vit-large-patch14``. Output ~1..10 (SD1.x ~5.5).
Preprocessing: the CLIP image processor of ``clip_path`` (short side 224 bicubic, center crop 224,
OpenAI mean/std); ``score_tensor`` does the same with tensor ops.
"""

from __future__ import annotations

import torch

from rewards.clip_models import TensorPreprocess, embed, load_clip, load_clip_processor, normalize
from rewards.hub import resolve
from rewards.model_base import ModelReward, linear_mlp_head, load_torch_state_dict

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_HEAD = "trl-lib/ddpo-aesthetic-predictor"
HEAD_FILENAME = "aesthetic-model.pth"


class AestheticReward(ModelReward):
    name = "aesthetic"

    def __init__(
        self,
        *,
        clip_path: str = DEFAULT_CLIP,
        head_path: str = DEFAULT_HEAD,
        head_filename: str = HEAD_FILENAME,
        processor_path: str | None = None,
        revision: str | None = None,
        head_revision: str | None = None,
        local_files_only: bool = False,
        dtype=None,
        device=None,
        batch_size: int = 16,
    ):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        self.clip = load_clip(
            clip_path, revision=revision, local_files_only=local_files_only, dtype=self.dtype,
            device=self.device, vision_only=True, reward_name=self.name,
        )
        self.image_processor = load_clip_processor(
            processor_path or clip_path, revision=revision if processor_path is None else None,
            local_files_only=local_files_only, image_only=True,
        )
        self.preprocess = TensorPreprocess.from_image_processor(self.image_processor)
        head_file = resolve(
            head_path, head_filename, revision=head_revision, local_files_only=local_files_only, reward_name=self.name
        )
        head = linear_mlp_head(load_torch_state_dict(head_file, self.name), self.name)
        proj = self.clip.config.projection_dim
        if head[0].in_features != proj:
            raise ValueError(
                f"aesthetic head {head_file} expects {head[0].in_features}-d embeddings but the CLIP model "
                f"{clip_path} projects to {proj}; use a head trained on this CLIP (ViT-L/14 -> 768)"
            )
        self.head = head.to(self.device).requires_grad_(False)

    def _from_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        e = embed(self.clip(pixel_values=pixel_values.to(self.device, self.dtype)).image_embeds)
        e = normalize(e.float())
        return self.head(e).squeeze(-1)

    def _score_pils(self, images, prompts):
        px = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return self._from_pixels(px)

    def _score_tensor(self, images, prompts):
        return self._from_pixels(self.preprocess(images))


def make_aesthetic_reward(
    clip_path: str = DEFAULT_CLIP,
    head_path: str = DEFAULT_HEAD,
    head_filename: str = HEAD_FILENAME,
    processor_path: str | None = None,
    model_path: str | None = None,
    revision: str | None = None,
    head_revision: str | None = None,
    local_files_only: bool = False,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 16,
) -> AestheticReward:
    """Factory for ``aesthetic``. ``model_path`` is an alias of ``clip_path``."""
    return AestheticReward(
        clip_path=model_path or clip_path, head_path=head_path, head_filename=head_filename,
        processor_path=processor_path, revision=revision, head_revision=head_revision,
        local_files_only=local_files_only, dtype=dtype, device=device, batch_size=batch_size,
    )
