"""GPU throughput of drl's flow-matching sampling and training on SD3.5-medium- and FLUX.1-dev-shaped pipelines
with random weights.

Builds a diffusers `StableDiffusion3Pipeline` with Stable Diffusion 3.5 Medium's MMDiT (2.24 B params, full size)
and a `FluxPipeline` with FLUX.1-dev's transformer (11.9 B params, full size), each with its real 16-channel VAE,
and **random weights**: nothing is downloaded. The text towers (CLIP-L, CLIP-G, T5-XXL) have their real widths
(hidden sizes, projections, vocabularies) but only `--text-layers` layers (default 2; the real ones have 12, 32
and 24) to save memory and build time: prompt encoding is a small part of a step, and the transformer sees
conditioning of the real shapes (SD3: 77 + 256 tokens of width 4096, pooled 2048; FLUX: 512 T5 tokens of width
4096, pooled 768). For every model x dtype it measures, through drl's own code paths (diffusion_rl.families,
diffusion_rl.sampling with the Flow-GRPO `FlowRule`):

* sampling: `sample_trajectories` on B prompts, T steps of the Flow-GRPO SDE (noise level 0.7) on every step,
  or on the first `--sde-window W` steps with ODE steps after them (Flow-GRPO-Fast); SD3 with classifier-free
  guidance 4.5 (the transformer sees the doubled batch), FLUX.1-dev with embedded guidance 3.5 (one pass);
  text encoding and VAE decode included;
* training, with and without gradient checkpointing (`denoiser.enable_gradient_checkpointing()`): a micro-batch
  of b trajectories x K stored SDE steps; per step `recompute_log_prob` forward + backward through LoRA (rank r,
  alpha 2r as drl's sd35/flux configs, on to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj,
  to_add_out) under autocast, a clipped-ratio surrogate loss, gradients accumulated over the K steps, then
  gradient clipping and one AdamW step (GradScaler for fp16), as drl's trainer does;
* samples/s, transition-steps/s (samples x steps) and peak GPU memory (`torch.cuda.max_memory_allocated`, reset
  before each phase, weights included) of each phase. A phase that runs out of GPU memory is reported as OOM.

Warm-up iterations are excluded from the timings; `torch.cuda.synchronize()` brackets every timed iteration.
The helpers are benchmarks/gpu_throughput.py's (the SD1.5 / UNet benchmark beside this one).

    python benchmarks/gpu_flow_throughput.py --out flow.json     # GPU: sd3 + flux, bf16, 512 px (~5 min budget)
    python benchmarks/gpu_flow_throughput.py --resolution 1024 --models flux --out flux1024.json
    python benchmarks/gpu_flow_throughput.py --models sd3 --dtypes bf16,fp16 --sde-window 2
    python benchmarks/gpu_flow_throughput.py --tiny --device cpu --iters 1 --warmup 0 --steps 2   # CPU smoke test

The default run (both models, bf16, 512 px, T=10, B=4, b=2, K=10, 1 warm-up + 3 timed iterations) is sized to
finish within about 5 minutes on one H200 (the estimate from the FLOP counts is 2-3 minutes: FLUX.1-dev's
forward at 512 px is ~38 TFLOP per sample; 1024 px is ~3x that and takes about as long again for FLUX alone).
Without `--tiny` it needs a CUDA GPU and exits with status 2 otherwise.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import diffusers
import peft
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

if str(Path(__file__).parent) not in sys.path:  # benchmarks/gpu_throughput.py, beside this script (when imported)
    sys.path.append(str(Path(__file__).parent))
from gpu_throughput import (  # noqa: E402
    DTYPES,
    Phase,
    _names,
    _num,
    autocast_factory,
    count_params,
    dtype_problem,
    log,
    peak_memory_gib,
    reset_peak_memory,
    time_iterations,
)

from diffusion_rl.families import Family, family_of  # noqa: E402
from diffusion_rl.models import byte_level_clip_tokenizer, prepare_trainable_denoiser  # noqa: E402
from diffusion_rl.sampling import FlowRule, Trajectories, recompute_log_prob, sample_trajectories  # noqa: E402
from diffusion_rl.tiny_pipelines import TINY_T5_LENGTH, build_tiny_flux, build_tiny_sd3, tiny_t5_tokenizer  # noqa: E402

MODELS = ("sd3", "flux")
GRAD_CKPT = {"off": False, "on": True}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
ETA = 1.0  # unused by the flow rule (its noise is --noise-level); sample_trajectories' positional argument
CLIP_RANGE = 1e-4  # Flow-GRPO's


# --------------------------------------------------------------------------------------------
# Model sizes
# --------------------------------------------------------------------------------------------

# openai/clip-vit-large-patch14 text tower (SD3's text_encoder, FLUX's text_encoder)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
# stabilityai/stable-diffusion-3.5-medium text_encoder_2/config.json (OpenCLIP ViT-bigG/14 text tower)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
# google/t5-v1_1-xxl encoder (SD3's text_encoder_3, FLUX's text_encoder_2)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128)
# the offline byte-level CLIP tokenizer's special ids (it uses only the first 514 of the 49408 ids)
CLIP_TOKENS = dict(bos_token_id=512, eos_token_id=513, pad_token_id=513)
T5_TOKENS = dict(decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)  # the tiny T5 tokenizer's ids

# stabilityai/stable-diffusion-3.5-medium vae/config.json; FLUX.1-dev's differs in scaling and shift only
VAE_16CH = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=16, layers_per_block=2, norm_num_groups=32, act_fn="silu",
                use_quant_conv=False, use_post_quant_conv=False)


@dataclass(frozen=True)
class FlowSizes:
    name: str  # sd3 | flux
    label: str
    transformer: dict  # without sample_size (SD3: from --resolution)
    vae: dict
    text: dict  # tower name -> its real config
    scheduler: dict
    guidance_scale: float
    max_sequence_length: int  # T5 tokens per prompt


SD35_MEDIUM = FlowSizes(
    name="sd3",
    label="SD3.5-medium",
    # stabilityai/stable-diffusion-3.5-medium transformer/config.json (sample_size 128 there: 1024 px / 8)
    transformer=dict(patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                     num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                     pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                     qk_norm="rms_norm"),
    vae={**VAE_16CH, "scaling_factor": 1.5305, "shift_factor": 0.0609},
    text={"text_encoder": CLIP_L, "text_encoder_2": CLIP_G, "text_encoder_3": T5_XXL},
    scheduler=dict(num_train_timesteps=1000, shift=3.0),  # scheduler/scheduler_config.json
    guidance_scale=4.5,  # configs/sd35_flow_grpo_pickscore.yaml (Flow-GRPO's)
    max_sequence_length=256,  # StableDiffusion3Pipeline's default, and drl's for sd3
)

FLUX_DEV = FlowSizes(
    name="flux",
    label="FLUX.1-dev",
    # black-forest-labs/FLUX.1-dev transformer/config.json
    transformer=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                     axes_dims_rope=(16, 56, 56)),
    vae={**VAE_16CH, "scaling_factor": 0.3611, "shift_factor": 0.1159},  # FLUX.1-dev vae/config.json
    text={"text_encoder": CLIP_L, "text_encoder_2": T5_XXL},
    # FLUX.1-dev scheduler/scheduler_config.json: the shift follows the image token count
    scheduler=dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                   base_image_seq_len=256, max_image_seq_len=4096),
    guidance_scale=3.5,  # configs/flux_flow_grpo.yaml (FLUX.1-dev's usual embedded guidance)
    max_sequence_length=512,  # FluxPipeline's default for FLUX.1-dev, as configs/flux_flow_grpo.yaml
)

FULL = {"sd3": SD35_MEDIUM, "flux": FLUX_DEV}
TINY_BUILDERS = {"sd3": build_tiny_sd3, "flux": build_tiny_flux}
TINY_RESOLUTION = 16  # the tiny pipelines' fixed image side (8x8x4 latents)
RESOLUTION_MULTIPLE = 16  # VAE 8x, then SD3's 2x2 patches / FLUX's 2x2 packing


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """New parameters in `dtype` (as from_pretrained's torch_dtype does), so no fp32 copy of 12 B params is made."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _text_tower(name: str, config: dict, layers: int, projection: bool) -> torch.nn.Module:
    if "d_model" in config:  # T5
        return T5EncoderModel(T5Config(**{**config, "num_layers": layers}, **T5_TOKENS))
    cfg = CLIPTextConfig(**{**config, "num_hidden_layers": layers}, **CLIP_TOKENS)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def build_networks(sizes: FlowSizes, resolution: int, text_layers: int) -> dict[str, torch.nn.Module]:
    """The pipeline's networks, created under the caller's device / default-dtype context."""
    if sizes.name == "sd3":
        transformer = SD3Transformer2DModel(sample_size=resolution // 8, **sizes.transformer)  # latent side
    else:
        transformer = FluxTransformer2DModel(**sizes.transformer)
    # drl's Flux family reads the unpacked latent side from the VAE's sample_size
    nets = {"transformer": transformer, "vae": AutoencoderKL(sample_size=resolution, **sizes.vae)}
    for name, config in sizes.text.items():
        # SD3's two CLIP towers have projections (pooled = both projections); FLUX's CLIP-L pools without one
        nets[name] = _text_tower(name, config, text_layers, projection=sizes.name == "sd3")
    return nets


def build_pipeline(sizes: FlowSizes, args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """A random-weight pipeline of `sizes` on `device` in `dtype` (or the tiny one with --tiny)."""
    if args.tiny:
        return TINY_BUILDERS[sizes.name](0).to(device=device, dtype=dtype)
    torch.manual_seed(0)
    # Initialise the weights where they will run and in the working dtype: a 12 B-param random init is slow on
    # the CPU, and an fp32 FLUX would take 48 GB before the cast. Schedulers and tokenizers stay outside.
    with torch.device(device), default_dtype(dtype):
        nets = build_networks(sizes, args.resolution, args.text_layers)
    scheduler = FlowMatchEulerDiscreteScheduler(**sizes.scheduler)
    clip_tok, t5_tok = byte_level_clip_tokenizer(), tiny_t5_tokenizer()
    if sizes.name == "sd3":
        pipe = StableDiffusion3Pipeline(scheduler=scheduler, tokenizer=clip_tok, tokenizer_2=clip_tok,
                                        tokenizer_3=t5_tok, **nets)
    else:
        pipe = FluxPipeline(scheduler=scheduler, tokenizer=clip_tok, tokenizer_2=t5_tok, **nets)
    for module in nets.values():
        module.eval()  # as from_pretrained leaves them (T5 has dropout 0.1)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def describe_model(sizes: FlowSizes, args: argparse.Namespace) -> dict:
    """Parameter counts (meta tensors: nothing allocated) and the shapes the transformer sees."""
    if args.tiny:
        nets = {k: v for k, v in TINY_BUILDERS[sizes.name](0).components.items() if isinstance(v, torch.nn.Module)}
        seq, res = TINY_T5_LENGTH, TINY_RESOLUTION
    else:
        with torch.device("meta"):
            nets = build_networks(sizes, args.resolution, args.text_layers)
        seq, res = sizes.max_sequence_length, args.resolution
    latent = res // 2 ** (len(nets["vae"].config.block_out_channels) - 1)  # the VAE's downscale
    if sizes.name == "sd3":
        image_tokens, text_tokens = (latent // 2) ** 2, 77 + seq
        latent_shape = [nets["transformer"].config.in_channels, latent, latent]
    else:
        image_tokens, text_tokens = (latent // 2) ** 2, seq
        latent_shape = [image_tokens, nets["transformer"].config.in_channels]  # packed 2x2 patches
    info = {
        "label": "tiny-random-" + sizes.name if args.tiny else sizes.label,
        "params_m": {k: count_params(v) / 1e6 for k, v in nets.items()},
        "latent_shape": latent_shape,
        "image_tokens": image_tokens,
        "text_tokens": text_tokens,
        "max_sequence_length": seq,
        "guidance": f"cfg {sizes.guidance_scale} (doubled batch)" if sizes.name == "sd3"
        else f"embedded {sizes.guidance_scale}",
        "scheduler": dict(sizes.scheduler),
    }
    if not args.tiny:
        info["text_layers"] = {k: args.text_layers for k in sizes.text}
        info["text_layers_real"] = {k: c.get("num_hidden_layers", c.get("num_layers")) for k, c in sizes.text.items()}
    return info


# --------------------------------------------------------------------------------------------
# The phases
# --------------------------------------------------------------------------------------------


def stochastic_mask(args: argparse.Namespace) -> torch.Tensor:
    """[T] bool: the SDE steps (all, or the first --sde-window); ODE steps elsewhere."""
    mask = torch.zeros(args.steps, dtype=torch.bool)
    mask[: args.sde_window or args.steps] = True
    return mask


def measure_sampling(pipe, family: Family, rule: FlowRule, sizes: FlowSizes, args: argparse.Namespace,
                     autocast: Callable[[], AbstractContextManager]) -> tuple[Phase, Trajectories]:
    """drl's sample_trajectories on `args.batch` prompts: B trajectories of T = args.steps flow steps."""
    denoiser = family.denoiser(pipe)
    device = denoiser.device
    prompts = [f"a photograph of an astronaut riding horse number {i}" for i in range(args.batch)]
    stochastic = stochastic_mask(args)
    last: list[Trajectories] = []

    def step() -> bool:
        gens = [torch.Generator().manual_seed(i) for i in range(args.batch)]  # drl's per-sample CPU generators
        traj = sample_trajectories(pipe, denoiser, prompts, gens, args.steps, sizes.guidance_scale, ETA, "",
                                   autocast=autocast, family=family, rule=rule, stochastic_steps=stochastic)
        # traj.latents / next_latents: [B, T, *latent] (SD3 [16, h, w], FLUX packed [h*w/4, 64]); images [B, 3, H, W]
        last[:] = [traj]
        return bool(torch.isfinite(traj.images).all() and torch.isfinite(traj.log_probs).all())

    denoiser.eval()
    reset_peak_memory(device)
    phase = time_iterations(device, args.warmup, args.iters, step)
    phase.peak_gib = peak_memory_gib(device)
    return phase, last[0]


def measure_training(pipe, family: Family, rule: FlowRule, sizes: FlowSizes, params: list[torch.nn.Parameter],
                     traj: Trajectories, args: argparse.Namespace, autocast: Callable[[], AbstractContextManager],
                     dtype: torch.dtype) -> Phase:
    """One iteration: a micro-batch of b = args.train_batch trajectories, K = args.train_steps stored SDE steps
    each; per step recompute_log_prob (SD3: on the CFG-doubled batch 2b) + a clipped-ratio surrogate + backward,
    accumulated over the K steps; then grad clipping and one AdamW step."""
    denoiser = family.denoiser(pipe)
    device = denoiser.device
    K = args.train_steps
    steps = stochastic_mask(args).nonzero().flatten()[:K].to(traj.latents.device)  # [K] the first K SDE steps
    idx = torch.arange(args.train_batch, device=traj.latents.device) % len(traj)  # repeats if b > B
    lat = traj.latents[idx][:, steps]  # [b, K, *latent]
    nxt = traj.next_latents[idx][:, steps]  # [b, K, *latent]
    ts = traj.timesteps[idx][:, steps]  # [b, K] sigmas fp32
    ts_next = traj.next_timesteps[idx][:, steps]  # [b, K]
    old_lp = traj.log_probs[idx][:, steps]  # [b, K] fp32
    cond = {k: v[idx] for k, v in traj.cond.items()}  # [b, ...] embeds / pooled (and negatives for SD3)
    adv = torch.randn(args.train_batch, generator=torch.Generator().manual_seed(0)).to(device)  # [b]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    use_scaler = dtype == torch.float16 and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    def step() -> bool:
        optimizer.zero_grad(set_to_none=True)
        finite = True
        for j in range(K):
            with autocast():
                out = recompute_log_prob(pipe, denoiser, lat[:, j], nxt[:, j], ts[:, j], cond, sizes.guidance_scale,
                                         ETA, next_timesteps=ts_next[:, j], family=family, rule=rule)
            ratio = torch.exp(out.log_prob - old_lp[:, j])  # [b] fp32
            clipped = torch.clamp(ratio, 1 - CLIP_RANGE, 1 + CLIP_RANGE)
            loss = torch.maximum(-adv * ratio, -adv * clipped).mean() / K  # scalar
            (scaler.scale(loss) if scaler else loss).backward()
            finite &= bool(torch.isfinite(loss))
        if all(p.grad is None for p in params):  # e.g. checkpointing that cut the graph: nothing would be trained
            raise RuntimeError("no LoRA parameter received a gradient")
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if scaler:
            scaler.step(optimizer)  # skipped (as in training) when the gradients are not finite
            scaler.update()
        else:
            optimizer.step()
        return finite

    denoiser.train()
    reset_peak_memory(device)
    try:
        phase = time_iterations(device, args.warmup, args.iters, step)
        phase.peak_gib = peak_memory_gib(device)
    finally:
        optimizer.zero_grad(set_to_none=True)  # free the gradients (also after an OOM)
        denoiser.eval()
    return phase


# --------------------------------------------------------------------------------------------
# Rows of the table
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    model: str
    dtype: str
    phase: str  # sampling | train | train+ckpt
    samples: int  # trajectories per iteration (B, or the micro-batch b)
    steps: int  # transitions per trajectory (T, or K trained steps)
    note: str | None = None  # why the phase was not measured
    trainable_params: int | None = None  # LoRA parameters (fp32)
    timing: Phase | None = None
    seconds_per_iter: float | None = None
    samples_per_s: float | None = None
    transition_steps_per_s: float | None = None

    def finish(self) -> None:
        s = self.timing.seconds
        self.seconds_per_iter = sum(s) / len(s)
        self.samples_per_s = self.samples / self.seconds_per_iter
        self.transition_steps_per_s = self.samples * self.steps / self.seconds_per_iter


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _oom_note(device: torch.device, err: BaseException) -> str:
    total = torch.cuda.get_device_properties(device).total_memory / 1024**3 if device.type == "cuda" else None
    return f"OOM ({type(err).__name__}" + (f", {total:.0f} GiB GPU)" if total else ")")


def run_model(sizes: FlowSizes, dtype_name: str, args: argparse.Namespace) -> list[Row]:
    """The sampling row and one training row per --grad-ckpt setting of one model x dtype."""
    device = torch.device(args.device)
    T, K = args.steps, args.train_steps
    rows = [Row(sizes.name, dtype_name, "sampling", args.batch, T)]
    rows += [Row(sizes.name, dtype_name, "train+ckpt" if GRAD_CKPT[c] else "train", args.train_batch, K)
             for c in args.grad_ckpt]
    problem = dtype_problem(device, dtype_name)
    if problem:
        for r in rows:
            r.note = problem
        return rows
    dtype = DTYPES[dtype_name]
    log(f"{sizes.name} {dtype_name}: building the random-weight pipeline on {device}")
    t0 = time.perf_counter()
    pipe = build_pipeline(sizes, args, device, dtype)
    family = family_of(pipe, TINY_T5_LENGTH if args.tiny else sizes.max_sequence_length)
    denoiser = family.denoiser(pipe)
    n_base = count_params(denoiser)
    params = prepare_trainable_denoiser(pipe, True, args.lora_rank, 2.0 * args.lora_rank, LORA_TARGETS)  # fp32 LoRA
    n_lora = sum(p.numel() for p in params)
    for r in rows:
        r.trainable_params = n_lora
    log(f"{sizes.name} {dtype_name}: built in {time.perf_counter() - t0:.1f} s "
        f"({n_base / 1e9:.3g} B transformer params, {n_lora / 1e6:.3g} M LoRA)")
    rule = FlowRule(args.noise_level)  # one instance: training uses the sigma cap of the sampled schedule
    autocast = autocast_factory(device, dtype)
    traj, failed = None, None
    log(f"{sizes.name} {dtype_name}: sampling B={args.batch} x T={T} ({args.warmup} warm-up + {args.iters} timed)")
    try:
        rows[0].timing, traj = measure_sampling(pipe, family, rule, sizes, args, autocast)
        rows[0].finish()
    except torch.cuda.OutOfMemoryError as err:
        failed = rows[0].note = _oom_note(device, err)
    _release(device)
    for row, ckpt in zip(rows[1:], args.grad_ckpt, strict=True):
        if traj is None:
            row.note = f"no trajectories (sampling: {failed})"
            continue
        if GRAD_CKPT[ckpt]:
            denoiser.enable_gradient_checkpointing()
        log(f"{sizes.name} {dtype_name}: {row.phase} b={args.train_batch} x K={K} "
            f"({args.warmup} warm-up + {args.iters} timed)")
        try:
            row.timing = measure_training(pipe, family, rule, sizes, params, traj, args, autocast, dtype)
            row.finish()
        except torch.cuda.OutOfMemoryError as err:
            row.note = _oom_note(device, err)
        finally:
            if GRAD_CKPT[ckpt]:
                denoiser.disable_gradient_checkpointing()
        _release(device)
    del pipe, denoiser, params, traj
    _release(device)
    return rows


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

COLUMNS = ["model", "dtype", "phase", "samples x steps", "samples/s", "transition-steps/s", "s/iter", "peak GiB"]


def format_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        head = f"| {r.model} | {r.dtype} | {r.phase} | {r.samples} x {r.steps} "
        if r.note:
            lines.append(head + f"| {r.note} | - | - | - |")
            continue
        lines.append(head + f"| {_num(r.samples_per_s, 3)} | {_num(r.transition_steps_per_s, 3)} "
                     f"| {_num(r.seconds_per_iter, 3)} | {_num(r.timing.peak_gib)} |")
    return "\n".join(lines)


def describe_setup(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    return {
        "tiny": args.tiny,
        "models": {name: describe_model(FULL[name], args) for name in args.models},
        "resolution": args.resolution,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})",
        "dtypes": args.dtypes,
        "num_steps": args.steps,
        "sde_steps": args.sde_window or args.steps,
        "sde_window": args.sde_window,
        "noise_level": args.noise_level,
        "batch": args.batch,
        "train_batch": args.train_batch,
        "train_steps": args.train_steps,
        "grad_ckpt": args.grad_ckpt,
        "warmup": args.warmup,
        "iters": args.iters,
        "clip_range": CLIP_RANGE,
        "attention": "sdpa",
        "lora": {"rank": args.lora_rank, "alpha": 2 * args.lora_rank, "target_modules": LORA_TARGETS},
        "text_towers": "real widths, random weights" + ("" if args.tiny else f", {args.text_layers} layers each"),
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
        },
    }


def print_report(rows: list[Row], setup: dict, args: argparse.Namespace, elapsed: float) -> None:
    tiny = " (tiny smoke-test networks)" if args.tiny else ""
    print(f"## drl flow-matching throughput: random-weight SD3.5-medium / FLUX.1-dev shapes{tiny} on {setup['device']}\n")
    for name, m in setup["models"].items():
        p = m["params_m"]
        text = ", ".join(f"{k} {v:.4g} M" for k, v in p.items() if k.startswith("text_encoder"))
        layers = "" if args.tiny else f" ({args.text_layers} layers each, real widths)"
        print(f"- {name}: {m['label']}, transformer {p['transformer']:.4g} M, VAE {p['vae']:.4g} M, "
              f"text towers{layers} {text}; {m['image_tokens']} image + {m['text_tokens']} text tokens, "
              f"latents {'x'.join(map(str, m['latent_shape']))}, guidance {m['guidance']}")
    window = f"SDE on the first {args.sde_window}, ODE after" if args.sde_window else "SDE on every step"
    print(
        f"\n{args.resolution} px, T={args.steps} flow steps ({window}, noise level {args.noise_level}); sampling batch "
        f"B={args.batch}, train micro-batch b={args.train_batch} x K={args.train_steps} stored SDE steps, "
        f"grad checkpointing {'/'.join(args.grad_ckpt)}; LoRA r={args.lora_rank} alpha={2 * args.lora_rank} on "
        f"{', '.join(LORA_TARGETS)}; SDPA attention; {args.warmup} warm-up + {args.iters} timed iterations per phase; "
        f"torch {torch.__version__}, diffusers {diffusers.__version__}\n"
    )
    print(format_table(rows))
    print()
    print("samples/s = trajectories per second (sampling: B trajectories of T steps incl. text encoding and VAE "
          "decode; training: b trajectories of K steps per iteration incl. the optimizer step); "
          "transition-steps/s = samples/s x steps.")
    if not args.device.startswith("cuda"):
        print("Peak memory: n/a on the CPU.")
    for r in rows:
        if r.timing and not r.timing.finite:
            print(f"Note: {r.model} {r.dtype} {r.phase} produced non-finite values with the random weights (timings "
                  "still use the same kernels; with fp16 GradScaler skips those optimizer steps).")
    print(f"Total benchmark time: {elapsed:.1f} s")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="drl's tiny random SD3 / FLUX pipelines (CPU smoke test)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--models", nargs="+", default=["sd3,flux"], help="sd3 flux (default: both)")
    p.add_argument("--dtypes", nargs="+", default=None, help="bf16 fp16 fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--resolution", type=int, default=None,
                   help=f"image side in pixels, a multiple of {RESOLUTION_MULTIPLE} (default 512; the models' own "
                        f"is 1024; --tiny: {TINY_RESOLUTION})")
    p.add_argument("--steps", type=int, default=10, help="flow steps per trajectory T (default 10, Flow-GRPO's)")
    p.add_argument("--sde-window", type=int, default=None,
                   help="SDE on the first W steps only, ODE after (Flow-GRPO-Fast; default: SDE on every step)")
    p.add_argument("--noise-level", type=float, default=0.7, help="Flow-GRPO SDE noise level a (default 0.7)")
    p.add_argument("--batch", type=int, default=4, help="sampling batch B, before SD3's CFG doubling (default 4)")
    p.add_argument("--train-batch", type=int, default=2, help="training micro-batch b, before CFG doubling (default 2)")
    p.add_argument("--train-steps", type=int, default=None, help="trained SDE steps per trajectory K (default: all)")
    p.add_argument("--grad-ckpt", nargs="+", default=["off,on"], help="off on: training without / with gradient "
                   "checkpointing (default: both)")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per phase (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up iterations per phase (default 1)")
    p.add_argument("--lora-rank", type=int, default=32, help="LoRA rank r, alpha = 2r (default 32, drl's configs)")
    p.add_argument("--text-layers", type=int, default=2, help="layers of each text tower (default 2)")
    p.add_argument("--out", default=None, help="also write the results as JSON to this path")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.models = _names(args.models, MODELS, "models", p)
    args.dtypes = _names(args.dtypes or ["bf16" if args.device.startswith("cuda") else "fp32"], DTYPES, "dtypes", p)
    args.grad_ckpt = _names(args.grad_ckpt, GRAD_CKPT, "grad-ckpt", p)
    if args.tiny:
        if args.resolution not in (None, TINY_RESOLUTION):
            p.error(f"--tiny pipelines are {TINY_RESOLUTION} px; drop --resolution")
        args.resolution = TINY_RESOLUTION
    args.resolution = args.resolution or 512
    sde_steps = args.sde_window or args.steps
    args.train_steps = sde_steps if args.train_steps is None else args.train_steps
    for name in ("steps", "batch", "train_batch", "iters", "lora_rank", "train_steps", "resolution", "text_layers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.sde_window is not None and not 1 <= args.sde_window <= args.steps:
        p.error(f"--sde-window must be in [1, --steps={args.steps}], got {args.sde_window}")
    if args.train_steps > sde_steps:
        p.error(f"--train-steps ({args.train_steps}) cannot exceed the SDE steps ({sde_steps}): ODE steps have no "
                "log-prob to train")
    if args.resolution % RESOLUTION_MULTIPLE:
        p.error(f"--resolution must be a multiple of {RESOLUTION_MULTIPLE}, got {args.resolution}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    diffusers.utils.logging.set_verbosity_error()  # not the "modules to keep in float32" notice of .to(dtype)
    transformers.utils.logging.set_verbosity_error()
    if not args.tiny and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        print(
            "gpu_flow_throughput.py: error: the SD3.5-medium / FLUX.1-dev-sized benchmark needs a CUDA GPU "
            f"(device {args.device!r}, torch.cuda.is_available() = {torch.cuda.is_available()}). "
            "For a CPU smoke test of the same code path with tiny networks, run:\n"
            "  python benchmarks/gpu_flow_throughput.py --tiny --device cpu --iters 1 --warmup 0 --steps 2",
            file=sys.stderr,
        )
        return 2
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # as drl's trainer
    t_start = time.perf_counter()
    setup = describe_setup(args)
    rows: list[Row] = []
    for name in args.models:
        for dtype_name in args.dtypes:
            rows += run_model(FULL[name], dtype_name, args)
    elapsed = time.perf_counter() - t_start
    print_report(rows, setup, args, elapsed)
    if args.out:
        result = {"setup": setup, "elapsed_s": elapsed, "rows": [asdict(r) for r in rows]}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, allow_nan=False)
        print(f"Wrote {args.out}")
    return 0 if any(r.timing for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
