"""SEE's experts: several LoRA adapters (peft) on one frozen base model, how one is trained, and sequential routing.

    add_expert        a new adapter `expert_<k>`; only its parameters are trainable
    train_adapter     next-token NLL (fp32, completion tokens only) on indicator-labelled examples, AdamW over the
                      named adapter's parameters alone (earlier experts stay bit-identical)
    indicator_margin  log p(accept_marker | query) - log p(reject_marker | query) under one expert (teacher-forced)
    route             experts asked in order; a query goes to the first whose margin is > 0; -1 = none accepted
    answer            greedy completions: an accepting expert continues after its accept marker, the general model
                      (the base, adapters disabled) answers the queries nobody accepted
    evaluate_system   accuracy per task, routing accuracy and OOD detection of the first n experts

Baselines (one LoRA, no indicator) use `train_adapter` and `answer` with `route=None`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import get_scheduler

from reasoning_rl.continual.tasks import Example, Item
from reasoning_rl.data import format_prompt

GENERAL = -1  # route() value: no expert accepted, the general model answers


def expert_name(index: int) -> str:
    return f"expert_{index}"


def lora_config(rank: int, alpha: float, target_modules: list[str]):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM")


def add_expert(model, name: str, lora, seed: int):
    """`model` (a plain causal LM the first time, then the PeftModel) with a new adapter `name` initialised from
    `seed` (the global RNG left as it was); only that adapter's parameters require grad. Returns the PeftModel."""
    from peft import PeftModel, get_peft_model

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if isinstance(model, PeftModel):
            model.add_adapter(name, lora)
        else:
            model = get_peft_model(model, lora, adapter_name=name)
    finally:
        torch.random.set_rng_state(state)
    activate(model, name)
    return model


def activate(model, name: str) -> list[torch.nn.Parameter]:
    """Make `name` the active adapter and the only trainable parameters (fp32); returns them."""
    model.set_adapter(name)
    params = []
    for pname, p in model.named_parameters():
        mine = f".{name}." in pname
        p.requires_grad_(mine)
        if mine:
            p.data = p.data.float()
            params.append(p)
    if not params:
        raise ValueError(f"adapter {name!r} has no parameters in the model")
    return params


