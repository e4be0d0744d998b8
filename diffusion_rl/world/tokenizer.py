"""A word-level ``CLIPTokenizer`` for the shapes world: every caption word is exactly one token.

transformers 5's ``CLIPTokenizer`` is a byte-level BPE (tokenizers backend) with the ``</w>``
end-of-word suffix. A word-level vocabulary therefore still needs merges: starting from a word's
characters (the last one carrying ``</w>``), we repeatedly add the merge of its first two current
symbols until the whole word is one symbol. Words outside the world fall back to characters, and
characters outside the world to ``<|endoftext|>`` (the unknown token, as in CLIP).
"""

from __future__ import annotations

from transformers import CLIPTokenizer

from diffusion_rl.world.shapes import all_prompts

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77  # the text encoder's positions; the pipeline pads every prompt to this length


def world_words() -> list[str]:
    """The sorted caption vocabulary (``"left of"`` is two words)."""
    return sorted({w for p in all_prompts() for w in p.split()})


def build_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary (specials, characters, merged symbols) and the merges that make each word one token."""
    symbols: list[str] = [BOS, EOS]
    merges: list[tuple[str, str]] = []

    def add(symbol: str) -> None:
        if symbol not in symbols:
            symbols.append(symbol)

    splits = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    for parts in splits.values():
        for ch in parts:
            add(ch)
        add(parts[-1][:-4])  # the bare character too, so any in-world letter is known mid-word
    while any(len(parts) > 1 for parts in splits.values()):
        word = next(w for w, parts in splits.items() if len(parts) > 1)
        pair = (splits[word][0], splits[word][1])
        merged = pair[0] + pair[1]
        merges.append(pair)
        add(merged)
        for w, parts in splits.items():  # apply the new merge everywhere, leftmost first, like BPE
            i = 0
            while i < len(parts) - 1:
                if (parts[i], parts[i + 1]) == pair:
                    parts[i : i + 2] = [merged]
                i += 1
            splits[w] = parts
    return {s: i for i, s in enumerate(symbols)}, merges


def build_tokenizer() -> CLIPTokenizer:
    """The world's tokenizer; ``pad_token == eos_token`` as in Stable Diffusion 1.x."""
    vocab, merges = build_vocab_and_merges(world_words())
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, unk_token=EOS, bos_token=BOS, eos_token=EOS, pad_token=EOS)
    tokenizer.model_max_length = MODEL_MAX_LENGTH
    return tokenizer
