"""Held-out accuracy gained by a GRPO run of a reasoning config, overall and per step count of the arithmetic world
(or per question type of the visual world).

    OMP_NUM_THREADS=1 python benchmarks/reason_default_gain.py configs/reason_default.yaml seed=1 output_dir=runs/g1

Loads the config (extra arguments are `--set`-style overrides), measures the greedy exact-match accuracy of the
initial model on the 200 held-out problems `reasoning_rl.world.pretrain.eval_problems(50, seed=0)` (50 per step
count: the eval list of configs/reason_default.yaml), trains with `reasoning_rl.train` (what `drl reason train`
runs), measures the trained model the same way and prints one `RESULT {json}` line: minutes, accuracies before /
after (overall and per step count), the trainer's own eval before / after and the training reward per step. For a
config on the visual world (`prompts.world: shapes_vqa`) the accuracies are those of
`reasoning_rl.world.pretrain_vlm.greedy_accuracy` on its 200 held-out problems (50 per question type) and 100
arithmetic problems (the text skill of the vision-language model).
"""

from __future__ import annotations

import json
import sys
import time

import torch


def main(argv: list[str]) -> dict:
    torch.set_num_threads(1)
    from reasoning_rl.config import load_config
    from reasoning_rl.models import load_policy
    from reasoning_rl.trainer import train
    from reasoning_rl.world.pretrain import eval_problems, greedy_accuracy

    cfg = load_config(argv[0], argv[1:])
    if cfg.prompts.world == "shapes_vqa" and cfg.prompts.source == "world":
        from reasoning_rl.world import pretrain_vlm

        visual_problems, text_problems = pretrain_vlm.eval_visual_problems(50, seed=0), eval_problems(25, seed=0)

        def greedy_accuracy(model, processor, _):  # noqa: F811 - the visual world's measure
            return pretrain_vlm.greedy_accuracy(model, processor, visual_problems, text_problems)
    problems = eval_problems(50, seed=0)
    base, tokenizer = load_policy(cfg.model.pretrained)
    before = greedy_accuracy(base, tokenizer, problems)
    t0 = time.time()
    result = train(cfg)
    minutes = (time.time() - t0) / 60
    model = result.model.merge_and_unload() if cfg.model.use_lora else result.model
    after = greedy_accuracy(model, result.processor, problems)

    def strip(d):
        return {k: round(v, 3) for k, v in d.items() if k != "samples"}

    out = {"overrides": argv[1:], "minutes": round(minutes, 2), "before": strip(before), "after": strip(after),
           "eval_before": result.eval_before, "eval_after": result.eval_after,
           "reward_curve": [round(h["reward/mean"], 3) for h in result.history]}
    print("RESULT " + json.dumps(out))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
