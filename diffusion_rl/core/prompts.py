"""Prompt sets and the per-epoch prompt sampler both trainers use: which prompts each process draws in each
epoch, deterministic in (seed, epoch) and checkpointed."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


class PromptError(ValueError):
    """A prompt source could not be read; the message names the source and the fix."""


@dataclass
class PromptSet:
    prompts: list[str]
    metadata: list[dict]

    def fingerprint(self) -> str:
        return hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()[:16]


class PromptSampler:
    """Which prompts each process samples in each epoch.

    Epoch e uses a permutation of the prompt set seeded by (seed, e), shared by all processes; process r
    takes its own consecutive slice, so ranks get different prompts and every prompt is visited before
    any repeats. Deterministic in (seed, epoch), so resuming at epoch e reproduces the same prompts; the
    saved state pins the prompt set so a changed prompt source is caught on resume.
    """

    def __init__(self, prompt_set: PromptSet, seed: int, world_size: int, rank: int):
        self.prompt_set, self.seed, self.world_size, self.rank = prompt_set, seed, world_size, rank

    def epoch_indices(self, epoch: int, num_batches: int, prompts_per_batch: int) -> list[list[int]]:
        n = len(self.prompt_set.prompts)
        per_rank = num_batches * prompts_per_batch
        needed = per_rank * self.world_size
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-needed // n))])[:needed]
        mine = order[self.rank * per_rank : (self.rank + 1) * per_rank].tolist()
        return [mine[b * prompts_per_batch : (b + 1) * prompts_per_batch] for b in range(num_batches)]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "num_prompts": len(self.prompt_set.prompts), "fingerprint": self.prompt_set.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        if state["fingerprint"] != self.prompt_set.fingerprint():
            raise PromptError(
                f"the prompt set differs from the checkpoint's ({state['num_prompts']} prompts, fingerprint "
                f"{state['fingerprint']}; now {len(self.prompt_set.prompts)}, {self.prompt_set.fingerprint()}); "
                "resume with the same prompts or start a new run"
            )
        self.seed = state["seed"]
