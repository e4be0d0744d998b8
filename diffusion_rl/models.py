"""Loading Stable Diffusion pipelines, the tiny offline pipeline, LoRA (peft) and saving trained weights.

Model code only: knows nothing of the CLI or the trainer loop.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

BUILTIN_PREFIX = "builtin:"
ASSETS = Path(__file__).parent / "assets"
BUILTIN_MODELS = {"tiny-random": None, "tiny-shapes": ASSETS / "tiny-shapes"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says which, why, and what to pass instead."""


# --------------------------------------------------------------------------------------------
# The tiny pipeline: real diffusers/transformers components with toy sizes, built offline.
# --------------------------------------------------------------------------------------------


def byte_level_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer over the 256 byte symbols (no merges): 514 ids, any text tokenises, no download."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = printable[:], 0
    for b in range(256):  # GPT-2 byte-to-unicode: unprintable bytes map to 256 + n
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    symbols = [chr(c) for c in codes]
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def build_tiny_pipeline(seed: int = 0, sample_size: int = 8) -> StableDiffusionPipeline:
    """A randomly initialised SD-style pipeline (UNet ~0.4 M params, 16x16 images) for tests and smoke runs.

    Deterministic in `seed`, so `builtin:tiny-random` rebuilds identical weights for `drl sample` on a run.
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        unet = UNet2DConditionModel(
            sample_size=sample_size,  # latent 8x8 -> 16x16 images
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=2,  # number of heads in diffusers' naming; small keeps CPU fast
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=32,
            sample_size=2 * sample_size,
        )
        tokenizer = byte_level_clip_tokenizer()
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=512,
                eos_token_id=513,
                pad_token_id=513,
            )
        )
    finally:
        torch.random.set_rng_state(generator_state)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="trailing",
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def resolve_builtin(name: str) -> Path | None:
    """`builtin:tiny-shapes` -> its directory inside the package; None for `builtin:tiny-random`."""
    key = name[len(BUILTIN_PREFIX):]
    if key not in BUILTIN_MODELS:
        raise ModelLoadError(
            f"unknown built-in model {name!r}; built-ins are "
            + ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS)
        )
    path = BUILTIN_MODELS[key]
    if path is not None and not (path / "model_index.json").is_file():
        raise ModelLoadError(f"built-in model {name!r} is missing its weights at {path}; reinstall drl")
    return path


def load_pipeline(
    pretrained: str,
    revision: str | None = None,
    dtype: str = "float32",
    local_files_only: bool = False,
    seed: int = 0,
) -> StableDiffusionPipeline:
    """Load an SD1.x/SD2.x-style pipeline from a hub id, a local directory or a `builtin:` name.

    The scheduler is always a DDIMScheduler built from the pipeline's scheduler config (DDPO's policy).
    """
    torch_dtype = DTYPES[dtype]
    if pretrained.startswith(BUILTIN_PREFIX):
        path = resolve_builtin(pretrained)
        if path is None:
            pipe = build_tiny_pipeline(seed)
            pipe.to(dtype=torch_dtype)
            return pipe
        pretrained = str(path)
    local = Path(pretrained)
    if local.exists() and not (local / "model_index.json").is_file():
        raise ModelLoadError(
            f"model path {pretrained!r} exists but has no model_index.json; pass a directory saved with "
            "StableDiffusionPipeline.save_pretrained or a hub id"
        )
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            pretrained,
            revision=revision,
            torch_dtype=torch_dtype,
            local_files_only=local_files_only,
            safety_checker=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"could not load a Stable Diffusion pipeline from {pretrained!r} (revision={revision}): {err}\n"
            "Pass a local directory containing model_index.json, a reachable hub id, or builtin:tiny-random."
        ) from None
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def set_attention_backend(unet: UNet2DConditionModel, backend: str) -> None:
    """PyTorch SDPA (diffusers' default processor) or xformers, which needs CUDA and the package."""
    if backend == "sdpa":
        return
    if backend != "xformers":
        raise ValueError(f"model.attention={backend!r}; use sdpa or xformers")
    problems = []
    if importlib.util.find_spec("xformers") is None:
        problems.append("the xformers package is not installed (pip install 'diffusion-rl[xformers]')")
    if not torch.cuda.is_available():
        problems.append("no CUDA device is available (xformers kernels are CUDA-only)")
    if problems:
        raise ModelLoadError(
            "model.attention=xformers cannot run here: " + "; ".join(problems) + ". Use model.attention=sdpa."
        )
    unet.enable_xformers_memory_efficient_attention()


# --------------------------------------------------------------------------------------------
# Trainable parameters
# --------------------------------------------------------------------------------------------


def prepare_trainable_unet(
    pipe: StableDiffusionPipeline,
    use_lora: bool,
    rank: int,
    alpha: float,
    target_modules: list[str],
) -> list[torch.nn.Parameter]:
    """Freeze everything but the trained part; LoRA through peft or the full UNet. Trainable params are fp32."""
    from peft import LoraConfig

    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    unet = pipe.unet
    if use_lora:
        unet.requires_grad_(False)
        config = LoraConfig(
            r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules)
        )
        try:
            unet.add_adapter(config)
        except ValueError as err:
            raise ModelLoadError(
                f"model.lora_target_modules={target_modules} matched no UNet module ({err}); "
                "use names such as to_q, to_k, to_v, to_out.0"
            ) from None
    else:
        unet.requires_grad_(True)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        # fp16/bf16 trainable params break GradScaler and lose small updates: keep them fp32.
        p.data = p.data.float()
    return params


def trainable_state_dict(unet: UNet2DConditionModel, use_lora: bool) -> dict[str, torch.Tensor]:
    """The trained weights only (LoRA adapters, or the whole UNet), detached fp32 copies on CPU."""
    if use_lora:
        from peft.utils import get_peft_model_state_dict

        sd = get_peft_model_state_dict(unet)
    else:
        sd = unet.state_dict()
    return {k: v.detach().float().cpu().clone() for k, v in sd.items()}


def save_trained_weights(unet: UNet2DConditionModel, use_lora: bool, out_dir: str | Path) -> Path:
    """LoRA: a directory `StableDiffusionPipeline.load_lora_weights(dir)` loads in plain diffusers.
    Full fine-tune: `unet/` saved with save_pretrained (safetensors)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if use_lora:
        from peft.utils import get_peft_model_state_dict

        # peft's own key names (lora_A / lora_B), which diffusers loads for Linear and Conv2d alike. (Its
        # convert_state_dict_to_diffusers renames only attention keys; a file mixing both naming schemes
        # loads the conv adapters and silently drops the attention ones.) The adapter metadata carries
        # rank and alpha, so the loaded scaling is alpha / rank as trained.
        StableDiffusionPipeline.save_lora_weights(
            out_dir,
            unet_lora_layers=get_peft_model_state_dict(unet),
            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
            safe_serialization=True,
        )
        return out_dir
    unet.save_pretrained(out_dir / "unet", safe_serialization=True)
    return out_dir / "unet"
