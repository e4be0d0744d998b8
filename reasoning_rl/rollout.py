"""Rollouts: G completions per prompt with transformers `generate`, and the per-token log-probs the training
forward recomputes for them.

Both sides see the same thing: left-padded prompts with position ids counted from the first real token, the
logits divided by the sampling temperature before the log-softmax, log-probs in fp32. So with unchanged
weights the recomputed log-probs equal the sampler's (ratio 1).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


@dataclass
class Rollouts:
    """B = prompts x G sequences; P prompt positions (left-padded), C completion positions (right-padded)."""

    prompt_ids: torch.Tensor  # [B, P] long, left-padded
    prompt_mask: torch.Tensor  # [B, P] long, 1 = real token
    completion_ids: torch.Tensor  # [B, C] long
    completion_mask: torch.Tensor  # [B, C] long, 1 up to and including the end-of-sequence token
    stopped: torch.Tensor  # [B] bool, ended by the eos token or a stop string (else cut at max_new_tokens)
    completions: list[str]  # [B] decoded, without special tokens
    prompts: list[str]  # [B] the problems (group keys, reward inputs), G consecutive copies each
    metadata: list[dict]  # [B]

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def lengths(self) -> torch.Tensor:  # [B] completion tokens
        return self.completion_mask.sum(1)

    def rows(self, index: slice | torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors of a subset of sequences (a training micro-batch)."""
        return {f.name: getattr(self, f.name)[index] for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}


def completion_mask(completion_ids: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """[B, C] bool: the real completion tokens, up to and including the first eos; the padding `generate` puts
    after an eos or a stop string is not (when pad == eos, everything after the first eos is padding)."""
    is_eos = completion_ids == eos_id
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    mask = ~after_eos
    if pad_id != eos_id:
        mask &= completion_ids != pad_id
    return mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (left padding), as `generate` computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def generate(
    model, tokenizer, texts: list[str], prompts: list[str], metadata: list[dict], num_generations: int,
    max_new_tokens: int, temperature: float, top_p: float, top_k: int, stop_strings: list[str], batch_size: int,
) -> Rollouts:
    """`num_generations` sampled completions of each formatted prompt text (G consecutive rows per prompt)."""
    device = next(model.parameters()).device
    texts = [t for t in texts for _ in range(num_generations)]
    prompts = [p for p in prompts for _ in range(num_generations)]
    metadata = [m for m in metadata for _ in range(num_generations)]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    prompt_ids, prompt_mask = enc.input_ids.to(device), enc.attention_mask.to(device)  # [B, P]
    eos = tokenizer.eos_token_id
    pieces = []
    for start in range(0, len(texts), batch_size):
        chunk = slice(start, start + batch_size)
        out = model.generate(
            input_ids=prompt_ids[chunk], attention_mask=prompt_mask[chunk], max_new_tokens=max_new_tokens,
            do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k or None,
            stop_strings=stop_strings or None, tokenizer=tokenizer if stop_strings else None,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
        )
        pieces.append(out[:, prompt_ids.shape[1]:])  # [b, <= max_new_tokens]
    width = max(p.shape[1] for p in pieces)
    completion_ids = torch.cat([F.pad(p, (0, width - p.shape[1]), value=tokenizer.pad_token_id) for p in pieces])
    mask = completion_mask(completion_ids, eos, tokenizer.pad_token_id)
    completions = tokenizer.batch_decode(torch.where(mask, completion_ids, tokenizer.pad_token_id), skip_special_tokens=True)
    hit_stop = torch.tensor([any(s in c for s in stop_strings) for c in completions], device=device, dtype=torch.bool)
    return Rollouts(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids, completion_mask=mask.long(),
        stopped=(completion_ids == eos).any(1) | hit_stop, completions=completions, prompts=prompts, metadata=metadata,
    )


def token_log_probs(
    model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
    completion_mask: torch.Tensor, temperature: float, with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(o_t | q, o_<t) of every completion token [B, C] in fp32 (0 at masked positions), from one forward
    over [prompt; completion]; optionally the entropy of each position's distribution [B, C]."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [B, P + C]
    attention = torch.cat([prompt_mask, completion_mask], dim=1)
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids(attention),
                   use_cache=False).logits
    C = completion_ids.shape[1]
    logits = logits[:, -C - 1 : -1].float() / temperature  # [B, C, V] the positions that predict o_1..o_C
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, completion_ids[..., None]).squeeze(-1)  # [B, C]
    logp = torch.where(completion_mask.bool(), logp, torch.zeros((), device=logp.device))
    entropy = None
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1)  # [B, C]
    return logp, entropy
