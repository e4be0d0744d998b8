"""Train the tiny shapes-world text-to-image model from scratch and save it as a StableDiffusionPipeline.

    python -m diffusion_rl.world.pretrain --out diffusion_rl/assets/tiny-shapes

Three phases, all on CPU, deterministic for a given seed and step budget:

1. VAE (AutoencoderKL, 32x32x3 <-> 16x16x4): reconstruction MSE + a tiny KL term. Before moving
   on, reconstructions of fresh renders are read back with the alignment checker; training goes on
   in chunks until they score ``--vae-min-score`` (MSE alone can look fine while shapes are lost).
2. Latents: encode ``--n-images`` renders once (posterior mean) and scale them to unit std; the
   scale is stored as the VAE's ``scaling_factor``.
3. UNet + CLIP text encoder: epsilon-prediction MSE at uniform timesteps of a 1000-step
   scaled-linear DDPM schedule, 10 % of captions dropped to "" (the pipeline's negative prompt),
   AdamW with warm-up and cosine decay, gradient clipping, EMA weights (those are saved).

The saved pipeline samples with DDIM (``timestep_spacing="trailing"``); the script reports its
alignment on the held-out eval prompts (guidance 4, 20 steps) and the sampling time per image.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffusion_rl.world import shapes
from diffusion_rl.world.tokenizer import MODEL_MAX_LENGTH, build_tokenizer
from rewards.shapes_alignment import make_shapes_alignment_reward

SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


# ---------------------------------------------------------------------------------------------------------
# models


def build_vae() -> AutoencoderKL:
    """32x32x3 -> 16x16x4: two encoder blocks (32, 64 channels), one downsampling, no mid attention."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        sample_size=shapes.IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A 2-layer, 64-wide CLIP text transformer; it pools at the tokenizer's eos id."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MODEL_MAX_LENGTH,
        projection_dim=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet() -> UNet2DConditionModel:
    """16x16x4 latents; cross-attention at 32 channels (16x16), mid block and 32 channels on the way up.

    ``attention_head_dim`` is, despite its name, the number of heads in diffusers: keep it small."""
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=2,
    )


def sampling_scheduler() -> DDIMScheduler:
    """DDIM over the training schedule; "trailing" spacing so 20 steps start at t = 999, not 951."""
    return DDIMScheduler(
        **SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing"
    )


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------------
# helpers


