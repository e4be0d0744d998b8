"""Multi-turn tool rollouts, token-in / token-out.

Each sequence is a list of token ids that only ever grows. A round: the policy continues the exact ids it has
(prompt, its earlier turns, the observations), sampling one turn up to its end-of-turn token (eos) or
`max_new_tokens`; the turn's text is parsed as an OpenThinkIMG action (`reasoning_rl.tools.actions`); a
terminate action ends the rollout; otherwise the calls run (`reasoning_rl.tools.base.call_tool`) and the
observation text, wrapped in `observation_template` (by default a ChatML user turn then the assistant header),
is tokenised on its own and appended. Earlier text is never re-tokenised, so the sequence the trainer scores is
the one that was sampled. Up to `max_rounds` policy turns.

The result is an ordinary `reasoning_rl.rollout.Rollouts` (left-padded prompts, right-padded completions =
everything after the prompt) plus

* ``tool_mask``   [B, C] long: 1 for the policy's own tokens, 0 for observation tokens (and padding); the trainer
  multiplies the loss mask by it, so observations get no policy loss, KL or entropy term;
* ``tool_logp``   [B, C] fp32: log pi(token) at sampling time (logits / temperature, full softmax; NaN at
  observation tokens and padding): with unchanged weights `token_log_probs` recomputes the same numbers;
* ``tool_stats``  [B, 3] long: calls, errors (malformed actions, unknown tools, arguments against the schema,
  tool failures) and policy turns per sequence.

`expert_rollouts` builds the same structure from given policy turns (teacher forcing, for SFT on expert traces):
the tools really run, so the observations in the SFT context are the real ones, and `tool_mask` keeps them out
of the loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from reasoning_rl.rollout import Rollouts, encode_prompts
from reasoning_rl.tools.actions import parse_turn
from reasoning_rl.tools.base import Tool, call_tool

CHATML_OBSERVATION = "\n<|im_start|>user\n{observation}<|im_end|>\n<|im_start|>assistant\n"


@dataclass
class _Sequence:
    """One rollout in progress."""

    prompt: list[int]
    state: object
    ids: list[int] = field(default_factory=list)  # everything after the prompt
    policy: list[int] = field(default_factory=list)  # 1 = sampled by the policy, 0 = observation
    logp: list[float] = field(default_factory=list)
    calls: int = 0
    errors: int = 0
    turns: int = 0
    done: bool = False
    truncated: bool = False  # a turn hit max_new_tokens without its end-of-turn token


def _after_turn(seq: _Sequence, text: str, tools: dict[str, Tool], last_round: bool) -> str | None:
    """Parse and run one finished policy turn; the observation text to append, or None when the rollout ends."""
    seq.turns += 1
    turn = parse_turn(text)
    if turn.answer is not None and not turn.calls:
        seq.done = True
        return None
    if turn.error is not None:
        seq.errors += 1
        lines = [f"error: {turn.error}"]
    else:
        lines = []
        for name, args in turn.calls:
            obs = call_tool(tools, name, args, seq.state)
            seq.calls += 1
            seq.errors += obs.error
            lines.append(obs.text)
    if turn.answer is not None or last_round:  # calls then terminate in one turn: they ran, the rollout ends
        seq.done = True
        return None
    return "\n".join(lines)


def _append_observation(seq: _Sequence, text: str, tokenizer, template: str) -> None:
    ids = tokenizer(template.format(observation=text), add_special_tokens=False).input_ids
    seq.ids += ids
    seq.policy += [0] * len(ids)
    seq.logp += [float("nan")] * len(ids)


def _left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long, device=device)
        mask[i, width - len(r):] = 1
    return ids, mask


def _assemble(seqs: list[_Sequence], base: Rollouts, tokenizer) -> Rollouts:
    """The finished sequences as Rollouts with tool_mask, tool_logp and tool_stats."""
    device, pad = base.prompt_ids.device, tokenizer.pad_token_id
    C = max(1, max(len(s.ids) for s in seqs))
    B = len(seqs)
    completion_ids = torch.full((B, C), pad, dtype=torch.long, device=device)
    completion_mask = torch.zeros((B, C), dtype=torch.long, device=device)
    tool_mask = torch.zeros((B, C), dtype=torch.long, device=device)
    tool_logp = torch.full((B, C), float("nan"), dtype=torch.float32, device=device)
    for i, s in enumerate(seqs):
        n = len(s.ids)
        completion_ids[i, :n] = torch.tensor(s.ids, dtype=torch.long, device=device)
        completion_mask[i, :n] = 1
        tool_mask[i, :n] = torch.tensor(s.policy, dtype=torch.long, device=device)
        tool_logp[i, :n] = torch.tensor(s.logp, dtype=torch.float32, device=device)
    base.completion_ids, base.completion_mask, base.pad_id = completion_ids, completion_mask, pad
    base.completions = [tokenizer.decode(s.ids, skip_special_tokens=True) for s in seqs]
    base.stopped = torch.tensor([not s.truncated for s in seqs], dtype=torch.bool, device=device)
    base.tool_mask, base.tool_logp = tool_mask, tool_logp
    base.tool_stats = torch.tensor([[s.calls, s.errors, s.turns] for s in seqs], dtype=torch.long, device=device)
    return base


def _start(processor, texts, prompts, metadata, make_state, device) -> tuple[Rollouts, list[_Sequence]]:
    tokenizer = getattr(processor, "tokenizer", processor)
    base = encode_prompts(tokenizer, texts, None, device)
    base.prompts, base.metadata = list(prompts), list(metadata)
    seqs = [_Sequence(prompt=base.prompt_ids[i][base.prompt_mask[i].bool()].tolist(), state=make_state(meta))
            for i, meta in enumerate(metadata)]
    return base, seqs


@torch.no_grad()
def generate_with_tools(
    model, processor, texts: list[str], prompts: list[str], metadata: list[dict], num_generations: int,
    max_new_tokens: int, temperature: float, top_p: float, top_k: int, batch_size: int, tools: dict[str, Tool],
    max_rounds: int, make_state: Callable[[dict], object], observation_template: str = CHATML_OBSERVATION,
    do_sample: bool = True,
) -> Rollouts:
    """`num_generations` multi-turn rollouts of each formatted prompt text (G consecutive rows per prompt), each
    turn at most `max_new_tokens` tokens, at most `max_rounds` turns; `make_state(metadata row)` builds each
    rollout's own tool state. Text-only policies (observations enter the context as text)."""
    device = next(model.parameters()).device
    tokenizer = getattr(processor, "tokenizer", processor)
    repeat = lambda items: [x for x in items for _ in range(num_generations)]  # noqa: E731
    base, seqs = _start(processor, repeat(texts), repeat(prompts), repeat(metadata), make_state, device)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for round_index in range(max_rounds):
        active = [i for i, s in enumerate(seqs) if not s.done]
        for start in range(0, len(active), batch_size):
            rows = active[start:start + batch_size]
            ids, mask = _left_pad([seqs[i].prompt + seqs[i].ids for i in rows], pad, device)  # [b, L]
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
                top_k=(top_k or None) if do_sample else None, pad_token_id=pad, eos_token_id=eos,
                return_dict_in_generate=True, output_logits=True,
            )
            new = out.sequences[:, ids.shape[1]:]  # [b, T]
            # log pi of every drawn token under the same distribution the trainer scores: logits / T, full softmax
            logits = torch.stack(out.logits, 1).float() / (temperature if do_sample else 1.0)  # [b, T, V]
            logp = torch.log_softmax(logits, -1).gather(-1, new[..., None])[..., 0]  # [b, T]
            for j, i in enumerate(rows):
                s, toks = seqs[i], new[j].tolist()
                end = toks.index(eos) + 1 if eos in toks else len(toks)
                s.ids += toks[:end]
                s.policy += [1] * end
                s.logp += logp[j, :end].tolist()
                if eos not in toks[:end]:  # cut at max_new_tokens: no complete action, the rollout ends
                    s.turns += 1
                    s.done = s.truncated = True
                    continue
                obs = _after_turn(s, tokenizer.decode(toks[:end], skip_special_tokens=True), tools,
                                  round_index == max_rounds - 1)
                if obs is not None:
                    _append_observation(s, obs, tokenizer, observation_template)
    return _assemble(seqs, base, tokenizer)


