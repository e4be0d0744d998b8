"""Rewards of the shipped recipes, as TRL-style functions (`reward: {name: trl_function, options: {function:
reasoning_rl.recipe_rewards:<name>}}`).

`last_number`: a chatty instruct model (SmolLM2-135M-Instruct, `configs/reason_smollm2.yaml`) answers in sentences
("Ann has 12 + 13 = 25 pens.") and follows neither `<answer>` tags nor `\\boxed{}`, so its answer is read as the last
number of the completion (the GSM8K convention): 1.0 when that number equals the problem's answer, 0.0 when it
differs or the completion has no number, None (unscorable) when the problem has no answer.
"""

from __future__ import annotations

import math
import re

NUMBER = re.compile(r"(?<![\d.])-?\d+(?:,\d{3})*(?:\.\d+)?")


def parse_number(text) -> float | None:
    """A number written as `-1,234.5` (thousands commas allowed), or None."""
    if text is None:
        return None
    if isinstance(text, int | float):
        return float(text) if math.isfinite(text) else None
    match = NUMBER.fullmatch(str(text).strip())
    return float(match.group().replace(",", "")) if match else None


def last_number_in(text: str) -> float | None:
    """The last number in `text` (a trailing full stop is not a decimal point), or None."""
    found = NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def last_number(completions, answer, **columns) -> list[float | None]:
    """1.0 where the completion's last number equals `answer` (numerically), else 0.0; None without an answer."""
    scores: list[float | None] = []
    for completion, gold in zip(completions, answer, strict=True):
        gold = parse_number(gold)
        if gold is None:
            scores.append(None)
            continue
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        value = last_number_in(text)
        scores.append(float(value is not None and math.isclose(value, gold, rel_tol=0, abs_tol=1e-9)))
    return scores
