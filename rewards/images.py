"""Image-format conversion for rewards: one place that turns any accepted batch into what a model needs.

Accepted inputs (``ImageBatch``):

* float ``torch.Tensor [B, 3, H, W]`` in ``[0, 1]`` (the trainer's decoded VAE output; main case);
  a uint8 tensor ``[B, 3, H, W]`` is read as 0..255;
* uint8 ``numpy.ndarray [B, H, W, 3]`` (float arrays in ``[0, 1]`` also accepted);
* a list of PIL images (any mode, converted to RGB). List items may also be file paths,
  ``[3, H, W]`` tensors or ``[H, W, 3]`` arrays.

Conversions:

* ``to_pil_list`` -> ``list[PIL.Image | None]``: float -> ``x * 255``, round, clamp to 0..255, uint8
  (ddpo-pytorch ``jpeg_incompressibility``); this 8-bit rendering is what every non-differentiable
  reward scores, so a saved PNG scores the same as the tensor it came from. ``None`` marks a sample
  that could not be decoded (non-finite pixels, unreadable file, wrong shape): the reward returns NaN.
* ``to_float_tensor`` -> float32 ``[B, 3, H, W]`` in ``[0, 1]`` (all images must share a size).
* ``resize_center_crop_normalize`` -> the tensor-side equivalent of the CLIP/BLIP processors: bicubic
  resize of the short side with antialias, center crop, ``(x - mean) / std``; differentiable.
* ``resize_longest_pad_normalize`` -> the letterbox of hpsv2 (open_clip ``ResizeMaxSize``): bicubic
  resize of the *longest* side, centred zero (black) padding to a square, ``(x - mean) / std``;
  differentiable, antialias optional.

``ImageRewardFn`` is the base of rewards that score images: it validates the batch layout above before
scoring (``rewards.base.RewardFn`` itself only counts samples, so non-image rewards can share it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from rewards.base import RewardError, RewardFn

ImageBatch = torch.Tensor | np.ndarray | Sequence[Any]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def batch_size(images: ImageBatch) -> int:
    """Number of images in a batch (validates the batch layout)."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"image tensor has shape {tuple(images.shape)}; expected [B, 3, H, W] with values in [0, 1]"
            )
        return int(images.shape[0])
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[3] != 3:
            raise ValueError(f"image array has shape {images.shape}; expected uint8 [B, H, W, 3]")
        return int(images.shape[0])
    if isinstance(images, Image.Image):
        raise TypeError("got a single PIL image; pass a list of PIL images")
    if isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        return len(images)
    raise TypeError(
        f"unsupported image batch type {type(images).__name__}; pass a float tensor [B,3,H,W] in [0,1], "
        f"a uint8 array [B,H,W,3] or a list of PIL images"
    )


def _float_chw_to_uint8_hwc(x: torch.Tensor) -> np.ndarray | None:
    x = x.detach().to("cpu")
    if x.dtype == torch.uint8:
        return x.permute(1, 2, 0).contiguous().numpy()
    x = x.float()
    if not bool(torch.isfinite(x).all()):
        return None
    return (x * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def _array_to_uint8(a: np.ndarray) -> np.ndarray | None:
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        return None
    a = a[:, :, :3]
    if a.dtype == np.uint8:
        return a
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        return None
    return np.clip(np.round(a * 255), 0, 255).astype(np.uint8)


def _item_to_pil(item: Any) -> Image.Image | None:
    try:
        if isinstance(item, Image.Image):
            return item.convert("RGB") if item.mode != "RGB" else item
        if isinstance(item, (str, os.PathLike)):
            with Image.open(item) as im:
                return im.convert("RGB")
        if isinstance(item, torch.Tensor):
            if item.ndim != 3 or item.shape[0] != 3:
                return None
            arr = _float_chw_to_uint8_hwc(item)
        elif isinstance(item, np.ndarray):
            arr = _array_to_uint8(item)
        else:
            return None
        return None if arr is None else Image.fromarray(np.ascontiguousarray(arr), mode="RGB")
    except (OSError, ValueError, TypeError):
        return None


def to_pil_list(images: ImageBatch) -> list[Image.Image | None]:
    """Convert a batch to RGB PIL images; ``None`` for a sample that cannot be decoded."""
    n = batch_size(images)
    if isinstance(images, torch.Tensor):
        return [_item_to_pil(images[i]) for i in range(n)]
    if isinstance(images, np.ndarray):
        return [_item_to_pil(images[i]) for i in range(n)]
    return [_item_to_pil(item) for item in images]


def to_uint8_numpy(images: ImageBatch) -> np.ndarray:
    """Convert a batch of equally sized images to uint8 ``[B, H, W, 3]`` (raises on undecodable ones)."""
    pils = to_pil_list(images)
    bad = [i for i, p in enumerate(pils) if p is None]
    if bad:
        raise ValueError(f"images at indices {bad} could not be decoded")
    return np.stack([np.asarray(p) for p in pils])  # type: ignore[arg-type]


def to_float_tensor(images: ImageBatch) -> torch.Tensor:
    """Convert a batch to float32 ``[B, 3, H, W]`` in ``[0, 1]``; a float tensor is returned as is."""
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        batch_size(images)
        return images.float()
    arr = to_uint8_numpy(images)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255.0)


