"""How much reward signal does each denoising step's policy gradient carry?

For a batch of trajectories of one prompt, this compares the score-function (policy-gradient) estimate that
DDPO/GRPO training uses, step by step, with the pathwise gradient of the same reward through the whole sampling
chain (same noise, so the pathwise gradient is a low-variance reference). Printed per step k:

    norm_k  = |g_k|, with g_k = grad of mean_n(A_n * log pi(x_{k+1} | x_k))  (ascent direction)
    cos_k   = cos(g_k, g_path)        the step's own signal
    cum_k   = cos(g_0 + ... + g_k, g_path)   what training on the first k+1 steps gets

The reward is a differentiable stand-in (mean image brightness), so the reference gradient exists.

Finding on the shipped tiny-shapes model (10 DDIM steps, eta 1, 64 samples, 3 seeds): the last step's
gradient norm is ~15x every other step's (its DDIM std is 0.03 against 0.2-0.5), while its cosine with the
reference is ~0. Summed over all steps the estimate has cos 0.03-0.06; without the last step 0.12-0.25; the first
1-3 steps alone 0.2-0.39. That is what `train.skip_final_steps` and credit-based step selection act on.

    python benchmarks/step_gradient_signal.py                       # tiny-shapes, 64 samples, seeds 0 1 2
    python benchmarks/step_gradient_signal.py --model builtin:tiny-random --samples 8 --seeds 0
"""

from __future__ import annotations

import argparse
import json

import torch

from diffusion_rl.ddim_logprob import ddim_step_with_logprob
from diffusion_rl.models import load_pipeline
from diffusion_rl.sampling import encode_prompts, guided_noise, recompute_log_prob


def step_signal(pipe, prompt: str, samples: int, seed: int, steps: int = 10, guidance: float = 4.0,
                eta: float = 1.0) -> dict[str, list[float]]:
    """Per-step gradient norms and cosines with the pathwise reference (see the module docstring)."""
    unet, sched = pipe.unet, pipe.scheduler
    params = list(unet.parameters())
    for p in params:
        p.requires_grad_(True)
    sched.set_timesteps(steps)
    prompts = [prompt] * samples
    cond = encode_prompts(pipe, prompts, "")
    gens = [torch.Generator().manual_seed(seed * 100_003 + i) for i in range(samples)]
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x = torch.stack([torch.randn(shape, generator=g) for g in gens]) * sched.init_noise_sigma  # [B, C, h, w]

    def flat_grad(sign: float = 1.0) -> torch.Tensor:
        return torch.cat([sign * p.grad.flatten() for p in params]).clone()

    # 1. sample with grad through the chain: pathwise gradient of the mean reward (the reference)
    unet.zero_grad()
    states, actions = [], []
    for t in sched.timesteps:
        tb = t.expand(samples)
        out = ddim_step_with_logprob(sched, guided_noise(pipe, unet, x, tb, cond, guidance), tb, x, eta=eta,
                                     generator=gens)
        states.append(x.detach())
        actions.append(out.prev_sample.detach())
        x = out.prev_sample
    images = (pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)  # [B, 3, H, W]
    reward = images.float().mean(dim=(1, 2, 3))  # [B]
    reward.mean().backward()
    g_path = flat_grad()

    # 2. score-function estimate per step, group-normalised advantages as in GRPO
    r = reward.detach()
    adv = (r - r.mean()) / (r.std() + 1e-8)  # [B]
    per_step = []
    for k, t in enumerate(sched.timesteps):
        unet.zero_grad()
        lp = recompute_log_prob(pipe, unet, states[k], actions[k], t.expand(samples), cond, guidance, eta).log_prob
        (-(adv * lp).mean()).backward()
        per_step.append(flat_grad(-1.0))  # ascent direction

    def cos(g: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(g, g_path, dim=0))

    cumulative = torch.stack(per_step).cumsum(0)
    return {
        "norm": [float(g.norm()) for g in per_step],
        "cos": [cos(g) for g in per_step],
        "cum_cos": [cos(g) for g in cumulative],
        "all_but_last_cos": cos(cumulative[-2]) if steps > 1 else float("nan"),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:tiny-shapes")
    ap.add_argument("--prompt", default="a red circle left of a blue square")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json", action="store_true", help="print one JSON object per seed instead of tables")
    args = ap.parse_args(argv)
    pipe = load_pipeline(args.model)
    results = []
    for seed in args.seeds:
        res = {"seed": seed, **step_signal(pipe, args.prompt, args.samples, seed, args.steps)}
        results.append(res)
        if args.json:
            print(json.dumps(res))
            continue
        print(f"seed {seed}: {args.samples} samples of {args.prompt!r}, {args.steps} steps")
        print("  step   |g_k|    cos_k   cos(first k+1)")
        for k in range(args.steps):
            print(f"  {k:4d} {res['norm'][k]:8.3f} {res['cos'][k]:8.3f} {res['cum_cos'][k]:8.3f}")
        print(f"  all steps but the last: cos {res['all_but_last_cos']:.3f}; all steps: cos {res['cum_cos'][-1]:.3f}")
    return results


if __name__ == "__main__":
    main()
