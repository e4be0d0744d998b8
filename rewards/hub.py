"""Weight resolution and common loading options for model rewards.

``resolve(source, filename)`` is the single entry point for files: an existing local file is used as
is, an existing local directory is joined with ``filename``, anything else is treated as a Hugging Face
Hub repo id and fetched with ``huggingface_hub.hf_hub_download`` (honouring ``revision`` and
``local_files_only``). Whole-model sources (``from_pretrained`` directories) pass through
unchanged: ``from_pretrained`` itself handles local directories and hub ids the same way, so tiny
offline test models and published weights go through one code path.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from rewards.base import RewardError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


def resolve(
    source: str | os.PathLike,
    filename: str | None = None,
    *,
    revision: str | None = None,
    local_files_only: bool = False,
    reward_name: str = "reward",
) -> str:
    """Return a local path for ``source`` (+ ``filename``).

    * ``source`` is an existing file -> that file (``filename`` ignored);
    * ``source`` is an existing directory -> ``source/filename`` (must exist), or the directory itself
      when ``filename`` is None;
    * otherwise ``source`` is a hub repo id: with a ``filename`` the file is downloaded (or taken from
      the cache) with ``hf_hub_download``; without one the id is returned for ``from_pretrained``.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return str(path)
    if path.is_dir():
        if filename is None:
            return str(path)
        candidate = path / filename
        if candidate.is_file():
            return str(candidate)
        raise RewardError(
            f"reward {reward_name!r}: local directory {str(path)!r} has no file {filename!r}; put the "
            f"file there or pass model_path=<path to the file>"
        )
    if filename is None:
        return str(source)
    if str(source).startswith((".", "/", "~")) or os.sep + os.sep in str(source):
        raise RewardError(f"reward {reward_name!r}: local path {str(source)!r} does not exist")
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(
            repo_id=str(source), filename=filename, revision=revision, local_files_only=local_files_only
        )
    except Exception as exc:
        raise RewardError(
            f"reward {reward_name!r}: could not fetch {filename!r} from the Hugging Face Hub repo "
            f"{str(source)!r} (revision={revision!r}, local_files_only={local_files_only}): "
            f"{type(exc).__name__}: {exc}. Fix: download it once with network access, or pass "
            f"model_path=<local file or directory>"
        ) from exc


def parse_dtype(dtype: str | torch.dtype | None, reward_name: str = "reward") -> torch.dtype:
    """``"float32"``/``"fp16"``/``"bf16"``/``torch.dtype``/None (float32) -> ``torch.dtype``."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise RewardError(
            f"reward {reward_name!r}: unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))}"
        )
    return _DTYPES[key]


def parse_device(device: str | torch.device | None) -> torch.device:
    """Explicit device; None means CPU (rewards never pick a GPU on their own)."""
    return torch.device("cpu") if device is None else torch.device(device)


def check_batch_size(batch_size: int, reward_name: str = "reward") -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise RewardError(f"reward {reward_name!r}: batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def chunks(n: int, size: int):
    """Yield ``slice`` objects covering ``range(n)`` in steps of ``size``."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))
