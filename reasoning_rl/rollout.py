"""Rollouts: G completions per prompt with transformers `generate`, and the per-token log-probs the training
forward recomputes for them.

Both sides see the same thing: left-padded prompts with position ids counted from the first real token, the
logits divided by the sampling temperature before the log-softmax, log-probs in fp32. So with unchanged
weights the recomputed log-probs equal the sampler's (ratio 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel


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
    # vision-language models (one image per sequence): each row's image patches [n_i, D] (Qwen2-VL), its patch grid
    # [B, 3] (t, h, w) and the token types [B, P] the multimodal rotary positions are computed from
    pixel_values: list[torch.Tensor] | None = None
    image_grid_thw: torch.Tensor | None = None
    mm_token_type_ids: torch.Tensor | None = None
    off_policy: torch.Tensor | None = None  # [B] bool: the completion is a dataset trace (LUFFY), not sampled
    pad_id: int = 0
    # rollout.backend=vllm: the engine's log-prob of each sampled token [B, C] fp32 (NaN: none, e.g. a LUFFY trace),
    # the trainer's at the same weights, and the importance-sampling weights [B, C] the policy loss is multiplied by
    # (reasoning_rl.vllm_rollout.importance_weights)
    sampling_logp: torch.Tensor | None = None
    trainer_logp: torch.Tensor | None = None
    is_weights: torch.Tensor | None = None
    # multi-turn tool rollouts (reasoning_rl.tools.rollout): 1 = the policy's own token, 0 = a tool observation [B, C]
    # (the loss mask is multiplied by it); log pi of each policy token at sampling time [B, C] fp32 (NaN elsewhere);
    # per sequence (calls, errors, turns) [B, 3]
    tool_mask: torch.Tensor | None = None
    tool_logp: torch.Tensor | None = None
    tool_stats: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def lengths(self) -> torch.Tensor:  # [B] completion tokens
        return self.completion_mask.sum(1)

    def vision(self, index) -> dict[str, torch.Tensor] | None:
        """The image inputs of rows `index` (a slice or index tensor) for a forward or `generate`, or None."""
        if self.pixel_values is None:
            return None
        rows = range(len(self.pixel_values))[index] if isinstance(index, slice) else index.tolist()
        return {"pixel_values": torch.cat([self.pixel_values[i] for i in rows]),
                "image_grid_thw": self.image_grid_thw[index], "mm_token_type_ids": self.mm_token_type_ids[index]}


    def select(self, index: torch.Tensor) -> Rollouts:
        """The rows `index` [k] (repeats allowed: PAD resamples with replacement), in that order."""
        rows = index.tolist()
        take = lambda x: None if x is None else x[index.to(x.device)]  # noqa: E731
        return Rollouts(
            prompt_ids=take(self.prompt_ids), prompt_mask=take(self.prompt_mask), completion_ids=take(self.completion_ids),
            completion_mask=take(self.completion_mask), stopped=take(self.stopped),
            completions=[self.completions[i] for i in rows], prompts=[self.prompts[i] for i in rows],
            metadata=[self.metadata[i] for i in rows],
            pixel_values=None if self.pixel_values is None else [self.pixel_values[i] for i in rows],
            image_grid_thw=take(self.image_grid_thw), mm_token_type_ids=take(self.mm_token_type_ids),
            off_policy=take(self.off_policy), pad_id=self.pad_id, sampling_logp=take(self.sampling_logp),
            trainer_logp=take(self.trainer_logp), is_weights=take(self.is_weights), tool_mask=take(self.tool_mask),
            tool_logp=take(self.tool_logp), tool_stats=take(self.tool_stats),
        )

    @staticmethod
    def cat(parts: list[Rollouts]) -> Rollouts:
        """Rows of several generation rounds in one batch: prompts re-padded on the left, completions on the right."""
        if len(parts) == 1:
            return parts[0]
        P = max(p.prompt_ids.shape[1] for p in parts)
        C = max(p.completion_ids.shape[1] for p in parts)
        left = lambda x, v: F.pad(x, (P - x.shape[1], 0), value=v)  # noqa: E731
        right = lambda x, v: F.pad(x, (0, C - x.shape[1]), value=v)  # noqa: E731
        cat = lambda xs: None if xs[0] is None else torch.cat(xs)  # noqa: E731
        pad = parts[0].pad_id
        return Rollouts(
            prompt_ids=torch.cat([left(p.prompt_ids, pad) for p in parts]),
            prompt_mask=torch.cat([left(p.prompt_mask, 0) for p in parts]),
            completion_ids=torch.cat([right(p.completion_ids, pad) for p in parts]),
            completion_mask=torch.cat([right(p.completion_mask, 0) for p in parts]),
            stopped=torch.cat([p.stopped for p in parts]),
            completions=sum((p.completions for p in parts), []), prompts=sum((p.prompts for p in parts), []),
            metadata=sum((p.metadata for p in parts), []),
            pixel_values=None if parts[0].pixel_values is None else sum((p.pixel_values for p in parts), []),
            image_grid_thw=cat([p.image_grid_thw for p in parts]),
            mm_token_type_ids=None if parts[0].mm_token_type_ids is None
            else torch.cat([left(p.mm_token_type_ids, 0) for p in parts]),
            off_policy=cat([p.off_policy for p in parts]), pad_id=pad,
            sampling_logp=None if parts[0].sampling_logp is None else torch.cat([right(p.sampling_logp, 0.0) for p in parts]),
            trainer_logp=None if parts[0].trainer_logp is None else torch.cat([right(p.trainer_logp, 0.0) for p in parts]),
            is_weights=None if parts[0].is_weights is None else torch.cat([right(p.is_weights, 1.0) for p in parts]),
            tool_mask=None if parts[0].tool_mask is None else torch.cat([right(p.tool_mask, 0) for p in parts]),
            tool_logp=None if parts[0].tool_logp is None else torch.cat([right(p.tool_logp, float("nan")) for p in parts]),
            tool_stats=cat([p.tool_stats for p in parts]),
        )

    def with_traces(self, slots: torch.Tensor, traces: list[str], processor) -> Rollouts:
        """LUFFY's mixed group: the rows where `slots` [B] is set take their problem's off-policy trace (a
        reference solution, tokenised and ended with eos) as the completion; the other rows keep their samples."""
        tokenizer = getattr(processor, "tokenizer", processor)
        rows = slots.nonzero().flatten().tolist()
        if not rows:
            self.off_policy = torch.zeros(len(self), dtype=torch.bool, device=self.completion_ids.device)
            return self
        ids = [tokenizer(traces[i], add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for i in rows]
        C = max(self.completion_ids.shape[1], max(len(x) for x in ids))
        completion_ids = F.pad(self.completion_ids, (0, C - self.completion_ids.shape[1]), value=self.pad_id)
        mask = F.pad(self.completion_mask, (0, C - self.completion_mask.shape[1]), value=0)
        if self.sampling_logp is not None:  # a trace was not sampled by the engine: no log-probs (NaN = no correction)
            self.sampling_logp = F.pad(self.sampling_logp, (0, C - self.sampling_logp.shape[1]), value=0.0)
            self.sampling_logp[slots.to(self.sampling_logp.device).bool()] = float("nan")
        if self.is_weights is not None:
            self.is_weights = F.pad(self.is_weights, (0, C - self.is_weights.shape[1]), value=1.0)
            self.is_weights[slots.to(self.is_weights.device).bool()] = 1.0
        for i, trace in zip(rows, ids, strict=True):
            completion_ids[i] = self.pad_id
            completion_ids[i, : len(trace)] = torch.tensor(trace, device=completion_ids.device)
            mask[i] = 0
            mask[i, : len(trace)] = 1
            self.completions[i] = traces[i]
        self.completion_ids, self.completion_mask = completion_ids, mask
        self.stopped = self.stopped | slots.to(self.stopped.device)
        self.off_policy = slots.to(self.completion_ids.device).bool()
        return self


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


def placeholder_token_ids(model) -> list[int]:
    """Token ids a vision-language model expands into image/video features: a completion must never contain one
    (the forward would count it as an image slot), so generation suppresses them and log-probs exclude them."""
    config = getattr(model, "config", None)
    vocab = model.get_output_embeddings().weight.shape[0]
    return sorted({i for name in ("image_token_id", "video_token_id")
                   if isinstance(i := getattr(config, name, None), int) and 0 <= i < vocab})


def encode_prompts(processor, texts: list[str], images: list | None, device) -> Rollouts:
    """Rollouts holding only the left-padded prompts (and their image inputs); completions are filled in later."""
    tokenizer = getattr(processor, "tokenizer", processor)
    if images is not None:
        enc = processor(text=texts, images=images, return_tensors="pt", padding=True)
        patches = enc.image_grid_thw.prod(-1).tolist()  # patches per image
        vision = dict(pixel_values=list(enc.pixel_values.to(device).split(patches)),
                      image_grid_thw=enc.image_grid_thw.to(device), mm_token_type_ids=enc.mm_token_type_ids.to(device))
    else:
        enc, vision = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False), {}
    empty = torch.empty(0)
    return Rollouts(prompt_ids=enc.input_ids.to(device), prompt_mask=enc.attention_mask.to(device),
                    completion_ids=empty, completion_mask=empty, stopped=empty, completions=[], prompts=[],
                    metadata=[], **vision)


@torch.no_grad()
def generate(
    model, processor, texts: list[str], prompts: list[str], metadata: list[dict], num_generations: int,
    max_new_tokens: int, temperature: float, top_p: float, top_k: int, stop_strings: list[str], batch_size: int,
    images: list | None = None,
) -> Rollouts:
    """`num_generations` sampled completions of each formatted prompt text (G consecutive rows per prompt).
    `processor` is the tokenizer, or a vision-language model's processor when `images` (one per text) are given."""
    device = next(model.parameters()).device
    tokenizer = getattr(processor, "tokenizer", processor)
    repeat = lambda items: [x for x in items for _ in range(num_generations)]  # noqa: E731
    texts, prompts, metadata = repeat(texts), repeat(prompts), repeat(metadata)
    rollouts = encode_prompts(processor, texts, repeat(images) if images is not None else None, device)
    rollouts.prompts, rollouts.metadata = prompts, metadata
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    suppressed = placeholder_token_ids(model) if images is not None else []
    pieces = []
    for start in range(0, len(texts), batch_size):
        chunk = slice(start, start + batch_size)
        out = model.generate(
            input_ids=rollouts.prompt_ids[chunk], attention_mask=rollouts.prompt_mask[chunk],
            **(rollouts.vision(chunk) or {}), max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
            top_p=top_p, top_k=top_k or None, stop_strings=stop_strings or None,
            tokenizer=tokenizer if stop_strings else None, pad_token_id=pad, eos_token_id=eos,
            suppress_tokens=suppressed or None,
        )
        pieces.append(out[:, rollouts.prompt_ids.shape[1]:])  # [b, <= max_new_tokens]
    width = max(p.shape[1] for p in pieces)
    completion_ids = torch.cat([F.pad(p, (0, width - p.shape[1]), value=pad) for p in pieces])
    mask = completion_mask(completion_ids, eos, pad)
    completions = tokenizer.batch_decode(torch.where(mask, completion_ids, pad), skip_special_tokens=True)
    hit_stop = torch.tensor([any(s in c for s in stop_strings) for c in completions], device=device, dtype=torch.bool)
    rollouts.completion_ids, rollouts.completion_mask, rollouts.completions = completion_ids, mask.long(), completions
    rollouts.stopped = (completion_ids == eos).any(1) | hit_stop
    rollouts.pad_id = pad
    return rollouts


