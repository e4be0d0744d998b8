"""Model families the diffusion trainer drives: how each diffusers pipeline encodes prompts, calls its denoiser
(with classifier-free or embedded guidance), lays out and decodes latents, and saves LoRA weights.

    sd    StableDiffusionPipeline      UNet, eps-prediction, the DDIM MDP   (SD 1.x / 2.x)
    sdxl  StableDiffusionXLPipeline    UNet + pooled text embeds + added time ids, the DDIM MDP
    sd3   StableDiffusion3Pipeline     MMDiT transformer, rectified flow (the Flow-GRPO SDE MDP), CLIP x2 (+T5), pooled
    flux  FluxPipeline                 MMDiT transformer on packed 2x2 latents, rectified flow, T5 + CLIP pooled,
                                       guidance embedding (FLUX.1-dev) instead of classifier-free guidance

Conditioning is a dict of per-sample tensors ([B, ...]), so the trainer shuffles and slices it like the latents.
Model code only: knows nothing of the CLI, the trainer loop or rewards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

Cond = dict[str, torch.Tensor]


@dataclass
class Family:
    """The behaviour the sampler and trainer need from a pipeline; one subclass per family."""

    name: ClassVar[str]
    mdp: ClassVar[str]  # "ddim" | "flow"
    denoiser_attr: ClassVar[str]  # "unet" | "transformer"
    lora_prefix: ClassVar[str]  # the save_lora_weights keyword: unet_lora_layers / transformer_lora_layers
    max_sequence_length: int | None = None  # T5 tokens (sd3, flux)

    # ---- components ------------------------------------------------------------------------------------
    def denoiser(self, pipe) -> torch.nn.Module:
        return getattr(pipe, self.denoiser_attr)

    def frozen_modules(self, pipe) -> list[torch.nn.Module]:
        """Everything but the denoiser (VAE and text encoders), frozen during RL."""
        names = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "image_encoder")
        return [m for n in names if (m := getattr(pipe, n, None)) is not None]

    # ---- conditioning and the model call ------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, pipe, prompts: list[str], negative_prompt: str) -> Cond:
        raise NotImplementedError

    def predict(self, pipe, denoiser, latents, timesteps, cond: Cond, guidance_scale: float) -> torch.Tensor:
        """The guided model output (eps for DDIM families, velocity for flow families), [B, ...] like latents."""
        raise NotImplementedError

    # ---- latents -------------------------------------------------------------------------------------------
    def latent_shape(self, pipe) -> tuple[int, ...]:
        """Shape of one sample's latent as the sampler carries it (packed for FLUX)."""
        raise NotImplementedError

    def initial_noise(self, pipe, generators: list[torch.Generator], dtype: torch.dtype) -> torch.Tensor:
        # each sample's own generator, in the working dtype (fp32 noise cast to bf16 differs per element)
        shape = self.latent_shape(pipe)
        return torch.stack([torch.randn(shape, generator=g, dtype=dtype) for g in generators])

    @torch.no_grad()
    def decode(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        """Final latents -> fp32 images in [0, 1], [B, 3, H, W]."""
        vae = pipe.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        return (vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1)

    # ---- saving --------------------------------------------------------------------------------------------
    def save_lora(self, pipe_class, denoiser, out_dir: Path, state_dict: dict | None = None,
                  text_encoder: torch.nn.Module | None = None) -> None:
        """A directory that the plain diffusers pipeline's `load_lora_weights(dir)` loads (with the text encoder's
        adapter when `text_encoder` is given)."""
        from peft.utils import get_peft_model_state_dict

        # peft's own key names (lora_A / lora_B), which diffusers loads for Linear and Conv2d alike; the adapter
        # metadata carries rank and alpha, so the loaded scaling is alpha / rank as trained.
        layers = {f"{self.lora_prefix}_lora_layers": get_peft_model_state_dict(denoiser, state_dict=state_dict),
                  f"{self.lora_prefix}_lora_adapter_metadata": denoiser.peft_config["default"].to_dict()}
        if text_encoder is not None:
            layers["text_encoder_lora_layers"] = get_peft_model_state_dict(text_encoder)
            layers["text_encoder_lora_adapter_metadata"] = text_encoder.peft_config["default"].to_dict()
        pipe_class.save_lora_weights(out_dir, **layers, safe_serialization=True)


def text_encoder_trains(pipe) -> bool:
    """Does the pipeline's text encoder carry a trainable adapter (model.text_encoder_lora_rank)?"""
    encoder = getattr(pipe, "text_encoder", None)
    return encoder is not None and any(p.requires_grad for p in encoder.parameters())


def _cfg(forward, latents, timesteps, cond: Cond, guidance_scale: float, keys: dict[str, str]) -> torch.Tensor:
    """out_u + w (out_c - out_u) from one forward over the doubled [negative; prompt] batch (or the prompt
    batch alone at w = 1). `keys` maps a forward keyword to the cond entry; its negative is `negative_<entry>`."""
    if guidance_scale == 1.0:
        return forward(latents, timesteps, **{k: cond[v] for k, v in keys.items()})
    doubled = {k: torch.cat([cond[f"negative_{v}"], cond[v]]) for k, v in keys.items()}
    out = forward(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), **doubled)
    out_uncond, out_cond = out.chunk(2)
    return out_uncond + guidance_scale * (out_cond - out_uncond)


