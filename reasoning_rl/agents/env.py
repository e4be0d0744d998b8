"""The environment interface for language agents, and the guard that turns a model's bad action into a counted no-op.

An environment is a seeded, text-in / text-out episode:

    obs = env.reset(task_id, seed)        -> Observation(text, task, valid_actions)
    result = env.step(action_text)        -> StepResult(observation, reward, done, invalid, info)

plus the task lists (`tasks("seen")`, `tasks("unseen")`). Two optional hooks serve the hierarchical agent:
`subgoal_done(subgoal)` (True / False when the environment can check a sub-task, None when it cannot: the agent
then re-plans every k steps) and `subgoals()` (candidate sub-task texts, for exploration).

`step` of every environment here goes through `guarded_step`: an action that is not one of the valid actions
(malformed, empty, hallucinated) is a no-op that returns `INVALID_OBSERVATION` with reward 0, is counted in
`invalid_actions`, and never raises. The episode still spends a step on it (so a model that only babbles times out).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Protocol

INVALID_OBSERVATION = "Nothing happens."
"""The fixed observation of an invalid or malformed action."""

Split = Literal["seen", "unseen"]


@dataclass
class Observation:
    text: str
    """What the agent sees now (room, exits, objects, inventory, or the environment's own text)."""
    task: str
    """The task description of the episode."""
    valid_actions: list[str]
    """The primitive actions the environment accepts in this state (normalised text)."""


@dataclass
class StepResult:
    observation: Observation
    reward: float
    done: bool
    invalid: bool = False
    """True when the action was not valid: nothing changed, the observation is INVALID_OBSERVATION."""
    info: dict = field(default_factory=dict)


class TextEnvironment(Protocol):
    name: str
    max_steps: int

    def tasks(self, split: Split) -> list[str]: ...

    def reset(self, task_id: str, seed: int = 0) -> Observation: ...

    def step(self, action: str) -> StepResult: ...

    def subgoal_done(self, subgoal: str) -> bool | None: ...

    def subgoals(self) -> list[str]: ...


def normalise_action(text: str) -> str:
    """Lower case, single spaces, no surrounding punctuation: how a model's text is compared to valid actions."""
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .!")


class EpisodeCounter:
    """Steps, invalid actions and the return of the running episode (every environment holds one)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.invalid_actions = 0
        self.episode_return = 0.0
        self.success = False


def guarded_step(env, action: str, apply) -> StepResult:
    """`apply(valid_action) -> StepResult` when `action` (normalised) is valid; else the counted no-op. Counts the
    step and the return on `env.counter`; the episode ends (done, not success) at `env.max_steps`."""
    counter: EpisodeCounter = env.counter
    counter.steps += 1
    a = normalise_action(action) if isinstance(action, str) else ""
    current = env.observation()
    if a not in current.valid_actions:
        counter.invalid_actions += 1
        obs = Observation(INVALID_OBSERVATION, current.task, current.valid_actions)
        result = StepResult(obs, 0.0, False, invalid=True, info={"action": a})
    else:
        result = apply(a)
    counter.episode_return += result.reward
    counter.success = counter.success or bool(result.info.get("success", False))
    if counter.steps >= env.max_steps and not result.done:
        result.done = True
        result.info["timeout"] = True
    result.info.setdefault("steps", counter.steps)
    return result


ENVIRONMENTS = ("rooms", "rooms-moved", "rooms-rewired", "scienceworld")


def make_env(name: str, max_steps: int = 20, split_seed: int = 0, scienceworld_tasks: list[str] | None = None,
             scienceworld_simplifications: str = "easy"):
    """An environment by name: a rooms variant (embedded) or `scienceworld` (the adapter; needs Java)."""
    if name.startswith("rooms"):
        from reasoning_rl.agents.rooms import RoomsEnv

        return RoomsEnv(name, max_steps=max_steps, split_seed=split_seed)
    if name == "scienceworld":
        from reasoning_rl.agents.scienceworld_env import ScienceWorldEnv

        return ScienceWorldEnv(scienceworld_tasks or ["boil"], max_steps=max_steps,
                               simplifications=scienceworld_simplifications)
    raise ValueError(f"unknown environment {name!r}; choose one of {ENVIRONMENTS} (e.g. --task env:rooms)")