def token_log_probs(
    model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
    completion_mask: torch.Tensor, temperature: float, with_entropy: bool = False, vision: dict | None = None,
    fused: str = "off",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(o_t | q, o_<t) of every completion token [B, C] in fp32 (0 at masked positions), from one forward
    over [prompt; completion]; optionally the entropy of each position's distribution [B, C] (0 where masked). With `vision`
    (`Rollouts.vision`), the model computes its own multimodal positions from the token types, as in generate.

    `fused` (`model.fused_logprob`): "off" runs the LM head on the C positions and takes the log-softmax of the
    [B, C, V] logits; "auto" / "torch" / "triton" take the backbone's last hidden states instead and compute the
    same numbers with `reasoning_rl.kernels.fused_token_logprobs`, never holding more than one tile of logits."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [B, P + C]
    attention = torch.cat([prompt_mask, completion_mask], dim=1)
    suppressed = []
    if vision is not None:
        types = torch.cat([vision["mm_token_type_ids"], torch.zeros_like(completion_ids)], dim=1)  # text after P
        inputs = dict(pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"], mm_token_type_ids=types)
        suppressed = placeholder_token_ids(extract_model_from_parallel(model))
    else:
        inputs = dict(position_ids=position_ids(attention))
    C = completion_ids.shape[1]
    if fused != "off":
        return _fused_token_log_probs(model, input_ids, attention, inputs, completion_ids, completion_mask,
                                      temperature, with_entropy, suppressed, fused)
    # only the C positions that predict o_1..o_C (and the last, dropped) reach the LM head
    logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False, logits_to_keep=C + 1,
                   **inputs).logits
    logits = logits[:, :-1].float() / temperature  # [B, C, V]
    if suppressed:  # the sampler never draws them: the same distribution, renormalised without them
        logits[..., suppressed] = float("-inf")
    log_norm = torch.logsumexp(logits, dim=-1)  # [B, C]
    logp = logits.gather(-1, completion_ids[..., None]).squeeze(-1) - log_norm  # [B, C]
    logp = torch.where(completion_mask.bool(), logp, torch.zeros((), device=logp.device))
    entropy = None
    if with_entropy:
        probs = torch.softmax(logits, dim=-1)
        entropy = log_norm - (probs * torch.nan_to_num(logits, neginf=0.0)).sum(-1)  # H = logZ - E[logit]  [B, C]
        entropy = torch.where(completion_mask.bool(), entropy, torch.zeros((), device=logp.device))
    return logp, entropy


def _fused_token_log_probs(model, input_ids, attention, inputs, completion_ids, completion_mask, temperature,
                           with_entropy, suppressed, backend):
    """The fused path of `token_log_probs`: one forward through the (possibly DDP-wrapped) model that keeps a
    single position's logits, its last hidden states [B, C, H] at the positions predicting the completion, and
    the fused log-prob op on the LM head's weight. Suppressed (placeholder) ids leave the head instead of being
    masked to -inf: the same renormalised distribution."""
    from reasoning_rl.kernels import fused_token_logprobs

    head = lm_head_for_fused(extract_model_from_parallel(model))
    out = model(input_ids=input_ids, attention_mask=attention, use_cache=False, logits_to_keep=1,
                output_hidden_states=True, **inputs)
    last_hidden = out.hidden_states[-1]  # [B, P + C, H]
    _check_hidden_feeds_head(model, head, last_hidden[:, -1], out.logits[:, -1])
    C = completion_ids.shape[1]
    hidden = last_hidden[:, -C - 1:-1]  # [B, C, H]: position t predicts o_t
    weight, bias, targets = head.weight, head.bias, completion_ids
    if suppressed:
        keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        keep[suppressed] = False
        new_id = keep.long().cumsum(0) - 1  # old id -> row of the kept head
        weight, bias = weight[keep], (bias[keep] if bias is not None else None)
        targets = new_id[completion_ids]
    mask = completion_mask.bool()
    return fused_token_logprobs(hidden, weight, targets, bias, temperature=temperature, mask=mask,
                                with_entropy=with_entropy, backend=backend)


def lm_head_for_fused(model) -> torch.nn.Linear:
    """The LM head as a plain linear layer, or a clear error: LoRA on the head (or a wrapped head) is refused."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if head is None or type(head) is not torch.nn.Linear:
        raise ValueError(
            f"model.fused_logprob needs the LM head to be a plain torch.nn.Linear, got {type(head).__name__} "
            f"(a LoRA adapter or a modules_to_save wrapper on the head: remove 'lm_head' from "
            f"model.lora_target_modules, or set model.fused_logprob=off)")
    return head


def _check_hidden_feeds_head(model, head, last_hidden, last_logits) -> None:
    """Once per model: the last hidden state through the head must give the model's own logits (an architecture
    that post-processes logits, e.g. a softcap or a logit scale, cannot use the fused path)."""
    unwrapped = extract_model_from_parallel(model)
    if getattr(unwrapped, "_drl_fused_head_checked", False):
        return
    config = getattr(unwrapped, "config", None)
    configs = [config, getattr(config, "text_config", None)]
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):  # Gemma 2/3, Cohere, Granite
        value = next((getattr(c, name) for c in configs if getattr(c, name, None) is not None), None)
        if value is not None and value != 1.0:
            raise ValueError(
                f"model.fused_logprob: {type(unwrapped).__name__} post-processes its logits ({name}={value}), so "
                f"they are not lm_head(last hidden state); set model.fused_logprob=off")
    with torch.no_grad():
        mine = torch.nn.functional.linear(last_hidden.float(), head.weight.float(),
                                          None if head.bias is None else head.bias.float())
        theirs = last_logits.float()
        err = float((mine - theirs).abs().max())
        scale = float(theirs.abs().max()) + 1.0
    if not err <= 1e-2 * scale:
        raise ValueError(
            f"model.fused_logprob: this model's logits are not lm_head(last hidden state) (max difference {err:.3g}; "
            f"{type(unwrapped).__name__} post-processes its logits, e.g. a softcap or a logit scale); set "
            f"model.fused_logprob=off")
    unwrapped._drl_fused_head_checked = True
