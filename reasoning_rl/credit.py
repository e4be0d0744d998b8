"""Token-level step credit: character spans of a completion judged right (+1) or wrong (-1) by a verifier become a
[B, C] credit added to the outcome advantage of the tokens that wrote them (`credit.kind`, not `sparse`).

    char_ends = token_char_ends(tokenizer, completion_ids, completion_mask, texts)  # per row: end offset of each token
    credit = spans_to_token_credit(spans, char_ends, C)                        # [B, C] fp32 in {-1, 0, +1}
    advantages = outcome_advantages[:, None] + weight * credit                 # [B, C]

The diffusion half's CoCA gives each denoising step its own share of the reward; here a verifier gives each checked
step of a reasoning trace its own sign. The verifiers are the worlds' (`reasoning_rl.world.fact_credit` for the
arithmetic world), keyed by `credit.kind` in `VERIFIERS`. Knows nothing of models beyond a tokenizer's `decode`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def _arithmetic_facts(text: str) -> list[tuple[int, int, float]]:
    from reasoning_rl.world.fact_credit import fact_spans

    return fact_spans(text)


# credit.kind -> verifier(completion text) -> [(char start, char end exclusive, sign)]
VERIFIERS: dict[str, Callable[[str], list[tuple[int, int, float]]]] = {"arithmetic_facts": _arithmetic_facts}


def token_char_ends(tokenizer, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                    texts: Sequence[str]) -> list[list[int]]:
    """For each row, the end offset (exclusive) of each real completion token in `texts` (the completions decoded
    without special tokens: what the reward and the verifier read). Each distinct id is decoded once and the pieces
    are concatenated; where they do not add up to the row's text (tokenizers that merge bytes or spaces across
    tokens), that row falls back to decoding every prefix."""
    ids = completion_ids.tolist()
    lengths = completion_mask.sum(1).tolist()
    piece: dict[int, str] = {}
    ends = []
    for row, n, text in zip(ids, lengths, texts, strict=True):
        row = row[:n]
        for token in row:
            if token not in piece:
                piece[token] = tokenizer.decode([token], skip_special_tokens=True)
        offsets, total = [], 0
        for token in row:
            total += len(piece[token])
            offsets.append(total)
        if total != len(text) or "".join(piece[t] for t in row) != text:
            offsets = [len(tokenizer.decode(row[: t + 1], skip_special_tokens=True)) for t in range(len(row))]
        ends.append(offsets)
    return ends


def spans_to_token_credit(spans: Sequence[Sequence[tuple[int, int, float]]], char_ends: Sequence[Sequence[int]],
                          width: int) -> torch.Tensor:
    """[B, width] fp32: a token takes the sign of the span its characters overlap (the last one, should two spans
    share a token); 0 for tokens outside every span and past each row's end."""
    credit = torch.zeros(len(char_ends), width, dtype=torch.float32)
    for b, (row_spans, ends) in enumerate(zip(spans, char_ends, strict=True)):
        start = 0
        for t, end in enumerate(ends):
            for s, e, sign in row_spans:
                if start < e and s < end:  # [start, end) overlaps [s, e)
                    credit[b, t] = sign
            start = end
    return credit


def step_credit(kind: str, tokenizer, completions: Sequence[str], completion_ids: torch.Tensor,
                completion_mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The [B, C] credit of `kind`'s verifier for these completions, and its statistics: ``credit/steps_checked``
    (verified steps per completion) and ``credit/step_accuracy`` (the share judged right; NaN when none)."""
    if kind not in VERIFIERS:
        raise ValueError(f"unknown credit.kind {kind!r}; use 'sparse' or one of {sorted(VERIFIERS)}")
    spans = [VERIFIERS[kind](text) for text in completions]
    ends = token_char_ends(tokenizer, completion_ids, completion_mask, completions)
    credit = spans_to_token_credit(spans, ends, completion_ids.shape[1])
    signs = [sign for row in spans for _, _, sign in row]
    right = sum(1 for sign in signs if sign > 0)
    return credit, {"credit/steps_checked": len(signs) / max(len(completions), 1),
                    "credit/step_accuracy": right / len(signs) if signs else float("nan")}
