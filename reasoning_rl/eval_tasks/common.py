"""What the `drl reason eval --task` evaluations share: loading the model, generating greedy and sampled
completions with the same code (and seed) as `drl reason eval`, token lengths, data files and means.

Generation goes through `reasoning_rl.evaluation.evaluate` (greedy: one completion per problem; sampled:
`options.num` per problem at the sampling temperature, seeded by `options.seed` alone), so a task's numbers are
those `drl reason eval` and the trainer's periodic evaluation would produce on the same problems. A run directory
brings its own rollout settings (max_new_tokens, temperature, top-p / top-k, stop strings), system prompt and chat
template; a plain model uses the task's defaults. `--max-new-tokens` / `--temperature` override either.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffusion_rl.core.prompts import PromptError, PromptSet


@dataclass
class Loaded:
    """A model ready for evaluation: the model, its tokenizer or processor, the run's config (None for a plain
    model) and whether it reads images."""

    model: Any
    processor: Any
    run_config: Any
    vision: bool

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)


def load(model_or_run: str) -> Loaded:
    """A hub id, a directory, a `builtin:...` model or a drl reasoning run (`reasoning_rl.inference`)."""
    from reasoning_rl.inference import load_for_inference
    from reasoning_rl.models import is_vision_language

    model, processor, cfg = load_for_inference(model_or_run)
    return Loaded(model, processor, cfg, is_vision_language(model))


@dataclass(frozen=True)
class Sampling:
    """The generation settings a task runs with (the run's, else the task's defaults; CLI options win)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop_strings: tuple[str, ...]
    system_prompt: str | None
    use_chat_template: bool


def sampling(loaded: Loaded, options, default_max_new_tokens: int) -> Sampling:
    """The run's rollout and prompt settings (a plain model: `default_max_new_tokens`, temperature 1, no top-p /
    top-k, no stop strings, the chat template without a system prompt); `options` override length and temperature."""
    cfg = loaded.run_config
    if options.max_new_tokens is not None and options.max_new_tokens < 1:
        raise PromptError(f"--max-new-tokens must be >= 1, got {options.max_new_tokens}")
    if options.temperature is not None and not options.temperature > 0:
        raise PromptError(f"--temperature must be > 0, got {options.temperature} (greedy completions are always reported)")
    if options.num < 1:
        raise PromptError(f"--num must be >= 1, got {options.num}")
    if cfg is None:
        return Sampling(options.max_new_tokens or default_max_new_tokens, options.temperature or 1.0, 1.0, 0, (),
                        None, True)
    r, p = cfg.rollout, cfg.prompts
    return Sampling(options.max_new_tokens or r.max_new_tokens, options.temperature or r.temperature, r.top_p, r.top_k,
                    tuple(r.stop_strings), p.system_prompt, p.use_chat_template)


@dataclass
class Completions:
    """Greedy [N] and sampled [N * num] completions of N problems (the sampled ones grouped by problem: rows
    i*num .. i*num+num-1 belong to problem i)."""

    greedy: list[str]
    sampled: list[str]
    num: int
    sampled_length: float
    """The mean sampled completion length in tokens as `evaluate` counts it (the eos token included)."""


def _unscored(texts, prompts, metadata):
    """The reward `evaluate` is given: every task scores the completions itself, afterwards."""
    return torch.zeros(len(texts)), {}


def complete(loaded: Loaded, problems: PromptSet, options, s: Sampling, *, sampled: bool = True) -> Completions:
    """Greedy (and, with `sampled`, `options.num` sampled) completions of `problems`, through
    `reasoning_rl.evaluation.evaluate` (problems with an image carry it in metadata["image"])."""
    from reasoning_rl.evaluation import evaluate

    if not problems.prompts:
        raise PromptError("no problems to evaluate (--limit 0, or an empty --data file)")
    num = options.num if sampled else 1
    results, texts = evaluate(
        loaded.model, loaded.processor, problems, _unscored, num_samples=num, max_new_tokens=s.max_new_tokens,
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, stop_strings=list(s.stop_strings),
        system_prompt=s.system_prompt, use_chat_template=s.use_chat_template, seed=options.seed,
    )
    return Completions(texts["greedy"], texts["sampled"] if sampled else [], num, results["completion_length"])


def token_lengths(loaded: Loaded, texts: Iterable[str]) -> list[int]:
    """Length of each decoded completion in tokens of the policy's tokenizer (without the eos token)."""
    tok = loaded.tokenizer
    return [len(tok(t, add_special_tokens=False).input_ids) for t in texts]


def mean(values: Iterable[float | None]) -> float | None:
    """Mean over the finite values; None when there are none (JSON null, never NaN)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(xs) / len(xs) if xs else None


def percent(count: int, total: int) -> float | None:
    return 100.0 * count / total if total else None


def read_records(path: Path, what: str) -> list[dict]:
    """Rows of a JSONL file (one object per line) or a JSON file holding a list of objects."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"--data {str(path)!r} does not exist; pass a local {what} file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise PromptError(f"--data {path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if isinstance(rows, dict):
            rows = [rows]
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise PromptError(f"--data {path}:{n}: not valid JSON ({err.msg})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise PromptError(f"--data {path}: expected a list of JSON objects (one {what} record each)")
    if not rows:
        raise PromptError(f"--data {path} holds no records")
    return rows


def take(rows: list, limit: int | None) -> list:
    if limit is not None and limit < 1:
        raise PromptError(f"--limit must be >= 1, got {limit}")
    return rows if limit is None else rows[:limit]
