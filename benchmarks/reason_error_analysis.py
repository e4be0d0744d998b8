"""Where a model's held-out arithmetic errors are, and whether RL could reach them.

    OMP_NUM_THREADS=1 python benchmarks/reason_error_analysis.py                 # the shipped builtin:tiny-arith-lm
    OMP_NUM_THREADS=1 python benchmarks/reason_error_analysis.py runs/reason_default/model

For every one of the 200 held-out problems of configs/reason_default.yaml (`eval_problems(50, seed=0)`) that the
model gets wrong greedily, the first wrong equation of its trace is classified (a wrong arithmetic fact, a value not
carried from the previous step, an operation misread from the text, too few / too many steps, a malformed
equation). For that first error it also measures the probability the model gives the correct next character
(teacher-forced on its own trace up to the error) at temperature 1 and at the trainer's 0.7: how often GRPO's
sampling would find the correct token there. Last, how often each held-out problem's arithmetic facts
(``value op operand``) are computed in the reference traces of the config's 2,000 training problems: how often RL
sees each fact at all. Prints one table per measure; about a minute at one thread.
"""

from __future__ import annotations

import collections
import re
import statistics
import sys
from pathlib import Path

import torch

from reasoning_rl.world import text
from reasoning_rl.world.pretrain import eval_problems, prompt_text

EQUATION = re.compile(r"(\d+)([+\-*])(\d+)=(\d+)")


def first_error(problem: text.ArithProblem, completion: str) -> str:
    """The kind of the first mistake in a wrong completion's trace."""
    think = re.search(r"<think>(.*?)</think>", completion, re.S)
    equations = [e.strip() for e in think.group(1).split(";")] if think else []
    value = problem.start
    for k, (op, operand) in enumerate(problem.ops):
        if k >= len(equations):
            return "too few steps"
        m = EQUATION.fullmatch(equations[k])
        if not m:
            return "malformed equation"
        left, symbol, right, result = int(m[1]), m[2], int(m[3]), int(m[4])
        if left != value:
            return "value not carried"
        if symbol != text.SYMBOL[op] or right != operand:
            return "operation misread"
        value = text.apply_op(value, op, operand)
        if result != value:
            return f"wrong fact ({op})"
    return "too many steps" if len(equations) > len(problem.ops) else "wrong answer tag"


@torch.no_grad()
def correct_char_probability(model, tokenizer, problem: text.ArithProblem, completion: str) -> tuple[float, float]:
    """P(the reference's next character | prompt + the completion's prefix it shares with the reference), T 1 / 0.7."""
    reference, _ = text.solution_trace(problem.start, problem.ops)
    k = 0
    while k < min(len(completion), len(reference)) and completion[k] == reference[k]:
        k += 1
    ids = tokenizer(prompt_text(tokenizer, problem.prompt) + completion[:k], return_tensors="pt",
                    add_special_tokens=False).input_ids
    target = tokenizer(reference[k : k + 1], add_special_tokens=False).input_ids[0]
    logits = model(ids).logits[0, -1].float()
    return torch.softmax(logits, -1)[target].item(), torch.softmax(logits / 0.7, -1)[target].item()


def fact_counts(problems) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for p in problems:
        value = p.start
        for op, operand in p.ops:
            counts[(value, op, operand)] += 1
            value = text.apply_op(value, op, operand)
    return counts


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import reasoning_rl

    source = argv[0] if argv else str(Path(reasoning_rl.__file__).parent / "assets" / "tiny_lm")
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.padding_side = "left"
    problems = eval_problems(50, seed=0)
    completions: list[str] = []
    with torch.no_grad():
        for start in range(0, len(problems), 50):
            chunk = problems[start : start + 50]
            enc = tokenizer([prompt_text(tokenizer, p.prompt) for p in chunk], return_tensors="pt", padding=True,
                            add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=64, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            completions += tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)

    kinds: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    reach: dict[int, list[tuple[float, float]]] = collections.defaultdict(list)
    for p, c in zip(problems, completions, strict=True):
        if f"<answer>{p.answer}</answer>" in c:
            kinds[p.steps]["right"] += 1
            continue
        kinds[p.steps][first_error(p, c)] += 1
        reach[p.steps].append(correct_char_probability(model, tokenizer, p, c))
    print(f"model: {source}\n\n| steps | right | first error of the wrong ones |\n|---|---|---|")
    for s in sorted(kinds):
        wrong = ", ".join(f"{k} {n}" for k, n in kinds[s].most_common() if k != "right")
        print(f"| {s} | {kinds[s]['right']} / {sum(kinds[s].values())} | {wrong} |")

    print("\n| steps | wrong | median P(correct char) T 1 | median P(correct char) T 0.7 | share with P > 0.2 at T 0.7 |")
    print("|---|---|---|---|---|")
    for s in sorted(reach):
        p1, p07 = [r[0] for r in reach[s]], [r[1] for r in reach[s]]
        print(f"| {s} | {len(p1)} | {statistics.median(p1):.3f} | {statistics.median(p07):.3f} | "
              f"{sum(x > 0.2 for x in p07) / len(p07):.2f} |")

    train_facts = fact_counts(text.generate_problems(2000, "train", seed=0))  # configs/reason_default.yaml's prompts
    print(f"\ntraining problems: 2,000, {sum(train_facts.values())} fact instances, {len(train_facts)} distinct facts")
    print("| steps | median occurrences of a held-out problem's facts in training | share never computed in training |")
    print("|---|---|---|")
    for s in text.STEPS:
        counts = [train_facts[f] for f, _ in fact_counts([p for p in problems if p.steps == s]).items()]
        print(f"| {s} | {statistics.median(counts):.0f} | {sum(c == 0 for c in counts) / len(counts):.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
