"""Fixed-seed evaluation: sample held-out prompts with per-image seeds, score with one or more rewards.

Used by `drl eval` and by the trainer's periodic evaluation, so both report the same numbers for the
same model and seed. The noise comes from generators seeded by (seed, image index) only: evaluation is
decoupled from the training sampler's randomness.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffusion_rl.prompts import PromptError
from diffusion_rl.sampling import sample_trajectories


def eval_generators(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed * 100_003 + i) for i in range(n)]


@torch.no_grad()
def evaluate(
    pipe,
    unet,
    prompts: list[str],
    reward_fns: list,
    seed: int,
    images_per_prompt: int = 1,
    num_steps: int = 20,
    guidance_scale: float = 5.0,
    eta: float = 1.0,
    batch_size: int = 16,
    negative_prompt: str = "",
    *,
    family=None,
    rule=None,
) -> tuple[dict[str, dict[str, float]], torch.Tensor, list[str]]:
    """Returns ({reward name: {"mean", "std", "n"} plus any scalar info means}, images [N, 3, H, W], prompts).

    DDIM models sample with the training policy (eta); flow models with the ODE (every step deterministic), which
    is what their pipelines sample."""
    from diffusion_rl.families import family_of
    from diffusion_rl.sampling import default_rule

    family = family or family_of(pipe)
    rule = rule or default_rule(family, eta)
    ode = torch.zeros(num_steps, dtype=torch.bool) if rule.kind == "flow" else None
    was_training = unet.training
    unet.eval()
    expanded = [p for p in prompts for _ in range(images_per_prompt)]
    gens = eval_generators(seed, len(expanded))
    images = []
    for i in range(0, len(expanded), batch_size):
        traj = sample_trajectories(
            pipe, unet, expanded[i : i + batch_size], gens[i : i + batch_size], num_steps, guidance_scale, eta,
            negative_prompt, family=family, rule=rule, stochastic_steps=ode,
        )
        images.append(traj.images.cpu())
    images_t = torch.cat(images)
    results: dict[str, dict[str, float]] = {}
    for fn in reward_fns:
        scores, info = fn(images_t, expanded, [{} for _ in expanded])
        finite = scores[torch.isfinite(scores)]
        row = {
            "mean": float(finite.mean()) if len(finite) else float("nan"),
            "std": float(finite.std()) if len(finite) > 1 else 0.0,
            "n": float(len(finite)),
        }
        row.update({k: float(v) for k, v in info.items() if isinstance(v, (int, float))})
        results[fn.name] = row
    unet.train(was_training)
    return results, images_t, expanded


def eval_prompts_from(source: str) -> list[str]:
    """`world:eval` / `world:train` (the shapes world's splits) or a .txt / .jsonl prompt file."""
    if source.startswith("world:"):
        from diffusion_rl.world import split_prompts

        split = source.split(":", 1)[1]
        train, held_out = split_prompts()
        if split not in ("train", "eval"):
            raise PromptError(f"--prompts {source!r}: use world:eval or world:train")
        return list(held_out if split == "eval" else train)
    from diffusion_rl.config import PromptsConfig
    from diffusion_rl.prompts import load_prompts

    if not Path(source).is_file():
        raise PromptError(f"--prompts {source!r}: not a file; pass a .txt/.jsonl file or world:eval")
    return load_prompts(PromptsConfig(source="file", path=source)).prompts
