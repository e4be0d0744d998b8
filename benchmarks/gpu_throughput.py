"""GPU throughput of drl's sampling and training on an SD1.5-sized pipeline with random weights.

Builds a diffusers `StableDiffusionPipeline` with Stable Diffusion 1.5's architecture (UNet ~860 M params,
VAE ~84 M, a CLIP-L/14-sized text encoder ~123 M) and **random weights**: nothing is downloaded. For every
dtype x attention backend it measures, through drl's own code paths:

* sampling: `diffusion_rl.sampling.sample_trajectories` on a batch of prompts, classifier-free guidance on
  (the UNet sees the doubled batch), N DDIM steps with eta = 1, text encoding and VAE decode included;
* training: `diffusion_rl.sampling.recompute_log_prob` forward + backward through the LoRA parameters under
  autocast on K stored steps per trajectory of a micro-batch, gradients accumulated over the K steps, then
  gradient clipping and one AdamW step (GradScaler for fp16), as drl's trainer does;
* peak GPU memory (`torch.cuda.max_memory_allocated`, reset before each phase) of each phase; it includes the
  weights that stay resident.

Warm-up iterations are excluded from the timings; `torch.cuda.synchronize()` brackets every timed iteration.

    python benchmarks/gpu_throughput.py                         # GPU: fp16/bf16 x sdpa/xformers at 512 px
    python benchmarks/gpu_throughput.py --out gpu.json --iters 3 --steps 20 --batch 8 --train-batch 4
    python benchmarks/gpu_throughput.py --tiny --device cpu --iters 1 --steps 2   # CPU smoke test (seconds)

Without `--tiny` it needs a CUDA GPU and exits with status 2 otherwise.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import importlib.util
import json
import platform
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field

import diffusers
import peft
import torch
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from diffusion_rl.models import byte_level_clip_tokenizer, prepare_trainable_denoiser, set_attention_backend
from diffusion_rl.sampling import Trajectories, recompute_log_prob, sample_trajectories

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BACKENDS = ("sdpa", "xformers")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
GUIDANCE_SCALE = 5.0  # > 1: CFG on, one UNet forward over the doubled [negative; prompt] batch
ETA = 1.0
GIB = 1024**3


# --------------------------------------------------------------------------------------------
# Model sizes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """Constructor arguments of the three networks (the UNet's sample_size comes from --resolution)."""

    name: str
    unet: dict
    vae: dict
    text: dict
    default_resolution: int

    @property
    def vae_scale(self) -> int:  # pixels per latent cell: one 2x downsample per VAE block after the first
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def unet_scale(self) -> int:  # the latent side must survive the UNet's downsamples
        return 2 ** (len(self.unet["block_out_channels"]) - 1)


SD15 = Sizes(
    name="sd15",
    # runwayml/stable-diffusion-v1-5 unet/config.json
    unet=dict(
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
        act_fn="silu",
    ),
    # runwayml/stable-diffusion-v1-5 vae/config.json
    vae=dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        norm_num_groups=32,
        act_fn="silu",
        scaling_factor=0.18215,
    ),
    # openai/clip-vit-large-patch14, text tower
    text=dict(
        vocab_size=49408,  # CLIP's; the offline byte-level tokenizer uses only the first 514 ids
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    ),
    default_resolution=512,
)

TINY = Sizes(
    name="tiny",
    unet=dict(
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=32,
    ),
    vae=dict(  # four blocks like SD's, so pixels / latents = 8 here too
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        scaling_factor=0.18215,
    ),
    text=dict(
        vocab_size=514,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    ),
    default_resolution=64,
)


def build_pipeline(sizes: Sizes, resolution: int, device: torch.device, dtype: torch.dtype) -> StableDiffusionPipeline:
    """A random-weight pipeline of `sizes`, on `device` in `dtype` (DDIM scheduler, offline tokenizer)."""
    torch.manual_seed(0)
    # Initialise the weights where they will run: an 860 M-param random init is slow on the CPU. Only the
    # networks are built under the device context (the scheduler and the samplers' CPU generators are not).
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=resolution // sizes.vae_scale, **sizes.unet)  # latent side
        vae = AutoencoderKL(sample_size=resolution, **sizes.vae)
        text_encoder = CLIPTextModel(CLIPTextConfig(**sizes.text))
    scheduler = DDIMScheduler(  # SD1.5's scheduler config, as drl's load_pipeline turns it into DDIM
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=byte_level_clip_tokenizer(model_max_length=sizes.text["max_position_embeddings"]),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def autocast_factory(device: torch.device, dtype: torch.dtype) -> Callable[[], AbstractContextManager]:
    """What drl's trainer passes as `autocast` (accelerator.autocast): mixed precision in the working dtype."""
    if dtype == torch.float32:
        return nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)


