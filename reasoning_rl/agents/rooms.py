"""`rooms`: the embedded procedural text environment (pure Python, seeded, fast) and its scripted policies.

A small house of six rooms joined by doors; eight portable objects, each at a home room; six receptacles, one per
room. Two task families, each a chain of sub-goals:

    put the X in the Y      get X -> go to <room of Y> -> put X in Y
    bring the X to the R    get X -> go to R -> drop X

Primitive actions: `go R` (an adjacent room), `take X` (a loose object here, hands empty), `put X in Y` (X held, Y
here), `drop X`. Reward 1 and done on success; done with 0 when the task's object goes into a wrong receptacle or
after `max_steps` steps. An action that is not valid here is a counted no-op (`reasoning_rl.agents.env`).

Splits: 25 % of each family's (object, target) pairs are `unseen` (held out from the offline data), chosen so that
every object, receptacle and room still appears in a `seen` task: generalising to them means recombining known
sub-skills. Variants (the changed environment of the adaptation benchmark): `rooms-moved` puts every receptacle in
another room (the high level's "where is Y" changes, the navigation skills do not); `rooms-rewired` changes the
doors (the low level's routes change).

Scripted policies (the offline data): `expert` (shortest routes, sub-goal annotated: the gold trajectories) and
`medium` (a systematically wrong destination per task, recovering with probability `recover`); both with
epsilon-random primitive actions. `collect` plays them and records episodes as segments (sub-goal, steps, achieved
sub-goal for hindsight relabelling).
"""

from __future__ import annotations

import copy
import random
import zlib
from collections import deque

from reasoning_rl.agents.env import EpisodeCounter, Observation, StepResult, guarded_step

ROOMS = ["hall", "kitchen", "bedroom", "garden", "study", "cellar"]
OBJECTS = ["apple", "key", "book", "cup", "coin", "ball", "pen", "sock"]
RECEPTACLES = ["box", "bag", "basket", "drawer", "chest", "shelf"]
DOORS = {
    "base": [("hall", "kitchen"), ("hall", "bedroom"), ("hall", "study"), ("kitchen", "garden"), ("study", "cellar")],
    "rewired": [("hall", "garden"), ("garden", "kitchen"), ("hall", "cellar"), ("cellar", "study"), ("study", "bedroom")],
}
OBJECT_HOME = {"apple": "kitchen", "key": "study", "book": "bedroom", "cup": "kitchen", "coin": "cellar",
               "ball": "garden", "pen": "study", "sock": "bedroom"}
RECEPTACLE_HOME = {"box": "hall", "bag": "kitchen", "basket": "garden", "drawer": "bedroom", "chest": "cellar",
                   "shelf": "study"}
VARIANTS = ("rooms", "rooms-moved", "rooms-rewired")


def _stable(text: str) -> int:
    return zlib.crc32(text.encode())


def all_tasks() -> list[str]:
    put = [f"put:{o}:{r}" for o in OBJECTS for r in RECEPTACLES]
    bring = [f"bring:{o}:{room}" for o in OBJECTS for room in ROOMS if room != OBJECT_HOME[o]]
    return put + bring


def task_split(split_seed: int = 0, unseen_fraction: float = 0.25) -> dict[str, list[str]]:
    """{'seen': [...], 'unseen': [...]}: per family, a seeded held-out share such that every object, receptacle and
    room keeps appearing in a seen task of that family."""
    rng = random.Random(split_seed)
    seen, unseen = [], []
    for family in ("put", "bring"):
        ids = [t for t in all_tasks() if t.startswith(family)]
        for _ in range(1000):
            order = ids[:]
            rng.shuffle(order)
            n = round(unseen_fraction * len(ids))
            held, kept = order[:n], order[n:]
            cover = {p for t in kept for p in t.split(":")[1:]}
            if cover >= {p for t in ids for p in t.split(":")[1:]}:
                break
        seen += sorted(kept)
        unseen += sorted(held)
    return {"seen": seen, "unseen": unseen}


def task_text(task_id: str) -> str:
    family, obj, target = task_id.split(":")
    return f"put the {obj} in the {target}" if family == "put" else f"bring the {obj} to the {target}"


