"""Which trainer a `drl reason train` YAML runs, and which `drl reason eval --task` evaluations exist.

The reasoning half is a toolkit, not one loss: GRPO (and its variants) is the default trainer; other methods
(GLIDER's hierarchical offline RL, SEE's continual expert ensemble) have their own config and loop but the
same conventions. A YAML picks its trainer with the top-level key `trainer:` (absent = `grpo`). Each trainer
is a module exposing

    load_config(path, overrides) -> config      (strict, all problems at once, like reasoning_rl.config)
    train(config, resume=None) -> None

An evaluation task is `NAME` or `NAME:ARG` (e.g. `mathif`, `env:rooms`); each names a function

    run(model_or_run: str, arg: str | None, options: EvalOptions) -> dict    (JSON-ready results)

Modules are imported on use, so `drl --help` does not pay for torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusion_rl.core.config import ConfigError, read_yaml

TRAINERS: dict[str, str] = {
    "grpo": "reasoning_rl.trainer_entry",
    "glider": "reasoning_rl.agents.entry",
    "see": "reasoning_rl.continual.entry",
}
"""trainer name -> module with load_config(path, overrides) and train(config, resume)."""

EVAL_TASKS: dict[str, str] = {
    "mathif": "reasoning_rl.eval_tasks.mathif:run",
    "mmkc": "reasoning_rl.eval_tasks.mmkc:run",
    "satori": "reasoning_rl.eval_tasks.satori:run",
    "env": "reasoning_rl.agents.evaluation:run",
    "see": "reasoning_rl.continual.evaluation:run",
}
"""task name -> "module:function" (see the module docstring for the signature)."""


@dataclass(frozen=True)
class EvalOptions:
    """Options `drl reason eval --task` passes to every task (a task ignores those it has no use for)."""

    num: int = 4
    """Sampled completions per problem."""
    limit: int | None = None
    """Evaluate at most this many problems / episodes (None: the task's default size)."""
    seed: int = 1234
    max_new_tokens: int | None = None
    temperature: float | None = None
    data: Path | None = None
    """A local file or directory with the task's data in its released format (e.g. MMKC-Bench), else procedural."""


def trainer_name(path: str | Path | None, overrides: list[str] = ()) -> str:
    """The `trainer:` of a YAML (a `--set trainer=...` override wins); `grpo` when absent."""
    name = "grpo"
    if path is not None:
        name = read_yaml(path).get("trainer", "grpo")
    for item in overrides:
        if item.split("=", 1)[0].strip() == "trainer":
            name = item.split("=", 1)[1].strip()
    if name not in TRAINERS:
        raise ConfigError([f"trainer: unknown trainer {name!r}; choose one of {sorted(TRAINERS)}"])
    return name


def trainer_module(name: str):
    return importlib.import_module(TRAINERS[name])


def run_eval_task(spec: str, model_or_run: str, options: EvalOptions) -> dict[str, Any]:
    """Run the evaluation task `spec` (`NAME` or `NAME:ARG`) and return its results."""
    name, _, arg = spec.partition(":")
    if name not in EVAL_TASKS:
        raise ConfigError([f"--task: unknown evaluation task {spec!r}; choose one of {sorted(EVAL_TASKS)} "
                          "(e.g. --task mathif, --task env:rooms)"])
    module, func = EVAL_TASKS[name].split(":")
    return getattr(importlib.import_module(module), func)(model_or_run, arg or None, options)


def flatten(results: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested results as (a/b/c, value) rows for the table output."""
    rows: list[tuple[str, Any]] = []
    for key, value in results.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(flatten(value, path + "/"))
        else:
            rows.append((path, value))
    return rows
