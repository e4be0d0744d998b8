"""Reward contract shared by every reward: ``RewardFn``, ``RewardError`` and ``check_scores``.

Contract (ddpo-pytorch "reward factory" pattern, kvablack/ddpo-pytorch ``ddpo_pytorch/rewards.py``):
a factory loads its models once and returns a callable

    scores, info = fn(samples, prompts, metadata)

* ``samples``: a batch of B generated samples. Every reward in this package scores images today
  (float tensor ``[B, 3, H, W]`` in ``[0, 1]``, uint8 numpy ``[B, H, W, 3]`` or a list of PIL images;
  see ``rewards.images``, whose ``ImageRewardFn`` validates that layout), but the contract itself is
  modality-free: a text reward takes a list of B strings. ``RewardFn`` only counts the samples
  (``len`` of a sequence, first dimension of a tensor or array).
* ``prompts``: B strings, or one string broadcast to every sample, or None (empty prompts).
* ``metadata``: B dicts or None, passed through untouched.
* ``scores``: ``torch.float32`` tensor ``[B]`` on CPU, one per sample. ``NaN`` means "this sample
  could not be scored" (never 0). ``+-inf`` is a bug and raises.
* ``info``: dict, may be empty. Multi-rewards put per-component scores in ``info["components"]``.

Differentiable rewards also implement ``score_tensor(samples, prompts) -> tensor[B]`` whose gradient
reaches ``samples`` (for image rewards: float ``[B, 3, H, W]`` in ``[0, 1]``, on the reward's device or
any device).

Backward compatibility: the first argument used to be called ``images``; positional calls are
unchanged and ``images=`` is still accepted as a keyword alias of ``samples``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

_MISSING: Any = object()


class RewardError(RuntimeError):
    """A reward could not be loaded, could not score a batch, or returned invalid scores."""


def check_scores(reward_name: str, scores: Any, batch_size: int) -> torch.Tensor:
    """Validate and normalise a reward's output to a ``torch.float32`` CPU tensor of shape ``[B]``.

    ``batch_size`` is the number of samples scored (one score each).

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
            f"{where} returned a single number ({scores!r}); return one score per sample, "
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
            f"({batch_size},), one score per sample"
        )
    if t.shape[0] != batch_size:
        raise RewardError(
            f"{where} returned {t.shape[0]} scores for {batch_size} samples; return exactly one "
            f"score per sample (NaN for a sample that cannot be scored)"
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
    """Return ``n`` prompt strings (one per sample): a single string is broadcast, ``None`` becomes ``""``."""
    if prompts is None:
        return [""] * n
    if isinstance(prompts, str):
        return [prompts] * n
    prompts = list(prompts)
    if len(prompts) != n:
        raise RewardError(
            f"reward {reward_name!r} (batch size {n}) got {len(prompts)} prompts for {n} samples; "
            f"pass one prompt per sample or a single string"
        )
    return ["" if p is None else str(p) for p in prompts]


def sample_count(samples: Any) -> int:
    """Number of samples in a batch, whatever the modality: first dimension of a tensor or array,
    ``len`` of any other sequence (a single string or bytes object is not a batch)."""
    if isinstance(samples, (torch.Tensor, np.ndarray)):
        if samples.ndim == 0:
            raise ValueError("got a 0-d tensor/array; pass a batch with one entry per sample")
        return int(samples.shape[0])
    if isinstance(samples, (str, bytes)):
        raise TypeError(f"got a single {type(samples).__name__}; pass a list with one entry per sample")
    if isinstance(samples, Sequence):
        return len(samples)
    raise TypeError(f"unsupported batch type {type(samples).__name__}; pass a tensor, an array or a list of samples")


def _pick_samples(samples: Any, images: Any) -> Any:
    """``samples`` or its old keyword name ``images`` (exactly one of them)."""
    if images is _MISSING:
        if samples is _MISSING:
            raise TypeError("missing the batch of samples (first argument)")
        return samples
    if samples is not _MISSING:
        raise TypeError("pass the batch once: as `samples` (or positionally), not also as `images`")
    return images


class RewardFn:
    """Base class of every reward: ``fn(samples, prompts, metadata) -> (scores, info)``.

    Subclasses set ``name`` and ``differentiable`` and implement ``_score(samples, prompts, metadata)``
    returning ``(scores, info)`` (scores in any form ``check_scores`` accepts). ``__call__`` wraps it:
    counting the samples (``_batch_size``; modality-free here, image rewards derive from
    ``rewards.images.ImageRewardFn``, which validates the image layout), empty batches, prompt
    broadcasting, exception wrapping into ``RewardError`` (chained, naming the reward and the batch
    size) and output validation.
    """

    name: str = "reward"
    differentiable: bool = False

    def __call__(
        self,
        samples: Any = _MISSING,
        prompts: Sequence[str] | str | None = None,
        metadata: Sequence[dict] | None = None,
        *,
        images: Any = _MISSING,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        samples = _pick_samples(samples, images)
        n = self._batch_size(samples)
        prompt_list = normalize_prompts(self.name, prompts, n)
        if n == 0:
            return torch.zeros(0, dtype=torch.float32), {}
        try:
            scores, info = self._score(samples, prompt_list, metadata)
        except RewardError:
            raise
        except Exception as exc:
            raise RewardError(
                f"reward {self.name!r} failed on a batch of {n} sample(s): {type(exc).__name__}: {exc}"
            ) from exc
        return check_scores(self.name, scores, n), dict(info or {})

    def _batch_size(self, samples: Any) -> int:
        """Number of samples in the batch; raises ``RewardError`` when it cannot be read."""
        try:
            return sample_count(samples)
        except (TypeError, ValueError) as exc:
            raise RewardError(f"reward {self.name!r}: cannot read the batch of samples: {exc}") from exc

    def _score(self, samples: Any, prompts: list[str], metadata: Sequence[dict] | None) -> tuple[Any, dict[str, Any]]:
        raise NotImplementedError

    def score_tensor(self, samples: torch.Tensor, prompts: Sequence[str] | str | None = None) -> torch.Tensor:
        """Differentiable scores ``[B]`` of a tensor batch (image rewards: float ``[B, 3, H, W]`` in ``[0, 1]``)."""
        raise RewardError(
            f"reward {self.name!r} is not differentiable (differentiable=False); use a reward such as "
            f"'aesthetic', 'pickscore', 'hpsv2' or 'clipscore' for gradient-based training"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, differentiable={self.differentiable})"


class CallableReward(RewardFn):
    """Wrap a user function ``f(samples, prompts, metadata) -> scores | (scores, info)`` as a RewardFn.

    ``f`` gets the batch as passed (e.g. the trainer's images ``[B, 3, H, W]``), the prompts as a list
    of B strings and the metadata untouched; its scores are validated by ``check_scores``.
    """

    differentiable = False

    def __init__(self, name: str, fn: Callable[..., Any]):
        self.name = name
        self._fn = fn

    def _score(self, samples, prompts, metadata):
        out = self._fn(samples, prompts, metadata)
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
            return out
        return out, {}


def as_reward(fn: Callable[..., Any]) -> RewardFn:
    """A RewardFn as it is; any other callable `f(samples, prompts, metadata)` wrapped, named after it."""
    return fn if isinstance(fn, RewardFn) else CallableReward(getattr(fn, "__name__", "custom_reward"), fn)
