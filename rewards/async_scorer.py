"""Overlap reward scoring with sampling: score batch i in a worker thread while batch i+1 is sampled.

``scorer = AsyncScorer(fn); fut = scorer.submit(samples, prompts, metadata); scores, info = fut.result()``

Results are identical to calling ``fn`` synchronously (same function, same inputs). Inputs that are
tensors are snapshotted (detached, cloned to CPU when the caller might mutate them in place) so the
caller may reuse its buffers. Torch ops release the GIL, so a model reward overlaps with sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from rewards.base import _MISSING, RewardError, RewardFn, _pick_samples


class AsyncScorer:
    """Run a ``RewardFn`` in ``max_workers`` background threads."""

    def __init__(self, fn: RewardFn, max_workers: int = 1):
        if not isinstance(max_workers, int) or max_workers < 1:
            raise RewardError(f"AsyncScorer max_workers must be a positive integer, got {max_workers!r}")
        self.fn = fn
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="reward")
        self._closed = False

    def submit(
        self,
        samples: Any = _MISSING,
        prompts: Sequence[str] | str | None = None,
        metadata: Sequence[dict] | None = None,
        *,
        copy: bool = True,
        images: Any = _MISSING,
    ) -> Future[tuple[torch.Tensor, dict[str, Any]]]:
        """Schedule ``fn(samples, prompts, metadata)``; ``copy`` snapshots tensor/list inputs first.

        ``images=`` is accepted as the old keyword name of ``samples``.
        """
        samples = _pick_samples(samples, images)
        if self._closed:
            raise RewardError(f"AsyncScorer for reward {getattr(self.fn, 'name', '?')!r} is closed")
        if copy:
            if isinstance(samples, torch.Tensor):
                samples = samples.detach().clone()
            elif not isinstance(samples, (str, bytes)) and isinstance(samples, Sequence):
                samples = list(samples)
            if prompts is not None and not isinstance(prompts, str):
                prompts = list(prompts)
            if metadata is not None:
                metadata = list(metadata)
        return self._pool.submit(self.fn, samples, prompts, metadata)

    def close(self, wait: bool = True) -> None:
        """Stop accepting work; wait for pending batches when ``wait``."""
        self._closed = True
        self._pool.shutdown(wait=wait)

    def __enter__(self) -> AsyncScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(wait=True)
