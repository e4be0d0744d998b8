"""Prompt sources of the diffusion trainer (config list, text/JSONL file, `datasets` dataset, the shapes world);
the prompt set and the per-epoch sampler are the core's (`diffusion_rl.core.prompts`)."""

from __future__ import annotations

import json
from pathlib import Path

from diffusion_rl.config import PromptsConfig
from diffusion_rl.core.prompts import PromptError, PromptSampler, PromptSet  # noqa: F401  (re-exported)


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