def expert_rollouts(
    processor, texts: list[str], prompts: list[str], metadata: list[dict], turns: Sequence[Sequence[str]],
    tools: dict[str, Tool], max_rounds: int, make_state: Callable[[dict], object],
    observation_template: str = CHATML_OBSERVATION, device="cpu",
) -> Rollouts:
    """Rollouts of given policy turns (each ended with the eos token), the tools run on the real states: SFT
    batches on expert tool-use traces with the same tokens and tool mask a sampled rollout would have."""
    tokenizer = getattr(processor, "tokenizer", processor)
    base, seqs = _start(processor, texts, prompts, metadata, make_state, device)
    for s, row_turns in zip(seqs, turns, strict=True):
        for round_index, text in enumerate(list(row_turns)[:max_rounds]):
            ids = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            s.ids += ids
            s.policy += [1] * len(ids)
            s.logp += [float("nan")] * len(ids)
            obs = _after_turn(s, text, tools, round_index == max_rounds - 1)
            if obs is None:
                break
            _append_observation(s, obs, tokenizer, observation_template)
    return _assemble(seqs, base, tokenizer)


def tool_metrics(stats: torch.Tensor) -> dict[str, float]:
    """From `Rollouts.tool_stats` [B, 3]: per-completion means of tool calls, errors and turns, the errors' total and
    the share of error-free rollouts (logged as reason/tool_*)."""
    stats = stats.float().cpu()
    return {"tool_calls": float(stats[:, 0].mean()), "tool_errors": float(stats[:, 1].sum()),
            "tool_errors_mean": float(stats[:, 1].mean()), "tool_turns": float(stats[:, 2].mean()),
            "tool_error_free": float((stats[:, 1] == 0).float().mean())}


