"""Train the tiny shapes-world rectified-flow model (SD3-style) from scratch and save it as a StableDiffusion3Pipeline.

    python -m diffusion_rl.world.pretrain_flow --out diffusion_rl/assets/tiny-shapes-flow

The flow-matching counterpart of `diffusion_rl.world.pretrain` (the DDIM UNet), on the same world and split:

1. VAE: the shipped tiny-shapes AutoencoderKL (32x32x3 <-> 16x16x4), frozen, with its latent scale; SD3's
   pipeline also reads a `shift_factor`, registered as 0.
2. Latents: ``--n-images`` renders encoded once (posterior mean), scaled to unit std.
3. SD3Transformer2DModel (MMDiT, patch 2 -> 64 image tokens) + two CLIPTextModelWithProjection encoders (the
   pipeline's text_encoder and text_encoder_2; no T5: SD3's pipeline then feeds zeros for the T5 tokens,
   ``max_sequence_length`` of them): rectified-flow loss ||v_theta(x_s, s) - (eps - x0)||^2 at
   x_s = (1 - s) x0 + s eps, s from SD3's logit-normal density, 10 % of captions dropped to "", AdamW with
   warm-up and cosine decay, gradient clipping, EMA weights (those are saved).

The saved pipeline samples with FlowMatchEulerDiscreteScheduler; the script reports its alignment on the held-out
eval prompts (guidance 4, 20 Euler steps) and the sampling time per image.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from diffusion_rl.world import shapes
from diffusion_rl.world.pretrain import EMA, log, lr_factor, n_params, to_model_range
from diffusion_rl.world.tokenizer import MODEL_MAX_LENGTH, build_tokenizer
from rewards.shapes_alignment import make_shapes_alignment_reward

SHIPPED_VAE = Path(__file__).parents[1] / "assets" / "tiny-shapes" / "vae"
MAX_SEQUENCE_LENGTH = 4  # zero "T5" tokens the pipeline appends (no T5 encoder in the tiny model)


def build_text_encoder(tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModelWithProjection:
    """A 2-layer, 32-wide CLIP text transformer with a 32-d projection (SD3 pools both encoders: 64-d)."""
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=MODEL_MAX_LENGTH, projection_dim=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def build_transformer(seed: int) -> SD3Transformer2DModel:
    """16x16x4 latents, patch 2 (64 tokens), 4 joint blocks of 4 heads x 16; text features 64-d (32 + 32)."""
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=64,
        pos_embed_max_size=8,
    )


def make_pipeline(vae, text_encoder, text_encoder_2, tokenizer, transformer) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def evaluate(pipe: StableDiffusion3Pipeline, prompts: list[str], args: argparse.Namespace) -> dict:
    """Alignment of one sample per prompt (fixed seed, guidance ``args.guidance``, ``args.eval_steps`` Euler steps)."""
    reward = make_shapes_alignment_reward("partial")
    t = time.time()
    images = []
    for i in range(0, len(prompts), 64):
        images.append(pipe(
            prompts[i: i + 64], num_inference_steps=args.eval_steps, guidance_scale=args.guidance,
            generator=torch.Generator().manual_seed(args.seed + i), output_type="pt",
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        ).images)
    seconds = time.time() - t
    _, info = reward(torch.cat(images), prompts, None)
    keys = ("partial", "strict", "colour_acc", "shape_acc", "relation_acc")
    return {**{k: round(float(info[k]), 4) for k in keys}, "s_per_image": round(seconds / len(prompts), 4)}


def logit_normal_sigmas(n: int, generator: torch.Generator) -> torch.Tensor:
    """SD3's training density over s in (0, 1): sigmoid of a standard normal."""
    return torch.sigmoid(torch.randn(n, generator=generator))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m diffusion_rl.world.pretrain_flow",
        description="Train the tiny shapes-world StableDiffusion3Pipeline (rectified flow) from scratch on CPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output directory (StableDiffusion3Pipeline.save_pretrained)")
    p.add_argument("--seed", type=int, default=0, help="init, data order and noise (the prompt split is fixed)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--max-minutes", type=float, default=55.0, help="wall-clock cap; training stops early when reached")
    p.add_argument("--n-images", type=int, default=30000, help="renders encoded once to latents")
    p.add_argument("--steps", type=int, default=4000, help="step budget (sets the LR schedule)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=1000, help="steps between evals+checkpoints (0: only at the end)")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--eval-steps", type=int, default=20, help="Euler steps")
    p.add_argument("--log-every", type=int, default=50)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer()
    vae = AutoencoderKL.from_pretrained(SHIPPED_VAE).eval().requires_grad_(False)
    vae.register_to_config(shift_factor=0.0)
    text_encoder, text_encoder_2 = build_text_encoder(tokenizer, args.seed), build_text_encoder(tokenizer, args.seed + 1)
    transformer = build_transformer(args.seed + 2)
    train_prompts, eval_prompts = shapes.split_prompts()
    log(f"world: {len(train_prompts)} train prompts, {len(eval_prompts)} eval prompts", t0)
    log(f"params: transformer {n_params(transformer) / 1e6:.3f}M  text encoders "
        f"{(n_params(text_encoder) + n_params(text_encoder_2)) / 1e6:.3f}M  vae {n_params(vae) / 1e6:.3f}M (frozen)", t0)
    log(f"{args.steps} steps x batch {args.batch_size} = {args.steps * args.batch_size / args.n_images:.2f} epochs over "
        f"{args.n_images} latents; cap {args.max_minutes} min", t0)

    images, prompts = shapes.render_arrays(args.n_images, seed=args.seed, split="train")
    with torch.no_grad():
        latents = torch.cat([vae.encode(x).latent_dist.mean for x in to_model_range(images).split(256)])  # [N,4,16,16]
    del images
    latents = latents * vae.config.scaling_factor  # the shipped VAE's unit-std scale
    log(f"encoded latents {tuple(latents.shape)}, std {latents.std():.3f}", t0)

    def ids(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True,
                         return_tensors="pt").input_ids

    prompt_index = {p: i for i, p in enumerate(train_prompts)}
    prompt_ids, empty_ids = ids(train_prompts), ids([""])[0]  # [P,77], [77]
    caption = torch.tensor([prompt_index[p] for p in prompts])  # [N]

    encoders = (text_encoder, text_encoder_2)
    params = [p for m in (transformer, *encoders) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    emas = [EMA(m, args.ema_decay) for m in (transformer, *encoders)]
    g = torch.Generator().manual_seed(args.seed + 3)
    order, cursor, curve, loss_avg, step = torch.randperm(len(latents), generator=g), 0, [], None, 0
    for m in (transformer, *encoders):
        m.train()
    t_train = time.time()
    budget_s = args.max_minutes * 60 - 120 - (time.time() - t0)
    for step in range(1, args.steps + 1):
        if cursor + args.batch_size > len(order):
            order, cursor = torch.randperm(len(latents), generator=g), 0
        idx = order[cursor: cursor + args.batch_size]
        cursor += args.batch_size
        x0 = latents[idx]  # [B,4,16,16]
        input_ids = prompt_ids[caption[idx]]
        input_ids[torch.rand(len(idx), generator=g) < args.caption_dropout] = empty_ids
        noise = torch.randn(x0.shape, generator=g)
        s = logit_normal_sigmas(len(idx), g)  # [B]
        xs = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * noise

        # the pipeline's conditioning: penultimate hidden states of both encoders side by side (+ zero T5 tokens),
        # their pooled projections concatenated
        outs = [enc(input_ids, output_hidden_states=True) for enc in encoders]
        tokens = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)  # [B,77,64]
        tokens = torch.cat([tokens, tokens.new_zeros(len(idx), MAX_SEQUENCE_LENGTH, tokens.shape[-1])], dim=1)
        pooled = torch.cat([o.text_embeds for o in outs], dim=-1)  # [B,64]
        v = transformer(hidden_states=xs, encoder_hidden_states=tokens, pooled_projections=pooled,
                        timestep=s * 1000).sample
        loss = F.mse_loss(v, noise - x0)

        progress = max(step - 1, (time.time() - t_train) / budget_s * args.steps)
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor(progress, args.warmup, args.steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for ema, m in zip(emas, (transformer, *encoders), strict=True):
            ema.update(m)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if step % args.log_every == 0:
            log(f"step {step:5d}/{args.steps}  loss {loss_avg:.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                f"{(time.time() - t_train) / step:.2f} s/step", t0)
        out_of_time = time.time() - t_train > budget_s
        if (args.eval_every and step % args.eval_every == 0) or step == args.steps or out_of_time:
            pipe = make_pipeline(vae, emas[1].shadow, emas[2].shadow, tokenizer, emas[0].shadow)
            result = evaluate(pipe, eval_prompts, args)
            curve.append({"step": step, "minutes": round((time.time() - t0) / 60, 2), **result})
            log(f"eval at step {step}: {json.dumps(result)}", t0)
            pipe.save_pretrained(out, safe_serialization=True)
        if out_of_time:
            log(f"time cap reached after {step} steps", t0)
            break

    # what ships is what we measure (diffusers needs the absent optional components named as None)
    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None, image_encoder=None,
                                                    feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    size_mb = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 1e6
    report = {
        "args": vars(args),
        "params": {"transformer": n_params(pipe.transformer), "text_encoder": n_params(pipe.text_encoder),
                   "text_encoder_2": n_params(pipe.text_encoder_2), "vae": n_params(pipe.vae)},
        "steps": step,
        "s_per_step": round((time.time() - t_train) / max(step, 1), 3),
        "eval_curve": curve,
        "safetensors_mb": round(size_mb, 2),
        "total_minutes": round((time.time() - t0) / 60, 2),
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "final": curve[-1] if curve else None,
        "median_s_per_image": float(np.median([c["s_per_image"] for c in curve])) if curve else None,
    }
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"done: {json.dumps({k: report[k] for k in ('steps', 'safetensors_mb', 'total_minutes', 'final')})}", t0)


if __name__ == "__main__":
    main()
