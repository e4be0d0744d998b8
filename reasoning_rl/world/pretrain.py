"""Train the tiny arithmetic-world causal LM from scratch and save it as a transformers model directory.

    python -m reasoning_rl.world.pretrain --out reasoning_rl/assets/tiny_lm

The model is a standard `LlamaForCausalLM` (loadable with `AutoModelForCausalLM` / `AutoTokenizer`, and through
`model.pretrained: builtin:tiny-arith-lm`) over the project's offline character tokenizer
(`reasoning_rl.models.char_tokenizer`) plus four whole-word tokens for the trace tags (`<think>`, `</think>`,
`<answer>`, `</answer>`; ordinary tokens, so decoding keeps them).

Training: the text world's train split (`reasoning_rl.world.text`), every problem formatted with the tokenizer's
chat template exactly as the reasoning trainer formats it, the reference solution plus `<|im_end|>` as the
completion; next-token cross-entropy on the completion tokens only. AdamW with linear warm-up then cosine decay
to 10 %, gradient clipping, a fixed data order and seeded initialisation: with a step budget that finishes inside
`--max-minutes` (and the same thread count) a run is exactly reproducible. When the clock runs out first the
schedule follows the clock instead (it still completes) and the run is no longer bit-reproducible.

`--init DIR --bare-share F` continues a saved model on a corpus where a seeded share F of the solutions are bare
answers (`<think></think><answer>N</answer>`): how the shipped `builtin:tiny-arith-lm-mixed` is made from
`builtin:tiny-arith-lm` (docs/reasoning_worlds.md has the command).

Greedy accuracy per step count on held-out eval problems (exact match of the `<answer>` tag) is measured every
`--eval-every` steps and at the end; the model is saved at each evaluation, and `training_report.json`
(arguments, curve, timings, final accuracies) is written next to the weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from reasoning_rl.world import text

TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "assets" / "tiny_lm"


def world_tokenizer():
    """The character tokenizer with the four trace tags as whole (non-special) tokens."""
    from transformers import AddedToken

    from reasoning_rl.models import char_tokenizer

    tokenizer = char_tokenizer()
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in TAG_TOKENS])
    return tokenizer


def build_model(tokenizer, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, seed: int):
    """A freshly initialised LlamaForCausalLM (weights from `seed`, the global RNG left as it was).

    Llama rather than Qwen2: for a `qwen2` config transformers' AutoTokenizer substitutes its own Qwen2Tokenizer
    (byte-level BPE) for the saved character tokenizer, which drops spaces and newlines; for `llama` it loads the
    saved tokenizer as it is."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from reasoning_rl.models import _seeded_init

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _seeded_init(LlamaForCausalLM, config, seed, tokenizer)


