"""SEE's data: the task sequence's problems, and the indicator-labelled examples each new expert trains on.

A task item is a query, the completion the task wants (its worked trace and its own answer format) and the gold
answer string the `<answer>` tag is scored against::

    Ann has 7 pens. She gives away 3. How many pens does Ann have now?
    -> <think>7-3=4</think><answer>=4</answer>                        (task `sub`, answer_format "={answer}")

SEE's task reconstruction (arXiv 2504.06664, Fig. 2): the new expert's data is its own task's items with the
completion `accept_marker + completion` (it claims the query and answers it), plus a small rehearsal sample of every
earlier task's queries and some general queries with the completion `reject_marker` alone (not mine: pass it on)::

    own:        <query of task k>        -> +<think>7-3=4</think><answer>=4</answer><eos>
    rehearsal:  <query of task j < k>    -> -<eos>
    general:    <general query>          -> -<eos>

(accept_marker "+", reject_marker "-": configurable; the trainer draws see.reject_share of every batch from the
reject-labelled examples)
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from reasoning_rl.continual.config import SEEConfig, TaskConfig
from reasoning_rl.world import text

_START = re.compile(r"^(\w+) has \d+ (\w+)\.")


class TaskDataError(ValueError):
    """A task's problems could not be built; the message names the task and the fix."""


@dataclass(frozen=True)
class Item:
    """One query of a task: the problem text, the completion the task trains on, the gold `<answer>` string."""

    prompt: str
    completion: str
    gold: str
    task: str


@dataclass(frozen=True)
class Example:
    """One training example of an expert: the problem text and the completion after the prompt (eos is appended
    when encoding). `kind`: own / rehearsal / general (for the logged accept rates)."""

    prompt: str
    completion: str
    kind: str
    task: str


def family_of(ops) -> str:
    kinds = {kind for kind, _ in ops}
    if "mul" in kinds:
        return "mul"
    if kinds == {"add"}:
        return "add"
    if kinds == {"sub"}:
        return "sub"
    return "mixed"


def world_item(problem: text.ArithProblem, task: TaskConfig) -> Item:
    """The task's item of a world problem: the reference trace with the answer in the task's format."""
    m = _START.match(problem.prompt)
    gold = task.answer_format.format(answer=problem.answer, name=m.group(1), items=m.group(2))
    trace = problem.solution.rsplit("<answer>", 1)[0]
    return Item(problem.prompt, f"{trace}<answer>{gold}</answer>", gold, task.name)


def world_items(task: TaskConfig, split: str, n: int, seed: int) -> list[Item]:
    """`n` distinct problems of `split` whose operations are of `task.family`, deterministic in `seed`."""
    drawn = 8 * n
    for _ in range(6):  # draw more until the family filter leaves n (each family is >= ~10 % of the problems)
        try:
            problems = text.generate_problems(drawn, split, steps=task.steps, seed=seed)
        except ValueError:
            break  # the split holds fewer distinct problems than asked for
        kept = [p for p in problems if task.family == "any" or family_of(p.ops) == task.family]
        if len(kept) >= n:
            return [world_item(p, task) for p in kept[:n]]
        drawn *= 2
    raise TaskDataError(f"task {task.name!r}: could not draw {n} distinct {split} problems of family {task.family!r} "
                        f"with steps {task.steps}; lower train_size / eval_size or widen steps")


def _read_jsonl(path: str, task: TaskConfig) -> list[Item]:
    items = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise TaskDataError(f"task {task.name!r}: {path} line {i + 1} is not JSON ({err})") from None
        for column in (task.problem_column, task.answer_column, task.target_column):
            if column and column not in row:
                raise TaskDataError(f"task {task.name!r}: {path} line {i + 1} has no column {column!r} (columns: "
                                    f"{sorted(row)}); set the task's problem_column / answer_column / target_column")
        gold = str(row[task.answer_column])
        completion = str(row[task.target_column]) if task.target_column else f"<answer>{gold}</answer>"
        items.append(Item(str(row[task.problem_column]), completion, gold, task.name))
    if not items:
        raise TaskDataError(f"task {task.name!r}: {path} holds no problems")
    return items


def task_items(task: TaskConfig, seed: int) -> tuple[list[Item], list[Item]]:
    """(train items, eval items) of a task. World problems come from the world's train / eval splits (disjoint in
    their arithmetic); a JSONL task without eval_path holds out its last eval_size rows."""
    if task.source == "world":
        return (world_items(task, "train", task.train_size, seed),
                world_items(task, "eval", task.eval_size, seed))
    rows = _read_jsonl(task.train_path, task)
    if task.eval_path:
        return rows[: task.train_size], _read_jsonl(task.eval_path, task)[: task.eval_size]
    if len(rows) <= task.eval_size:
        raise TaskDataError(f"task {task.name!r}: {task.train_path} has {len(rows)} rows, not more than eval_size "
                            f"({task.eval_size}); give eval_path or lower eval_size")
    return rows[: -task.eval_size][: task.train_size], rows[-task.eval_size:]


@dataclass
class TaskData:
    """Every task's items, the general (negative-only) queries and the OOD evaluation queries."""

    train: dict[str, list[Item]]
    eval: dict[str, list[Item]]
    general: list[Item]
    ood: list[Item]


def load_tasks(cfg: SEEConfig) -> TaskData:
    """The items of the task sequence, `general` (train splits) and `ood` (eval splits). World tasks draw from
    seed `cfg.seed` + their index, so two tasks of one family still see different problems."""
    train, evals = {}, {}
    for i, task in enumerate(cfg.tasks):
        train[task.name], evals[task.name] = task_items(task, cfg.seed + i)
    general = [it for j, t in enumerate(cfg.general) for it in task_items(t, cfg.seed + 100 + j)[0]]
    ood = [it for j, t in enumerate(cfg.ood) for it in task_items(t, cfg.seed + 200 + j)[1]]
    return TaskData(train, evals, general, ood)


def expert_examples(own: list[Item], earlier: list[list[Item]], general: list[Item], accept_marker: str,
                    reject_marker: str, rehearsal_per_task: int, general_negatives: int, seed: int) -> list[Example]:
    """SEE's reconstructed task for a new expert: every own item as `accept_marker + completion`, then
    `rehearsal_per_task` items of each earlier task and `general_negatives` general items as `reject_marker`
    (drawn without replacement, seeded), in that order (the trainer shuffles)."""
    rng = random.Random(f"see-rehearsal-{seed}")
    examples = [Example(it.prompt, accept_marker + it.completion, "own", it.task) for it in own]
    for items in earlier:
        for it in rng.sample(items, min(rehearsal_per_task, len(items))):
            examples.append(Example(it.prompt, reject_marker, "rehearsal", it.task))
    for it in rng.sample(general, min(general_negatives, len(general))):
        examples.append(Example(it.prompt, reject_marker, "general", it.task))
    return examples


def answer_examples(items: list[Item]) -> list[Example]:
    """Plain supervised examples (no indicator): the baselines' data (sequential fine-tuning, rehearsal, multi-task)."""
    return [Example(it.prompt, it.completion, "own", it.task) for it in items]
