"""Shared machinery of model-based rewards: chunked no-grad scoring of decodable samples, NaN for the rest.

Non-differentiable path (``__call__``): images -> 8-bit RGB PIL (``rewards.images.to_pil_list``) ->
the model's own published preprocessing -> scores, ``batch_size`` images at a time under
``torch.inference_mode``. Differentiable path (``score_tensor``): float ``[B, 3, H, W]`` in ``[0, 1]``
-> tensor-side resize/crop (or letterbox for HPS)/normalise in float32 (``rewards.images``) -> cast to
the model dtype -> scores with gradients. Undecodable samples score NaN. Both paths preprocess in
float32 (float64 for a float64 model) and cast to the model dtype only when the pixels enter the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image

from rewards.base import normalize_prompts
from rewards.hub import check_batch_size, chunks, parse_device, parse_dtype
from rewards.images import ImageRewardFn, to_pil_list, valid_indices


class ModelReward(ImageRewardFn):
    """Base for rewards backed by a neural network."""

    differentiable = True

    def __init__(self, *, device=None, dtype=None, batch_size: int = 16):
        self.device = parse_device(device)
        self.dtype = parse_dtype(dtype, self.name)
        self.batch_size = check_batch_size(batch_size, self.name)

    def _score(self, images, prompts, metadata):
        pils = to_pil_list(images)
        idx = valid_indices(pils)
        out = torch.full((len(pils),), math.nan, dtype=torch.float32)
        with torch.inference_mode():
            for sl in chunks(len(idx), self.batch_size):
                ids = idx[sl]
                scores = self._score_pils([pils[i] for i in ids], [prompts[i] for i in ids])
                out[ids] = scores.detach().float().cpu()
        return out, {}

    def _score_pils(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def score_tensor(self, images: torch.Tensor, prompts: Sequence[str] | str | None = None) -> torch.Tensor:
        """Differentiable float32 scores ``[B]`` (on the reward's device) of float images in [0, 1]."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"score_tensor expects a float tensor [B, 3, H, W] in [0, 1], got {shape}")
        prompt_list = normalize_prompts(self.name, prompts, images.shape[0])
        x = images.to(device=self.device, dtype=self.preprocess_dtype)
        return self._score_tensor(x, prompt_list).float()

    @property
    def preprocess_dtype(self) -> torch.dtype:
        """Resize/crop/normalise run in float32 (float64 for a float64 model), never in the model's
        bf16/fp16: the pixels are rounded to the model dtype once, when they enter the model."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def _score_tensor(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError


def linear_mlp_head(state_dict: dict[str, torch.Tensor], name: str) -> torch.nn.Sequential:
    """The linear MLP used by the LAION aesthetic predictor and ImageReward (keys ``layers.{0,2,4,6,7}``).

    Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear -- no activations. Layer sizes are
    read from the state dict; keys must match exactly.
    """
    expected = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    got = set(state_dict)
    if got != expected:
        raise ValueError(
            f"{name}: MLP head state dict keys do not match the published layout; missing "
            f"{sorted(expected - got)}, unexpected {sorted(got - expected)[:10]}"
        )
    linears = {i: state_dict[f"layers.{i}.weight"].shape for i in (0, 2, 4, 6, 7)}
    lin = {i: torch.nn.Linear(int(s[1]), int(s[0])) for i, s in linears.items()}
    head = torch.nn.Sequential(
        lin[0], torch.nn.Dropout(0.2), lin[2], torch.nn.Dropout(0.2), lin[4], torch.nn.Dropout(0.1), lin[6], lin[7]
    )
    head.load_state_dict({k.removeprefix("layers."): v for k, v in state_dict.items()}, strict=True)
    if int(linears[7][0]) != 1:
        raise ValueError(f"{name}: MLP head must end in one output, got {int(linears[7][0])}")
    return head.eval()


def load_torch_state_dict(path: str, name: str) -> dict[str, torch.Tensor]:
    """``torch.load(path, map_location='cpu', weights_only=True)`` of a plain (or wrapped) state dict."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{name}: {path} does not contain a state dict of tensors")
    return dict(obj)