class SD(Family):
    name, mdp, denoiser_attr, lora_prefix = "sd", "ddim", "unet", "unet"

    @torch.no_grad()
    def encode(self, pipe, prompts, negative_prompt):
        device = pipe.text_encoder.device
        pos, _ = pipe.encode_prompt(prompts, device, 1, False)
        neg, _ = pipe.encode_prompt([negative_prompt], device, 1, False)  # one sequence, expanded over the batch
        cond = {"embeds": pos, "negative_embeds": neg.expand(len(prompts), -1, -1)}
        if text_encoder_trains(pipe):  # keep the tokens: the training forward encodes them again, with grad
            cond["ids"], cond["negative_ids"] = self._token_ids(pipe, prompts), self._token_ids(pipe, [negative_prompt])
            cond["negative_ids"] = cond["negative_ids"].expand(len(prompts), -1)
        return cond

    @staticmethod
    def _token_ids(pipe, prompts: list[str]) -> torch.Tensor:
        """[B, L] the token ids `encode_prompt` feeds the text encoder (padded to the tokenizer's max length)."""
        return pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(pipe.text_encoder.device)

    def predict(self, pipe, denoiser, latents, timesteps, cond, guidance_scale):
        def forward(x, t, encoder_hidden_states):
            return denoiser(x, t, encoder_hidden_states=encoder_hidden_states).sample

        if "ids" in cond and torch.is_grad_enabled():
            # text-encoder LoRA: the policy's conditioning is a function of the trained adapter, so the training
            # forward encodes the prompts again (the stored embeds are those of the weights that sampled)
            encode = pipe.text_encoder
            cond = {"embeds": encode(cond["ids"])[0], "negative_embeds": encode(cond["negative_ids"])[0]}
        return _cfg(forward, latents, timesteps, cond, guidance_scale, {"encoder_hidden_states": "embeds"})

    def latent_shape(self, pipe):
        c = pipe.unet.config
        return (c.in_channels, c.sample_size, c.sample_size)


class SDXL(SD):
    name = "sdxl"

    @torch.no_grad()
    def encode(self, pipe, prompts, negative_prompt):
        device = pipe.unet.device
        b = len(prompts)
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=[negative_prompt] * b,
        )
        size = 8 * pipe.unet.config.sample_size  # the image side the UNet's latents decode to
        projection = pipe.text_encoder_2.config.projection_dim
        time_ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), dtype=pos.dtype,
                                          text_encoder_projection_dim=projection).to(device)
        return {"embeds": pos, "negative_embeds": neg, "pooled": pooled, "negative_pooled": neg_pooled,
                "time_ids": time_ids.expand(b, -1), "negative_time_ids": time_ids.expand(b, -1)}

    def predict(self, pipe, denoiser, latents, timesteps, cond, guidance_scale):
        def forward(x, t, encoder_hidden_states, text_embeds, time_ids):
            return denoiser(x, t, encoder_hidden_states=encoder_hidden_states,
                            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample

        keys = {"encoder_hidden_states": "embeds", "text_embeds": "pooled", "time_ids": "time_ids"}
        return _cfg(forward, latents, timesteps, cond, guidance_scale, keys)


class SD3(Family):
    name, mdp, denoiser_attr, lora_prefix = "sd3", "flow", "transformer", "transformer"

    @torch.no_grad()
    def encode(self, pipe, prompts, negative_prompt):
        b = len(prompts)
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompts, None, None, device=pipe.transformer.device, num_images_per_prompt=1,
            do_classifier_free_guidance=True, negative_prompt=[negative_prompt] * b,
            max_sequence_length=self.max_sequence_length or 256,
        )
        return {"embeds": pos, "negative_embeds": neg, "pooled": pooled, "negative_pooled": neg_pooled}

    def predict(self, pipe, denoiser, latents, timesteps, cond, guidance_scale):
        # timesteps are sigmas in (0, 1]; the transformer takes sigma * num_train_timesteps
        scale = pipe.scheduler.config.num_train_timesteps

        def forward(x, sigma, encoder_hidden_states, pooled_projections):
            return denoiser(hidden_states=x, timestep=sigma * scale, encoder_hidden_states=encoder_hidden_states,
                            pooled_projections=pooled_projections).sample

        keys = {"encoder_hidden_states": "embeds", "pooled_projections": "pooled"}
        return _cfg(forward, latents, timesteps, cond, guidance_scale, keys)

    def latent_shape(self, pipe):
        c = pipe.transformer.config
        return (c.in_channels, c.sample_size, c.sample_size)