def xformers_problem(device: torch.device) -> str | None:
    """Why the xformers row cannot run here, as printed in the table; None when it can."""
    if importlib.util.find_spec("xformers") is None:
        return "xformers: not installed"
    try:
        importlib.import_module("xformers.ops")
    except Exception as err:  # a wheel built for another torch/CUDA fails at import
        return f"xformers: not importable ({type(err).__name__})"
    if device.type != "cuda":
        return "xformers: needs CUDA"
    return None


def dtype_problem(device: torch.device, dtype_name: str) -> str | None:
    if dtype_name == "fp16" and device.type != "cuda":
        return "fp16: skipped on CPU (needs CUDA)"
    if dtype_name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "bf16: not supported by this GPU"
    return None


# --------------------------------------------------------------------------------------------
# The two phases
# --------------------------------------------------------------------------------------------


@dataclass
class Phase:
    seconds: list[float] = field(default_factory=list)  # one entry per timed iteration
    peak_gib: float | None = None
    finite: bool = True


def time_iterations(device: torch.device, warmup: int, iters: int, step: Callable[[], bool]) -> Phase:
    """Run `step` warmup + iters times; time the last `iters`. `step` returns whether its outputs were finite."""
    phase = Phase()
    for i in range(warmup + iters):
        synchronize(device)
        t0 = time.perf_counter()
        finite = step()
        synchronize(device)
        if i >= warmup:
            phase.seconds.append(time.perf_counter() - t0)
            phase.finite &= finite
    return phase


def measure_sampling(
    pipe: StableDiffusionPipeline, args: argparse.Namespace, autocast: Callable[[], AbstractContextManager]
) -> tuple[Phase, Trajectories]:
    """drl's sample_trajectories on `args.batch` prompts: B trajectories of T = args.steps DDIM steps."""
    device = pipe.unet.device
    prompts = [f"a photograph of an astronaut riding horse number {i}" for i in range(args.batch)]
    last: list[Trajectories] = []

    def step() -> bool:
        gens = [torch.Generator().manual_seed(i) for i in range(args.batch)]  # drl's per-sample CPU generators
        traj = sample_trajectories(pipe, pipe.unet, prompts, gens, args.steps, GUIDANCE_SCALE, ETA, "", autocast=autocast)
        # traj.latents / next_latents: [B, T, 4, h, w] (h = w = resolution / 8), images: [B, 3, H, W] fp32
        last[:] = [traj]
        return bool(torch.isfinite(traj.images).all() and torch.isfinite(traj.log_probs).all())

    pipe.unet.eval()
    reset_peak_memory(device)
    phase = time_iterations(device, args.warmup, args.iters, step)
    phase.peak_gib = peak_memory_gib(device)
    return phase, last[0]


def measure_training(
    pipe: StableDiffusionPipeline,
    params: list[torch.nn.Parameter],
    traj: Trajectories,
    args: argparse.Namespace,
    autocast: Callable[[], AbstractContextManager],
    dtype: torch.dtype,
) -> Phase:
    """One iteration: a micro-batch of b = args.train_batch trajectories, K = args.train_steps stored steps each;
    per step recompute_log_prob (UNet on the CFG-doubled batch 2b) + a clipped-ratio surrogate loss + backward,
    accumulated over the K steps; then grad clipping and one AdamW step."""
    device = pipe.unet.device
    K = args.train_steps
    idx = torch.arange(args.train_batch, device=traj.latents.device) % len(traj)  # repeats if b > B
    lat = traj.latents[idx, :K]  # [b, K, 4, h, w]
    nxt = traj.next_latents[idx, :K]  # [b, K, 4, h, w]
    ts = traj.timesteps[idx, :K]  # [b, K]
    old_lp = traj.log_probs[idx, :K]  # [b, K] fp32
    cond = {k: v[idx] for k, v in traj.cond.items()}  # [b, 77, D] prompt / negative embeddings
    adv = torch.randn(args.train_batch, generator=torch.Generator().manual_seed(0)).to(device)  # [b]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    use_scaler = dtype == torch.float16 and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    def step() -> bool:
        optimizer.zero_grad(set_to_none=True)
        finite = True
        for j in range(K):
            with autocast():
                out = recompute_log_prob(pipe, pipe.unet, lat[:, j], nxt[:, j], ts[:, j], cond, GUIDANCE_SCALE, ETA)
            ratio = torch.exp(out.log_prob - old_lp[:, j])  # [b] fp32
            clipped = torch.clamp(ratio, 1 - 1e-4, 1 + 1e-4)
            loss = torch.maximum(-adv * ratio, -adv * clipped).mean() / K  # scalar
            (scaler.scale(loss) if scaler else loss).backward()
            finite &= bool(torch.isfinite(loss))
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if scaler:
            scaler.step(optimizer)  # skipped (as in training) when the gradients are not finite
            scaler.update()
        else:
            optimizer.step()
        return finite

    pipe.unet.train()
    reset_peak_memory(device)
    phase = time_iterations(device, args.warmup, args.iters, step)
    phase.peak_gib = peak_memory_gib(device)
    return phase


