"""Loading diffusion pipelines (SD 1.x/2.x, SDXL, SD3, FLUX), the tiny offline pipelines, LoRA (peft) and saving.

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
BUILTIN_MODELS = {
    "tiny-random": None,  # built from configs (SD-style); the tiny-random-* below likewise (tiny_pipelines.py)
    "tiny-random-sdxl": None,
    "tiny-random-sd3": None,
    "tiny-random-flux": None,
    "tiny-shapes": ASSETS / "tiny-shapes",  # shipped: the shapes world's DDIM model (world/pretrain.py)
    "tiny-shapes-flow": ASSETS / "tiny-shapes-flow",  # shipped: its rectified-flow SD3-style model (world/pretrain_flow.py)
}
# T5 tokens the built-in flow models were trained / are built with (their pipelines' max_sequence_length)
BUILTIN_MAX_SEQUENCE_LENGTH = {"tiny-shapes-flow": 4, "tiny-random-sd3": 8, "tiny-random-flux": 8}
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


def builtin_max_sequence_length(pretrained: str) -> int | None:
    return BUILTIN_MAX_SEQUENCE_LENGTH.get(pretrained[len(BUILTIN_PREFIX):]) if pretrained.startswith(BUILTIN_PREFIX) else None


def _build_builtin(key: str, seed: int):
    if key == "tiny-random":
        return build_tiny_pipeline(seed)
    from diffusion_rl.tiny_pipelines import TINY_BUILDERS

    return TINY_BUILDERS[key](seed)


def load_pipeline(
    pretrained: str,
    revision: str | None = None,
    dtype: str = "float32",
    local_files_only: bool = False,
    seed: int = 0,
):
    """Load a StableDiffusion / StableDiffusionXL / StableDiffusion3 / Flux pipeline from a hub id, a local directory
    or a `builtin:` name; the family follows the pipeline's model_index.json.

    DDIM families (SD, SDXL) always sample with a DDIMScheduler built from the pipeline's scheduler config (DDPO's
    policy); flow families keep their FlowMatchEulerDiscreteScheduler (with its shift).
    """
    from diffusion_rl.families import PIPELINE_FAMILY

    torch_dtype = DTYPES[dtype]
    if pretrained.startswith(BUILTIN_PREFIX):
        path = resolve_builtin(pretrained)
        if path is None:
            pipe = _build_builtin(pretrained[len(BUILTIN_PREFIX):], seed)
            pipe.to(dtype=torch_dtype)
            return pipe
        pretrained = str(path)
    local = Path(pretrained)
    if local.exists() and not (local / "model_index.json").is_file():
        raise ModelLoadError(
            f"model path {pretrained!r} exists but has no model_index.json; pass a directory saved with "
            "the pipeline's save_pretrained or a hub id"
        )
    index = _model_index(pretrained, revision, local_files_only)
    class_name = index["_class_name"]
    if class_name not in PIPELINE_FAMILY:
        raise ModelLoadError(
            f"{pretrained!r} is a {class_name}; drl trains {', '.join(sorted(PIPELINE_FAMILY))} pipelines"
        )
    import diffusers

    # diffusers wants the optional components the index lists as null (no T5, no image encoder) named as None
    absent = {name: None for name, value in index.items() if isinstance(value, list) and value[0] is None}
    if class_name == "StableDiffusionPipeline":
        absent.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = getattr(diffusers, class_name).from_pretrained(
            pretrained, revision=revision, torch_dtype=torch_dtype, local_files_only=local_files_only, **absent,
        )
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"could not load a {class_name} from {pretrained!r} (revision={revision}): {err}\n"
            "Pass a local directory containing model_index.json, a reachable hub id, or builtin:tiny-random."
        ) from None
    if PIPELINE_FAMILY[class_name] in ("sd", "sdxl"):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def _model_index(pretrained: str, revision: str | None, local_files_only: bool) -> dict:
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(pretrained, revision=revision, local_files_only=local_files_only)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"could not load a diffusion pipeline from {pretrained!r} (revision={revision}): {err}\n"
            "Pass a local directory containing model_index.json, a reachable hub id, or builtin:tiny-random."
        ) from None


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


def prepare_trainable_denoiser(
    pipe,
    use_lora: bool,
    rank: int,
    alpha: float,
    target_modules: list[str],
    text_encoder_rank: int = 0,
    text_encoder_alpha: float | None = None,
) -> list[torch.nn.Parameter]:
    """Freeze everything but the denoiser (UNet or transformer); LoRA through peft on it, or all of it. With
    `text_encoder_rank`, a LoRA on the text encoder too (its params come last). Trainable params are fp32."""
    from peft import LoraConfig

    from diffusion_rl.families import family_of

    family = family_of(pipe)
    for module in family.frozen_modules(pipe):
        module.requires_grad_(False).eval()  # frozen and deterministic (no dropout in the text encoders)
    denoiser = family.denoiser(pipe)
    if use_lora:
        denoiser.requires_grad_(False)
        config = LoraConfig(
            r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules)
        )
        try:
            denoiser.add_adapter(config)
        except ValueError as err:
            raise ModelLoadError(
                f"model.lora_target_modules={target_modules} matched no "
                f"{'UNet' if family.denoiser_attr == 'unet' else 'transformer'} module ({err}); "
                "use names such as to_q, to_k, to_v, to_out.0"
            ) from None
    else:
        denoiser.requires_grad_(True)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    if text_encoder_rank:
        params += add_text_encoder_lora(pipe.text_encoder, text_encoder_rank, text_encoder_alpha or text_encoder_rank)
    for p in params:
        # fp16/bf16 trainable params break GradScaler and lose small updates: keep them fp32.
        p.data = p.data.float()
    return params


TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]  # CLIP text encoder layers


def add_text_encoder_lora(text_encoder: torch.nn.Module, rank: int, alpha: float) -> list[torch.nn.Parameter]:
    """A peft LoRA adapter ("default") on a frozen CLIP text encoder's attention and MLP layers; its params.
    B starts at zero, so the encoder's output is unchanged until the first update."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=TEXT_ENCODER_LORA_TARGETS)
    inject_adapter_in_model(config, text_encoder)
    text_encoder.peft_config = {"default": config}  # what peft's state-dict helpers and diffusers' saving read
    return [p for name, p in text_encoder.named_parameters() if "lora_" in name]


