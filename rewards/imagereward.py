"""ImageReward (Xu et al. 2023, arXiv 2304.05977; THUDM/ImageReward ``ImageReward/ImageReward.py``).

reward = (MLP(h_CLS) - 0.16717362830052426) / 1.0333394966054072

h_CLS = ``text_encoder(prompt ids, cross-attending to all BLIP ViT-L/16 image tokens).last_hidden_state[:, 0]``
(the first token stays ``[CLS]``); MLP 768->1024->128->64->16->1 with dropouts and no activations.

Runs on transformers ``BlipForImageTextRetrieval`` (``vision_model`` + ``text_encoder``) instead of the
unmaintained ``image-reward`` package. The original ``ImageReward.pt`` (``THUDM/ImageReward``) is
converted by ``convert_imagereward_state_dict`` (rename rules of transformers'
``convert_blip_original_pytorch_to_hf.py``); every checkpoint key must be consumed and no model
weight may stay uninitialised (only ``itm_head``, absent from ImageReward, is allowed missing).
Tokenizer ``bert-base-uncased`` + bos ``[DEC]`` + extra special ``[ENC]`` (30524 ids); text padded to
``max_length`` 35 with truncation. Images: Resize(224 short side, bicubic) -> CenterCrop(224) -> RGB ->
ToTensor -> Normalize(OpenAI mean/std). ``blip_config`` defaults to the real dimensions (vision
layer-norm eps 1e-6, not transformers' 1e-5).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from rewards.hub import resolve
from rewards.images import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    pil_to_float_tensor,
    resize_center_crop_normalize,
)
from rewards.model_base import ModelReward, linear_mlp_head, load_torch_state_dict

DEFAULT_REPO = "THUDM/ImageReward"
CHECKPOINT = "ImageReward.pt"
DEFAULT_TOKENIZER = "bert-base-uncased"
MEAN = 0.16717362830052426
STD = 1.0333394966054072
MAX_LENGTH = 35

REAL_BLIP_CONFIG: dict[str, Any] = {
    "vision_config": {
        "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
        "image_size": 224, "patch_size": 16, "layer_norm_eps": 1e-6,
    },
    "text_config": {
        "vocab_size": 30524, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
        "intermediate_size": 3072, "max_position_embeddings": 512, "encoder_hidden_size": 1024,
        "layer_norm_eps": 1e-12, "pad_token_id": 0, "bos_token_id": 30522, "sep_token_id": 102,
        "eos_token_id": 102,
    },
    "projection_dim": 256,
}

# ViT block renames (BLIP ``models/vit.py`` -> transformers ``BlipEncoderLayer``), applied in order.
_VISION_BLOCK_RULES = [
    (r"^norm1\.", "layer_norm1."),
    (r"^norm2\.", "layer_norm2."),
    (r"^attn\.proj\.", "self_attn.projection."),
    (r"^attn\.qkv\.", "self_attn.qkv."),
    (r"^mlp\.(fc[12])\.", r"mlp.\1."),
]
_VISION_TOP = {
    "cls_token": "vision_model.embeddings.class_embedding",
    "pos_embed": "vision_model.embeddings.position_embedding",
}


def _convert_vision_key(rest: str) -> str | None:
    if rest in _VISION_TOP:
        return _VISION_TOP[rest]
    if rest.startswith("patch_embed.proj."):
        return "vision_model.embeddings.patch_embedding." + rest.removeprefix("patch_embed.proj.")
    if rest.startswith("norm."):
        return "vision_model.post_layernorm." + rest.removeprefix("norm.")
    m = re.match(r"^blocks\.(\d+)\.(.*)$", rest)
    if m:
        inner = m.group(2)
        for pattern, repl in _VISION_BLOCK_RULES:
            new, n = re.subn(pattern, repl, inner)
            if n:
                return f"vision_model.encoder.layers.{m.group(1)}.{new}"
    return None


def convert_imagereward_state_dict(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """Split an ``ImageReward.pt`` state dict into (BLIP weights in transformers names, MLP head, leftovers).

    ``mlp.*`` -> head (prefix stripped); ``blip.visual_encoder.*`` -> ``vision_model.*``;
    ``blip.<x>`` -> ``<x>`` (text_encoder, vision_proj, text_proj); ``*.position_ids`` buffers dropped.
    Keys matching no rule are returned as leftovers.
    """
    blip: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    leftovers: list[str] = []
    for key, value in state.items():
        if key.endswith("embeddings.position_ids"):
            continue
        if key.startswith("mlp."):
            head[key.removeprefix("mlp.")] = value
        elif key.startswith("blip.visual_encoder."):
            new = _convert_vision_key(key.removeprefix("blip.visual_encoder."))
            if new is None:
                leftovers.append(key)
            else:
                blip[new] = value
        elif key.startswith("blip."):
            blip[key.removeprefix("blip.")] = value
        else:
            leftovers.append(key)
    return blip, head, leftovers


def _blip_config(blip_config):
    from transformers import BlipConfig

    if blip_config is None:
        blip_config = REAL_BLIP_CONFIG
    if isinstance(blip_config, BlipConfig):
        return blip_config
    if isinstance(blip_config, dict):
        return BlipConfig(**blip_config)
    raise TypeError(f"blip_config must be a BlipConfig or a dict, got {type(blip_config).__name__}")


def load_imagereward_tokenizer(path: str, revision: str | None = None, local_files_only: bool = False):
    """``BertTokenizer`` + bos ``[DEC]`` + extra special ``[ENC]`` (BLIP ``init_tokenizer``)."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(path, revision=revision, local_files_only=local_files_only)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


