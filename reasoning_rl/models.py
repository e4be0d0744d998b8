"""Loading causal language models and their tokenizers, the tiny offline model, LoRA (peft) and saving.

Model code only: knows nothing of the CLI or the trainer loop. Never imports diffusers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

BUILTIN_TINY_LM = "builtin:tiny-random-lm"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# A ChatML template (Qwen's shape): what the tiny model's tokenizer formats conversations with.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
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
        additional_special_tokens=["<|im_start|>"], padding_side="left", model_max_length=1024,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_causal_lm(seed: int = 0, tokenizer: PreTrainedTokenizerFast | None = None) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """A randomly initialised 2-layer Qwen2 (~60k parameters) with the character tokenizer; deterministic in
    `seed` and leaves the global RNG as it found it."""
    tokenizer = tokenizer or char_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = Qwen2ForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_policy(
    pretrained: str, revision: str | None = None, dtype: str = "float32", local_files_only: bool = False,
    trust_remote_code: bool = False, gguf_file: str | None = None, seed: int = 0,
):
    """(model, tokenizer) from a hub id, a local directory (optionally a GGUF file in it) or the built-in tiny
    model. The tokenizer pads on the left (generation) and has a pad token."""
    if pretrained == BUILTIN_TINY_LM:
        model, tokenizer = build_tiny_causal_lm(seed)
        return model.to(DTYPES[dtype]), tokenizer
    if pretrained.startswith("builtin:"):
        raise ModelLoadError(f"unknown built-in model {pretrained!r}; the built-in language model is {BUILTIN_TINY_LM}")
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
        tokenizer = AutoTokenizer.from_pretrained(pretrained, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=DTYPES[dtype] if not gguf_file else None, **kwargs)
    except (OSError, ValueError) as err:
        hint = ("" if trust_remote_code else "; if the repository needs its own code, set model.trust_remote_code=true "
                "(it runs that code)")
        raise ModelLoadError(
            f"could not load model {pretrained!r} (revision {revision}): {str(err).splitlines()[0]}. Pass a hub id, "
            f"a local directory with config.json, or {BUILTIN_TINY_LM}{hint}"
        ) from None
    if gguf_file:
        model = model.to(DTYPES[dtype])
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def prepare_trainable(model, use_lora: bool, rank: int, alpha: float, target_modules: list[str],
                      gradient_checkpointing: bool = False):
    """LoRA adapters (peft, fp32) on `target_modules`, or every weight trainable. Returns (model, params)."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if not use_lora:
        model.requires_grad_(True)
        return model, [p for p in model.parameters() if p.requires_grad]
    from peft import LoraConfig, get_peft_model

    present = {name.split(".")[-1] for name, _ in model.named_modules()}
    missing = [t for t in target_modules if t.split(".")[-1] not in present]
    if len(missing) == len(target_modules):
        raise ModelLoadError(
            f"model.lora_target_modules {target_modules} match no module of {type(model).__name__}; its linear "
            f"layers include {sorted(n for n in present if n.endswith('proj'))[:12]}"
        )
    if "lm_head" in target_modules and getattr(model.config, "tie_word_embeddings", False):
        raise ModelLoadError("LoRA on lm_head of a model with tied embeddings is not supported; drop lm_head from "
                             "model.lora_target_modules")
    lora = LoraConfig(r=rank, lora_alpha=alpha, target_modules=[t for t in target_modules if t not in missing],
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # trainable parameters in fp32 whatever the frozen dtype
    return model, params


def save_trained(model, tokenizer, use_lora: bool, out_dir: str | Path) -> Path:
    """LoRA: `out_dir/lora` in peft's format (`PeftModel.from_pretrained(base, out_dir/lora)` loads it); full
    fine-tune: `out_dir/model` with `save_pretrained` (safetensors) and the tokenizer."""
    out = Path(out_dir) / ("lora" if use_lora else "model")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
