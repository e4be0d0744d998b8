"""DDIM step that also returns the Gaussian log-probability of the transition.

Adapted from diffusers `DDIMScheduler.step` (diffusers 0.42.1,
`src/diffusers/schedulers/scheduling_ddim.py`), following the free-function patch of
kvablack/ddpo-pytorch `ddpo_pytorch/diffusers_patch/ddim_with_logprob.py` (commit 1958463).

What changed relative to diffusers' `DDIMScheduler.step`:
- a free function taking the scheduler, so one call handles a *batch* of different timesteps [B];
- `prev_timestep < 0` selects `final_alpha_cumprod` per sample with `torch.where` (ddpo-pytorch
  clamps to 0 instead, which differs when `set_alpha_to_one=True`);
- an optional `prev_sample` is taken as given (training-time recomputation of log pi on the stored
  transition) instead of being sampled;
- returns the log-probability of `prev_sample` under N(mu, sigma_t^2 I), **mean over the latent
  dimensions**, computed in fp32, and the predicted x0 (for CoCA's similarities);
- eta must be > 0 (eta = 0 makes sigma_t = 0 and the log-probability infinite) and a zero sigma_t is
  an error, never a silent clamp; thresholding / sample clipping are not supported (off for SD).

Why the *mean* over dimensions: with a sum over 4x64x64 = 16,384 dims the importance ratio is
exp(16384 * delta) and overflows at once; the PPO clip range (~1e-4) is tuned for the mean
(jannerm/ddpo#10). Do not change it to a sum without retuning the clip range and learning rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class DDIMStepOutput:
    prev_sample: torch.Tensor  # [B, C, H, W] x_{t_prev}, in the working dtype
    log_prob: torch.Tensor  # [B] fp32, mean over C*H*W of log N(prev_sample; mu, sigma_t^2)
    pred_original_sample: torch.Tensor  # [B, C, H, W] fp32 predicted x0
    mean: torch.Tensor  # [B, C, H, W] fp32 mu (for KL to a reference policy)
    std: torch.Tensor  # [B, 1, 1, 1] fp32 sigma_t


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] so per-sample scalars broadcast over the latent shape."""
    return values.reshape(values.shape[0], *([1] * (ndim - 1)))


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,  # [B, C, H, W] eps-hat after classifier-free guidance
    timestep: torch.Tensor,  # [B] (or scalar) integer timesteps t
    sample: torch.Tensor,  # [B, C, H, W] x_t
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,  # [B, C, H, W] given x_{t_prev} (recompute mode)
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> DDIMStepOutput:
    if scheduler.num_inference_steps is None:
        raise ValueError("scheduler.set_timesteps(num_inference_steps) must be called before stepping.")
    if eta <= 0:
        raise ValueError(
            f"eta={eta}: the DDIM log-probability needs eta > 0 (eta = 0 is deterministic and its "
            "log-probability is infinite). Use eta = 1.0 as DDPO does."
        )
    if scheduler.config.thresholding or scheduler.config.clip_sample:
        raise ValueError(
            "scheduler has thresholding/clip_sample enabled; the log-probability patch supports neither. "
            "Stable Diffusion schedulers have both off: load the scheduler with clip_sample=False."
        )
    batch = sample.shape[0]
    timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(batch).long()
    # All of the arithmetic is in fp32: log-probs and cosine credit are fp32 even under mixed precision.
    sample32 = sample.float()
    eps32 = model_output.float()

    # 1. get previous step value (=t-1)
    prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps

    # 2. compute alphas, betas
    alphas_cumprod = scheduler.alphas_cumprod.to(device=sample.device, dtype=torch.float32)
    final_alpha = torch.as_tensor(float(scheduler.final_alpha_cumprod), device=sample.device)
    alpha_prod_t = alphas_cumprod[timestep.clamp(0, len(alphas_cumprod) - 1)]
    alpha_prod_t_prev = torch.where(
        prev_timestep >= 0, alphas_cumprod[prev_timestep.clamp(min=0)], final_alpha
    )
    alpha_prod_t = _per_sample(alpha_prod_t, sample.ndim)
    alpha_prod_t_prev = _per_sample(alpha_prod_t_prev, sample.ndim)
    beta_prod_t = 1 - alpha_prod_t

    # 3. compute predicted original sample from predicted noise, "predicted x_0" of formula (12)
    #    of the DDIM paper (https://huggingface.co/papers/2010.02502)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        pred_original_sample = (sample32 - beta_prod_t.sqrt() * eps32) / alpha_prod_t.sqrt()
        pred_epsilon = eps32
    elif prediction_type == "sample":
        pred_original_sample = eps32
        pred_epsilon = (sample32 - alpha_prod_t.sqrt() * pred_original_sample) / beta_prod_t.sqrt()
    elif prediction_type == "v_prediction":
        pred_original_sample = alpha_prod_t.sqrt() * sample32 - beta_prod_t.sqrt() * eps32
        pred_epsilon = alpha_prod_t.sqrt() * eps32 + beta_prod_t.sqrt() * sample32
    else:
        raise ValueError(f"prediction_type {prediction_type!r} is not one of epsilon, sample, v_prediction")

    # 4. (thresholding / clipping of x_0: rejected above)

    # 5. compute variance: "sigma_t(eta)", formula (16):
    #    sigma_t = sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
    variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance.clamp(min=0).sqrt()
    if bool((std_dev_t <= 0).any()):
        bad = timestep[(std_dev_t.reshape(batch) <= 0)].tolist()
        raise ValueError(
            f"DDIM sigma_t is 0 at timesteps {bad}: that transition is deterministic and has no "
            "log-probability. This happens when the scheduler has set_alpha_to_one=True; load the "
            "scheduler with set_alpha_to_one=False (Stable Diffusion's default)."
        )

    # 6. compute "direction pointing to x_t" of formula (12)
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2).clamp(min=0).sqrt() * pred_epsilon

    # 7. compute x_t without "random noise" of formula (12): the mean mu of the Gaussian policy
    mean = alpha_prod_t_prev.sqrt() * pred_original_sample + pred_sample_direction

    if prev_sample is None:
        noise = _randn_like(model_output, generator)
        # The sample is stored in the working dtype exactly as fed to the next step, so the
        # training-time log-prob is computed on the very tensor the sampler produced.
        prev_sample = (mean + std_dev_t * noise.float()).to(sample.dtype)

    # 8. log pi(prev_sample | x_t): Gaussian log-density, mean over all non-batch dims. prev_sample
    #    is detached, so the gradient flows only through mu (i.e. through eps-hat).
    x_prev = prev_sample.detach().float()
    log_prob = (
        -((x_prev - mean) ** 2) / (2 * std_dev_t**2) - torch.log(std_dev_t) - LOG_SQRT_2PI
    )
    log_prob = log_prob.mean(dim=tuple(range(1, sample.ndim)))
    return DDIMStepOutput(prev_sample, log_prob, pred_original_sample, mean, std_dev_t)


def _randn_like(
    reference: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None
) -> torch.Tensor:
    """Noise in the working dtype, one generator per sample when a list is given (reproducible
    per sample regardless of batch composition; diffusers' `randn_tensor` convention)."""
    if isinstance(generator, list):
        if len(generator) != reference.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {reference.shape[0]}")
        return torch.cat(
            [
                torch.randn(reference.shape[1:], generator=g, device=g.device, dtype=reference.dtype)[None]
                for g in generator
            ]
        ).to(reference.device)
    return torch.randn(reference.shape, generator=generator, dtype=reference.dtype, device=reference.device)
