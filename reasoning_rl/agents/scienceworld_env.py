"""The ScienceWorld adapter (the `scienceworld` package, allenai; it runs its bundled Java engine, so it needs a Java
runtime: `apt-get install -y default-jre-headless` on Debian/Ubuntu, or any OpenJDK >= 11 on PATH).

    ScienceWorldEnv(["boil", ...])   tasks "NAME:VARIATION"; seen = the task's train variations, unseen = its test
                                     variations; observation = the engine's text; valid actions = the engine's
                                     valid action-object combinations; reward = score change / 100; success =
                                     score 100; done = the engine's completion or `max_steps`.

A malformed or unknown action (empty, or one the engine answers "No known action matches that input.") is a counted
no-op with `INVALID_OBSERVATION`, as everywhere in `reasoning_rl.agents.env`; the engine's own valid-action list is
not used to reject actions (it misses phrasings the parser accepts, e.g. the gold sequences' own).

Offline data (`gold_episodes`): the engine's gold action sequences, cut into sub-tasks that end at each action that
is not navigation or looking (or after k actions); a sub-task's text is its last action (e.g. `pick up thermometer`),
and `subgoal_done(g)` is true once that action has been executed, so the hierarchical agent runs the same way here.
"""

from __future__ import annotations

import shutil

from reasoning_rl.agents.env import (
    INVALID_OBSERVATION,
    EpisodeCounter,
    Observation,
    StepResult,
    normalise_action,
)

UNKNOWN = "No known action matches that input."
NAVIGATION = ("go to", "teleport to", "open", "close", "look", "inventory", "wait")


class ScienceWorldUnavailable(RuntimeError):
    """scienceworld or Java is missing; the message says how to install them."""


def available() -> str | None:
    """None when ScienceWorld can run here, else the reason (for skips and errors)."""
    try:
        import scienceworld  # noqa: F401
    except ImportError:
        return "the scienceworld package is not installed (pip install 'diffusion-rl[agents]')"
    if shutil.which("java") is None:
        return "no Java runtime on PATH (ScienceWorld runs a Java engine): apt-get install -y default-jre-headless"
    return None


class ScienceWorldEnv:
    name = "scienceworld"

    def __init__(self, task_names: list[str], max_steps: int = 30, simplifications: str = "easy",
                 variations_per_split: int = 5):
        reason = available()
        if reason:
            raise ScienceWorldUnavailable(f"env scienceworld: {reason}")
        from scienceworld import ScienceWorldEnv as Engine

        self.engine = Engine("", envStepLimit=max_steps + 10)
        known = self.engine.get_task_names()
        bad = [t for t in task_names if t not in known]
        if bad:
            raise ValueError(f"unknown ScienceWorld task(s) {bad}; choose from {known}")
        self.task_names, self.max_steps, self.simplifications = task_names, max_steps, simplifications
        self.split: dict[str, list[str]] = {"seen": [], "unseen": []}
        for t in task_names:
            self.engine.load(t, 0, simplifications)
            self.split["seen"] += [f"{t}:{v}" for v in self.engine.get_variations_train()[:variations_per_split]]
            self.split["unseen"] += [f"{t}:{v}" for v in self.engine.get_variations_test()[:variations_per_split]]
        self.counter = EpisodeCounter()
        self.last_action: str | None = None
        self._obs = Observation("", "", [])

    def tasks(self, split: str) -> list[str]:
        return list(self.split[split])

    def vocabulary(self) -> list[str]:
        from reasoning_rl.agents.lm import words_of

        return words_of([" ".join(self.engine.get_vocabulary()), INVALID_OBSERVATION])

    def reset(self, task_id: str, seed: int = 0, gold: bool = False) -> Observation:
        name, variation = task_id.rsplit(":", 1)
        self.engine.load(name, int(variation), self.simplifications, generateGoldPath=gold)
        obs, _ = self.engine.reset()
        self.counter.reset()
        self.score, self.last_action = 0.0, None
        self._obs = self._observation(obs)
        return self._obs

    def _observation(self, text: str) -> Observation:
        return Observation(" ".join(text.split()), self.engine.get_task_description(),
                           sorted(self.engine.get_valid_action_object_combinations()))

    def observation(self) -> Observation:
        return self._obs

    def step(self, action: str) -> StepResult:
        c = self.counter
        c.steps += 1
        a = normalise_action(action) if isinstance(action, str) else ""
        text = UNKNOWN
        if a:
            text, _, completed, info = self.engine.step(a)
        if not a or text.strip() == UNKNOWN:
            c.invalid_actions += 1
            result = StepResult(Observation(INVALID_OBSERVATION, self._obs.task, self._obs.valid_actions), 0.0, False,
                                invalid=True, info={"action": a})
        else:
            score = max(float(info["score"]), 0.0)
            reward, self.score = (score - self.score) / 100.0, score
            self.last_action = a
            self._obs = self._observation(text)
            success = score >= 100
            result = StepResult(self._obs, reward, bool(completed) or success, info={"success": success, "action": a})
            c.episode_return += reward
            c.success = c.success or success
        if c.steps >= self.max_steps and not result.done:
            result.done, result.info["timeout"] = True, True
        return result

    def subgoal_done(self, subgoal: str) -> bool | None:
        return self.last_action == normalise_action(subgoal)

    def subgoals(self) -> list[str]:
        return []

    def gold_episodes(self, episodes: int, seed: int, subtask_steps: int) -> list[dict]:
        """The gold action sequences of the seen tasks (round robin), segmented into sub-tasks."""
        out = []
        seen = self.tasks("seen")
        for i in range(episodes):
            task_id = seen[i % len(seen)]
            obs = self.reset(task_id, seed + i, gold=True)
            gold = [g for g in self.engine.get_gold_action_sequence() if not g.startswith("ERROR")]
            segments, seg, done = [], None, False
            for action in gold[: self.max_steps]:
                if seg is None:
                    seg = {"obs": obs.text, "steps": []}
                result = self.step(action)
                next_obs = self.observation() if result.invalid else result.observation
                seg["steps"].append({"obs": obs.text, "action": normalise_action(action), "reward": result.reward,
                                     "done": result.done, "invalid": result.invalid, "next_obs": next_obs.text})
                obs, done = next_obs, result.done
                boundary = not normalise_action(action).startswith(NAVIGATION)
                if boundary or len(seg["steps"]) >= subtask_steps or done:
                    seg["subgoal"] = seg["relabel"] = seg["steps"][-1]["action"]
                    seg["achieved"] = True
                    segments.append(seg)
                    seg = None
                if done:
                    break
            if seg is not None:
                seg["subgoal"] = seg["relabel"] = seg["steps"][-1]["action"]
                seg["achieved"] = True
                segments.append(seg)
            c = self.counter
            out.append({"task_id": task_id, "task": obs.task, "seed": seed + i, "policy": "gold", "success": c.success,
                        "return": c.episode_return, "steps": c.steps, "invalid": c.invalid_actions,
                        "segments": segments})
        return out

    def close(self) -> None:
        self.engine.close()
