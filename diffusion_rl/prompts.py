"""Prompt sources (config list, text/JSONL file, `datasets` dataset) and the per-epoch prompt sampler."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusion_rl.config import PromptsConfig


class PromptError(ValueError):
    """A prompt source could not be read; the message names the source and the fix."""


@dataclass
class PromptSet:
    prompts: list[str]
    metadata: list[dict]

    def fingerprint(self) -> str:
        return hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()[:16]


def load_prompts(cfg: PromptsConfig) -> PromptSet:
    if cfg.source == "list":
        return PromptSet(list(cfg.prompts), [{} for _ in cfg.prompts])
    if cfg.source == "file":
        return _from_file(Path(cfg.path))
    if cfg.source == "world":
        from diffusion_rl.world import split_prompts

        if cfg.split not in ("train", "eval"):
            raise PromptError(f"prompts.split={cfg.split!r} for source=world; use train or eval")
        prompts = split_prompts()[0 if cfg.split == "train" else 1]
        return PromptSet(list(prompts), [{} for _ in prompts])
    return _from_dataset(cfg.dataset, cfg.split, cfg.column)


def _from_file(path: Path) -> PromptSet:
    if not path.is_file():
        raise PromptError(f"prompts.path {str(path)!r} does not exist; give a .txt (one prompt per line) or .jsonl file")
    prompts, metadata = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise PromptError(f"{path}:{n}: not valid JSON ({err})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise PromptError(f"{path}:{n}: each JSONL line needs a string 'prompt' key, got {line[:80]!r}")
            prompts.append(row.pop("prompt"))
            metadata.append(row)
        else:
            prompts.append(line.strip())
            metadata.append({})
    if not prompts:
        raise PromptError(f"prompts.path {str(path)!r} holds no prompts")
    return PromptSet(prompts, metadata)


def _from_dataset(name: str, split: str, column: str) -> PromptSet:
    import datasets

    try:
        if Path(name).is_dir() and (Path(name) / "dataset_info.json").exists():
            ds = datasets.load_from_disk(name)
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # datasets raises many types; report them all the same way
        raise PromptError(f"could not load prompts dataset {name!r} split {split!r}: {err}") from None
    if column not in ds.column_names:
        raise PromptError(f"dataset {name!r} has no column {column!r}; columns: {ds.column_names}")
    prompts = [str(p) for p in ds[column]]
    others = [c for c in ds.column_names if c != column]
    metadata = [{c: ds[i][c] for c in others} for i in range(len(ds))] if others else [{} for _ in prompts]
    return PromptSet(prompts, metadata)


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