# --------------------------------------------------------------------------------------------
# One cell of the table
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    dtype: str
    backend: str
    note: str | None = None  # why the cell was not measured
    trainable_params: int | None = None  # LoRA parameters (fp32)
    sampling: Phase | None = None
    training: Phase | None = None
    sampling_samples_per_s: float | None = None
    train_traj_steps_per_s: float | None = None
    train_samples_per_s: float | None = None
    sampling_ratio: float | None = None  # vs the first measured row
    train_ratio: float | None = None


def run_cell(sizes: Sizes, dtype_name: str, backend: str, args: argparse.Namespace) -> Row:
    row = Row(dtype_name, backend)
    device = torch.device(args.device)
    row.note = dtype_problem(device, dtype_name) or (xformers_problem(device) if backend == "xformers" else None)
    if row.note:
        return row
    dtype = DTYPES[dtype_name]
    log(f"{dtype_name}+{backend}: building the {sizes.name} pipeline")
    pipe = build_pipeline(sizes, args.resolution, device, dtype)
    set_attention_backend(pipe.unet, backend)  # drl's order: attention processors, then LoRA
    params = prepare_trainable_denoiser(pipe, True, args.lora_rank, float(args.lora_rank), LORA_TARGETS)  # fp32 LoRA
    row.trainable_params = sum(p.numel() for p in params)
    autocast = autocast_factory(device, dtype)
    log(f"{dtype_name}+{backend}: sampling ({args.warmup} warm-up + {args.iters} timed)")
    row.sampling, traj = measure_sampling(pipe, args, autocast)
    log(f"{dtype_name}+{backend}: training ({args.warmup} warm-up + {args.iters} timed)")
    row.training = measure_training(pipe, params, traj, args, autocast, dtype)
    row.sampling_samples_per_s = args.batch * len(row.sampling.seconds) / sum(row.sampling.seconds)
    row.train_traj_steps_per_s = args.train_batch * args.train_steps * len(row.training.seconds) / sum(row.training.seconds)
    row.train_samples_per_s = row.train_traj_steps_per_s / args.train_steps
    del pipe, params, traj
    return row


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_table(rows: list[Row], args: argparse.Namespace) -> str:
    K = args.train_steps
    header = (
        "| dtype | attention | sampling samples/s | sampling vs first | train traj-steps/s "
        f"| train samples/s (K={K}) | train vs first | peak GiB sampling | peak GiB training |"
    )
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        if r.note:
            lines.append(f"| {r.dtype} | {r.backend} | {r.note} | - | - | - | - | - | - |")
            continue
        lines.append(
            f"| {r.dtype} | {r.backend} | {_num(r.sampling_samples_per_s, 3)} | {_num(r.sampling_ratio)} "
            f"| {_num(r.train_traj_steps_per_s, 3)} | {_num(r.train_samples_per_s, 3)} | {_num(r.train_ratio)} "
            f"| {_num(r.sampling.peak_gib)} | {_num(r.training.peak_gib)} |"
        )
    return "\n".join(lines)


