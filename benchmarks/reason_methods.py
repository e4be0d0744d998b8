"""The reasoning seed methods against GRPO on the arithmetic world, at the same budget, over seeds.

    OMP_NUM_THREADS=1 python benchmarks/reason_methods.py --methods grpo dapo dr_grpo --seeds 0 1 2
    python benchmarks/reason_methods.py --report            # tables + plots from the saved runs

Every method starts from the shipped `builtin:tiny-arith-lm` and runs `reasoning_rl.train` (what `drl reason train`
runs) on `configs/reason_default.yaml` with the benchmark budget (`BUDGET`: 40 steps of 8 problems x 8 completions,
full fine-tuning, lr 5e-5, temperature 0.7) and the method's overrides (`METHODS`); the held-out accuracy is the
greedy exact match of the `<answer>` tag on the 200 eval-split problems of the pretraining report (50 per step
count), measured by `reasoning_rl.world.pretrain.greedy_accuracy` for every method (so a shaped reward, e.g. a
length reward, is never what is reported). One JSON line per run goes to `benchmarks/results/reason_methods.jsonl`
(a run already there is skipped); `--report` prints the markdown tables of docs/reasoning_methods.md (mean ± std
over seeds and the paired difference to GRPO per seed) and writes the plots to docs/reasoning_methods/.

The comparisons (docs/reasoning_methods.md):
1. GRPO vs DAPO (clip-higher 0.28, token-level `dapo` aggregation, dynamic sampling) vs Dr.GRPO (`dr_grpo`
   aggregation, no std scaling): accuracy, generated tokens (DAPO's dynamic sampling pays for its re-draws), length.
2. PAD (ReVisual-R1's prioritized advantage distillation) vs GRPO: accuracy and the zero-advantage fraction.
3. LUFFY (one solver trace per group of 8, policy shaping gamma 0.1) vs LUFFY without shaping vs on-policy GRPO vs
   SFT on the same traces for the same number of steps.
4. Length rewards (Kimi k1.5's, cosine) vs GRPO: accuracy against mean completion length.
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
RESULTS = ROOT / "benchmarks" / "results" / "reason_methods.jsonl"
PLOTS = ROOT / "docs" / "reasoning_methods"
CONFIG = ROOT / "configs" / "reason_default.yaml"

# the fully worked model every table of docs/reasoning_methods.md starts from (the default config has trained
# builtin:tiny-arith-lm-mixed since 2026-12-07)
BASE_MODEL = "builtin:tiny-arith-lm"
BUDGET = ["num_steps=40", "rollout.prompts_per_step=8", "eval.problems=[]", "checkpoint.every=0",
          "logging.completions_every=0", f"model.pretrained={BASE_MODEL}"]
# the length rewards count tokens of the policy's tokenizer (the shipped model's directory)
TOKENIZER = ROOT / "reasoning_rl" / "assets" / "tiny_lm"
METHODS: dict[str, list[str]] = {
    # GRPO as published: per-sequence token mean, symmetric clip 0.2, group-standardised advantages
    "grpo": ["train.loss_aggregation=grpo"],
    "dapo": ["train.loss_aggregation=dapo", "train.clip_range_high=0.28", "rollout.dynamic_sampling=true"],
    "dr_grpo": ["train.loss_aggregation=dr_grpo", "advantage.scale=none"],
    "pad": ["train.loss_aggregation=grpo", "advantage.pad=true"],
    "luffy": ["train.loss_aggregation=grpo", "train.off_policy_per_group=1", "prompts.off_policy_column=solution"],
    "luffy_no_shaping": ["train.loss_aggregation=grpo", "train.off_policy_per_group=1",
                         "prompts.off_policy_column=solution", "train.luffy_policy_shaping=false"],
    # the same traces, supervised: 40 steps of 8 solutions (LUFFY sees 8 traces a step too)
    "sft": ["prompts.solution_column=solution", "stages=[{name: sft, kind: sft, num_steps: 40}]"],
    "kimi_length": ["train.loss_aggregation=grpo",
                    f"reward={{name: kimi_length, options: {{tokenizer: '{TOKENIZER}', correctness: exact_match, "
                    "correctness_options: {extract: [answer]}}}"],
    "cosine_length": ["train.loss_aggregation=grpo",
                      f"reward={{name: cosine_length, options: {{tokenizer: '{TOKENIZER}', max_len: 64, correctness: exact_match, "
                      "correctness_options: {extract: [answer]}}}"],
}
SUITES = {
    "GRPO vs DAPO vs Dr.GRPO": ["grpo", "dapo", "dr_grpo"],
    "PAD vs GRPO": ["grpo", "pad"],
    "LUFFY vs GRPO vs SFT": ["grpo", "luffy", "luffy_no_shaping", "sft"],
    "Length rewards": ["grpo", "kimi_length", "cosine_length"],
}


def run_one(method: str, seed: int, base_accuracy: dict) -> dict:
    from reasoning_rl.config import load_config
    from reasoning_rl.trainer import train
    from reasoning_rl.world.pretrain import eval_problems, greedy_accuracy

    overrides = BUDGET + METHODS[method] + [f"seed={seed}", f"output_dir=runs/reason_methods/{method}_s{seed}"]
    cfg = load_config(str(CONFIG), overrides)
    t0 = time.time()
    result = train(cfg)
    minutes = (time.time() - t0) / 60
    after = greedy_accuracy(result.model, result.processor, eval_problems(50, seed=0))
    hist = [h for h in result.history if "reward/mean" in h]

    def mean_of(key: str) -> float | None:
        values = [h[key] for h in hist if key in h]
        return sum(values) / len(values) if values else None

    return {
        "method": method, "seed": seed, "overrides": METHODS[method], "minutes": round(minutes, 2),
        "accuracy_before": base_accuracy["accuracy"], "accuracy": after["accuracy"],
        "accuracy_steps": {s: after[f"accuracy_steps_{s}"] for s in (1, 2, 3, 4)},
        "format": after["format"],
        "generated_tokens": sum(h.get("perf/generated_tokens", 0) for h in hist),
        "completion_length_mean": mean_of("reason/completion_length_mean"),
        "zero_std_fraction_mean": mean_of("reason/frac_reward_zero_std"),
        "pad_kept_fraction_mean": mean_of("loss/pad_kept_fraction"),
        "reward_curve": [round(h["reward/mean"], 3) for h in hist],
    }


def load_runs() -> list[dict]:
    if not RESULTS.is_file():
        return []
    return [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]


def _ms(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def report(runs: list[dict]) -> str:
    by = {(r["method"], r["seed"]): r for r in runs}
    lines: list[str] = []
    for title, methods in SUITES.items():
        seeds = sorted({s for (m, s) in by if m == "grpo"})
        lines += [f"### {title}", "",
                  "| method | held-out accuracy | rise | paired diff. to GRPO (per seed) | generated tokens | "
                  "mean completion length (train) | zero-std groups | minutes |",
                  "|---|---|---|---|---|---|---|---|"]
        for m in methods:
            rs = [by[(m, s)] for s in seeds if (m, s) in by]
            if not rs:
                continue
            diffs = [by[(m, r["seed"])]["accuracy"] - by[("grpo", r["seed"])]["accuracy"] for r in rs
                     if ("grpo", r["seed"]) in by]
            diff = "-" if m == "grpo" else (f"{statistics.mean(diffs):+.3f} (" +
                                            ", ".join(f"{d:+.3f}" for d in diffs) + ")")
            lengths = [r["completion_length_mean"] for r in rs if r["completion_length_mean"] is not None]
            zero = [r["zero_std_fraction_mean"] for r in rs if r["zero_std_fraction_mean"] is not None]
            lines.append(
                f"| {m} (n={len(rs)}) | {_ms([r['accuracy'] for r in rs])} | "
                f"{statistics.mean(r['accuracy'] - r['accuracy_before'] for r in rs):+.3f} | {diff} | "
                f"{statistics.mean(r['generated_tokens'] for r in rs):,.0f} | {_ms(lengths, 1)} | {_ms(zero, 2)} | "
                f"{statistics.mean(r['minutes'] for r in rs):.1f} |")
        lines.append("")
    if runs:
        lines.append(f"Accuracy of the initial model: {runs[0]['accuracy_before']:.3f}.")
    return "\n".join(lines)


def plot(runs: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOTS.mkdir(parents=True, exist_ok=True)
    written = []
    for title, methods in SUITES.items():
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
        for m in methods:
            rs = [r for r in runs if r["method"] == m]
            if not rs:
                continue
            xs = [r["generated_tokens"] / 1e3 for r in rs]
            ys = [r["accuracy"] for r in rs]
            left.scatter(xs, ys, label=m, alpha=0.8)
            curves = [r["reward_curve"] for r in rs]
            width = min(len(c) for c in curves)
            mean_curve = [statistics.mean(c[i] for c in curves) for i in range(width)]
            right.plot(range(1, width + 1), mean_curve, label=m)
        left.axhline(runs[0]["accuracy_before"], color="grey", ls="--", lw=1, label="initial model")
        left.set_xlabel("generated tokens (thousands)")
        left.set_ylabel("held-out greedy accuracy")
        left.set_title("final accuracy per run")
        right.set_xlabel("step")
        right.set_ylabel("training reward (mean over seeds)")
        right.set_title("training reward")
        left.legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        path = PLOTS / (title.lower().replace(" ", "_").replace(".", "").replace("vs_", "") + ".png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=[])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--report", action="store_true", help="print the tables and write the plots")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.methods:
        from reasoning_rl.models import load_policy
        from reasoning_rl.world.pretrain import eval_problems, greedy_accuracy

        base, tokenizer = load_policy(BASE_MODEL)
        base_accuracy = greedy_accuracy(base, tokenizer, eval_problems(50, seed=0))
        done = {(r["method"], r["seed"]) for r in load_runs()}
        for seed in args.seeds:
            for method in args.methods:
                if (method, seed) in done:
                    continue
                record = run_one(method, seed, base_accuracy)
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                with RESULTS.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                print(f"RESULT {method} seed {seed}: accuracy {record['accuracy_before']:.3f} -> "
                      f"{record['accuracy']:.3f} | {record['generated_tokens']:,} tokens | {record['minutes']:.1f} min",
                      flush=True)
    if args.report:
        runs = load_runs()
        print(report(runs))
        for path in plot(runs):
            print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