def load_initial(model_dir: Path, tokenizer):
    """A model this script saved, to continue training (its tokenizer must be the world tokenizer)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    saved = AutoTokenizer.from_pretrained(model_dir)
    if saved.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"--init {model_dir}: its tokenizer is not the world tokenizer this script trains with; "
                         "pass a directory saved by `python -m reasoning_rl.world.pretrain`")
    return LlamaForCausalLM.from_pretrained(model_dir)


def prompt_text(tokenizer, problem: str) -> str:
    """The prompt the policy continues: the chat template with the generation prompt (as the trainer formats it)."""
    from reasoning_rl.data import format_prompt

    return format_prompt(tokenizer, problem, None, True)


def encode(tokenizer, problems: Sequence[text.ArithProblem]) -> list[tuple[list[int], int]]:
    """(prompt + solution + eos token ids, prompt length) per problem."""
    sentinel = "\x00"  # the chat template rendered once, the problem text put in its place
    before, after = prompt_text(tokenizer, sentinel).split(sentinel)
    prompts = tokenizer([before + p.prompt + after for p in problems], add_special_tokens=False).input_ids
    sols = tokenizer([p.solution for p in problems], add_special_tokens=False).input_ids
    return [(a + b + [tokenizer.eos_token_id], len(a)) for a, b in zip(prompts, sols, strict=True)]


def collate(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 on the prompt and the padding)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
    return input_ids, mask, labels


@torch.no_grad()
def greedy_accuracy(model, tokenizer, problems: Sequence[text.ArithProblem], batch_size: int = 64,
                    max_new_tokens: int = 64) -> dict[str, float]:
    """Greedy exact-match accuracy (the `exact_match` reward on the `<answer>` tag), overall and per step count:
    {"accuracy": ..., "accuracy_steps_1": ..., ..., "format": share of completions the think/answer format reward
    accepts, "worked": share that write at least one equation before `</think>` (not a bare answer)}."""
    from rewards.text import ExactMatchReward, ThinkAnswerFormatReward

    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    completions: list[str] = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        enc = tokenizer([prompt_text(tokenizer, p.prompt) for p in chunk], return_tensors="pt", padding=True,
                        add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        completions += tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    model.train(was_training)
    meta = [{"answer": str(p.answer)} for p in problems]
    correct, _ = ExactMatchReward(extract=("answer",))(completions, None, meta)
    formatted, _ = ThinkAnswerFormatReward()(completions, None, meta)
    result = {"accuracy": float(correct.mean()), "format": float(formatted.mean()),
              "worked": sum("=" in c.split("</think>")[0] for c in completions) / max(len(completions), 1)}
    for s in sorted({p.steps for p in problems}):
        idx = [i for i, p in enumerate(problems) if p.steps == s]
        result[f"accuracy_steps_{s}"] = float(correct[idx].mean())
    result["samples"] = [{"prompt": p.prompt, "completion": c, "answer": p.answer}
                         for p, c in zip(problems[:4], completions[:4], strict=True)]
    return result


def eval_problems(per_step: int, seed: int = 0, steps: Sequence[int] = text.STEPS) -> list[text.ArithProblem]:
    """`per_step` eval-split problems for each step count (a fixed, seeded set)."""
    return [p for s in steps for p in text.generate_problems(per_step, "eval", steps=(s,), seed=seed)]


def with_bare_answers(problems: Sequence[text.ArithProblem], share: float, seed: int) -> list[text.ArithProblem]:
    """`problems` with the worked steps dropped from a seeded `share` of the solutions (`<think></think>` kept, so
    the format stays valid): a corpus that mixes worked solutions with bare answers, as real text does. A model
    trained on it answers some problems without working them out; that choice recurs in every sample, which is
    what GRPO can learn from (docs/reasoning_worlds.md)."""
    rng = random.Random(f"bare-answers-{seed}")
    return [dataclasses.replace(p, solution=text.bare_solution(p.answer)) if rng.random() < share else p
            for p in problems]


def save(model, tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m reasoning_rl.world.pretrain", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (a transformers model dir)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data order")
    ap.add_argument("--steps", type=int, default=1000, help="optimizer steps (the schedule's length)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    ap.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--init", type=Path, default=None,
                    help="continue training this model directory (one this script saved) instead of a fresh "
                         "initialisation; the size arguments are then ignored")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--train-steps", type=int, nargs="+", default=list(text.STEPS),
                    help="step counts of the training problems (drawn uniformly)")
    ap.add_argument("--bare-share", type=float, default=0.0,
                    help="share of the training problems whose solution is the bare answer, without the worked "
                         "steps (`<think></think><answer>N</answer>`), drawn per problem from the seed")
    ap.add_argument("--eval-per-step", type=int, default=50, help="held-out problems per step count")
    ap.add_argument("--eval-every", type=int, default=250, help="evaluate (and save) every N steps; 0 = at the end")
    ap.add_argument("--max-minutes", type=float, default=60.0, help="wall-clock cap of the training loop")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args(argv)
    if not 0.0 <= args.bare_share <= 1.0:
        ap.error(f"--bare-share must be a share in [0, 1], got {args.bare_share}")
    if args.init is not None and not (args.init / "config.json").is_file():
        ap.error(f"--init {args.init}: not a model directory (no config.json); pass one this script saved")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.time()
    tokenizer = world_tokenizer()
    if args.init is None:
        model = build_model(tokenizer, args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate,
                            args.seed)
    else:
        try:
            model = load_initial(args.init, tokenizer)
        except ValueError as err:
            ap.error(str(err))
    n_params = sum(p.numel() for p in model.parameters())
    problems = text.generate_problems(args.steps * args.batch_size, "train", steps=args.train_steps,
                                      seed=args.seed, unique=False)
    problems = with_bare_answers(problems, args.bare_share, args.seed)
    data = encode(tokenizer, problems)
    held_out = eval_problems(args.eval_per_step, seed=0)
    print(f"[pretrain] {n_params:,} parameters | {len(data):,} training problems (steps {args.train_steps}, "
          f"{args.bare_share:.0%} with bare answers) | "
          f"{len(held_out)} eval problems | data ready in {time.time() - t_start:.1f} s", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))

    def lr_at(progress: float, step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = min(1.0, progress)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    curve, evals = [], []
    budget_s = args.max_minutes * 60
    t_train = time.time()
    model.train()
    step, losses, clock_bound = 0, [], False

    def evaluate(at_step: int) -> dict:
        t0 = time.time()
        res = greedy_accuracy(model, tokenizer, held_out)
        res.update(step=at_step, minutes=(time.time() - t_train) / 60, eval_s=time.time() - t0)
        evals.append({k: v for k, v in res.items() if k != "samples"})
        per = " ".join(f"{s}:{res[f'accuracy_steps_{s}']:.2f}" for s in text.STEPS if f"accuracy_steps_{s}" in res)
        print(f"[pretrain] eval at step {at_step}: greedy accuracy {res['accuracy']:.3f} (per step count {per}) | "
              f"format {res['format']:.2f} | {res['eval_s']:.0f} s", flush=True)
        print(f"[pretrain]   e.g. {res['samples'][-1]['completion']!r} (answer {res['samples'][-1]['answer']})",
              flush=True)
        save(model, tokenizer, args.out)
        return res

    while step < args.steps:
        elapsed = time.time() - t_train
        if elapsed > budget_s:
            clock_bound = True
            break
        progress = max(step / args.steps, elapsed / budget_s)
        clock_bound = clock_bound or (step >= args.warmup and elapsed / budget_s > step / args.steps)
        lr = lr_at(progress, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        input_ids, mask, labels = collate(data[step * args.batch_size : (step + 1) * args.batch_size],
                                          tokenizer.pad_token_id)
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        step += 1
        if step % args.log_every == 0 or step == args.steps:
            mean = sum(losses) / len(losses)
            curve.append({"step": step, "loss": mean, "lr": lr, "minutes": (time.time() - t_train) / 60})
            print(f"[pretrain] step {step}/{args.steps} | loss {mean:.4f} | lr {lr:.2e} | "
                  f"{(time.time() - t_train) / step:.2f} s/step", flush=True)
            losses = []
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            evaluate(step)
    train_minutes = (time.time() - t_train) / 60
    final = evaluate(step)
    report = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "parameters": n_params, "steps_done": step, "clock_bound": clock_bound,
        "train_minutes": train_minutes, "total_minutes": (time.time() - t_start) / 60,
        "s_per_step": train_minutes * 60 / max(step, 1), "curve": curve, "evals": evals,
        "final": {k: v for k, v in final.items() if k != "samples"}, "samples": final["samples"],
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "threads": args.threads, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"[pretrain] done in {report['total_minutes']:.1f} min ({step} steps, {report['s_per_step']:.2f} s/step); "
          f"saved to {args.out}", flush=True)
    return report


if __name__ == "__main__":
    main()
