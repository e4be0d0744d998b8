"""Reward contract shared by every reward: ``RewardFn``, ``RewardError`` and ``check_scores``.

Contract (ddpo-pytorch "reward factory" pattern, kvablack/ddpo-pytorch ``ddpo_pytorch/rewards.py``):
a factory loads its models once and returns a callable

    scores, info = fn(images, prompts, metadata)

* ``images``: float tensor ``[B, 3, H, W]`` in ``[0, 1]`` (main case), uint8 numpy ``[B, H, W, 3]``
  or a list of PIL images (see ``rewards.images``).
* ``scores``: ``torch.float32`` tensor ``[B]`` on CPU. ``NaN`` means "this sample could not be
  scored" (never 0). ``+-inf`` is a bug and raises.
* ``info``: dict, may be empty. Multi-rewards put per-component scores in ``info["components"]``.

Differentiable rewards also implement ``score_tensor(images, prompts) -> tensor[B]`` whose gradient
reaches ``images`` (float ``[B, 3, H, W]`` in ``[0, 1]``, on the reward's device or any device).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from rewards.images import ImageBatch, batch_size


class RewardError(RuntimeError):
    """A reward could not be loaded, could not score a batch, or returned invalid scores."""


def check_scores(reward_name: str, scores: Any, batch_size: int) -> torch.Tensor:
    """Validate and normalise a reward's output to a ``torch.float32`` CPU tensor of shape ``[B]``.

    Accepts a list/tuple of numbers (``None`` becomes NaN), a numpy array or a torch tensor.
    Raises ``RewardError`` naming the reward, the batch size and what was wrong for a wrong length,
    a wrong shape (anything but 1-D, except a ``[B, 1]`` column), non-numeric values or ``+-inf``.
    NaN is allowed: it marks an unscorable sample.
    """
    where = f"reward {reward_name!r} (batch size {batch_size})"
    if isinstance(scores, torch.Tensor):
        t = scores.detach().to("cpu")
    elif isinstance(scores, np.ndarray):
        if scores.dtype == object:
            scores = [None if v is None else v for v in scores.tolist()]
            t = _from_sequence(where, scores)
        else:
            t = torch.from_numpy(np.ascontiguousarray(scores))
    elif isinstance(scores, Sequence) and not isinstance(scores, (str, bytes)):
        t = _from_sequence(where, scores)
    elif isinstance(scores, (int, float)) and not isinstance(scores, bool):
        raise RewardError(
            f"{where} returned a single number ({scores!r}); return one score per image, "
            f"i.e. a sequence or tensor of length {batch_size}"
        )
    else:
        raise RewardError(
            f"{where} returned {type(scores).__name__}; expected a list, numpy array or torch tensor "
            f"of {batch_size} scores"
        )
    if t.dtype == torch.bool or not (t.is_floating_point() or t.dtype in _INT_DTYPES):
        raise RewardError(f"{where} returned scores of dtype {t.dtype}; expected real numbers")
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim != 1:
        raise RewardError(
            f"{where} returned scores of shape {tuple(t.shape)}; expected a 1-D tensor of shape "
            f"({batch_size},), one score per image"
        )
    if t.shape[0] != batch_size:
        raise RewardError(
            f"{where} returned {t.shape[0]} scores for {batch_size} images; return exactly one "
            f"score per image (NaN for an image that cannot be scored)"
        )
    t = t.to(torch.float32).contiguous()
    bad = torch.isinf(t)
    if bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()
        raise RewardError(
            f"{where} returned infinite scores at indices {idx[:10]} (values {t[bad][:10].tolist()}); "
            f"use NaN for an unscorable sample and a finite value otherwise"
        )
    return t


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _from_sequence(where: str, values: Sequence[Any]) -> torch.Tensor:
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
            continue
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        elif isinstance(v, np.ndarray) and v.size == 1:
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise RewardError(
                f"{where} returned a non-numeric score at index {i}: {v!r} ({type(v).__name__}); "
                f"expected a real number or None/NaN"
            )
        out.append(float(v))
    return torch.tensor(out, dtype=torch.float64).reshape(len(out))


def normalize_prompts(reward_name: str, prompts: Any, n: int) -> list[str]:
    """Return ``n`` prompt strings: a single string is broadcast, ``None`` becomes ``""``."""
    if prompts is None:
        return [""] * n
    if isinstance(prompts, str):
        return [prompts] * n
    prompts = list(prompts)
    if len(prompts) != n:
        raise RewardError(
            f"reward {reward_name!r} (batch size {n}) got {len(prompts)} prompts for {n} images; "
            f"pass one prompt per image or a single string"
        )
    return ["" if p is None else str(p) for p in prompts]


class RewardFn:
    """Base class of every reward.

    Subclasses set ``name`` and ``differentiable`` and implement ``_score(images, prompts, metadata)``
    returning ``(scores, info)`` (scores in any form ``check_scores`` accepts). ``__call__`` wraps it:
    empty batches, prompt broadcasting, exception wrapping into ``RewardError`` (chained, naming the
    reward and the batch size) and output validation.
    """

    name: str = "reward"
    differentiable: bool = False

    def __call__(
        self,
        images: ImageBatch,
        prompts: Sequence[str] | str | None = None,
        metadata: Sequence[dict] | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        try:
            n = batch_size(images)
        except (TypeError, ValueError) as exc:
            raise RewardError(f"reward {self.name!r}: cannot read the image batch: {exc}") from exc
        prompt_list = normalize_prompts(self.name, prompts, n)
        if n == 0:
            return torch.zeros(0, dtype=torch.float32), {}
        try:
            scores, info = self._score(images, prompt_list, metadata)
        except RewardError:
            raise
        except Exception as exc:
            raise RewardError(
                f"reward {self.name!r} failed on a batch of {n} image(s): {type(exc).__name__}: {exc}"
            ) from exc
        return check_scores(self.name, scores, n), dict(info or {})

    def _score(
        self, images: ImageBatch, prompts: list[str], metadata: Sequence[dict] | None
    ) -> tuple[Any, dict[str, Any]]:
        raise NotImplementedError

    def score_tensor(self, images: torch.Tensor, prompts: Sequence[str] | str | None = None) -> torch.Tensor:
        """Differentiable scores ``[B]`` of float images ``[B, 3, H, W]`` in ``[0, 1]``."""
        raise RewardError(
            f"reward {self.name!r} is not differentiable (differentiable=False); use a reward such as "
            f"'aesthetic', 'pickscore', 'hpsv2' or 'clipscore' for gradient-based training"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, differentiable={self.differentiable})"


class CallableReward(RewardFn):
    """Wrap a user function ``f(images, prompts, metadata) -> scores | (scores, info)`` as a RewardFn."""

    differentiable = False

    def __init__(self, name: str, fn: Callable[..., Any]):
        self.name = name
        self._fn = fn

    def _score(self, images, prompts, metadata):
        out = self._fn(images, prompts, metadata)
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
            return out
        return out, {}
