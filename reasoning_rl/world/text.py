"""The arithmetic text world: seeded multi-step word problems with exact integer answers and worked traces.

A problem is a start quantity and 1-4 operations (the step count is the difficulty knob)::

    Ann has 7 pens. She buys 5 more. She gives away 3. How many pens does Ann have now?

with the reference solution (one equation per step, then the answer; the format the reasoning trainer's SFT and
LUFFY paths train on and the `exact_match` / `think_answer_format` rewards read)::

    <think>7+5=12; 12-3=9</think><answer>9</answer>

Numbers are small so a tiny character-level model can learn the world: the start (2-19) and every operand are below 20
(``MAX_OPERAND``), every intermediate value and the answer lie in 0-99 (``MAX_VALUE``). Operations: add
("buys / finds / gets N more"), subtract ("gives away / loses / sells N") and multiply ("doubles / triples them",
where the operand is not written as a number).

Splits: a problem's split is a function of its arithmetic alone (the start value and the operations, not the names
or wording), through a fixed hash: ``split_of(key)``. The eval split (``EVAL_PERCENT`` % of the arithmetic) is
therefore disjoint from the train split by construction, also in what is computed, not only in the text.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

MAX_OPERAND = 19  # the start value and every written operand are in 1..MAX_OPERAND
MAX_VALUE = 99  # every intermediate value and the answer are in 0..MAX_VALUE
STEPS = (1, 2, 3, 4)
EVAL_PERCENT = 10
SPLITS = ("train", "eval")

NAMES = (("Ann", "She"), ("Ben", "He"), ("Cat", "She"), ("Dan", "He"), ("Eve", "She"), ("Gus", "He"),
         ("Ivy", "She"), ("Max", "He"), ("Sue", "She"), ("Tom", "He"))
ITEMS = ("apples", "books", "cards", "coins", "pens", "shells", "stamps", "marbles")
ADD_PHRASES = ("{P} buys {n} more.", "{P} finds {n} more.", "{P} gets {n} more.")
SUB_PHRASES = ("{P} gives away {n}.", "{P} loses {n}.", "{P} sells {n}.")
MUL_PHRASES = {2: "{P} doubles them.", 3: "{P} triples them."}
QUESTION = "How many {items} does {name} have now?"
SYMBOL = {"add": "+", "sub": "-", "mul": "*"}


@dataclass(frozen=True)
class ArithProblem:
    """One problem: its text, exact answer, reference solution trace and structure."""

    prompt: str
    answer: int
    solution: str
    steps: int
    start: int
    ops: tuple[tuple[str, int], ...]  # ((kind, operand), ...) with kind in add / sub / mul
    key: str  # the arithmetic content: what the split is a function of
    split: str

    def row(self) -> dict:
        """The dataset row: ``prompt``, ``answer`` (a string, as rewards compare text), ``solution``, ``steps``,
        ``key``, ``split``."""
        d = asdict(self)
        d.pop("ops")
        d.pop("start")
        d["answer"] = str(self.answer)
        return d


def arithmetic_key(start: int, ops: Sequence[tuple[str, int]]) -> str:
    """The canonical arithmetic content of a problem, e.g. ``"7|add 5|sub 3"``."""
    return "|".join([str(start), *(f"{kind} {n}" for kind, n in ops)])


def split_of(key: str) -> str:
    """``"eval"`` for ``EVAL_PERCENT`` % of arithmetic keys (a fixed hash, the same on every machine), else
    ``"train"``."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return "eval" if h % 100 < EVAL_PERCENT else "train"


def apply_op(value: int, kind: str, n: int) -> int:
    return {"add": value + n, "sub": value - n, "mul": value * n}[kind]


def solution_trace(start: int, ops: Sequence[tuple[str, int]]) -> tuple[str, int]:
    """(``<think>a+b=c; c-d=e</think><answer>e</answer>``, the answer)."""
    value, lines = start, []
    for kind, n in ops:
        new = apply_op(value, kind, n)
        lines.append(f"{value}{SYMBOL[kind]}{n}={new}")
        value = new
    return f"<think>{'; '.join(lines)}</think><answer>{value}</answer>", value


def bare_solution(answer: int) -> str:
    """The answer without the worked steps: ``<think></think><answer>9</answer>`` (still the think/answer format)."""
    return f"<think></think><answer>{answer}</answer>"