class RoomsEnv:
    """The embedded environment; `variant` is one of VARIANTS. Deterministic given (task_id, seed)."""

    def __init__(self, variant: str = "rooms", max_steps: int = 20, split_seed: int = 0):
        if variant not in VARIANTS:
            raise ValueError(f"unknown rooms variant {variant!r}; choose one of {VARIANTS}")
        self.name, self.max_steps = variant, max_steps
        doors = DOORS["rewired" if variant == "rooms-rewired" else "base"]
        self.adjacent = {r: sorted({b for a, b in doors if a == r} | {a for a, b in doors if b == r}) for r in ROOMS}
        if variant == "rooms-moved":  # every receptacle one room further along ROOMS
            self.receptacle_room = {k: ROOMS[(ROOMS.index(v) + 1) % len(ROOMS)] for k, v in RECEPTACLE_HOME.items()}
        else:
            self.receptacle_room = dict(RECEPTACLE_HOME)
        self.split = task_split(split_seed)
        self.counter = EpisodeCounter()
        self.task_id: str | None = None

    # -- the interface ---------------------------------------------------------------------------
    def tasks(self, split: str) -> list[str]:
        if split not in self.split:
            raise ValueError(f"unknown split {split!r}; choose seen or unseen")
        return list(self.split[split])

    def reset(self, task_id: str, seed: int = 0) -> Observation:
        if task_id not in all_tasks():
            raise ValueError(f"unknown rooms task {task_id!r}; e.g. {all_tasks()[0]!r} (see RoomsEnv.tasks('seen'))")
        rng = random.Random(_stable(f"{task_id}|{seed}"))
        self.task_id, self.family, self.obj, self.target = task_id, *task_id.split(":")
        self.task = task_text(task_id)
        self.location = dict(OBJECT_HOME)  # object -> room, "held", or "in:<receptacle>"
        self.room = rng.choice([r for r in ROOMS if r != OBJECT_HOME[self.obj]])
        self.dropped: set[str] = set()  # objects the agent put down where they now lie ("drop X" is done)
        self.counter.reset()
        return self.observation()

    def step(self, action: str) -> StepResult:
        return guarded_step(self, action, self._apply)

    def subgoal_done(self, subgoal: str) -> bool | None:
        words = subgoal.split()
        if words[:1] == ["get"] and len(words) == 2:
            return self.location.get(words[1]) == "held"
        if words[:2] == ["go", "to"] and len(words) == 3:
            return self.room == words[2]
        if words[:1] == ["put"] and len(words) == 4:
            return self.location.get(words[1]) == f"in:{words[3]}"
        if words[:1] == ["drop"] and len(words) == 2:
            return words[1] in self.dropped and self.location.get(words[1]) == self.room
        return False

    def subgoals(self) -> list[str]:
        """Most specific first (hindsight relabelling takes the first newly achieved one)."""
        return ([f"put {o} in {r}" for o in OBJECTS for r in RECEPTACLES] + [f"drop {o}" for o in OBJECTS]
                + [f"get {o}" for o in OBJECTS] + [f"go to {r}" for r in ROOMS])

    def vocabulary(self) -> list[str]:
        """Every word the environment's texts (tasks, observations, actions, sub-tasks) can contain."""
        from reasoning_rl.agents.env import INVALID_OBSERVATION
        from reasoning_rl.agents.lm import words_of

        texts = [task_text(t) for t in all_tasks()] + self.subgoals() + ROOMS + OBJECTS + RECEPTACLES
        return words_of(texts + ["in exits see hold go take put drop", INVALID_OBSERVATION])

    # -- state and dynamics --------------------------------------------------------------------
    @property
    def held(self) -> str | None:
        return next((o for o, loc in self.location.items() if loc == "held"), None)

    def observation(self) -> Observation:
        loose = [o for o in OBJECTS if self.location[o] == self.room]
        here = loose + [r for r in RECEPTACLES if self.receptacle_room[r] == self.room]
        text = (f"in {self.room}; exits {' '.join(self.adjacent[self.room])}; see {' '.join(here) or '-'}; "
                f"hold {self.held or '-'}")
        return Observation(text, self.task, self.valid_actions())

    def valid_actions(self) -> list[str]:
        acts = [f"go {r}" for r in self.adjacent[self.room]]
        held = self.held
        if held is None:
            acts += [f"take {o}" for o in OBJECTS if self.location[o] == self.room]
        else:
            acts += [f"put {held} in {r}" for r in RECEPTACLES if self.receptacle_room[r] == self.room]
            acts.append(f"drop {held}")
        return acts

    def _apply(self, action: str) -> StepResult:
        verb, *rest = action.split()
        if verb == "go":
            self.room = rest[0]
        elif verb == "take":
            self.location[rest[0]] = "held"
            self.dropped.discard(rest[0])
        elif verb == "put":
            self.location[rest[0]] = f"in:{rest[2]}"
        elif verb == "drop":
            self.location[rest[0]] = self.room
            self.dropped.add(rest[0])
        success = (self.location[self.obj] == f"in:{self.target}" if self.family == "put"
                   else self.location[self.obj] == self.target)
        failed = self.location[self.obj].startswith("in:") and not success
        return StepResult(self.observation(), 1.0 if success else 0.0, success or failed,
                          info={"success": success, "failed": failed, "action": action})

    def snapshot(self) -> dict:
        return {"room": self.room, "location": dict(self.location), "dropped": sorted(self.dropped), "counter": copy.copy(self.counter.__dict__)}

    # -- what the scripted policies know --------------------------------------------------------
    def next_hop(self, goal_room: str) -> str | None:
        """The first room of a shortest route from here to `goal_room` (BFS over the doors)."""
        if goal_room == self.room:
            return None
        parent, queue = {self.room: None}, deque([self.room])
        while queue:
            r = queue.popleft()
            for n in self.adjacent[r]:
                if n not in parent:
                    parent[n] = r
                    queue.append(n)
        node = goal_room
        while parent[node] != self.room:
            node = parent[node]
        return node

    def expert_subgoal(self) -> str:
        o, held = self.obj, self.held
        if held is not None and held != o:
            return f"drop {held}"
        goal_room = self.receptacle_room[self.target] if self.family == "put" else self.target
        if held != o:
            return f"get {o}"
        if self.room != goal_room:
            return f"go to {goal_room}"
        return f"put {o} in {self.target}" if self.family == "put" else f"drop {o}"

    def expert_action(self, subgoal: str) -> str:
        words = subgoal.split()
        if words[0] == "get":
            where = self.location[words[1]]
            if where == "held":
                return f"drop {self.held}"  # not reached by the expert; keeps the function total
            if where.startswith("in:"):
                return f"go {self.adjacent[self.room][0]}"
            hop = self.next_hop(where)
            if hop is None:
                return f"take {words[1]}" if self.held is None else f"drop {self.held}"
            return f"go {hop}"
        if words[0] == "go":
            hop = self.next_hop(words[2])
            return f"go {hop}" if hop else f"go {self.adjacent[self.room][0]}"
        return subgoal  # put X in Y / drop X are primitive actions too

    def decoy_room(self) -> str:
        """The medium policy's wrong destination for this task (fixed per task)."""
        right = self.receptacle_room[self.target] if self.family == "put" else self.target
        wrong = [r for r in ROOMS if r not in (right, OBJECT_HOME[self.obj])]
        return wrong[_stable(self.task_id) % len(wrong)]


