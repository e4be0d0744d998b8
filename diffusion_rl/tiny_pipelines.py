"""Tiny randomly initialised SDXL, SD3 and FLUX pipelines built offline from configs (real diffusers and
transformers classes, toy sizes), for tests and smoke runs: `builtin:tiny-random-sdxl`, `builtin:tiny-random-sd3`,
`builtin:tiny-random-flux`. Deterministic in `seed`. (The SD 1.x-style one is `models.build_tiny_pipeline`.)
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from diffusion_rl.models import byte_level_clip_tokenizer

TINY_T5_LENGTH = 8  # T5 tokens the tiny flow pipelines encode (their max_sequence_length)


def _clip(tokenizer, projection: bool, hidden: int = 32):
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                            projection_dim=hidden, bos_token_id=512, eos_token_id=513, pad_token_id=513,
                            hidden_act="gelu")
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def tiny_t5_tokenizer() -> T5Tokenizer:
    """A Unigram T5 tokenizer over lower-case letters, digits and "▁" (no sentencepiece file, no download)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _t5(tokenizer, d_model: int = 32):
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_ff=2 * d_model, d_kv=8,
                                   num_layers=2, num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                                   eos_token_id=1))


def _vae(latent_channels: int, image_size: int, shift_factor: float | None = None) -> AutoencoderKL:
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=latent_channels,
                        layers_per_block=1, norm_num_groups=16, sample_size=image_size)
    if shift_factor is not None:
        vae.register_to_config(shift_factor=shift_factor, scaling_factor=1.5)
    return vae


def _seeded(build, seed: int):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        pipe = build()
    finally:
        torch.random.set_rng_state(state)
    for module in pipe.components.values():  # eval mode, as from_pretrained leaves them (T5 has dropout 0.1)
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe


def build_tiny_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL's structure at toy size: two CLIP encoders (the second with a projection: pooled embeds), a UNet with
    added text/time conditioning, 16x16 images from 8x8x4 latents, DDIM."""

    def build():
        tokenizer = byte_level_clip_tokenizer()
        te, te2 = _clip(tokenizer, False), _clip(tokenizer, True)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
            projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=32,
        )
        return StableDiffusionXLPipeline(
            vae=_vae(4, 16), text_encoder=te, text_encoder_2=te2, tokenizer=tokenizer, tokenizer_2=tokenizer,
            unet=unet, scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                               clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                               timestep_spacing="trailing"),
            force_zeros_for_empty_prompt=False,
        )

    return _seeded(build, seed)


def build_tiny_sd3(seed: int = 0) -> StableDiffusion3Pipeline:
    """SD3's structure at toy size: two CLIP encoders with projections and a T5 encoder, an MMDiT (2 joint blocks)
    on 8x8x4 latents (16x16 images), FlowMatchEulerDiscreteScheduler with shift 3 as SD3 ships."""

    def build():
        tokenizer, t5_tok = byte_level_clip_tokenizer(), tiny_t5_tokenizer()
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
            pos_embed_max_size=8,
        )
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(4, 16, 0.1),
            text_encoder=_clip(tokenizer, True), tokenizer=tokenizer, text_encoder_2=_clip(tokenizer, True),
            tokenizer_2=tokenizer, text_encoder_3=_t5(t5_tok, 64), tokenizer_3=t5_tok,
        )

    return _seeded(build, seed)


def build_tiny_flux(seed: int = 0, guidance_embeds: bool = True) -> FluxPipeline:
    """FLUX.1's structure at toy size: CLIP (pooled) + T5 (tokens), a transformer with 1 double and 1 single block
    on 2x2-packed 8x8x4 latents (16 tokens), guidance embedding as FLUX.1-dev (off: schnell-like), dynamic shift."""

    def build():
        tokenizer, t5_tok = byte_level_clip_tokenizer(), tiny_t5_tokenizer()
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
            axes_dims_rope=(2, 2, 4),
        )
        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                    base_image_seq_len=256, max_image_seq_len=4096)
        return FluxPipeline(
            scheduler=scheduler, vae=_vae(4, 16, 0.1), text_encoder=_clip(tokenizer, False), tokenizer=tokenizer,
            text_encoder_2=_t5(t5_tok, 32), tokenizer_2=t5_tok, transformer=transformer,
        )

    return _seeded(build, seed)


TINY_BUILDERS = {"tiny-random-sdxl": build_tiny_sdxl, "tiny-random-sd3": build_tiny_sd3,
                 "tiny-random-flux": build_tiny_flux}