def to_model_range(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 [N,32,32,3] -> float [N,3,32,32] in [-1, 1]."""
    return torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(-1, 1) + 1) / 2


def lr_factor(step: float, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``floor`` of the peak at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of a module's parameters, with the usual (1 + n) / (10 + n) warm-up."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay, self.updates = decay, 0
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow.parameters(), module.parameters(), strict=True):
            s.lerp_(p.detach(), 1 - d)


def log(msg: str, t0: float) -> None:
    print(f"[{(time.time() - t0) / 60:6.2f} min] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------
# phase 1: VAE


def train_vae(vae: AutoencoderKL, args: argparse.Namespace, t0: float) -> dict:
    reward = make_shapes_alignment_reward("partial")
    images, _ = shapes.render_arrays(args.vae_images, seed=args.seed + 101)
    x_all = to_model_range(images)  # [N,3,32,32]
    check_images, check_prompts = shapes.render_arrays(512, seed=args.seed + 202)
    check_x = to_model_range(check_images)
    g = torch.Generator().manual_seed(args.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    step, score, history = 0, 0.0, []
    while True:
        vae.train()
        chunk_end = args.vae_steps if step < args.vae_steps else step + args.vae_chunk
        while step < chunk_end:
            idx = torch.randint(0, len(x_all), (args.vae_batch,), generator=g)
            x = x_all[idx]
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
            recon = vae.decode(z).sample
            mse = F.mse_loss(recon, x)
            kl = posterior.kl().mean() / x[0].numel()  # per pixel, like the MSE
            loss = mse + args.kl_weight * kl
            for group in opt.param_groups:
                group["lr"] = args.vae_lr * min(1.0, (step + 1) / 50)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            step += 1
            if step % args.log_every == 0:
                log(f"vae step {step:5d}  mse {mse.item():.5f}  kl/px {kl.item():.3f}", t0)
        # read reconstructions back with the checker: shapes must survive the round trip
        vae.eval()
        with torch.no_grad():
            recon = torch.cat([vae.decode(vae.encode(c).latent_dist.mean).sample for c in check_x.split(128)])
        _, info = reward(to_unit_range(recon), check_prompts, None)
        score = info["partial"]
        history.append({"step": step, "partial": score, "strict": info["strict"]})
        log(f"vae check at step {step}: reconstructions score partial {score:.4f} strict {info['strict']:.4f}", t0)
        if score >= args.vae_min_score or step >= args.vae_max_steps:
            break
    return {"steps": step, "checks": history}


# ---------------------------------------------------------------------------------------------------------
# phase 3 helpers: sampling and scoring


@torch.no_grad()
def evaluate(pipe: StableDiffusionPipeline, prompts: list[str], args: argparse.Namespace) -> dict:
    """Alignment of one sample per prompt (fixed seed, guidance ``args.guidance``, ``args.eval_steps`` DDIM)."""
    reward = make_shapes_alignment_reward("partial")
    t = time.time()
    images = []
    for i in range(0, len(prompts), 64):
        out = pipe(
            prompts[i : i + 64],
            num_inference_steps=args.eval_steps,
            guidance_scale=args.guidance,
            generator=torch.Generator().manual_seed(args.seed + i),
            output_type="pt",
        )
        images.append(out.images)
    seconds = time.time() - t
    _, info = reward(torch.cat(images), prompts, None)
    keys = ("partial", "strict", "colour_acc", "shape_acc", "count_acc", "relation_acc")
    return {**{k: round(float(info[k]), 4) for k in keys}, "s_per_image": round(seconds / len(prompts), 4)}


def make_pipeline(vae, text_encoder, tokenizer, unet) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m diffusion_rl.world.pretrain",
        description="Train the tiny shapes-world StableDiffusionPipeline from scratch on CPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output directory (StableDiffusionPipeline.save_pretrained)")
    p.add_argument("--seed", type=int, default=0, help="init, data order and noise (the prompt split is fixed)")
    p.add_argument("--init-from", default=None,
                   help="continue from a saved pipeline directory: skip the VAE phase, keep its latent scale, "
                        "train its UNet + text encoder further (fresh optimizer, warm-up and schedule)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--max-minutes", type=float, default=55.0,
                   help="wall-clock cap for the whole run; UNet training stops early when reached")
    g = p.add_argument_group("VAE")
    g.add_argument("--vae-images", type=int, default=8000, help="renders the VAE trains on")
    g.add_argument("--vae-steps", type=int, default=400)
    g.add_argument("--vae-chunk", type=int, default=200, help="extra steps per failed checker test")
    g.add_argument("--vae-max-steps", type=int, default=1200)
    g.add_argument("--vae-batch", type=int, default=16)
    g.add_argument("--vae-lr", type=float, default=1e-3)
    g.add_argument("--kl-weight", type=float, default=1e-5, help="weight of the per-pixel KL term")
    g.add_argument("--vae-min-score", type=float, default=0.99, help="checker partial score on reconstructions")
    g = p.add_argument_group("UNet + text encoder")
    g.add_argument("--n-images", type=int, default=40000, help="renders encoded once to latents")
    g.add_argument("--unet-steps", type=int, default=3000, help="step budget (sets the LR schedule)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--warmup", type=int, default=200)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--ema-decay", type=float, default=0.999)
    g.add_argument("--caption-dropout", type=float, default=0.1)
    g = p.add_argument_group("evaluation / logging")
    g.add_argument("--eval-every", type=int, default=1000, help="UNet steps between evals+checkpoints (0: only at the end)")
    g.add_argument("--guidance", type=float, default=4.0)
    g.add_argument("--eval-steps", type=int, default=20, help="DDIM steps")
    g.add_argument("--log-every", type=int, default=50)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.init_from:  # continue from a saved pipeline: keep its VAE and latent scale, train on
        start = StableDiffusionPipeline.from_pretrained(args.init_from)
        tokenizer, vae, text_encoder, unet = build_tokenizer(), start.vae, start.text_encoder, start.unet
        vae.eval().requires_grad_(False)
        del start
    else:
        tokenizer = build_tokenizer()
        vae, text_encoder, unet = build_vae(), build_text_encoder(tokenizer), build_unet()
    train_prompts, eval_prompts = shapes.split_prompts()  # the world's fixed split, whatever the training seed
    log(f"world: {len(train_prompts)} train prompts, {len(eval_prompts)} eval prompts, {shapes.IMAGE_SIZE}px images", t0)
    log(f"tokenizer: {len(tokenizer)} tokens, max length {tokenizer.model_max_length}", t0)
    log(f"params: vae {n_params(vae) / 1e6:.3f}M  text encoder {n_params(text_encoder) / 1e6:.3f}M  "
        f"unet {n_params(unet) / 1e6:.3f}M", t0)
    log(f"unet: {args.unet_steps} steps x batch {args.batch_size} = {args.unet_steps * args.batch_size / args.n_images:.2f} "
        f"epochs over {args.n_images} latents; cap {args.max_minutes} min for the whole run", t0)

    # ---- phase 1: VAE -----------------------------------------------------------------------------------
    vae_report = {"init_from": args.init_from} if args.init_from else train_vae(vae, args, t0)
    vae.eval().requires_grad_(False)

    # ---- phase 2: latents, scaled to unit std ---------------------------------------------------------------
    images, prompts = shapes.render_arrays(args.n_images, seed=args.seed, split="train")
    log(f"rendered {len(images)} training images", t0)
    with torch.no_grad():
        latents = torch.cat([vae.encode(x).latent_dist.mean for x in to_model_range(images).split(256)])  # [N,4,16,16]
    del images
    if args.init_from:  # the UNet was trained at this scale
        scaling_factor = float(vae.config.scaling_factor)
    else:
        scaling_factor = 1.0 / latents.std().item()
        vae.register_to_config(scaling_factor=scaling_factor)
    latents = latents * scaling_factor
    log(f"encoded latents {tuple(latents.shape)}; std before scaling {1 / scaling_factor:.4f} -> scaling_factor "
        f"{scaling_factor:.4f}", t0)

    # every train prompt tokenised once; caption dropout swaps in the ids of "" (the default negative prompt)
    def ids(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True,
                         return_tensors="pt").input_ids

    prompt_index = {p: i for i, p in enumerate(train_prompts)}
    prompt_ids = ids(train_prompts)  # [P,77]
    empty_ids = ids([""])[0]  # [77]
    caption = torch.tensor([prompt_index[p] for p in prompts])  # [N]

    # ---- phase 3: UNet + text encoder ---------------------------------------------------------------------------
    noise_scheduler = DDPMScheduler(**SCHEDULE)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    ema_unet, ema_text = EMA(unet, args.ema_decay), EMA(text_encoder, args.ema_decay)
    g = torch.Generator().manual_seed(args.seed + 2)
    order, cursor = torch.randperm(len(latents), generator=g), 0
    curve: list[dict] = []
    unet.train()
    text_encoder.train()
    t_unet, loss_avg = time.time(), None
    # the schedule follows whichever runs out first, the step budget or the clock (minus ~2 min for the
    # final eval and save): with a step budget that fits, runs are exactly reproducible; on a busier machine
    # the LR still decays fully before the cap instead of stopping mid-schedule.
    unet_budget_s = args.max_minutes * 60 - 120 - (time.time() - t0)
    log(f"unet time budget {unet_budget_s / 60:.1f} min", t0)
    step = 0
    for step in range(1, args.unet_steps + 1):
        if cursor + args.batch_size > len(order):  # fixed, seeded data order: a new permutation per epoch
            order, cursor = torch.randperm(len(latents), generator=g), 0
        idx = order[cursor : cursor + args.batch_size]
        cursor += args.batch_size
        z0 = latents[idx]  # [B,4,16,16]
        input_ids = prompt_ids[caption[idx]]  # [B,77]
        drop = torch.rand(len(idx), generator=g) < args.caption_dropout
        input_ids[drop] = empty_ids
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=g)
        zt = noise_scheduler.add_noise(z0, noise, t)

        text = text_encoder(input_ids)[0]  # [B,77,64]
        pred = unet(zt, t, encoder_hidden_states=text).sample  # [B,4,16,16]
        loss = F.mse_loss(pred, noise)

        for group in opt.param_groups:
            progress = max(step - 1, (time.time() - t_unet) / unet_budget_s * args.unet_steps)
            group["lr"] = args.lr * lr_factor(progress, args.warmup, args.unet_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_unet.update(unet)
        ema_text.update(text_encoder)

        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if step % args.log_every == 0:
            sps = (time.time() - t_unet) / step
            log(f"unet step {step:5d}/{args.unet_steps}  loss {loss_avg:.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                f"{sps:.2f} s/step", t0)
        out_of_time = time.time() - t_unet > unet_budget_s
        if (args.eval_every and step % args.eval_every == 0) or step == args.unet_steps or out_of_time:
            pipe = make_pipeline(vae, ema_text.shadow, tokenizer, ema_unet.shadow)
            result = evaluate(pipe, eval_prompts, args)
            curve.append({"step": step, "minutes": round((time.time() - t0) / 60, 2), **result})
            log(f"eval at step {step}: {json.dumps(result)}", t0)
            pipe.save_pretrained(out, safe_serialization=True)
        if out_of_time:
            log(f"time cap reached after {step} UNet steps", t0)
            break

    # ---- final report ---------------------------------------------------------------------------------------
    pipe = StableDiffusionPipeline.from_pretrained(out)  # what ships is what we measure
    pipe.set_progress_bar_config(disable=True)
    t = time.time()
    pipe(eval_prompts[:4], num_inference_steps=args.eval_steps, guidance_scale=args.guidance,
         generator=torch.Generator().manual_seed(0))
    s_batch1 = []
    for p in eval_prompts[:4]:
        t = time.time()
        pipe(p, num_inference_steps=args.eval_steps, guidance_scale=args.guidance, generator=torch.Generator().manual_seed(0))
        s_batch1.append(time.time() - t)
    size_mb = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 1e6
    report = {
        "args": vars(args),
        "params": {"vae": n_params(vae), "text_encoder": n_params(text_encoder), "unet": n_params(unet)},
        "vae": vae_report,
        "scaling_factor": scaling_factor,
        "unet_steps": step,
        "unet_s_per_step": round((time.time() - t_unet) / max(step, 1), 3),
        "eval_curve": curve,
        "s_per_image_batch1": round(float(np.median(s_batch1)), 3),
        "safetensors_mb": round(size_mb, 2),
        "total_minutes": round((time.time() - t0) / 60, 2),
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
    }
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"done: {json.dumps({k: report[k] for k in ('unet_steps', 's_per_image_batch1', 'safetensors_mb', 'total_minutes')})}", t0)


if __name__ == "__main__":
    main()
