"""The agent's built-in backbone: a tiny Llama over a word-level tokenizer of an environment's vocabulary.

Why words: a text environment's observations are ~100 characters but ~25 words; at one token per word a decision
(`go kitchen`, `put apple in box`) is 2-4 tokens, so a CPU trains the agent in minutes. Any transformers causal LM
works instead (`model.pretrained: builtin:tiny-arith-lm`, a hub id, a local directory): the prompts are plain text.

`word_tokenizer(words)`: WordLevel over the words plus punctuation (split by `tokenizers`' Whitespace
pre-tokenizer: runs of letters/digits or of punctuation), an `<|unk|>` for anything else, `<|im_end|>` as eos,
`<|pad|>`, left padding; decoding joins words with spaces. `build_word_lm` draws the weights from a seed (the global
RNG is left as it was).
"""

from __future__ import annotations

import re

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from reasoning_rl.models import _seeded_init

SPECIAL = ["<|pad|>", "<|im_end|>", "<|unk|>"]
PUNCTUATION = list(":;>.,-!?'\"()[]/")


def words_of(texts: list[str]) -> list[str]:
    """The sorted distinct words (runs of letters, digits and underscores) of `texts`, lower-cased."""
    return sorted({w for t in texts for w in re.findall(r"\w+", t.lower())})


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for w in [*PUNCTUATION, *words]:
        vocab.setdefault(w, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|pad|>", eos_token="<|im_end|>",
                                   unk_token="<|unk|>", padding_side="left", model_max_length=512)


def build_word_lm(words: list[str], seed: int = 0, hidden_size: int = 64, layers: int = 2, heads: int = 4):
    """(a randomly initialised LlamaForCausalLM, its word tokenizer); deterministic in `seed`."""
    tokenizer = word_tokenizer(words)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=3 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return _seeded_init(LlamaForCausalLM, config, seed, tokenizer), tokenizer