def describe_setup(sizes: Sizes, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    with torch.device("meta"):  # parameter counts without allocating anything
        unet = UNet2DConditionModel(sample_size=args.resolution // sizes.vae_scale, **sizes.unet)
        vae = AutoencoderKL(sample_size=args.resolution, **sizes.vae)
        text = CLIPTextModel(CLIPTextConfig(**sizes.text))

    latent = args.resolution // sizes.vae_scale
    return {
        "model": sizes.name,
        "params_m": {"unet": count_params(unet) / 1e6, "vae": count_params(vae) / 1e6, "text_encoder": count_params(text) / 1e6},
        "resolution": args.resolution,
        "latent_shape": [4, latent, latent],
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "num_steps": args.steps,
        "batch": args.batch,
        "train_batch": args.train_batch,
        "train_steps": args.train_steps,
        "warmup": args.warmup,
        "iters": args.iters,
        "guidance_scale": GUIDANCE_SCALE,
        "eta": ETA,
        "lora": {"rank": args.lora_rank, "alpha": args.lora_rank, "target_modules": LORA_TARGETS},
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
        },
    }


def log(message: str) -> None:
    print(f"[gpu_throughput] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _names(values: list[str], allowed, what: str, parser: argparse.ArgumentParser) -> list[str]:
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        parser.error(f"--{what}: {bad or names} not among {', '.join(allowed)}")
    return names


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Sizes]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random networks instead of SD1.5 sizes (CPU smoke test)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps per trajectory (default 20)")
    p.add_argument("--batch", type=int, default=8, help="sampling batch, before CFG doubling (default 8)")
    p.add_argument("--train-batch", type=int, default=4, help="training micro-batch, before CFG doubling (default 4)")
    p.add_argument("--train-steps", type=int, default=None, help="trained steps per trajectory K (default: all --steps)")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per phase and cell (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up iterations per phase and cell (default 1)")
    p.add_argument("--dtypes", nargs="+", default=None, help="fp16 bf16 fp32 (default: fp16,bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--backends", nargs="+", default=["sdpa,xformers"], help="sdpa xformers (default: both)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default 512; --tiny: 64)")
    p.add_argument("--lora-rank", type=int, default=4, help="LoRA rank = alpha (default 4)")
    p.add_argument("--out", default=None, help="also write the results as JSON to this path")
    args = p.parse_args(argv)
    sizes = TINY if args.tiny else SD15
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.resolution = args.resolution or sizes.default_resolution
    args.train_steps = args.steps if args.train_steps is None else args.train_steps
    args.dtypes = _names(args.dtypes or ["fp16,bf16" if args.device.startswith("cuda") else "fp32"], DTYPES, "dtypes", p)
    args.backends = _names(args.backends, BACKENDS, "backends", p)
    for name in ("steps", "batch", "train_batch", "iters", "lora_rank", "train_steps", "resolution"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.train_steps > args.steps:
        p.error(f"--train-steps ({args.train_steps}) cannot exceed --steps ({args.steps})")
    multiple = sizes.vae_scale * sizes.unet_scale
    if args.resolution % multiple:
        p.error(f"--resolution must be a multiple of {multiple} for the {sizes.name} networks, got {args.resolution}")
    return args, sizes


def main(argv: list[str] | None = None) -> int:
    args, sizes = parse_args(argv)
    diffusers.utils.logging.set_verbosity_error()  # not the "modules to keep in float32: []" notice of .to(dtype)
    if not args.tiny and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        print(
            "gpu_throughput.py: error: the SD1.5-sized benchmark needs a CUDA GPU "
            f"(device {args.device!r}, torch.cuda.is_available() = {torch.cuda.is_available()}). "
            "For a CPU smoke test of the same code path with tiny networks, run:\n"
            "  python benchmarks/gpu_throughput.py --tiny --device cpu --iters 1 --steps 2",
            file=sys.stderr,
        )
        return 2
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # as drl's trainer
    setup = describe_setup(sizes, args)
    t_start = time.perf_counter()
    rows = []
    for dtype_name in args.dtypes:
        for backend in args.backends:
            rows.append(run_cell(sizes, dtype_name, backend, args))
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    measured = [r for r in rows if not r.note]
    first = measured[0] if measured else None
    for r in measured:
        r.sampling_ratio = r.sampling_samples_per_s / first.sampling_samples_per_s
        r.train_ratio = r.train_samples_per_s / first.train_samples_per_s
    elapsed = time.perf_counter() - t_start

    p = setup["params_m"]
    print(
        f"## drl throughput: {setup['model']} random weights ({p['unet']:.4g} M UNet, {p['vae']:.4g} M VAE, "
        f"{p['text_encoder']:.4g} M text encoder) on {setup['device']}\n"
    )
    print(
        f"{args.resolution} px (latents 4x{args.resolution // sizes.vae_scale}x{args.resolution // sizes.vae_scale}), "
        f"{args.steps} DDIM steps, eta {ETA}, CFG {GUIDANCE_SCALE}; sampling batch {args.batch}, train micro-batch "
        f"{args.train_batch} x K={args.train_steps} steps per trajectory; LoRA r={args.lora_rank} on "
        f"{', '.join(LORA_TARGETS)}; {args.warmup} warm-up + {args.iters} timed iterations per phase; "
        f"torch {torch.__version__}\n"
    )
    print(format_table(rows, args))
    print()
    if first:
        print(f"'vs first' = ratio to {first.dtype}+{first.backend} measured in this run.")
    if not args.device.startswith("cuda"):
        print("Peak memory: n/a on the CPU.")
    for r in measured:
        if not (r.sampling.finite and r.training.finite):
            print(
                f"Note: {r.dtype}+{r.backend} produced non-finite values with the random weights (timings still "
                "use the same kernels; with fp16 GradScaler skips those optimizer steps)."
            )
    print(f"Total benchmark time: {elapsed:.1f} s")

    if args.out:
        result = {"setup": setup, "elapsed_s": elapsed, "rows": [asdict(r) for r in rows]}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, allow_nan=False)
        print(f"Wrote {args.out}")
    return 0 if measured else 1


if __name__ == "__main__":
    sys.exit(main())
