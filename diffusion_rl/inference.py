"""Loading a model or a trained run for sampling, through plain diffusers (what users do after training)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from diffusion_rl.config import load_config
from diffusion_rl.models import load_pipeline
from diffusion_rl.tb import image_grid


def load_for_inference(model_or_run: str) -> tuple[StableDiffusionPipeline, dict]:
    """A run directory (has config.yaml): its base model plus the trained LoRA (`lora/`) or UNet (`unet/`).
    Anything else is loaded as a model. Returns the pipeline and the run's sampling defaults."""
    run = Path(model_or_run)
    if (run / "config.yaml").is_file():
        cfg = load_config(run / "config.yaml")
        m = cfg.model
        pipe = load_pipeline(m.pretrained, m.revision, m.dtype, m.local_files_only, m.seed)
        if (run / "lora" / "pytorch_lora_weights.safetensors").is_file():
            pipe.load_lora_weights(run / "lora")
        elif (run / "unet" / "config.json").is_file():
            pipe.unet = UNet2DConditionModel.from_pretrained(run / "unet", torch_dtype=pipe.unet.dtype)
        defaults = {
            "num_steps": cfg.sample.num_steps, "guidance_scale": cfg.sample.guidance_scale, "eta": cfg.sample.eta,
            "negative_prompt": cfg.sample.negative_prompt, "config": cfg,
        }
        return pipe, defaults
    return load_pipeline(model_or_run), {}


@torch.no_grad()
def sample_images(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    num: int,
    out: Path,
    seed: int,
    steps: int,
    guidance_scale: float,
    negative_prompt: str = "",
) -> list[Path]:
    """`num` images per prompt as PNGs plus `grid.png` (one row per prompt). Returns the paths, grid last."""
    out.mkdir(parents=True, exist_ok=True)
    pipe.set_progress_bar_config(disable=True)
    paths, tensors = [], []
    for i, prompt in enumerate(prompts):
        gens = [torch.Generator().manual_seed(seed + 1000 * i + j) for j in range(num)]
        images = pipe(
            [prompt] * num, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gens, output_type="pt",
            negative_prompt=[negative_prompt] * num if negative_prompt else None,
        ).images
        tensors.append(images.float().cpu())
        for j, img in enumerate(images):
            path = out / f"{i:03d}_{j:02d}.png"
            image_grid(img[None], nrow=1).save(path)
            paths.append(path)
    grid_path = out / "grid.png"
    image_grid(torch.cat(tensors), nrow=num).save(grid_path)
    return paths + [grid_path]
