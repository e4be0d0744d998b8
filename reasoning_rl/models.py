"""Loading causal language models and vision-language (image-text) models with their tokenizers / processors,
the tiny offline models, LoRA (peft) and saving.

Model code only: knows nothing of the CLI or the trainer loop. Never imports diffusers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

BUILTIN_TINY_LM = "builtin:tiny-random-lm"
BUILTIN_TINY_VLM = "builtin:tiny-random-vlm"
BUILTIN_TINY_ARITH_LM = "builtin:tiny-arith-lm"  # shipped weights: reasoning_rl/assets/tiny_lm (reasoning_rl.world)
BUILTIN_TINY_SHAPES_VLM = "builtin:tiny-shapes-vlm"  # shipped weights: reasoning_rl/assets/tiny_vlm
# shipped weights: reasoning_rl/assets/tiny_lm_mixed, the arithmetic LM further trained on a corpus where half of the
# solutions are bare answers (it often answers without working; configs/reason_default.yaml's policy)
BUILTIN_TINY_ARITH_LM_MIXED = "builtin:tiny-arith-lm-mixed"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# A ChatML template (Qwen's shape): what the tiny model's tokenizer formats conversations with.
# Content is a string or (vision-language) a list of {"type": "image"} / {"type": "text", "text": ...} parts.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|unk|>"]


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says which, why, and what to pass instead."""


# --------------------------------------------------------------------------------------------
# The tiny model: a real transformers Qwen2 with toy sizes and a character tokenizer, built offline.
# --------------------------------------------------------------------------------------------