def _random_ops(rng: random.Random, start: int, steps: int) -> tuple[tuple[str, int], ...]:
    value, ops = start, []
    for _ in range(steps):
        choices = []
        if value + 1 <= MAX_VALUE:
            choices.append("add")
        if value >= 1:
            choices.append("sub")
        if 2 * value <= MAX_VALUE and value >= 1:
            choices.append("mul")
        kind = rng.choice(choices)
        if kind == "add":
            n = rng.randint(1, min(MAX_OPERAND, MAX_VALUE - value))
        elif kind == "sub":
            n = rng.randint(1, min(MAX_OPERAND, value))
        else:
            n = rng.choice([m for m in (2, 3) if m * value <= MAX_VALUE])
        ops.append((kind, n))
        value = apply_op(value, kind, n)
    return tuple(ops)


def random_problem(rng: random.Random, steps: int) -> ArithProblem:
    """One problem of `steps` operations drawn from `rng` (any split)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    name, pronoun = rng.choice(NAMES)
    items = rng.choice(ITEMS)
    start = rng.randint(2, MAX_OPERAND)
    ops = _random_ops(rng, start, steps)
    sentences = [f"{name} has {start} {items}."]
    for kind, n in ops:
        phrase = MUL_PHRASES[n] if kind == "mul" else rng.choice(ADD_PHRASES if kind == "add" else SUB_PHRASES)
        sentences.append(phrase.format(P=pronoun, n=n))
    sentences.append(QUESTION.format(items=items, name=name))
    solution, answer = solution_trace(start, ops)
    key = arithmetic_key(start, ops)
    return ArithProblem(" ".join(sentences), answer, solution, steps, start, ops, key, split_of(key))


def generate_problems(n: int, split: str = "train", steps: Sequence[int] = STEPS, seed: int = 0,
                      unique: bool = True) -> list[ArithProblem]:
    """`n` problems of `split`, the step count of each drawn uniformly from `steps`, deterministic in `seed`.
    `unique`: no problem text twice (raises when the split cannot hold `n` distinct problems)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    steps = tuple(int(s) for s in steps)
    if not steps or min(steps) < 1:
        raise ValueError(f"steps must be a non-empty list of step counts >= 1, got {list(steps)}")
    rng = random.Random(f"arithmetic-{seed}-{split}")
    out: list[ArithProblem] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 10_000:
            raise ValueError(f"could not draw {n} distinct {split} problems with steps {list(steps)}; ask for fewer")
        p = random_problem(rng, rng.choice(steps))
        if p.split != split or (unique and p.prompt in seen):
            continue
        seen.add(p.prompt)
        out.append(p)
    return out


def arithmetic_dataset(n: int, split: str = "train", steps: Sequence[int] = STEPS, seed: int = 0):
    """A ``datasets.Dataset`` of `n` problems with columns ``prompt``, ``answer``, ``solution``, ``steps``, ``key``,
    ``split``."""
    import datasets

    return datasets.Dataset.from_list([p.row() for p in generate_problems(n, split, steps, seed)])


# ---------------------------------------------------------------------------------------------------------
# reading a problem back (independent of the generator's state; used to check answers and by tests)

_START = re.compile(r"^(\w+) has (\d+) (\w+)\.")
_ADD = re.compile(r"^(?:She|He) (?:buys|finds|gets) (\d+) more\.$")
_SUB = re.compile(r"^(?:She|He) (?:gives away|loses|sells) (\d+)\.$")
_MUL = {"doubles them.": 2, "triples them.": 3}


def solve(prompt: str) -> int:
    """The answer of a world problem computed from its text alone (ValueError for text outside the world)."""
    m = _START.match(prompt)
    if not m:
        raise ValueError(f"not an arithmetic-world problem: {prompt!r}")
    value = int(m.group(2))
    sentences = re.findall(r"[^.?]+[.?]", prompt[m.end():])
    if not sentences or not sentences[-1].strip().startswith("How many"):
        raise ValueError(f"no question at the end of {prompt!r}")
    for sentence in (s.strip() for s in sentences[:-1]):
        if a := _ADD.match(sentence):
            value += int(a.group(1))
        elif s := _SUB.match(sentence):
            value -= int(s.group(1))
        elif sentence.split(" ", 1)[-1] in _MUL:
            value *= _MUL[sentence.split(" ", 1)[-1]]
        else:
            raise ValueError(f"unknown step {sentence!r} in {prompt!r}")
    return value
