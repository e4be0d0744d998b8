"""Greedy accuracy of the converted SmolLM2-135M-Instruct on the held-out problems of configs/reason_smollm2.yaml,
before any training: what the recipe's task choice rests on (the model should partly solve it).

    python -m reasoning_rl.fetch_smollm2 --out models/smollm2-135m-instruct     # once
    python benchmarks/smollm2_base_accuracy.py [--model DIR] [--threads 1]

The same formatting (chat template, the config's system prompt), greedy decoding, max_new_tokens and reward as the
trainer's evaluation (`eval/greedy_reward`). Prints the accuracy, the time the generation took and a few completions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from reasoning_rl.config import load_config  # noqa: E402
from reasoning_rl.data import format_prompt, rows_to_problems  # noqa: E402
from reasoning_rl.models import load_policy  # noqa: E402
from reasoning_rl.rollout import encode_prompts  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "reason_smollm2.yaml")
    parser.add_argument("--model", default=os.environ.get("DRL_SMOLLM2_DIR"),
                        help="the converted model directory (default: $DRL_SMOLLM2_DIR, else the config's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--show", type=int, default=5, help="completions to print")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [f"model.pretrained={args.model}"] if args.model else [])
    problems = rows_to_problems(cfg.eval.problems, cfg.prompts, "eval.problems")
    reward = cfg.reward.build()
    t0 = time.perf_counter()
    model, tokenizer = load_policy(cfg.model.pretrained, dtype=cfg.model.dtype, local_files_only=True)
    model.eval()
    load_s = time.perf_counter() - t0
    texts = [format_prompt(tokenizer, p, cfg.prompts.system_prompt, cfg.prompts.use_chat_template, False)
             for p in problems.prompts]
    enc = encode_prompts(tokenizer, texts, None, torch.device("cpu"))
    completions, t0 = [], time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(texts), args.batch_size):
            rows = slice(start, start + args.batch_size)
            out = model.generate(input_ids=enc.prompt_ids[rows], attention_mask=enc.prompt_mask[rows], do_sample=False,
                                 max_new_tokens=cfg.rollout.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            completions += tokenizer.batch_decode(out[:, enc.prompt_ids.shape[1]:], skip_special_tokens=True)
    generate_s = time.perf_counter() - t0
    scores, _ = reward(completions, problems.prompts, problems.metadata)
    scores = torch.nan_to_num(scores.float())
    result = {"model": cfg.model.pretrained, "problems": len(texts), "greedy_accuracy": float(scores.mean()),
              "solved": int((scores >= 1).sum()), "generate_s": round(generate_s, 1), "load_s": round(load_s, 1),
              "threads": args.threads, "max_new_tokens": cfg.rollout.max_new_tokens}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"greedy accuracy {result['greedy_accuracy']:.2f} ({result['solved']}/{len(texts)}) | generation "
              f"{generate_s:.0f} s at {args.threads} thread(s) | model load {load_s:.0f} s")
        for p, m, c, s in list(zip(problems.prompts, problems.metadata, completions, scores.tolist(), strict=True))[:args.show]:
            print(f"  [{s:.0f}] {p}  (answer {m['answer']})\n      -> {c!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
