"""Shared CLIP helpers (transformers ``CLIPModel``) for aesthetic, PickScore and CLIPScore.

* ``load_clip`` / ``load_clip_processor``: ``from_pretrained`` on a hub id or local directory with an
  explicit ``dtype``, ``revision``, ``local_files_only``; never ``trust_remote_code``; eval mode.
* ``embed``: transformers 5 returns ``BaseModelOutputWithPooling`` from ``get_image_features`` /
  ``get_text_features`` (huggingface/transformers#42564) -- the projected embedding is
  ``.pooler_output``; older versions return the tensor. Both are accepted.
* ``TensorPreprocess``: the CLIP processor's resize (short side, bicubic) / center crop / OpenAI
  mean-std normalisation, done with tensor ops so gradients flow (AlignProp-style).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rewards.hub import resolve
from rewards.images import resize_center_crop_normalize


def embed(output) -> torch.Tensor:
    """Projected embedding from a tensor or a ``BaseModelOutputWithPooling``."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"cannot read an embedding from {type(output).__name__}")
    return pooled


def normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _pretrained_kwargs(revision, local_files_only):
    return {"revision": revision, "local_files_only": local_files_only, "trust_remote_code": False}


def load_clip(
    model_path: str,
    *,
    revision: str | None,
    local_files_only: bool,
    dtype: torch.dtype,
    device: torch.device,
    vision_only: bool = False,
    reward_name: str = "reward",
):
    """``CLIPModel`` (or ``CLIPVisionModelWithProjection`` when ``vision_only``) in eval mode."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModelWithProjection

    source = resolve(model_path, None, revision=revision, local_files_only=local_files_only, reward_name=reward_name)
    kwargs = _pretrained_kwargs(revision, local_files_only)
    if vision_only:
        # The vision sub-config of a CLIPConfig lacks the top-level projection_dim; carry it over.
        full = CLIPConfig.from_pretrained(source, **kwargs)
        vision_config = full.vision_config
        vision_config.projection_dim = full.projection_dim
        model, info = CLIPVisionModelWithProjection.from_pretrained(
            source, config=vision_config, dtype=dtype, output_loading_info=True, **kwargs
        )
    else:
        model, info = CLIPModel.from_pretrained(source, dtype=dtype, output_loading_info=True, **kwargs)
    missing = list(info.get("missing_keys", []))
    mismatched = list(info.get("mismatched_keys", []))
    if missing or mismatched:
        raise ValueError(
            f"{reward_name}: CLIP weights at {model_path!r} left parameters uninitialised: missing "
            f"{missing[:10]}, mismatched {mismatched[:10]}; is this a CLIP checkpoint?"
        )
    return model.to(device).eval().requires_grad_(False)


def load_clip_processor(path: str, *, revision: str | None, local_files_only: bool, image_only: bool = False):
    """``CLIPProcessor`` (tokenizer + image processor) or just ``CLIPImageProcessor``."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    cls = CLIPImageProcessor if image_only else CLIPProcessor
    return cls.from_pretrained(path, **_pretrained_kwargs(revision, local_files_only))


def _field(size, key: str):
    """Read ``key`` from an int, a dict or transformers 5's ``SizeDict``."""
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


@dataclass(frozen=True)
class TensorPreprocess:
    """Resize short side to ``size`` (bicubic, antialias), center-crop ``crop``, normalise."""

    size: int
    crop: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_image_processor(cls, ip) -> TensorPreprocess:
        size, crop = ip.size, ip.crop_size
        short = _field(size, "shortest_edge")
        if short is None:
            short = min(_field(size, "height"), _field(size, "width"))
        crop_hw = (int(_field(crop, "height")), int(_field(crop, "width")))
        return cls(int(short), crop_hw, tuple(ip.image_mean), tuple(ip.image_std))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return resize_center_crop_normalize(images, self.size, self.crop, self.mean, self.std)
