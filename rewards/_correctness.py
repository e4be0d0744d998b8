"""The correctness reward that a composite text reward (MathIF, length rewards) gates on or adds to."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rewards.base import RewardError, RewardFn, as_reward


def load_correctness(name: str, correctness: Any, options: Mapping[str, Any] | None) -> RewardFn | None:
    """The correctness reward: None, a registered name (built with ``options``) or a reward/callable."""
    if options is not None and not isinstance(options, Mapping):
        raise RewardError(f"{name}: correctness_options must be a dict of options for the correctness reward, "
                          f"got {options!r}")
    if correctness is None:
        if options:
            raise RewardError(f"{name}: correctness_options {dict(options)!r} given without a correctness reward; "
                              f"set correctness (e.g. 'math_answer' or 'exact_match')")
        return None
    if isinstance(correctness, str):
        from rewards.registry import load

        return load(correctness, **dict(options or {}))
    if callable(correctness):
        if options:
            raise RewardError(f"{name}: correctness_options apply only to a registered correctness name, not to "
                              f"the object {correctness!r}; build it with its options instead")
        return as_reward(correctness)
    raise RewardError(f"{name}: correctness must be a registered reward name (e.g. 'math_answer', 'exact_match'), "
                      f"a reward object or None, got {correctness!r}")
