"""The `arithmetic_steps` reward: exact match of the answer plus partial credit for the worked steps of the
arithmetic world's reference trace that the completion reproduces (a process reward from a verifiable trace).

    fn = make_arithmetic_steps_reward(step_weight=0.5)   # or rewards.load("arithmetic_steps") once
    scores, info = fn(completions, prompts, metadata)     # reasoning_rl.world is imported

Follows the reward contract of `rewards/base.py`. Each sample's metadata is a row of the arithmetic world
(`reasoning_rl.world.text`: ``answer`` and ``solution``, the reference ``<think>a+b=c; c-d=e</think>...``). With
the reference equations e_1..e_n and the completion's equations (its ``<think>`` content split at ``;``):

    score = exact_match(answer) + step_weight * k / n,   k = how many leading e_i the completion reproduces in order

so a chain that goes wrong at its third step earns 2/n of the step credit even when its answer is wrong. NaN for a
sample without an answer or reference solution (unscorable, never 0).
"""

from __future__ import annotations

import math
import re

import torch

from rewards.base import RewardError
from rewards.text import ExactMatchReward, TextRewardFn

THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def equations(text: str) -> list[str]:
    """The `;`-separated equations of the first <think> block, whitespace removed."""
    match = THINK.search(text)
    if match is None:
        return []
    return [re.sub(r"\s+", "", part) for part in match.group(1).split(";") if part.strip()]


def leading_matches(predicted: list[str], reference: list[str]) -> int:
    k = 0
    for p, r in zip(predicted, reference):
        if p != r:
            break
        k += 1
    return k


class ArithmeticStepsReward(TextRewardFn):
    """exact_match + step_weight x (share of the reference steps reproduced in order). ``info``: ``components``
    (``answer``, ``steps``: float32 [B]) and ``unscorable``."""

    name = "arithmetic_steps"

    def __init__(self, step_weight: float = 0.5):
        if not (isinstance(step_weight, (int, float)) and math.isfinite(step_weight) and step_weight >= 0):
            raise RewardError(f"arithmetic_steps: step_weight must be a finite number >= 0, got {step_weight!r}; "
                              "0 gives plain exact match, 0.5 is the default")
        self.step_weight = float(step_weight)
        self.exact = ExactMatchReward(extract=("answer",))

    def _score_texts(self, texts, prompts, metadata):
        metadata = list(metadata) if metadata is not None else [None] * len(texts)
        if len(metadata) != len(texts):
            raise ValueError(f"got {len(metadata)} metadata entries for {len(texts)} samples; pass one per sample")
        answer, _ = self.exact(texts, prompts, metadata)
        steps = torch.full((len(texts),), float("nan"))
        for i, (text, meta) in enumerate(zip(texts, metadata, strict=True)):
            reference = equations(str(meta.get("solution", ""))) if isinstance(meta, dict) else []
            if reference:
                steps[i] = leading_matches(equations(text), reference) / len(reference)
        scores = answer.float() + self.step_weight * steps  # NaN where either part is unscorable
        return scores, {"components": {"answer": answer.float(), "steps": steps},
                        "unscorable": int(torch.isnan(scores).sum())}


def make_arithmetic_steps_reward(step_weight: float = 0.5) -> ArithmeticStepsReward:
    return ArithmeticStepsReward(step_weight)
