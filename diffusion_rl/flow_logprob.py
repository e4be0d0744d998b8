"""Rectified-flow SDE step that also returns the Gaussian log-probability of the transition (Flow-GRPO).

Adapted from diffusers `FlowMatchEulerDiscreteScheduler.step` (diffusers 0.42.1,
`src/diffusers/schedulers/scheduling_flow_match_euler_discrete.py`), with the stochastic step of
Flow-GRPO (yifan123/flow_grpo `flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`, Liu et al. 2025).

The model: x_sigma = (1 - sigma) x0 + sigma eps, velocity v = eps - x0, the ODE step
x_{sigma'} = x_sigma + v dt with dt = sigma' - sigma < 0. Flow-GRPO replaces it by the Euler-Maruyama step of
the SDE whose marginals equal the ODE's:

    std_t = a sqrt(sigma / (1 - sigma))                  (a = noise_level; sigma = 1 uses sigma_cap below)
    mu    = x (1 + std_t^2 dt / (2 sigma)) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt
    x'    = mu + std_t sqrt(-dt) z,   log pi(x' | x) = log N(x'; mu, (std_t sqrt(-dt))^2), mean over dims

What changed relative to diffusers' `step`:
- a free function over *batched* per-sample sigmas [B] (after the trainer's time shuffle, samples of one batch
  sit at different steps), not the scheduler's internal step index;
- the stochastic step above instead of the Euler step; `noise_level = 0` is exactly diffusers' Euler step, and
  such a deterministic (ODE) step reports log-prob 0 (it has no density; the trainer never trains one);
- an optional `prev_sample` is taken as given (training-time recomputation on the stored transition);
- all arithmetic in fp32 (Flow-GRPO: "bf16 can overflow" in the mean); the log-prob is the **mean over the
  latent dimensions**, as on the DDIM side (diffusion_rl.ddim_logprob explains why not the sum);
- returns the predicted x0 = x - sigma v (CoCA's similarities) and the mean and std (KL to a reference).
"""

from __future__ import annotations

import math

import torch

from diffusion_rl.ddim_logprob import LOG_SQRT_2PI, DDIMStepOutput, _per_sample, _randn_like

FlowStepOutput = DDIMStepOutput  # same fields: prev_sample, log_prob [B], pred_original_sample, mean, std


def sde_std(sigma: torch.Tensor, noise_level: float, sigma_cap: float) -> torch.Tensor:
    """std_t = a sqrt(sigma / (1 - sigma)) [B]; at sigma = 1 the denominator uses 1 - sigma_cap (Flow-GRPO uses
    the schedule's second sigma), so the first step of a schedule starting at pure noise stays finite."""
    sigma = sigma.float()
    denominator = 1 - torch.where(sigma >= 1, torch.full_like(sigma, sigma_cap), sigma)
    return noise_level * torch.sqrt(sigma / denominator)


def flow_sde_step_with_logprob(
    model_output: torch.Tensor,  # [B, C, H, W] (or [B, L, D] packed) velocity v after classifier-free guidance
    sigma: torch.Tensor,  # [B] current sigma in (0, 1]
    sigma_next: torch.Tensor,  # [B] next sigma in [0, sigma)
    sample: torch.Tensor,  # [B, C, H, W] x_sigma
    noise_level: float = 0.7,
    sigma_cap: float | None = None,
    prev_sample: torch.Tensor | None = None,  # given x_{sigma'} (recompute mode)
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> FlowStepOutput:
    if noise_level < 0 or not math.isfinite(noise_level):
        raise ValueError(f"noise_level={noise_level}: use a >= 0 (Flow-GRPO's default is 0.7; 0 = the ODE step)")
    batch = sample.shape[0]
    sigma = torch.as_tensor(sigma, device=sample.device, dtype=torch.float32).reshape(-1).expand(batch)
    sigma_next = torch.as_tensor(sigma_next, device=sample.device, dtype=torch.float32).reshape(-1).expand(batch)
    if bool((sigma_next >= sigma).any()) or bool((sigma <= 0).any()):
        raise ValueError(f"a flow step needs 0 < sigma and sigma_next < sigma; got sigma={sigma.tolist()}, "
                         f"sigma_next={sigma_next.tolist()}")
    if sigma_cap is None:
        if bool((sigma >= 1).any()):
            raise ValueError("a step at sigma = 1 needs sigma_cap (Flow-GRPO: the schedule's second sigma, "
                             "scheduler.sigmas[1]) so that std_t = a sqrt(sigma / (1 - sigma)) stays finite")
        sigma_cap = 0.0  # unused below sigma = 1
    x = sample.float()
    v = model_output.float()
    s = _per_sample(sigma, x.ndim)
    dt = _per_sample(sigma_next - sigma, x.ndim)  # < 0
    pred_original_sample = x - s * v

    std_t = _per_sample(sde_std(sigma, noise_level, sigma_cap), x.ndim)
    mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    std = std_t * torch.sqrt(-dt)  # [B, 1, ...] the transition's standard deviation
    if prev_sample is None:
        noise = _randn_like(model_output, generator).float() if noise_level > 0 else torch.zeros_like(mean)
        # stored in the working dtype exactly as fed to the next step (recomputation sees the same tensor)
        prev_sample = (mean + std * noise).to(sample.dtype)
    if noise_level == 0:  # the ODE (Euler) step: deterministic, no density
        log_prob = torch.zeros(batch, device=sample.device)
    else:
        x_next = prev_sample.detach().float()
        log_prob = -((x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
        log_prob = log_prob.mean(dim=tuple(range(1, x.ndim)))
    return FlowStepOutput(prev_sample, log_prob, pred_original_sample, mean, std)