@torch.no_grad()
def evaluate_with_tools(
    model, processor, texts: list[str], prompts: list[str], metadata: list[dict], reward_fn, *, tools, max_rounds,
    make_state, observation_template: str = CHATML_OBSERVATION, num_samples: int = 1, max_new_tokens: int = 32,
    temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, batch_size: int = 16, seed: int = 1234,
) -> dict[str, float]:
    """`reasoning_rl.evaluation.evaluate`'s numbers for tool rollouts: greedy_reward, sampled_reward, pass_at_<n>,
    completion_length (policy tokens), plus the greedy rollouts' tool_calls / tool_errors_mean."""
    was_training = model.training
    model.eval()
    common = dict(tools=tools, max_rounds=max_rounds, make_state=make_state, observation_template=observation_template)
    greedy = generate_with_tools(model, processor, texts, prompts, metadata, 1, max_new_tokens, 1.0, 1.0, 0,
                                 batch_size, do_sample=False, **common)
    greedy_scores, _ = reward_fn(greedy.completions, greedy.prompts, greedy.metadata)
    rng = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        sampled = generate_with_tools(model, processor, texts, prompts, metadata, num_samples, max_new_tokens,
                                      temperature, top_p, top_k, batch_size, **common)
    finally:
        torch.random.set_rng_state(rng)
    sampled_scores, _ = reward_fn(sampled.completions, sampled.prompts, sampled.metadata)
    model.train(was_training)
    solved = (torch.nan_to_num(sampled_scores.float()).reshape(len(texts), num_samples) >= 1.0).any(1)
    m = tool_metrics(greedy.tool_stats)
    return {
        "greedy_reward": float(torch.nan_to_num(greedy_scores.float()).mean()),
        "sampled_reward": float(torch.nan_to_num(sampled_scores.float()).mean()),
        f"pass_at_{num_samples}": float(solved.float().mean()),
        "completion_length": float(sampled.tool_mask.sum(1).float().mean()),
        "tool_calls": m["tool_calls"], "tool_errors_mean": m["tool_errors_mean"],
    }