def adapter_state(model, name: str) -> dict[str, torch.Tensor]:
    """The adapter's weights by parameter name (copies): what 'bit-identical' compares and checkpoints hold."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{name}." in n}


# --------------------------------------------------------------------------------------------------------------
# encoding
# --------------------------------------------------------------------------------------------------------------


def prompt_texts(tokenizer, problems: Sequence[str], use_chat_template: bool) -> list[str]:
    return [format_prompt(tokenizer, p, None, use_chat_template) for p in problems]


def encode_examples(tokenizer, examples: Sequence[Example], use_chat_template: bool) -> list[tuple[list[int], int]]:
    """(prompt ids + completion ids + eos, prompt length) per example. Prompt and completion are tokenised apart
    (the same way scoring and generation join them)."""
    prompts = tokenizer(prompt_texts(tokenizer, [e.prompt for e in examples], use_chat_template),
                        add_special_tokens=False).input_ids
    completions = tokenizer([e.completion for e in examples], add_special_tokens=False).input_ids
    return [(a + b + [tokenizer.eos_token_id], len(a)) for a, b in zip(prompts, completions, strict=True)]


def right_padded(examples: Sequence[tuple[list[int], int]], pad_id: int):
    """input ids [B, T], attention mask [B, T], labels [B, T] (-100 on the prompt and the padding)."""
    from reasoning_rl.world.pretrain import collate

    return collate(list(examples), pad_id)


def left_padded(sequences: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input ids [B, T] and attention mask [B, T], padded on the left (generation continues on the right)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def completion_nll(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """Mean next-token NLL over the labelled (completion) tokens, in fp32 (inputs moved to the model's device)."""
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits  # [B, T, V]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(device), ignore_index=-100)


# --------------------------------------------------------------------------------------------------------------
# training one adapter
# --------------------------------------------------------------------------------------------------------------


def train_adapter(model, name: str, tokenizer, examples: Sequence[Example], *, steps: int, batch_size: int,
                  learning_rate: float, warmup_steps: int, weight_decay: float, max_grad_norm: float, seed: int,
                  use_chat_template: bool = True, reject_share: float | None = None,
                  on_step: Callable[[int, dict], None] | None = None) -> list[float]:
    """`steps` AdamW steps on adapter `name` alone (every other adapter frozen and outside the optimizer), over
    the examples in seeded shuffled passes. `reject_share`: that share of every batch comes from the non-`own`
    examples (the reject-labelled rehearsal / general queries, re-drawn as often as needed), the rest from the own
    ones; None = one pool. `on_step(step, {"loss", "lr", "grad_norm"})` after each step. Returns the losses."""
    params = activate(model, name)
    model.train()
    data = encode_examples(tokenizer, examples, use_chat_template)
    own = [i for i, e in enumerate(examples) if e.kind == "own"]
    other = [i for i, e in enumerate(examples) if e.kind != "own"]
    if reject_share is None or not own or not other:
        pools, sizes = [list(range(len(data)))], [batch_size]
    else:
        n_other = min(max(round(reject_share * batch_size), 1), batch_size - 1)
        pools, sizes = [own, other], [batch_size - n_other, n_other]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=warmup_steps, num_training_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    orders: list[list[int]] = [[] for _ in pools]
    losses = []
    for step in range(steps):
        batch = []
        for pool, size, order in zip(pools, sizes, orders, strict=True):
            while len(order) < size:  # seeded passes over the pool; a batch may straddle two passes
                order += [pool[i] for i in torch.randperm(len(pool), generator=gen).tolist()]
            batch += [data[i] for i in order[:size]]
            del order[:size]
        input_ids, mask, labels = right_padded(batch, tokenizer.pad_token_id)  # [B, T] each
        loss = completion_nll(model, input_ids, mask, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
        if math.isfinite(loss.item()) and math.isfinite(grad_norm):
            optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, {"loss": loss.item(), "lr": schedule.get_last_lr()[0], "grad_norm": grad_norm})
    model.eval()
    return losses


# --------------------------------------------------------------------------------------------------------------
# routing and answering
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sequence_log_prob(model, prompt_ids: Sequence[list[int]], continuation: list[int], batch_size: int) -> torch.Tensor:
    """log p(continuation | prompt) per prompt [N], summed over the continuation's tokens, fp32 (teacher-forced)."""
    out = []
    device = next(model.parameters()).device
    for start in range(0, len(prompt_ids), batch_size):
        chunk = [(list(p) + continuation, len(p)) for p in prompt_ids[start:start + batch_size]]
        input_ids, mask, labels = (t.to(device) for t in right_padded(chunk, 0))  # [B, T] each
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()  # [B, T-1, V]
        targets = labels[:, 1:]  # [B, T-1]
        logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out.append((logp * (targets != -100)).sum(-1).cpu())
    return torch.cat(out)


def indicator_margin(model, name: str, prompt_ids: Sequence[list[int]], accept_ids: list[int], reject_ids: list[int],
                     batch_size: int) -> torch.Tensor:
    """log p(accept | query) - log p(reject | query) under expert `name` [N]: > 0 means the expert claims the query."""
    model.set_adapter(name)
    model.eval()
    return (sequence_log_prob(model, prompt_ids, accept_ids, batch_size)
            - sequence_log_prob(model, prompt_ids, reject_ids, batch_size))


def route(model, order: Sequence[str], prompt_ids: Sequence[list[int]], accept_ids: list[int], reject_ids: list[int],
          batch_size: int) -> list[int]:
    """For each query the position in `order` of the first expert that accepts it, or GENERAL (-1): experts are
    asked in `order`, each only about the queries nobody before it accepted."""
    choice = [GENERAL] * len(prompt_ids)
    pending = list(range(len(prompt_ids)))
    for position, name in enumerate(order):
        if not pending:
            break
        margin = indicator_margin(model, name, [prompt_ids[i] for i in pending], accept_ids, reject_ids, batch_size)
        for i, m in zip(pending, margin.tolist(), strict=True):
            if m > 0:
                choice[i] = position
        pending = [i for i in pending if choice[i] == GENERAL]
    return choice


@torch.no_grad()
def generate_greedy(model, tokenizer, sequences: Sequence[list[int]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuations of token-id sequences (left-padded), decoded without special tokens."""
    texts = []
    device = next(model.parameters()).device
    for start in range(0, len(sequences), batch_size):
        ids, mask = (t.to(device) for t in left_padded(sequences[start:start + batch_size], tokenizer.pad_token_id))
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        texts += tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return texts


def answer(model, tokenizer, prompt_ids: Sequence[list[int]], choice: Sequence[int] | None, order: Sequence[str],
           prefix_ids: list[int], max_new_tokens: int, batch_size: int) -> list[str]:
    """The system's answer to each query: queries routed to `order[c]` are continued by that expert after
    `prefix_ids` (its accept marker); GENERAL queries by the base model with every adapter disabled.
    `choice=None`: every query goes to `order[0]` without a prefix (a plain fine-tuned adapter)."""
    if choice is None:
        choice, prefix_ids = [0] * len(prompt_ids), []
    texts = [""] * len(prompt_ids)
    for position in sorted(set(choice)):
        idx = [i for i, c in enumerate(choice) if c == position]
        if position == GENERAL:
            with model.disable_adapter():
                outs = generate_greedy(model, tokenizer, [prompt_ids[i] for i in idx], max_new_tokens, batch_size)
        else:
            model.set_adapter(order[position])
            outs = generate_greedy(model, tokenizer, [list(prompt_ids[i]) + prefix_ids for i in idx],
                                   max_new_tokens, batch_size)
        for i, t in zip(idx, outs, strict=True):
            texts[i] = t
    return texts


def correct(completions: Sequence[str], items: Sequence[Item]) -> list[float]:
    """1.0 where the `<answer>` tag equals the item's gold string (the `exact_match` reward), else 0.0."""
    from rewards.text import ExactMatchReward

    scores, _ = ExactMatchReward(extract=("answer",))(list(completions), None, [{"answer": it.gold} for it in items])
    return [float(s) for s in scores]


def evaluate_system(model, tokenizer, experts: Sequence[str], order: str, tasks: dict[str, list[Item]],
                    ood: list[Item], accept_marker: str, reject_marker: str, max_new_tokens: int, batch_size: int,
                    use_chat_template: bool = True, owner: dict[str, str] | None = None) -> dict:
    """The SEE system made of `experts` (training order) asked in `order` (newest_first / oldest_first):

    accuracy/<task>: exact-match accuracy of the routed answers on the task's eval items;
    routing/<task>: share of the task's queries answered by its own expert (`owner[task]` names it; a task without
    an expert yet counts as routed right when nobody accepts it); routing/mean over the tasks;
    accept/<task>: share accepted by any expert; ood_detection: share of OOD queries every expert rejected."""
    asked = list(reversed(experts)) if order == "newest_first" else list(experts)
    accept_ids = tokenizer(accept_marker, add_special_tokens=False).input_ids
    reject_ids = tokenizer(reject_marker, add_special_tokens=False).input_ids
    owner = owner or {}
    names = list(tasks)
    items = [it for n in names for it in tasks[n]] + list(ood)
    prompt_ids = tokenizer(prompt_texts(tokenizer, [it.prompt for it in items], use_chat_template),
                           add_special_tokens=False).input_ids
    choice = route(model, asked, prompt_ids, accept_ids, reject_ids, batch_size) if asked else [GENERAL] * len(items)
    texts = answer(model, tokenizer, prompt_ids, choice, asked, accept_ids, max_new_tokens, batch_size)
    scores = correct(texts, items)
    result: dict = {"accuracy": {}, "routing": {}, "accept": {}}
    start = 0
    for n in names:
        span = range(start, start + len(tasks[n]))
        start += len(tasks[n])
        mine = asked.index(owner[n]) if owner.get(n) in asked else GENERAL
        result["accuracy"][n] = sum(scores[i] for i in span) / len(span)
        result["routing"][n] = sum(choice[i] == mine for i in span) / len(span)
        result["accept"][n] = sum(choice[i] != GENERAL for i in span) / len(span)
    result["accuracy"]["mean"] = sum(result["accuracy"][n] for n in names) / len(names)
    result["routing"]["mean"] = sum(result["routing"][n] for n in names) / len(names)
    if ood:
        span = range(start, len(items))
        result["ood_detection"] = sum(choice[i] == GENERAL for i in span) / len(span)
        result["ood_accuracy"] = sum(scores[i] for i in span) / len(span)
    result["samples"] = [{"task": it.task, "prompt": it.prompt, "routed_to": asked[c] if c != GENERAL else "general",
                          "completion": texts[i], "gold": it.gold}
                         for i, (it, c) in enumerate(zip(items, choice, strict=True)) if i % max(len(items) // 4, 1) == 0]
    return result


def forgetting(matrix: Sequence[Sequence[float]]) -> float:
    """Average forgetting (Chaudhry et al. 2018) of an accuracy matrix acc[task][after stage] over the tasks before
    the last: mean_j (max_{i < K-1, i >= j} acc[j][i] - acc[j][K-1]). 0 with a single task."""
    k = len(matrix)
    if k < 2:
        return 0.0
    return sum(max(matrix[j][j:k - 1]) - matrix[j][k - 1] for j in range(k - 1)) / (k - 1)
