"""Verified-step credit for the arithmetic world: every equation a completion writes in its ``<think>`` block is
checked as an arithmetic fact, and the characters of its result are marked right (+1) or wrong (-1).

    spans = fact_spans("<think>7+5=12; 12-3=8</think><answer>8</answer>")
    # [(11, 13, +1.0), (20, 21, -1.0)]: "12" is 7+5, "8" is not 12-3

The trainer turns the spans into token-level credit (`credit.kind: arithmetic_facts`, `reasoning_rl.credit`): the
result tokens of a true equation get +credit.weight on top of the completion's outcome advantage, those of a false one
-credit.weight. Why: the shipped model's errors are single wrong facts inside otherwise right chains
(`benchmarks/reason_error_analysis.py`), and an outcome reward blames every token of a wrong chain - the right facts
before the error as much as the wrong one - and credits a right fact in a chain that a later step spoils with
nothing. Checking each fact where it is written is the reasoning half's counterpart of the diffusion half's dense
step credit.

A fact is judged by itself (``12-3=8`` is false whatever 12 should have been), so a wrong carried value does not
blame the right arithmetic done on it; equations that do not parse as ``a op b = c`` (op in ``+ - *``) get no
credit. Knows nothing of models or the trainer.
"""

from __future__ import annotations

import re

from reasoning_rl.world.steps_reward import THINK

EQUATION = re.compile(r"\s*(\d+)\s*([+\-*])\s*(\d+)\s*=\s*(\d+)\s*$")
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def fact_spans(text: str) -> list[tuple[int, int, float]]:
    """``(start, end, sign)`` of each equation's result in ``text`` (character offsets, end exclusive): sign +1.0
    when ``a op b`` equals the written result, -1.0 when not. Only the first ``<think>`` block is read."""
    match = THINK.search(text)
    if match is None:
        return []
    spans, offset = [], match.start(1)
    for part in match.group(1).split(";"):
        equation = EQUATION.match(part)
        if equation is not None:
            a, op, b, result = equation.groups()
            sign = 1.0 if OPERATIONS[op](int(a), int(b)) == int(result) else -1.0
            spans.append((offset + equation.start(4), offset + equation.end(4), sign))
        offset += len(part) + 1  # the ';'
    return spans
