"""Sampling denoising trajectories with per-step log-probs, and the training-time recomputation.

One function, `guided_noise`, computes eps-hat (classifier-free guidance) for both sampling and
training, so the recomputed log-prob of a stored transition matches the sampled one (ratio 1).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields

import torch
from diffusers import StableDiffusionPipeline

from diffusion_rl.credit import trajectory_similarities
from diffusion_rl.ddim_logprob import ddim_step_with_logprob


@dataclass
class Trajectories:
    """A batch of B trajectories of T steps, in sampling order (k = 0 is pure noise)."""

    prompt_embeds: torch.Tensor  # [B, L, D] working dtype
    negative_embeds: torch.Tensor  # [B, L, D]
    latents: torch.Tensor  # [B, T, C, h, w] x_{t_k}, the state before step k
    next_latents: torch.Tensor  # [B, T, C, h, w] x_{t_{k+1}}, the action of step k
    timesteps: torch.Tensor  # [B, T] long
    log_probs: torch.Tensor  # [B, T] fp32 log pi_old(a_k | s_k)
    # the predicted x0 of every step is reduced to these on the fly and not kept (T latents per sample at SD scale)
    similarities: torch.Tensor  # [B, T+1] fp32 cos(pred_x0_k, x_T), s_T = 1 (CoCA's input)
    images: torch.Tensor  # [B, 3, H, W] fp32 in [0, 1]

    def __len__(self) -> int:
        return self.latents.shape[0]

    @staticmethod
    def cat(parts: list[Trajectories]) -> Trajectories:
        return Trajectories(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Trajectories)})


def guided_noise(
    unet: torch.nn.Module,
    latents: torch.Tensor,  # [B, C, h, w]
    timesteps: torch.Tensor,  # [B]
    prompt_embeds: torch.Tensor,  # [B, L, D]
    negative_embeds: torch.Tensor,  # [B, L, D]
    guidance_scale: float,
) -> torch.Tensor:
    """eps-hat = eps_u + w (eps_c - eps_u), one UNet forward over the doubled [neg; prompt] batch."""
    if guidance_scale == 1.0:
        return unet(latents, timesteps, encoder_hidden_states=prompt_embeds).sample
    eps = unet(
        torch.cat([latents, latents]),
        torch.cat([timesteps, timesteps]),
        encoder_hidden_states=torch.cat([negative_embeds, prompt_embeds]),
    ).sample
    eps_uncond, eps_cond = eps.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


@torch.no_grad()
def encode_prompts(
    pipe: StableDiffusionPipeline, prompts: list[str], negative_prompt: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings [B, L, D] and the negative prompt's, computed once per batch (the negative
    prompt is one sequence, expanded over the batch)."""
    device = pipe.text_encoder.device
    pos, _ = pipe.encode_prompt(prompts, device, 1, False)
    neg, _ = pipe.encode_prompt([negative_prompt], device, 1, False)
    return pos, neg.expand(len(prompts), -1, -1)


@torch.no_grad()
def sample_trajectories(
    pipe: StableDiffusionPipeline,
    unet: torch.nn.Module,  # the (possibly accelerate-wrapped) UNet that is being trained
    prompts: list[str],
    generators: list[torch.Generator],  # one per trajectory: reproducible noise per sample
    num_steps: int,
    guidance_scale: float,
    eta: float,
    negative_prompt: str = "",
    autocast: Callable[[], AbstractContextManager] = nullcontext,  # e.g. accelerator.autocast
) -> Trajectories:
    device = pipe.vae.device
    dtype = pipe.unet.dtype
    scheduler = pipe.scheduler
    scheduler.set_timesteps(num_steps, device=device)
    prompt_embeds, negative_embeds = encode_prompts(pipe, prompts, negative_prompt)
    batch = len(prompts)
    latent_shape = (
        pipe.unet.config.in_channels,
        pipe.unet.config.sample_size,
        pipe.unet.config.sample_size,
    )
    # Initial noise in the working dtype, from each sample's own generator (diffusers pitfall:
    # fp32 noise cast to bf16 differs per element and the difference compounds over steps).
    x = torch.stack([torch.randn(latent_shape, generator=g, dtype=dtype) for g in generators]).to(device)
    x = x * scheduler.init_noise_sigma
    latents, next_latents, log_probs, pred_x0 = [], [], [], []
    for t in scheduler.timesteps:
        t_batch = t.expand(batch).to(device)
        with autocast():
            eps = guided_noise(unet, x, t_batch, prompt_embeds, negative_embeds, guidance_scale)
        out = ddim_step_with_logprob(scheduler, eps, t_batch, x, eta=eta, generator=generators)
        latents.append(x)
        next_latents.append(out.prev_sample)
        log_probs.append(out.log_prob)
        pred_x0.append(out.pred_original_sample)
        x = out.prev_sample
    images = decode_latents(pipe, x)
    similarities = trajectory_similarities(torch.stack(pred_x0, dim=1), x)  # [B, T+1] from [B, T, C, h, w]
    return Trajectories(
        prompt_embeds=prompt_embeds,
        negative_embeds=negative_embeds,
        latents=torch.stack(latents, dim=1),
        next_latents=torch.stack(next_latents, dim=1),
        timesteps=scheduler.timesteps.to(device).long()[None].expand(batch, -1).clone(),
        log_probs=torch.stack(log_probs, dim=1),
        similarities=similarities,
        images=images,
    )


@torch.no_grad()
def decode_latents(pipe: StableDiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode final latents to fp32 images in [0, 1], [B, 3, H, W]."""
    vae = pipe.vae
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def recompute_log_prob(
    pipe: StableDiffusionPipeline,
    unet: torch.nn.Module,
    latents: torch.Tensor,  # [B, C, h, w] stored x_{t_k}
    next_latents: torch.Tensor,  # [B, C, h, w] stored x_{t_{k+1}}
    timesteps: torch.Tensor,  # [B] (may differ per sample after the time shuffle)
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    guidance_scale: float,
    eta: float,
):
    """Training forward: log pi_theta of the stored transitions (with grad), fp32. Returns the step output."""
    eps = guided_noise(unet, latents, timesteps, prompt_embeds, negative_embeds, guidance_scale)
    return ddim_step_with_logprob(pipe.scheduler, eps, timesteps, latents, eta=eta, prev_sample=next_latents)