def trainable_state_dict(denoiser: torch.nn.Module, use_lora: bool) -> dict[str, torch.Tensor]:
    """The trained weights only (LoRA adapters, or the whole UNet / transformer), detached fp32 copies on CPU."""
    if use_lora:
        from peft.utils import get_peft_model_state_dict

        sd = get_peft_model_state_dict(denoiser)
    else:
        sd = denoiser.state_dict()
    return {k: v.detach().float().cpu().clone() for k, v in sd.items()}


def save_trained_weights(denoiser: torch.nn.Module, use_lora: bool, out_dir: str | Path, family: str = "sd",
                         state_dict: dict[str, torch.Tensor] | None = None,
                         text_encoder: torch.nn.Module | None = None) -> Path:
    """LoRA: a directory the family's plain diffusers pipeline loads with `load_lora_weights(dir)` (holding the
    text encoder's adapter too when `text_encoder` is given).
    Full fine-tune: `unet/` or `transformer/` saved with save_pretrained (safetensors). `state_dict`: the full
    weights when the module itself holds only a shard (FSDP: `accelerator.get_state_dict`)."""
    import diffusers

    from diffusion_rl.families import FAMILIES, PIPELINE_FAMILY

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fam = FAMILIES[family]()
    if use_lora:
        pipe_class = getattr(diffusers, next(c for c, f in PIPELINE_FAMILY.items() if f == family))
        fam.save_lora(pipe_class, denoiser, out_dir, state_dict, text_encoder)
        return out_dir
    denoiser.save_pretrained(out_dir / fam.denoiser_attr, safe_serialization=True, state_dict=state_dict)
    return out_dir / fam.denoiser_attr