def char_tokenizer(extra_chars: str = "") -> PreTrainedTokenizerFast:
    """One token per character of printable ASCII plus newline (and `extra_chars`), ChatML special tokens and
    a chat template; `<|im_end|>` ends a turn (eos), `<|pad|>` pads on the left for generation."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = sorted(set("\n" + "".join(chr(c) for c in range(32, 127)) + extra_chars))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(chars)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
    backend.decoder = decoders.Fuse()  # join characters back without spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|pad|>", eos_token="<|im_end|>", unk_token="<|unk|>",
        additional_special_tokens=["<|im_start|>", *VISION_TOKENS], padding_side="left", model_max_length=1024,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _seeded_init(model_class, config, seed: int, tokenizer):
    """`model_class(config)` with weights drawn from `seed`, leaving the global RNG as it was; generation pads and
    stops with the tokenizer's ids."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = model_class(config)
    finally:
        torch.random.set_rng_state(state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_tiny_causal_lm(seed: int = 0, tokenizer: PreTrainedTokenizerFast | None = None) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """A randomly initialised 2-layer Qwen2 (~60k parameters) with the character tokenizer; deterministic in
    `seed` and leaves the global RNG as it found it."""
    tokenizer = tokenizer or char_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return _seeded_init(Qwen2ForCausalLM, config, seed, tokenizer), tokenizer


def build_tiny_vlm(seed: int = 0):
    """A randomly initialised Qwen2-VL (1 vision block, 2 text layers; ~0.1 M parameters) with a Qwen2-VL
    processor over the character tokenizer (images resized to 4-16 patches of 28 px); deterministic in `seed`.
    Loadable with AutoModelForImageTextToText + AutoProcessor once saved."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = char_tokenizer()
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size={"shortest_edge": 4 * 28 * 28, "longest_edge": 16 * 28 * 28}),
        tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(), chat_template=CHATML_TEMPLATE,
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids["<|image_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True,
    )
    return _seeded_init(Qwen2VLForConditionalGeneration, config, seed, tokenizer), processor


def is_vision_language(model) -> bool:
    return getattr(model.config, "vision_config", None) is not None


def set_image_pixels(processor, min_pixels: int | None, max_pixels: int | None) -> None:
    """Bound the pixels each image is resized to (Qwen2-VL's min_pixels / max_pixels)."""
    if min_pixels is None and max_pixels is None:
        return
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        raise ModelLoadError("prompts.min_pixels / max_pixels need a vision-language model with an image processor")
    size = dict(image_processor.size)
    image_processor.size = {"shortest_edge": min_pixels or size.get("shortest_edge"),
                            "longest_edge": max_pixels or size.get("longest_edge")}


def vision_tower(model):
    """The image encoder of a vision-language model (Qwen2-VL's `visual`, LLaVA's `vision_tower`), or None."""
    for owner in (model, getattr(model, "model", None)):
        for name in ("visual", "vision_tower", "vision_model"):
            if owner is not None and isinstance(getattr(owner, name, None), torch.nn.Module):
                return getattr(owner, name)
    return None


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


# built-in name -> (its directory's name in reasoning_rl.world, the script that trains it)
SHIPPED_MODELS = {
    BUILTIN_TINY_ARITH_LM: ("TINY_ARITH_LM", "pretrain"),
    BUILTIN_TINY_ARITH_LM_MIXED: ("TINY_ARITH_LM_MIXED", "pretrain"),
    BUILTIN_TINY_SHAPES_VLM: ("TINY_SHAPES_VLM", "pretrain_vlm"),
}


def load_policy(
    pretrained: str, revision: str | None = None, dtype: str = "float32", local_files_only: bool = False,
    trust_remote_code: bool = False, gguf_file: str | None = None, seed: int = 0,
):
    """(model, processor) from a hub id, a local directory (optionally a GGUF file in it) or a built-in tiny model.
    A causal LM comes with its tokenizer, a vision-language model (a config with `vision_config`, loaded with
    AutoModelForImageTextToText) with its processor; either pads on the left (generation) and has a pad token."""
    if pretrained in (BUILTIN_TINY_LM, BUILTIN_TINY_VLM):
        model, processor = build_tiny_causal_lm(seed) if pretrained == BUILTIN_TINY_LM else build_tiny_vlm(seed)
        return model.to(DTYPES[dtype]), processor
    if pretrained in SHIPPED_MODELS:  # shipped directories, loaded as local ones
        from reasoning_rl import world

        directory, script = SHIPPED_MODELS[pretrained]
        shipped = getattr(world, directory)
        if not (shipped / "config.json").is_file():
            raise ModelLoadError(f"{pretrained}: the shipped model is missing from {shipped}; "
                                 f"reinstall drl or train it with `python -m reasoning_rl.world.{script}`")
        pretrained = str(shipped)
    if pretrained.startswith("builtin:"):
        raise ModelLoadError(f"unknown built-in model {pretrained!r}; the built-ins are "
                             f"{', '.join([BUILTIN_TINY_LM, BUILTIN_TINY_VLM, *SHIPPED_MODELS])}")
    local = Path(pretrained)
    if local.exists() and not (local / "config.json").is_file() and not gguf_file:
        raise ModelLoadError(
            f"model.pretrained={pretrained!r} is a directory without config.json; pass a transformers model "
            "directory, a hub id, or model.gguf_file for a GGUF file in that directory"
        )
    kwargs = dict(revision=revision, local_files_only=local_files_only, trust_remote_code=trust_remote_code)
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        config = AutoConfig.from_pretrained(pretrained, **kwargs)
        vlm = getattr(config, "vision_config", None) is not None
        auto_model = AutoModelForImageTextToText if vlm else AutoModelForCausalLM
        tokenizer = (AutoProcessor if vlm else AutoTokenizer).from_pretrained(pretrained, **kwargs)
        model = auto_model.from_pretrained(pretrained, dtype=DTYPES[dtype] if not gguf_file else None, **kwargs)
    except (OSError, ValueError) as err:
        hint = ("" if trust_remote_code else "; if the repository needs its own code, set model.trust_remote_code=true "
                "(it runs that code)")
        raise ModelLoadError(
            f"could not load model {pretrained!r} (revision {revision}): {str(err).splitlines()[0]}. Pass a hub id, "
            f"a local directory with config.json, or {BUILTIN_TINY_LM}{hint}"
        ) from None
    if gguf_file:
        model = model.to(DTYPES[dtype])
    text_tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    text_tokenizer.padding_side = "left"
    if text_tokenizer.pad_token is None:
        text_tokenizer.pad_token = text_tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = text_tokenizer.pad_token_id
    return model, tokenizer


def prepare_trainable(model, use_lora: bool, rank: int, alpha: float, target_modules: list[str],
                      gradient_checkpointing: bool = False, freeze_vision_tower: bool = True):
    """LoRA adapters (peft, fp32) on `target_modules` of the language model, or every weight trainable (the
    vision tower of a vision-language model frozen when asked). Returns (model, params)."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    tower = vision_tower(model)
    if not use_lora:
        model.requires_grad_(True)
        if tower is not None and freeze_vision_tower:
            tower.requires_grad_(False)
        return model, [p for p in model.parameters() if p.requires_grad]
    from peft import LoraConfig, get_peft_model

    tower_names = {id(m) for m in tower.modules()} if tower is not None else set()
    present = {name.split(".")[-1] for name, m in model.named_modules() if id(m) not in tower_names}
    missing = [t for t in target_modules if t.split(".")[-1] not in present]
    if len(missing) == len(target_modules):
        raise ModelLoadError(
            f"model.lora_target_modules {target_modules} match no module of {type(model).__name__}; its linear "
            f"layers include {sorted(n for n in present if n.endswith('proj'))[:12]}"
        )
    if "lm_head" in target_modules and getattr(model.config, "tie_word_embeddings", False):
        raise ModelLoadError("LoRA on lm_head of a model with tied embeddings is not supported; drop lm_head from "
                             "model.lora_target_modules")
    targets = [t for t in target_modules if t not in missing]
    if tower is not None:  # adapters on the language model only: a regex over module paths outside the tower
        tower_prefix = next(n for n, m in model.named_modules() if m is tower)
        targets = rf"^(?!{tower_prefix}\.).*\.({'|'.join(t.replace('.', chr(92) + '.') for t in targets)})$"
    lora = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # trainable parameters in fp32 whatever the frozen dtype
    return model, params


def save_trained(model, tokenizer, use_lora: bool, out_dir: str | Path) -> Path:
    """LoRA: `out_dir/lora` in peft's format (`PeftModel.from_pretrained(base, out_dir/lora)` loads it); full
    fine-tune: `out_dir/model` with `save_pretrained` (safetensors) and the tokenizer (or processor)."""
    out = Path(out_dir) / ("lora" if use_lora else "model")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
