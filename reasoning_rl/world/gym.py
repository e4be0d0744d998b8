"""reasoning-gym (Apache-2.0, offline) as a prompt source: procedural tasks with exact verifiers.

    rows = gym_rows(["chain_sum", "basic_arithmetic"], size=200, seed=0, split="train")

Each row has the trainer's columns ``prompt`` (the task's question), ``answer`` (its reference answer, "" where
the task has none), ``solution`` (``<think></think><answer>ANSWER</answer>``: the reference answer in the
think/answer format; reasoning-gym ships no worked traces) and ``task``, plus what the verifier needs to rebuild
the exact entry: ``gym_task``, ``gym_size``, ``gym_seed``, ``gym_index``, ``gym_config`` (JSON of the task's
options) and ``gym_entry`` (the entry as JSON, a fallback for rows read back from a file).
The reward `reasoning_gym` (``reasoning_rl.world.gym_reward``) scores completions with the task's own
``score_answer``.

``size`` problems in all, shared out over the tasks in turn. reasoning-gym has no held-out splits: ``split="eval"``
draws from a different seed (``seed + EVAL_SEED_OFFSET``) and drops every question that also occurs in the train
split of the same tasks, size and seed, so the two never overlap.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence

EVAL_SEED_OFFSET = 1_000_003
INSTALL_HINT = ("reasoning-gym is not installed; `pip install reasoning-gym` (Apache-2.0, offline; a dependency "
                "of drl, reinstall with `pip install -e .`)")


def require_gym():
    try:
        import reasoning_gym
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return reasoning_gym


def available_tasks() -> list[str]:
    """The registered reasoning-gym task names."""
    require_gym()
    from reasoning_gym.factory import DATASETS

    return sorted(n for n in DATASETS if n != "composite")


@functools.lru_cache(maxsize=256)
def _dataset(task: str, size: int, seed: int, config_json: str):
    rg = require_gym()
    if task not in available_tasks():
        raise ValueError(f"unknown reasoning-gym task {task!r}; tasks include {available_tasks()[:12]} "
                         f"({len(available_tasks())} in all, see reasoning_rl.world.gym.available_tasks())")
    return rg.create_dataset(task, size=size, seed=seed, **json.loads(config_json))


def gym_entry(task: str, size: int, seed: int, index: int, config: Mapping | str | None = None) -> dict:
    """The reasoning-gym entry ({question, answer, metadata}) `index` of a task dataset, regenerated exactly."""
    config_json = config if isinstance(config, str) else json.dumps(dict(config or {}), sort_keys=True)
    return _dataset(task, int(size), int(seed), config_json)[int(index)]


def _shares(size: int, n_tasks: int) -> list[int]:
    return [size // n_tasks + (i < size % n_tasks) for i in range(n_tasks)]


def _task_rows(tasks: Sequence[str], size: int, seed: int, configs: Mapping[str, Mapping]) -> list[dict]:
    rows = []
    for i, (task, n) in enumerate(zip(tasks, _shares(size, len(tasks)), strict=True)):
        if n == 0:
            continue
        config_json = json.dumps(dict(configs.get(task, {})), sort_keys=True)
        task_seed = seed + 7919 * i  # different tasks, different streams
        ds = _dataset(task, n, task_seed, config_json)
        for index in range(n):
            entry = ds[index]
            answer = entry.get("answer")
            answer = "" if answer is None else str(answer)
            rows.append({
                "prompt": str(entry["question"]), "answer": answer,
                "solution": f"<think></think><answer>{answer}</answer>", "task": task,
                "gym_task": task, "gym_size": n, "gym_seed": task_seed, "gym_index": index, "gym_config": config_json,
                "gym_entry": json.dumps(entry, default=str),
            })
    return rows


def gym_rows(tasks: Sequence[str], size: int = 100, seed: int = 0, split: str = "train",
             configs: Mapping[str, Mapping] | None = None) -> list[dict]:
    """`size` problems of reasoning-gym `tasks` (shared out in turn) as rows; `configs`: per-task options, e.g.
    {"chain_sum": {"min_terms": 2, "max_terms": 3}}. Deterministic in `seed`; eval never overlaps train."""
    if isinstance(tasks, str):
        tasks = [tasks]
    if not tasks:
        raise ValueError("reasoning-gym needs at least one task name (prompts.tasks)")
    if split not in ("train", "eval"):
        raise ValueError(f"reasoning-gym split must be 'train' or 'eval', got {split!r}")
    configs = dict(configs or {})
    unknown = sorted(set(configs) - set(tasks))
    if unknown:
        raise ValueError(f"options given for tasks not in the task list: {unknown}")
    train = _task_rows(tasks, size, seed, configs)
    if split == "train":
        return train
    seen = {r["prompt"] for r in train}
    rows = [r for r in _task_rows(tasks, size, seed + EVAL_SEED_OFFSET, configs) if r["prompt"] not in seen]
    if not rows:
        raise ValueError(f"every eval question of {list(tasks)} also occurs in the train split; use tasks with a "
                         "larger problem space or a smaller size")
    return rows


def gym_dataset(tasks: Sequence[str], size: int = 100, seed: int = 0, split: str = "train",
                configs: Mapping[str, Mapping] | None = None):
    """`gym_rows` as a ``datasets.Dataset``."""
    import datasets

    return datasets.Dataset.from_list(gym_rows(tasks, size, seed, split, configs))
