"""The `tool_answer` reward: exact match of a tool rollout's terminate answer (OpenThinkIMG's accuracy reward).

    fn = rewards.load("tool_answer")       # registered on import of reasoning_rl.tools
    scores, info = fn(completions, prompts, metadata)

The answer is the ``ans`` of the last terminate action in the completion (`reasoning_rl.tools.actions.
terminate_answer`; observations in the transcript are never read as answers since they hold no action object);
1.0 when it equals ``metadata[answer_key]`` after normalisation (`rewards.text.normalize_text`; a list means any
of these), 0.0 otherwise or with no terminate action, NaN without a ground truth.
"""

from __future__ import annotations

import math

from reasoning_rl.tools.actions import terminate_answer
from rewards.text import TextRewardFn, check_key, gold_list, ground_truths, normalize_text


class ToolAnswerReward(TextRewardFn):
    """``info``: ``terminated`` (a terminate action was found), ``correct``, ``unscorable`` counts."""

    name = "tool_answer"

    def __init__(self, answer_key: str = "answer", case_sensitive: bool = False):
        self.answer_key = check_key(answer_key)
        self.case_sensitive = bool(case_sensitive)

    def _score_texts(self, texts, prompts, metadata):
        golds = ground_truths(self.name, metadata, len(texts), self.answer_key)
        norm = lambda s: normalize_text(s, case_sensitive=self.case_sensitive)  # noqa: E731
        scores, terminated, correct, unscorable = [], 0, 0, 0
        for text, gold in zip(texts, golds, strict=True):
            found = terminate_answer(text)
            terminated += found is not None
            if gold is None:
                unscorable += 1
                scores.append(math.nan)
                continue
            ok = found is not None and norm(found) in {norm(g) for g in gold_list(gold)}
            correct += ok
            scores.append(1.0 if ok else 0.0)
        return scores, {"terminated": terminated, "correct": correct, "unscorable": unscorable}


def make_tool_answer_reward(answer_key: str = "answer", case_sensitive: bool = False) -> ToolAnswerReward:
    return ToolAnswerReward(answer_key=answer_key, case_sensitive=case_sensitive)
