"""The `reasoning_gym` reward: a reasoning-gym task's own verifier (`score_answer`) on text completions.

    fn = make_reasoning_gym_reward()          # or, once reasoning_rl.world is imported: rewards.load("reasoning_gym")
    scores, info = fn(completions, prompts, metadata)

Follows the reward contract of `rewards/base.py`. Each sample's metadata is a row of
`reasoning_rl.world.gym.gym_rows` (the trainer passes the problem's columns): the entry is rebuilt exactly from
``gym_task`` / ``gym_size`` / ``gym_seed`` / ``gym_index`` / ``gym_config`` (the generator is deterministic), or
read from ``gym_entry`` (JSON) when those are missing. The answer is the last ``<answer>...</answer>`` of the
completion (then, per `extract`, the last ``\\boxed{}`` or the whole completion); the score is the task's
``score_answer(answer, entry)`` in [0, 1] (0 when no answer is found), NaN for a sample with no reasoning-gym
entry in its metadata (unscorable, never 0).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from rewards.base import RewardFn
from rewards.text import check_sources, completion_text, extract_answer

RECIPE_KEYS = ("gym_task", "gym_size", "gym_seed", "gym_index", "gym_config")


class ReasoningGymReward(RewardFn):
    """score_answer of the sample's reasoning-gym task. ``info``: ``extracted``, ``solved`` (score 1),
    ``unscorable`` counts and ``per_task`` mean scores."""

    name = "reasoning_gym"
    differentiable = False

    def __init__(self, extract: Sequence[str] | str = ("answer", "full")):
        self.extract = check_sources(extract)

    @staticmethod
    def entry_of(meta) -> tuple[str, dict] | None:
        """(task, entry) of a metadata row, or None."""
        from reasoning_rl.world.gym import gym_entry

        if not isinstance(meta, dict):
            return None
        if all(meta.get(k) is not None for k in RECIPE_KEYS):
            return meta["gym_task"], gym_entry(meta["gym_task"], meta["gym_size"], meta["gym_seed"], meta["gym_index"],
                                               meta["gym_config"])
        raw = meta.get("gym_entry")
        if raw is None:
            return None
        entry = json.loads(raw) if isinstance(raw, str) else dict(raw)
        task = meta.get("gym_task") or entry.get("metadata", {}).get("source_dataset")
        return (task, entry) if task else None

    def _score(self, samples, prompts, metadata):
        from reasoning_gym import get_score_answer_fn

        metadata = list(metadata) if metadata is not None else [None] * len(samples)
        if len(metadata) != len(samples):
            raise ValueError(f"got {len(metadata)} metadata entries for {len(samples)} samples; pass one per sample")
        scores, per_task = [], {}
        extracted = solved = unscorable = 0
        for sample, meta in zip(samples, metadata, strict=True):
            found = self.entry_of(meta)
            if found is None:
                unscorable += 1
                scores.append(math.nan)
                continue
            task, entry = found
            answer = extract_answer(completion_text(sample), self.extract)
            extracted += answer is not None
            score = float(get_score_answer_fn(task)(answer[1], entry)) if answer is not None else 0.0
            solved += score >= 1.0
            scores.append(score)
            per_task.setdefault(task, []).append(score)
        return scores, {"extracted": extracted, "solved": solved, "unscorable": unscorable,
                        "per_task": {t: sum(v) / len(v) for t, v in per_task.items()}}


def make_reasoning_gym_reward(extract: Sequence[str] | str = ("answer", "full")) -> ReasoningGymReward:
    """reasoning-gym's verifier of each sample's task; `extract`: where the answer is read from, in order
    (`answer` tag, `boxed`, `full` text)."""
    return ReasoningGymReward(extract=extract)