class Flux(Family):
    """FLUX.1: 2x2 latent patches packed into tokens; FLUX.1-dev is guidance-distilled (the guidance scale is an
    input of the transformer, no negative pass), FLUX.1-schnell has no guidance input at all."""

    name, mdp, denoiser_attr, lora_prefix = "flux", "flow", "transformer", "transformer"

    def _latent_hw(self, pipe) -> int:
        """Unpacked latent side: the VAE's sample size over its downscale factor, rounded to the 2x2 packing."""
        side = pipe.vae.config.sample_size // pipe.vae_scale_factor
        return 2 * (side // 2)

    @torch.no_grad()
    def encode(self, pipe, prompts, negative_prompt):
        embeds, pooled, _ = pipe.encode_prompt(prompts, None, device=pipe.transformer.device, num_images_per_prompt=1,
                                               max_sequence_length=self.max_sequence_length or 512)
        return {"embeds": embeds, "pooled": pooled}

    def predict(self, pipe, denoiser, latents, timesteps, cond, guidance_scale):
        b, side = latents.shape[0], self._latent_hw(pipe)
        device, dtype = latents.device, cond["embeds"].dtype
        img_ids = pipe._prepare_latent_image_ids(b, side // 2, side // 2, device, dtype)
        txt_ids = torch.zeros(cond["embeds"].shape[1], 3, device=device, dtype=dtype)
        guidance = (torch.full((b,), guidance_scale, device=device, dtype=torch.float32)
                    if denoiser.config.guidance_embeds else None)
        return denoiser(hidden_states=latents, timestep=timesteps, guidance=guidance, pooled_projections=cond["pooled"],
                        encoder_hidden_states=cond["embeds"], txt_ids=txt_ids, img_ids=img_ids).sample

    def latent_shape(self, pipe):
        c, side = pipe.transformer.config.in_channels // 4, self._latent_hw(pipe)
        return ((side // 2) * (side // 2), c * 4)

    def initial_noise(self, pipe, generators, dtype):
        # the unpacked [C, h, w] noise of each generator, then packed, as FluxPipeline.prepare_latents does
        c, side = pipe.transformer.config.in_channels // 4, self._latent_hw(pipe)
        noise = torch.stack([torch.randn((c, side, side), generator=g, dtype=dtype) for g in generators])
        return pipe._pack_latents(noise, len(generators), c, side, side)

    @torch.no_grad()
    def decode(self, pipe, latents):
        side = self._latent_hw(pipe) * pipe.vae_scale_factor
        return super().decode(pipe, pipe._unpack_latents(latents, side, side, pipe.vae_scale_factor))

    def flow_shift_mu(self, pipe) -> float | None:
        """FLUX's resolution-dependent timestep shift (use_dynamic_shifting): mu from the image token count."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = pipe.scheduler.config
        if not c.use_dynamic_shifting:
            return None
        tokens = self.latent_shape(pipe)[0]
        return calculate_shift(tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                               c.get("base_shift", 0.5), c.get("max_shift", 1.15))


FAMILIES: dict[str, type[Family]] = {"sd": SD, "sdxl": SDXL, "sd3": SD3, "flux": Flux}
PIPELINE_FAMILY = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}


def family_name_of(pipe_or_class_name) -> str:
    name = pipe_or_class_name if isinstance(pipe_or_class_name, str) else type(pipe_or_class_name).__name__
    if name not in PIPELINE_FAMILY:
        raise ValueError(f"pipeline class {name!r} is not supported; drl trains {sorted(PIPELINE_FAMILY)}")
    return PIPELINE_FAMILY[name]


def family_of(pipe, max_sequence_length: int | None = None) -> Family:
    fam = FAMILIES[family_name_of(pipe)]()
    fam.max_sequence_length = max_sequence_length
    return fam


def flow_sigma_schedule(pipe, family: Family, num_steps: int, device, shift: float | None = None) -> torch.Tensor:
    """The flow sampler's sigmas [T+1] (terminal 0 appended), as the pipeline's own scheduler computes them, with an
    optional static timestep `shift` overriding the scheduler's (SD3: 3.0)."""
    import numpy as np

    scheduler = pipe.scheduler
    if shift is not None:
        if scheduler.config.use_dynamic_shifting:
            raise ValueError(f"sample.timestep_shift={shift}: this scheduler shifts by resolution "
                             "(use_dynamic_shifting, FLUX); leave sample.timestep_shift unset")
        scheduler.set_shift(shift)
    mu = family.flow_shift_mu(pipe) if isinstance(family, Flux) else None
    if mu is not None:  # FluxPipeline's own schedule: linear sigmas 1 -> 1/T, shifted by mu
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), device=device, mu=mu)
    else:
        scheduler.set_timesteps(num_steps, device=device)
    sigmas = scheduler.sigmas.to(device=device, dtype=torch.float32)
    if not math.isclose(float(sigmas[-1]), 0.0, abs_tol=1e-6):
        raise ValueError(f"the flow schedule must end at sigma 0, got {float(sigmas[-1])}")
    return sigmas
