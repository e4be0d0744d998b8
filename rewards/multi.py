"""Weighted multi-reward: ``score = sum_k w_k * r_k`` with per-component raw scores reported.

``load_multi([{"name": "pickscore", "weight": 1.0}, {"name": "aesthetic", "weight": 0.1,
"label": "aes", **options}])``.

A ``MultiReward`` always returns the weighted sum as its scores and the raw, unweighted component
scores in ``info["components"] = {label: float32 tensor [B]}``; it exposes ``.weights``. How the
components become advantages is the trainer's choice (``reward.combine``), not the reward's:

* ``sum``: the trainer uses the weighted sum as the scalar reward;
* ``advantage``: the trainer normalises each component per prompt itself and combines the normalised
  components with ``.weights`` (as in flow_grpo's multi-reward); the weighted sum is then only logged.

``load_multi(..., mode=...)`` still accepts (and validates) ``"sum"`` / ``"advantage"`` so existing
callers keep working, but the mode does not change the reward: the same scores and info come back
either way. (``MultiReward.mode`` used to be stored without any effect and was removed.)

A NaN in any component makes the weighted sum NaN for that sample (the sample is unscorable), while
the other components keep their values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from rewards.base import RewardError, RewardFn
from rewards.registry import load

MODES = ("sum", "advantage")  # the trainer's reward.combine values accepted by load_multi


class MultiReward(RewardFn):
    """Weighted combination of named component rewards."""

    def __init__(self, components: Mapping[str, RewardFn], weights: Mapping[str, float]):
        if not components:
            raise RewardError("multi-reward needs at least one component")
        if set(components) != set(weights):
            raise RewardError(
                f"multi-reward components {sorted(components)} and weights {sorted(weights)} differ"
            )
        for label, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise RewardError(f"multi-reward weight of {label!r} must be a finite number, got {w!r}")
        self.components: dict[str, RewardFn] = dict(components)
        self.weights: dict[str, float] = {k: float(v) for k, v in weights.items()}
        self.name = "+".join(f"{self.weights[k]:g}*{k}" for k in self.components)
        self.differentiable = all(c.differentiable for c in self.components.values())

    def _score(self, samples, prompts, metadata):
        comps: dict[str, torch.Tensor] = {}
        infos: dict[str, dict[str, Any]] = {}
        for label, fn in self.components.items():
            scores, info = fn(samples, prompts, metadata)
            comps[label] = scores
            if info:
                infos[label] = info
        total = sum(self.weights[k] * comps[k].double() for k in comps)
        info: dict[str, Any] = {"components": comps, "weights": dict(self.weights)}
        if infos:
            info["component_info"] = infos
        return total.float(), info

    def score_tensor(self, samples: torch.Tensor, prompts=None) -> torch.Tensor:
        if not self.differentiable:
            nd = [k for k, c in self.components.items() if not c.differentiable]
            raise RewardError(f"multi-reward {self.name!r} is not differentiable: components {nd} are not")
        total = None
        for label, fn in self.components.items():
            s = self.weights[label] * fn.score_tensor(samples, prompts)
            total = s if total is None else total + s.to(total.device)
        return total


def load_multi(specs: Sequence[Mapping[str, Any]], mode: str = "sum") -> MultiReward:
    """Load every component (``name``, ``weight`` = 1.0, optional ``label``, other keys = options).

    ``mode`` (``"sum"`` or ``"advantage"``, the trainer's ``reward.combine``) is validated for the
    caller's sake and does not change the returned reward (see the module docstring).
    """
    if mode not in MODES:
        raise RewardError(f"multi-reward mode must be one of {MODES}, got {mode!r}")
    if isinstance(specs, Mapping) or not isinstance(specs, Sequence) or not specs:
        raise RewardError(
            f"load_multi expects a non-empty list of dicts like [{{'name': 'aesthetic', 'weight': 1.0}}], "
            f"got {specs!r}"
        )
    components: dict[str, RewardFn] = {}
    weights: dict[str, float] = {}
    for i, spec in enumerate(specs):
        if not isinstance(spec, Mapping) or "name" not in spec:
            raise RewardError(f"multi-reward entry {i} must be a dict with a 'name' key, got {spec!r}")
        options = dict(spec)
        name = options.pop("name")
        weight = options.pop("weight", 1.0)
        label = options.pop("label", name)
        if label in components:
            raise RewardError(
                f"multi-reward component name {label!r} is used twice (entry {i}); give one of them a "
                f"distinct 'label'"
            )
        components[label] = load(name, **options)
        weights[label] = weight
    return MultiReward(components, weights)