def pil_to_float_tensor(image: Image.Image) -> torch.Tensor:
    """``torchvision.transforms.ToTensor`` of an RGB PIL image: float ``[3, H, W]`` in ``[0, 1]``."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255.0)


def resize_center_crop_normalize(
    images: torch.Tensor,
    size: int,
    crop: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Tensor-side CLIP-style preprocessing of float ``[B, 3, H, W]`` in ``[0, 1]`` (differentiable).

    Resize so the short side equals ``size`` (bicubic, antialias), center-crop to ``crop`` and
    normalise with ``mean``/``std``. Matches ``torchvision.transforms.Resize(size, BICUBIC)`` +
    ``CenterCrop`` + ``Normalize`` applied to a tensor (ToTensor first). HPS letterboxes instead
    (``resize_longest_pad_normalize``).
    """
    from torchvision.transforms.v2 import functional as TF

    if isinstance(crop, int):
        crop = (crop, crop)
    x = TF.resize(images, [size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    x = TF.center_crop(x, list(crop))
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def resize_longest_pad_normalize(
    images: torch.Tensor,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    antialias: bool,
    fill: float = 0.0,
) -> torch.Tensor:
    """Letterbox float ``[B, 3, H, W]`` in ``[0, 1]`` to ``[B, 3, size, size]`` and normalise (differentiable).

    hpsv2's eval transform (``create_model_and_transforms(..., light_augmentation=True)`` ->
    ``image_transform(resize_longest_max=True)`` -> open_clip ``ResizeMaxSize``) applied after ToTensor:
    scale = size / max(H, W); resize to ``(round(H * scale), round(W * scale))`` (Python rounding), bicubic,
    with or without ``antialias``; pad with ``fill`` (0 = black, before normalisation) to a square, the
    odd pixel going right/bottom (left = pad_w // 2, top = pad_h // 2); then ``(x - mean) / std``.

    Upstream skips the whole step when the longest side already equals ``size``, which leaves a
    non-square image unpadded (the model would then fail); here such an image is padded. A square
    ``size x size`` input is returned unresized.
    """
    from torchvision.transforms.v2 import functional as TF

    h, w = int(images.shape[-2]), int(images.shape[-1])
    x = images
    if (h, w) != (size, size):
        scale = size / float(max(h, w))
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        if (nh, nw) != (h, w):
            x = TF.resize(x, [nh, nw], interpolation=TF.InterpolationMode.BICUBIC, antialias=antialias)
        pad_h, pad_w = size - nh, size - nw
        x = torch.nn.functional.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def valid_indices(pils: Sequence[Image.Image | None]) -> list[int]:
    """Indices of decodable samples."""
    return [i for i, p in enumerate(pils) if p is not None]


class ImageRewardFn(RewardFn):
    """Base of rewards whose samples are images: the batch must be an ``ImageBatch`` (see module doc).

    A wrong layout (e.g. a ``[B, H, W]`` tensor) raises ``RewardError`` naming the reward and the
    expected layouts before ``_score`` runs.
    """

    def _batch_size(self, samples: Any) -> int:
        try:
            return batch_size(samples)
        except (TypeError, ValueError) as exc:
            raise RewardError(f"reward {self.name!r}: cannot read the image batch: {exc}") from exc
