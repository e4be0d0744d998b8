"""ReVisual-R1's staged curriculum (text RL -> multimodal RL -> text RL) against multimodal RL alone, on the shipped
tiny vision-language model, at the same number of steps, over seeds.

    OMP_NUM_THREADS=1 python benchmarks/reason_staged.py --seeds 0 1 2
    python benchmarks/reason_staged.py --report

Both arms start from `builtin:tiny-shapes-vlm` (its text model reads the arithmetic world, its vision tower the
shapes world) and run `reasoning_rl.train` stage by stage, each stage a separate run that starts from the previous
stage's saved model (so both arms restart the optimizer at the same boundaries):

    staged      text GRPO (arithmetic) -> multimodal GRPO (shapes VQA) -> text GRPO (arithmetic)
    mm_only     multimodal GRPO        -> multimodal GRPO              -> multimodal GRPO

with `STAGE_STEPS` steps per stage of 8 problems x 8 completions (full fine-tuning of the language model, the
vision tower frozen, lr 5e-5, temperature 0.7, exact match on the `<answer>` tag). After every stage both the
visual accuracy (greedy, 200 held-out VQA problems: 50 per question type) and the text accuracy (greedy, 100
held-out arithmetic problems: 25 per step count) are measured with `reasoning_rl.world.pretrain_vlm.greedy_accuracy`.
One JSON line per (arm, seed) goes to `benchmarks/results/reason_staged.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "reason_staged.jsonl"
CONFIG = ROOT / "configs" / "reason_vqa.yaml"
STAGE_STEPS = (10, 20, 10)
COMMON = ["rollout.prompts_per_step=8", "eval.prompts=null", "checkpoint.every=0", "logging.completions_every=0"]
TEXT = ["prompts={source: world, world: arithmetic, split: train, size: 2000, problem_column: prompt, "
        "answer_column: answer, image_column: null}", "rollout.max_new_tokens=64"]
VISUAL: list[str] = []  # configs/reason_vqa.yaml's own prompts
ARMS = {"staged": (TEXT, VISUAL, TEXT), "mm_only": (VISUAL, VISUAL, VISUAL)}


def measure(model, processor) -> dict:
    from reasoning_rl.world.pretrain import eval_problems
    from reasoning_rl.world.pretrain_vlm import eval_visual_problems, greedy_accuracy

    res = greedy_accuracy(model, processor, eval_visual_problems(50, seed=0), eval_problems(25, seed=0))
    return {k: round(v, 4) for k, v in res.items() if k != "samples"}


def run_arm(arm: str, seed: int, base: dict) -> dict:
    from reasoning_rl.config import load_config
    from reasoning_rl.trainer import train

    pretrained, stages, t0 = "builtin:tiny-shapes-vlm", [], time.time()
    for index, (overrides, steps) in enumerate(zip(ARMS[arm], STAGE_STEPS, strict=True)):
        out = ROOT / "runs" / "reason_staged" / f"{arm}_s{seed}_stage{index}"
        cfg = load_config(str(CONFIG), COMMON + overrides + [
            f"num_steps={steps}", f"seed={seed * 10 + index}", f"model.pretrained={pretrained}", f"output_dir={out}"])
        result = train(cfg)
        stages.append({"stage": index, "kind": "text" if overrides is TEXT else "multimodal", "steps": steps,
                       **measure(result.model, result.processor),
                       "reward_curve": [round(h["reward/mean"], 3) for h in result.history if "reward/mean" in h]})
        pretrained = str(out / "model")
        print(f"[staged] {arm} seed {seed} stage {index}: visual {stages[-1]['visual_accuracy']:.3f} | text "
              f"{stages[-1]['text_accuracy']:.3f}", flush=True)
    return {"arm": arm, "seed": seed, "stage_steps": list(STAGE_STEPS), "before": base, "stages": stages,
            "minutes": round((time.time() - t0) / 60, 2)}


def load_runs() -> list[dict]:
    if not RESULTS.is_file():
        return []
    return [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]


def report(runs: list[dict]) -> str:
    def ms(values):
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {sd:.3f}"

    lines = ["| arm | after stage | visual accuracy | text accuracy | per seed (visual / text) |", "|---|---|---|---|---|"]
    if runs:
        b = runs[0]["before"]
        lines.append(f"| (initial model) | - | {b['visual_accuracy']:.3f} | {b['text_accuracy']:.3f} | |")
    for arm in ARMS:
        rs = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
        for i in range(len(STAGE_STEPS)):
            vis = [r["stages"][i]["visual_accuracy"] for r in rs]
            txt = [r["stages"][i]["text_accuracy"] for r in rs]
            if not rs:
                continue
            kind = rs[0]["stages"][i]["kind"]
            per = ", ".join(f"{v:.2f} / {t:.2f}" for v, t in zip(vis, txt, strict=True))
            lines.append(f"| {arm} (n={len(rs)}) | {i + 1}: {kind} ({STAGE_STEPS[i]} steps) | {ms(vis)} | {ms(txt)} | {per} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[])
    ap.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=list(ARMS))
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.seeds:
        from reasoning_rl.models import load_policy

        base = measure(*load_policy("builtin:tiny-shapes-vlm"))
        done = {(r["arm"], r["seed"]) for r in load_runs()}
        for seed in args.seeds:
            for arm in args.arms:
                if (arm, seed) in done:
                    continue
                record = run_arm(arm, seed, base)
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                with RESULTS.open("a") as f:
                    f.write(json.dumps(record) + "\n")
    if args.report:
        print(report(load_runs()))


if __name__ == "__main__":
    main(sys.argv[1:])
