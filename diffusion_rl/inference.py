"""Loading a model or a trained run for sampling, through plain diffusers (what users do after training)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusion_rl.config import load_config
from diffusion_rl.families import family_of
from diffusion_rl.models import builtin_max_sequence_length, load_pipeline
from diffusion_rl.sampling import default_rule
from diffusion_rl.tb import image_grid


def load_for_inference(model_or_run: str) -> tuple[object, dict]:
    """A run directory (has config.yaml): its base model plus the trained LoRA (`lora/`) or denoiser (`unet/` or
    `transformer/`). Anything else is loaded as a model. Returns the pipeline and the sampling defaults (the run's,
    and always its `family`)."""
    run = Path(model_or_run)
    if (run / "config.yaml").is_file():
        cfg = load_config(run / "config.yaml")
        m, s = cfg.model, cfg.sample
        pipe = load_pipeline(m.pretrained, m.revision, m.dtype, m.local_files_only, m.seed)
        family = family_of(pipe, m.max_sequence_length or builtin_max_sequence_length(m.pretrained))
        if (run / "lora" / "pytorch_lora_weights.safetensors").is_file():
            pipe.load_lora_weights(run / "lora")
        elif (run / family.denoiser_attr / "config.json").is_file():
            trained = type(family.denoiser(pipe)).from_pretrained(run / family.denoiser_attr,
                                                                  torch_dtype=family.denoiser(pipe).dtype)
            setattr(pipe, family.denoiser_attr, trained)
        defaults = {
            "num_steps": s.num_steps, "guidance_scale": s.guidance_scale, "eta": s.eta,
            "negative_prompt": s.negative_prompt, "config": cfg, "family": family,
            "rule": default_rule(family, s.eta, s.noise_level, s.timestep_shift),
        }
        return pipe, defaults
    pipe = load_pipeline(model_or_run)
    family = family_of(pipe, builtin_max_sequence_length(model_or_run))
    return pipe, {"family": family, "rule": default_rule(family)}


@torch.no_grad()
def sample_images(
    pipe,
    prompts: list[str],
    num: int,
    out: Path,
    seed: int,
    steps: int,
    guidance_scale: float,
    negative_prompt: str = "",
    family=None,
) -> list[Path]:
    """`num` images per prompt as PNGs plus `grid.png` (one row per prompt). Returns the paths, grid last."""
    out.mkdir(parents=True, exist_ok=True)
    pipe.set_progress_bar_config(disable=True)
    paths, tensors = [], []
    for i, prompt in enumerate(prompts):
        gens = [torch.Generator().manual_seed(seed + 1000 * i + j) for j in range(num)]
        extra = {"max_sequence_length": family.max_sequence_length} if family and family.max_sequence_length else {}
        if negative_prompt and (family is None or family.name != "flux"):  # FLUX.1 has no negative prompt pass
            extra["negative_prompt"] = [negative_prompt] * num
        images = pipe(
            [prompt] * num, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gens, output_type="pt",
            **extra,
        ).images
        tensors.append(images.float().cpu())
        for j, img in enumerate(images):
            path = out / f"{i:03d}_{j:02d}.png"
            image_grid(img[None], nrow=1).save(path)
            paths.append(path)
    grid_path = out / "grid.png"
    image_grid(torch.cat(tensors), nrow=num).save(grid_path)
    return paths + [grid_path]
