"""Held-out evaluation of a language model: greedy and sampled completions scored by a reward.

Used by `drl reason eval` and by the trainer's periodic evaluation, so both report the same numbers for the
same model, problems and seed. Sampling is seeded by `seed` alone (decoupled from training's randomness).
"""

from __future__ import annotations

import torch

from diffusion_rl.core.prompts import PromptSet
from reasoning_rl.data import format_prompt
from reasoning_rl.rollout import encode_prompts, generate
from rewards.base import RewardError


@torch.no_grad()
def evaluate(
    model, processor, problems: PromptSet, reward_fn, *, num_samples: int = 1, max_new_tokens: int = 32,
    temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stop_strings: list[str] = (), batch_size: int = 16,
    system_prompt: str | None = None, use_chat_template: bool = True, seed: int = 1234,
) -> tuple[dict[str, float], dict[str, list]]:
    """Returns ({greedy_reward, sampled_reward, pass_at_<n>, completion_length}, the completions by kind).

    greedy_reward: the reward's mean over one greedy completion per problem (the accuracy for a 0/1 reward);
    sampled_reward: its mean over `num_samples` sampled completions per problem; pass_at_<n>: the share of
    problems where at least one of the n samples scores >= 1 (NaN scores count as 0). `processor` is the tokenizer,
    or a vision-language model's processor (problems then carry their image in metadata["image"])."""
    was_training = model.training
    model.eval()
    images = [m["image"] for m in problems.metadata] if problems.metadata and "image" in problems.metadata[0] else None
    texts = [format_prompt(processor, p, system_prompt, use_chat_template, images is not None) for p in problems.prompts]
    tokenizer = getattr(processor, "tokenizer", processor)
    prompts = encode_prompts(processor, texts, images, next(model.parameters()).device)
    greedy_text = []
    for start in range(0, len(texts), batch_size):
        chunk = slice(start, start + batch_size)
        out = model.generate(input_ids=prompts.prompt_ids[chunk], attention_mask=prompts.prompt_mask[chunk],
                             **(prompts.vision(chunk) or {}), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             stop_strings=list(stop_strings) or None, tokenizer=tokenizer if stop_strings else None)
        greedy_text += tokenizer.batch_decode(out[:, prompts.prompt_ids.shape[1]:], skip_special_tokens=True)
    greedy_scores, _ = reward_fn(greedy_text, problems.prompts, problems.metadata)
    if len(greedy_text) and bool(torch.isnan(greedy_scores.float()).all()):
        # NaN counts as 0 below, so an eval the reward cannot score at all would read as accuracy 0.0 all run long
        raise RewardError(
            f"the eval reward could not score any of the {len(greedy_text)} held-out problems (every score NaN = "
            f"unscorable): they lack what the reward needs, e.g. a reference `solution` for arithmetic_steps. Score "
            "them with a reward that needs only the answer: eval.reward: {name: exact_match, options: {extract: "
            "[answer]}}, or give the problems the missing column.")
    rng = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        sampled = generate(model, processor, texts, problems.prompts, problems.metadata, num_samples, max_new_tokens,
                           temperature, top_p, top_k, list(stop_strings), batch_size, images)
    finally:
        torch.random.set_rng_state(rng)
    sampled_scores, _ = reward_fn(sampled.completions, sampled.prompts, sampled.metadata)
    model.train(was_training)
    solved = (torch.nan_to_num(sampled_scores.float()).reshape(len(texts), num_samples) >= 1.0).any(1)
    results = {
        "greedy_reward": float(torch.nan_to_num(greedy_scores.float()).mean()),
        "sampled_reward": float(torch.nan_to_num(sampled_scores.float()).mean()),
        f"pass_at_{num_samples}": float(solved.float().mean()),
        "completion_length": float(sampled.lengths.float().mean()),
    }
    return results, {"greedy": greedy_text, "sampled": sampled.completions}
