"""HPSv2 / HPSv2.1 (Wu et al. 2023, arXiv 2306.09341; tgxs002/HPSv2 ``hpsv2/img_score.py``).

score(prompt, image) = <i/||i||, t/||t||>   (cosine, NO logit scale; papers report x100)

Model: mainline open_clip ``ViT-H-14`` created with ``pretrained=None`` (no base download), then the
``{"state_dict": ...}`` checkpoint from ``xswu/HPSv2`` (``HPS_v2_compressed.pt`` for v2.0,
``HPS_v2.1_compressed.pt`` for v2.1) loaded strictly with ``weights_only=True``. Tokenizer
``open_clip.get_tokenizer(model_name)`` (bundled BPE, offline).

Preprocessing follows hpsv2's scorer, ``create_model_and_transforms(..., light_augmentation=True)``,
whose eval transform is ``image_transform(resize_longest_max=True)``: RGB -> ToTensor FIRST -> open_clip
``ResizeMaxSize(224)`` on the tensor (bicubic resize of the LONGEST side to 224, then zero padding,
i.e. black before normalisation, centred, to 224x224: a letterbox, no crop) -> Normalize(OpenAI
mean/std). ``rewards.images.resize_longest_pad_normalize`` does this on both paths (PIL images are
turned into float tensors first, exactly like ToTensor), so square images are resized straight to
224x224 and non-square images keep their whole content.

``antialias`` (default ``False``): upstream resizes a *tensor* with torchvision's default, and the
checkpoints were trained and benchmarked with a torchvision (< 0.17) whose tensor resize did not
antialias; ``False`` reproduces that. ``True`` is what the same hpsv2 code does on torchvision >= 0.17
(and what drl did before the letterbox fix); it smooths the downscale, which also spreads the
gradient of ``score_tensor`` over every input pixel. Scores under the two settings are not
comparable. v2.0 and v2.1 scores are not comparable either.

The ``hpsv2`` package is not used (broken wheel, pins). ``model_config`` (a JSON file in open_clip's
format) is registered with ``open_clip.add_model_config`` so tests can use a tiny architecture.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rewards.hub import resolve
from rewards.images import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    pil_to_float_tensor,
    resize_longest_pad_normalize,
)
from rewards.model_base import ModelReward, load_torch_state_dict

DEFAULT_REPO = "xswu/HPSv2"
FILENAMES = {"2.0": "HPS_v2_compressed.pt", "2.1": "HPS_v2.1_compressed.pt"}
DEFAULT_MODEL_NAME = "ViT-H-14"


class HPSReward(ModelReward):
    def __init__(
        self,
        *,
        version: str,
        model_path: str = DEFAULT_REPO,
        filename: str | None = None,
        model_name: str | None = None,
        model_config: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        antialias: bool = False,
        dtype=None,
        device=None,
        batch_size: int = 16,
    ):
        if version not in FILENAMES:
            raise ValueError(f"HPS version must be one of {sorted(FILENAMES)}, got {version!r}")
        self.name = "hpsv2" if version == "2.0" else "hpsv2.1"
        self.version = version
        if not isinstance(antialias, bool):
            raise ValueError(f"{self.name}: antialias must be true or false, got {antialias!r}")
        self.antialias = antialias
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        import open_clip

        if model_config is not None:
            cfg = Path(model_config)
            if not cfg.is_file():
                raise FileNotFoundError(f"HPS model_config {model_config!r} is not a file (open_clip JSON config)")
            open_clip.add_model_config(cfg)
            model_name = model_name or cfg.stem
        model_name = model_name or DEFAULT_MODEL_NAME
        ckpt = resolve(
            model_path, filename or FILENAMES[version], revision=revision,
            local_files_only=local_files_only, reward_name=self.name,
        )
        model = open_clip.create_model(model_name, pretrained=None, device="cpu", output_dict=True)
        state = {k.removeprefix("module."): v for k, v in load_torch_state_dict(ckpt, self.name).items()}
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{self.name}: checkpoint {ckpt} does not match open_clip model {model_name!r}: missing "
                f"{result.missing_keys[:10]} ({len(result.missing_keys)}), unexpected "
                f"{result.unexpected_keys[:10]} ({len(result.unexpected_keys)})"
            )
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.model_name = model_name
        size = self.model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        cfg = getattr(self.model.visual, "preprocess_cfg", None) or {}
        self.mean = tuple(cfg.get("mean", OPENAI_CLIP_MEAN))
        self.std = tuple(cfg.get("std", OPENAI_CLIP_STD))

    def _preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Float ``[B, 3, H, W]`` in [0, 1] -> letterboxed, normalised ``[B, 3, S, S]`` (same dtype)."""
        return resize_longest_pad_normalize(
            images, self.image_size, self.mean, self.std, antialias=self.antialias
        )

    def _from_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(self.device)
        img = self.model.encode_image(pixels.to(self.device, self.dtype), normalize=True).float()
        txt = self.model.encode_text(tokens, normalize=True).float()
        return (img * txt).sum(-1)

    def _score_pils(self, images, prompts):
        pixels = torch.cat([self._preprocess(pil_to_float_tensor(im)[None]) for im in images])  # fp32
        return self._from_pixels(pixels, prompts)

    def _score_tensor(self, images, prompts):
        return self._from_pixels(self._preprocess(images), prompts)


def make_hpsv2_reward(
    model_path: str = DEFAULT_REPO,
    filename: str | None = None,
    model_name: str | None = None,
    model_config: str | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
    antialias: bool = False,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 16,
) -> HPSReward:
    """Factory for ``hpsv2`` (v2.0, ``HPS_v2_compressed.pt``)."""
    return HPSReward(
        version="2.0", model_path=model_path, filename=filename, model_name=model_name,
        model_config=model_config, revision=revision, local_files_only=local_files_only,
        antialias=antialias, dtype=dtype, device=device, batch_size=batch_size,
    )


def make_hpsv21_reward(
    model_path: str = DEFAULT_REPO,
    filename: str | None = None,
    model_name: str | None = None,
    model_config: str | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
    antialias: bool = False,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 16,
) -> HPSReward:
    """Factory for ``hpsv2.1`` (``HPS_v2.1_compressed.pt``)."""
    return HPSReward(
        version="2.1", model_path=model_path, filename=filename, model_name=model_name,
        model_config=model_config, revision=revision, local_files_only=local_files_only,
        antialias=antialias, dtype=dtype, device=device, batch_size=batch_size,
    )
