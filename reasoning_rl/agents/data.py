"""Offline data for GLIDER: recorded episodes (segments of a sub-task and its primitive steps) turned into the
three training sets, and a seeded batch sampler.

    high_transitions   one per segment: (task + observation at its start, sub-task, summed reward, done,
                       next segment's prompt and sub-task) -- the high level's critic and actor data
    low_samples        one per valid primitive step of a segment that achieved a sub-task, labelled with the sub-task
                       it achieved (hindsight relabelling: a segment meant to "go to cellar" that ended in the study
                       teaches "go to study"; a segment that achieved nothing is dropped) -- low-level BC
    flat_transitions   one per primitive step (task + observation, action, reward, done, next step) -- the flat
                       baseline's critic and actor data; invalid steps are kept for the critic, not for the actor

An episode record is what `reasoning_rl.agents.rooms.play` and `reasoning_rl.agents.agent.run_episodes` write.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from reasoning_rl.agents.glider import flat_prompt, high_prompt, low_prompt


def high_transitions(episodes: list[dict]) -> list[dict]:
    out = []
    for ep in episodes:
        segs = ep["segments"]
        for i, seg in enumerate(segs):
            last = seg["steps"][-1] if seg["steps"] else {"done": True}
            nxt = segs[i + 1] if i + 1 < len(segs) else None
            prompt = high_prompt(ep["task"], seg["obs"])
            out.append({
                "prompt": prompt, "action": seg["subgoal"],
                "reward": float(sum(s["reward"] for s in seg["steps"])),
                "done": float(bool(last["done"]) or nxt is None),
                "next_prompt": high_prompt(ep["task"], nxt["obs"]) if nxt else prompt,
                "next_action": nxt["subgoal"] if nxt else seg["subgoal"],
            })
    return out


def low_samples(episodes: list[dict]) -> list[dict]:
    out = []
    for ep in episodes:
        for seg in ep["segments"]:
            if seg.get("relabel") is None:
                continue
            out += [{"prompt": low_prompt(seg["relabel"], s["obs"]), "action": s["action"]}
                    for s in seg["steps"] if not s["invalid"]]
    return out


def flat_transitions(episodes: list[dict]) -> list[dict]:
    out = []
    for ep in episodes:
        steps = [s for seg in ep["segments"] for s in seg["steps"]]
        for i, s in enumerate(steps):
            nxt = steps[i + 1] if i + 1 < len(steps) else None
            prompt = flat_prompt(ep["task"], s["obs"])
            out.append({
                "prompt": prompt, "action": s["action"], "reward": float(s["reward"]),
                "done": float(bool(s["done"]) or nxt is None), "invalid": s["invalid"],
                "next_prompt": flat_prompt(ep["task"], nxt["obs"]) if nxt else prompt,
                "next_action": nxt["action"] if nxt else s["action"],
            })
    return out


class Sampler:
    """Seeded minibatches from a list of dicts, as a dict of lists; `state_dict` makes it resumable."""

    def __init__(self, rows: list[dict], seed: int):
        if not rows:
            raise ValueError("no training rows: the offline data produced none (raise data.episodes)")
        self.rows, self.seed, self.draws = rows, seed, 0

    def batch(self, size: int) -> dict[str, list]:
        rng = random.Random(self.seed * 1_000_003 + self.draws)
        self.draws += 1
        picked = [self.rows[rng.randrange(len(self.rows))] for _ in range(size)]
        return {k: [r[k] for r in picked] for k in picked[0]}

    def state_dict(self) -> dict:
        return {"seed": self.seed, "draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.draws = state["seed"], state["draws"]


def save_episodes(path: Path, episodes: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e) + "\n" for e in episodes))


def load_episodes(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def summary(episodes: list[dict]) -> dict[str, float]:
    n = max(len(episodes), 1)
    return {"episodes": len(episodes), "success": sum(e["success"] for e in episodes) / n,
            "expert_share": sum(e["policy"] == "expert" for e in episodes) / n,
            "mean_steps": sum(e["steps"] for e in episodes) / n}


def random_policy_rows(env, tasks: list[str], episodes: int, seed: int, max_steps: int = 10) -> list[dict]:
    """Language-model rows of a random policy (the backbone's domain pre-training): every prompt role on the states a
    uniformly random valid action visits, completed by a random valid action (or a random sub-task). They teach the
    words and what is possible where, not what solves a task."""
    rng = random.Random(seed)
    rows: list[dict] = []
    subgoals = env.subgoals()
    for i in range(episodes):
        obs = env.reset(tasks[i % len(tasks)], seed * 7 + i)
        for _ in range(max_steps):
            if not obs.valid_actions:
                break
            action = rng.choice(obs.valid_actions)
            goal = rng.choice(subgoals) if subgoals else action
            rows += [{"prompt": flat_prompt(obs.task, obs.text), "action": action},
                     {"prompt": low_prompt(goal, obs.text), "action": action},
                     {"prompt": high_prompt(obs.task, obs.text), "action": goal}]
            result = env.step(action)
            obs = result.observation
            if result.done:
                break
    return rows
