"""The language agent acting in environments: batched episodes of the hierarchical policy (the high level picks a
sub-task when none is running, the low level acts until the environment says it is done, the episode ends, or
`subtask_steps` steps have passed) or of the flat policy (one prompt role, primitive actions only).

Episodes of many environments advance together, so each decision is one batched `generate` call. The records have
the scripted policies' layout (`reasoning_rl.agents.rooms.play`): the evaluation reads their outcome, the online
phase trains on them.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from reasoning_rl.agents.env import normalise_action
from reasoning_rl.agents.glider import flat_prompt, high_prompt, low_prompt


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float,
                   seed: int, batch_size: int = 64) -> list[str]:
    """One completion per prompt (greedy at temperature 0), cut at eos, stripped."""
    model.eval()
    device = next(model.parameters()).device
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        tokenizer.padding_side = "left"
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        kwargs = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)
        if temperature > 0:
            torch.manual_seed(seed + start)
            kwargs.update(temperature=temperature, top_k=None, top_p=None)
        ids = model.generate(**enc, **kwargs)[:, enc.input_ids.shape[1]:]
        out += [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return out


class _Episode:
    def __init__(self, env, task_id: str, seed: int):
        self.env, self.task_id, self.seed = env, task_id, seed
        self.obs = env.reset(task_id, seed)
        self.segments: list[dict] = []
        self.seg: dict | None = None
        self.before: set[str] = set()
        self.done = False

    def record(self) -> dict:
        c = self.env.counter
        return {"task_id": self.task_id, "task": self.obs.task, "seed": self.seed, "policy": "model",
                "success": c.success, "return": c.episode_return, "steps": c.steps, "invalid": c.invalid_actions,
                "segments": self.segments}


def _done_set(env) -> set[str]:
    return {g for g in env.subgoals() if env.subgoal_done(g)}


def run_episodes(model, tokenizer, make_env: Callable[[], object], jobs: list[tuple[str, int]], hierarchical: bool,
                 subtask_steps: int = 6, temperature: float = 0.0, epsilon: float = 0.0, seed: int = 0,
                 max_new_tokens: int = 24) -> list[dict]:
    """Play `jobs` (task id, episode seed) to the end; epsilon: the share of primitive actions replaced by a random
    valid one (online exploration)."""
    rng = random.Random(seed)
    eps = [_Episode(make_env(), t, s) for t, s in jobs]
    decision = 0
    while any(not e.done for e in eps):
        decision += 1
        active = [e for e in eps if not e.done]
        planners = [e for e in active if hierarchical and e.seg is None]
        if planners:
            goals = generate_texts(model, tokenizer, [high_prompt(e.obs.task, e.obs.text) for e in planners],
                                   max_new_tokens, temperature, seed * 7919 + decision)
            for e, g in zip(planners, goals, strict=True):
                g = normalise_action(g)
                e.before = _done_set(e.env) if e.env.subgoals() else set()
                e.seg = {"subgoal": g, "obs": e.obs.text, "steps": []}
        for e in active:
            if e.seg is None:  # flat: one segment per episode, no sub-task
                e.seg = {"subgoal": "", "obs": e.obs.text, "steps": []}
        prompts = [low_prompt(e.seg["subgoal"], e.obs.text) if hierarchical else flat_prompt(e.obs.task, e.obs.text)
                   for e in active]
        actions = generate_texts(model, tokenizer, prompts, max_new_tokens, temperature, seed * 7919 + decision + 1)
        for e, a in zip(active, actions, strict=True):
            if epsilon > 0 and rng.random() < epsilon and e.obs.valid_actions:
                a = rng.choice(e.obs.valid_actions)
            result = e.env.step(a)
            next_obs = e.env.observation() if result.invalid else result.observation
            e.seg["steps"].append({"obs": e.obs.text, "action": normalise_action(a), "reward": result.reward,
                                   "done": result.done, "invalid": result.invalid, "next_obs": next_obs.text})
            e.obs, e.done = next_obs, result.done
            if not hierarchical:
                if e.done:
                    e.seg.update(achieved=False, relabel=None)
                    e.segments.append(e.seg)
                continue
            finished = e.env.subgoal_done(e.seg["subgoal"])
            if e.done or finished or len(e.seg["steps"]) >= subtask_steps:
                e.seg["achieved"] = bool(finished)
                new = [g for g in e.env.subgoals() if e.env.subgoal_done(g) and g not in e.before]
                e.seg["relabel"] = e.seg["subgoal"] if finished else (new[0] if new else None)
                e.segments.append(e.seg)
                e.seg = None
    records = [e.record() for e in eps]
    for e in eps:
        if hasattr(e.env, "close"):  # ScienceWorld: stop its Java engine
            e.env.close()
    return records


def outcome(records: list[dict]) -> dict[str, float]:
    """success rate, mean steps, invalid-action rate (invalid actions / steps) of finished episodes."""
    n = max(len(records), 1)
    steps = sum(r["steps"] for r in records)
    return {"success": sum(bool(r["success"]) for r in records) / n, "mean_steps": steps / n,
            "invalid_rate": sum(r["invalid"] for r in records) / max(steps, 1), "episodes": len(records)}