class ImageRewardReward(ModelReward):
    name = "imagereward"

    def __init__(
        self,
        *,
        model_path: str = DEFAULT_REPO,
        filename: str = CHECKPOINT,
        tokenizer_path: str = DEFAULT_TOKENIZER,
        blip_config=None,
        revision: str | None = None,
        tokenizer_revision: str | None = None,
        local_files_only: bool = False,
        dtype=None,
        device=None,
        batch_size: int = 16,
    ):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        from transformers import BlipForImageTextRetrieval

        config = _blip_config(blip_config)
        ckpt = resolve(model_path, filename, revision=revision, local_files_only=local_files_only, reward_name=self.name)
        blip_sd, head_sd, leftovers = convert_imagereward_state_dict(load_torch_state_dict(ckpt, self.name))
        if leftovers:
            raise ValueError(
                f"imagereward: {len(leftovers)} checkpoint keys of {ckpt} match no conversion rule: {leftovers[:10]}"
            )
        model = BlipForImageTextRetrieval(config)
        result = model.load_state_dict(blip_sd, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("itm_head.")]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"imagereward: checkpoint {ckpt} does not fit the BLIP config: missing {missing[:10]} "
                f"({len(missing)}), unconsumed {result.unexpected_keys[:10]} ({len(result.unexpected_keys)})"
            )
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.head = linear_mlp_head(head_sd, self.name).to(self.device).requires_grad_(False)
        if self.head[0].in_features != config.text_config.hidden_size:
            raise ValueError(
                f"imagereward: MLP head takes {self.head[0].in_features} features, text hidden size is "
                f"{config.text_config.hidden_size}"
            )
        self.tokenizer = load_imagereward_tokenizer(tokenizer_path, tokenizer_revision, local_files_only)
        if len(self.tokenizer) > config.text_config.vocab_size:
            raise ValueError(
                f"imagereward: tokenizer has {len(self.tokenizer)} ids but the text model only "
                f"{config.text_config.vocab_size}"
            )
        self.image_size = int(config.vision_config.image_size)

    def _preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return resize_center_crop_normalize(images, self.image_size, self.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def _from_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        image_embeds = self.model.vision_model(pixel_values=pixels.to(self.device, self.dtype)).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=self.device)
        text = self.model.text_encoder(
            input_ids=tok["input_ids"].to(self.device),
            attention_mask=tok["attention_mask"].to(self.device),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        ).last_hidden_state[:, 0]
        raw = self.head(text.float()).squeeze(-1)
        return (raw - MEAN) / STD

    def _score_pils(self, images, prompts):
        from torchvision.transforms.v2 import functional as TF

        pixels = []
        for im in images:
            im = TF.resize(im, [self.image_size], interpolation=TF.InterpolationMode.BICUBIC)
            im = TF.center_crop(im, [self.image_size, self.image_size])
            pixels.append(pil_to_float_tensor(im))
        x = torch.stack(pixels)
        m = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
        s = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
        return self._from_pixels((x - m) / s, prompts)

    def _score_tensor(self, images, prompts):
        return self._from_pixels(self._preprocess(images), prompts)


def make_imagereward_reward(
    model_path: str = DEFAULT_REPO,
    filename: str = CHECKPOINT,
    tokenizer_path: str = DEFAULT_TOKENIZER,
    blip_config: Any = None,
    revision: str | None = None,
    tokenizer_revision: str | None = None,
    local_files_only: bool = False,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 16,
) -> ImageRewardReward:
    """Factory for ``imagereward``."""
    return ImageRewardReward(
        model_path=model_path, filename=filename, tokenizer_path=tokenizer_path, blip_config=blip_config,
        revision=revision, tokenizer_revision=tokenizer_revision, local_files_only=local_files_only,
        dtype=dtype, device=device, batch_size=batch_size,
    )