# ------------------------------------------------------------------------------------------------
# scripted episodes (the offline data)
# ------------------------------------------------------------------------------------------------


def play(env, task_id: str, seed: int, policy: str = "expert", epsilon: float = 0.0, recover: float = 0.3,
         subtask_steps: int = 6) -> dict:
    """One scripted episode as a record: segments of (sub-goal, steps, hindsight label). `policy`: expert | medium."""
    rng = random.Random(_stable(f"{policy}|{task_id}|{seed}|{epsilon}"))
    obs = env.reset(task_id, seed)
    segments, done, mode = [], False, "mistake" if policy == "medium" else "expert"
    while not done:
        before = {g for g in env.subgoals() if env.subgoal_done(g)}
        if mode == "expert":
            goal = env.expert_subgoal()
        elif mode == "mistake" and env.held == env.obj:
            goal, mode = f"go to {env.decoy_room()}", "mistaken"
        elif mode == "mistake":
            goal = env.expert_subgoal()
        elif mode == "mistaken":  # at the decoy room: finish the task there (fails), then maybe recover
            goal = f"put {env.obj} in {env.target}" if env.family == "put" else f"drop {env.obj}"
            mode = "expert" if rng.random() < recover else "lost"
        else:  # lost: random sub-goals until the episode ends
            goal = rng.choice(env.subgoals()[48:])
        seg = {"subgoal": goal, "obs": obs.text, "steps": []}
        for _ in range(subtask_steps):
            action = env.expert_action(goal)
            if rng.random() < epsilon:
                action = rng.choice(obs.valid_actions)
            result = env.step(action)
            # after a no-op the agent keeps acting on the last informative observation (the room, unchanged)
            next_obs = env.observation() if result.invalid else result.observation
            seg["steps"].append({"obs": obs.text, "action": action, "reward": result.reward, "done": result.done,
                                 "invalid": result.invalid, "next_obs": next_obs.text})
            obs, done = next_obs, result.done
            if done or env.subgoal_done(goal):
                break
        seg["achieved"] = bool(env.subgoal_done(goal))
        seg["relabel"] = goal if seg["achieved"] else next(
            (g for g in env.subgoals() if env.subgoal_done(g) and g not in before), None)
        segments.append(seg)
    c = env.counter
    return {"task_id": task_id, "task": env.task, "seed": seed, "policy": policy, "success": c.success,
            "return": c.episode_return, "steps": c.steps, "invalid": c.invalid_actions, "segments": segments}


def collect(env, tasks: list[str], episodes: int, seed: int, expert_fraction: float, epsilon: float,
            recover: float = 0.3, subtask_steps: int = 6) -> list[dict]:
    """`episodes` scripted episodes over `tasks` (round robin), a share `expert_fraction` by the expert, the rest by
    the medium policy; all with epsilon-random primitive actions."""
    rng = random.Random(seed)
    out = []
    for i in range(episodes):
        task = tasks[i % len(tasks)]
        policy = "expert" if rng.random() < expert_fraction else "medium"
        out.append(play(env, task, seed * 100_003 + i, policy, epsilon, recover, subtask_steps))
    return out
