"""Sampling denoising trajectories with per-step log-probs, and the training-time recomputation.

Two pieces make a pipeline an MDP: its *family* (diffusion_rl.families: prompt encoding, the guided model call,
latent layout, decoding) and a *step rule*: the DDIM step of SD / SDXL (diffusion_rl.ddim_logprob) or the
Flow-GRPO SDE step of rectified-flow models (diffusion_rl.flow_logprob). The same `predict` and `step` run at
sampling and at training time, so the recomputed log-prob of a stored transition matches the sampled one (ratio 1).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields

import torch

from diffusion_rl.credit import trajectory_similarities
from diffusion_rl.ddim_logprob import DDIMStepOutput, ddim_step_with_logprob
from diffusion_rl.families import Family, family_of, flow_sigma_schedule
from diffusion_rl.flow_logprob import flow_sde_step_with_logprob


@dataclass
class Trajectories:
    """A batch of B trajectories of T steps, in sampling order (k = 0 is pure noise)."""

    cond: dict[str, torch.Tensor]  # the family's per-sample conditioning, each [B, ...] (prompt embeds, pooled, ...)
    latents: torch.Tensor  # [B, T, *latent] x_{t_k}, the state before step k
    next_latents: torch.Tensor  # [B, T, *latent] x_{t_{k+1}}, the action of step k
    timesteps: torch.Tensor  # [B, T] DDIM: integer timesteps (long); flow: sigmas (fp32)
    next_timesteps: torch.Tensor  # [B, T] the timestep / sigma after step k
    log_probs: torch.Tensor  # [B, T] fp32 log pi_old(a_k | s_k); 0 at deterministic (ODE) steps
    # the predicted x0 of every step is reduced to these on the fly and not kept (T latents per sample at SD scale)
    similarities: torch.Tensor  # [B, T+1] fp32 cos(pred_x0_k, x_T), s_T = 1 (CoCA's input)
    images: torch.Tensor  # [B, 3, H, W] fp32 in [0, 1]

    def __len__(self) -> int:
        return self.latents.shape[0]

    @staticmethod
    def cat(parts: list[Trajectories]) -> Trajectories:
        out = {f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Trajectories) if f.name != "cond"}
        cond = {k: torch.cat([p.cond[k] for p in parts]) for k in parts[0].cond}
        return Trajectories(cond=cond, **out)


# ---------------------------------------------------------------------------------------------------------
# step rules


class DDIMRule:
    """DDPO's policy: the DDIM step with eta > 0 (SD 1.x / 2.x, SDXL)."""

    kind = "ddim"

    def __init__(self, eta: float = 1.0):
        self.eta = eta

    def schedule(self, pipe, family: Family, num_steps: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps [T] and the timestep after each [T] (-stride after the last)."""
        scheduler = pipe.scheduler
        scheduler.set_timesteps(num_steps, device=device)
        t = scheduler.timesteps.to(device).long()
        return t, t - scheduler.config.num_train_timesteps // num_steps

    def step(self, pipe, model_output, t, t_next, x, prev_sample=None, generator=None, stochastic=True) -> DDIMStepOutput:
        if not stochastic:
            raise ValueError("the DDIM policy has no deterministic steps (sample.sde_window_size is for flow models)")
        return ddim_step_with_logprob(pipe.scheduler, model_output, t, x, eta=self.eta, prev_sample=prev_sample,
                                      generator=generator)


class FlowRule:
    """Flow-GRPO's policy on rectified-flow models: the SDE step with noise level a; deterministic (ODE) steps
    where `stochastic` is False (Flow-GRPO-Fast / MixGRPO windows) and for evaluation."""

    kind = "flow"

    def __init__(self, noise_level: float = 0.7, shift: float | None = None):
        self.noise_level, self.shift = noise_level, shift
        self.sigma_cap: float | None = None  # the schedule's second sigma, set by schedule()

    def schedule(self, pipe, family: Family, num_steps: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        sigmas = flow_sigma_schedule(pipe, family, num_steps, device, self.shift)  # [T+1]
        self.sigma_cap = float(sigmas[1]) if num_steps > 1 else 0.99
        return sigmas[:-1], sigmas[1:]

    def step(self, pipe, model_output, t, t_next, x, prev_sample=None, generator=None, stochastic=True) -> DDIMStepOutput:
        # the cap of the schedule sampled last (the scheduler keeps it, as DDIM's keeps num_inference_steps)
        cap = self.sigma_cap if self.sigma_cap is not None else float(pipe.scheduler.sigmas[1])
        return flow_sde_step_with_logprob(model_output, t, t_next, x, self.noise_level if stochastic else 0.0,
                                          cap, prev_sample=prev_sample, generator=generator)


def default_rule(family: Family, eta: float = 1.0, noise_level: float = 0.7, shift: float | None = None):
    return DDIMRule(eta) if family.mdp == "ddim" else FlowRule(noise_level, shift)


# ---------------------------------------------------------------------------------------------------------
# sampling


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], negative_prompt: str, family: Family | None = None) -> dict[str, torch.Tensor]:
    """The family's conditioning of a batch of prompts (each entry [B, ...]), computed once per batch."""
    return (family or family_of(pipe)).encode(pipe, prompts, negative_prompt)


def guided_noise(pipe, denoiser, latents, timesteps, cond, guidance_scale, family: Family | None = None) -> torch.Tensor:
    """The guided model output (eps-hat for DDIM families, velocity for flow) [B, *latent]: one forward over the
    doubled [negative; prompt] batch for classifier-free guidance."""
    return (family or family_of(pipe)).predict(pipe, denoiser, latents, timesteps, cond, guidance_scale)


@torch.no_grad()
def sample_trajectories(
    pipe,
    denoiser: torch.nn.Module,  # the (possibly accelerate-wrapped) UNet / transformer that is being trained
    prompts: list[str],
    generators: list[torch.Generator],  # one per trajectory: reproducible noise per sample
    num_steps: int,
    guidance_scale: float,
    eta: float,
    negative_prompt: str = "",
    autocast: Callable[[], AbstractContextManager] = nullcontext,  # e.g. accelerator.autocast
    *,
    family: Family | None = None,
    rule: DDIMRule | FlowRule | None = None,  # default: DDIM with `eta`, or Flow-GRPO's SDE at noise level 0.7
    stochastic_steps: torch.Tensor | None = None,  # [T] bool: False = an ODE step (flow only); default all True
) -> Trajectories:
    family = family or family_of(pipe)
    rule = rule or default_rule(family, eta)
    device = pipe.vae.device
    dtype = family.denoiser(pipe).dtype
    timesteps, next_timesteps = rule.schedule(pipe, family, num_steps, device)  # [T], [T]
    stochastic = torch.ones(num_steps, dtype=torch.bool) if stochastic_steps is None else stochastic_steps
    cond = encode_prompts(pipe, prompts, negative_prompt, family)
    batch = len(prompts)
    x = family.initial_noise(pipe, generators, dtype).to(device)  # [B, *latent]
    if rule.kind == "ddim":
        x = x * pipe.scheduler.init_noise_sigma
    latents, next_latents, log_probs, pred_x0 = [], [], [], []
    for k in range(num_steps):
        t, t_next = timesteps[k].expand(batch), next_timesteps[k].expand(batch)
        with autocast():
            out_model = guided_noise(pipe, denoiser, x, t, cond, guidance_scale, family)
        out = rule.step(pipe, out_model, t, t_next, x, generator=generators, stochastic=bool(stochastic[k]))
        latents.append(x)
        next_latents.append(out.prev_sample)
        log_probs.append(out.log_prob)
        pred_x0.append(out.pred_original_sample)
        x = out.prev_sample
    images = family.decode(pipe, x)
    similarities = trajectory_similarities(torch.stack(pred_x0, dim=1), x)  # [B, T+1] from [B, T, *latent]
    return Trajectories(
        cond=cond,
        latents=torch.stack(latents, dim=1),
        next_latents=torch.stack(next_latents, dim=1),
        timesteps=timesteps[None].expand(batch, -1).clone(),
        next_timesteps=next_timesteps[None].expand(batch, -1).clone(),
        log_probs=torch.stack(log_probs, dim=1),
        similarities=similarities,
        images=images,
    )


def recompute_log_prob(
    pipe,
    denoiser: torch.nn.Module,
    latents: torch.Tensor,  # [B, *latent] stored x_{t_k}
    next_latents: torch.Tensor,  # [B, *latent] stored x_{t_{k+1}}
    timesteps: torch.Tensor,  # [B] (may differ per sample after the time shuffle)
    cond: dict[str, torch.Tensor],  # [B, ...] each
    guidance_scale: float,
    eta: float,
    *,
    next_timesteps: torch.Tensor | None = None,  # [B] needed by flow rules
    family: Family | None = None,
    rule: DDIMRule | FlowRule | None = None,
):
    """Training forward: log pi_theta of the stored transitions (with grad), fp32. Returns the step output."""
    family = family or family_of(pipe)
    rule = rule or default_rule(family, eta)
    if rule.kind == "flow" and next_timesteps is None:
        raise ValueError("recompute_log_prob on a flow model needs next_timesteps (the sigma after each step)")
    out_model = guided_noise(pipe, denoiser, latents, timesteps, cond, guidance_scale, family)
    return rule.step(pipe, out_model, timesteps, next_timesteps, latents, prev_sample=next_latents)
