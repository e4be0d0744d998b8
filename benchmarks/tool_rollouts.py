"""Tool-calling rollouts (V-ToolRL / OpenThinkIMG) on the visual world: does RL with tools beat the same model
without tools, and the SFT-initialised tool policy it starts from?

    OMP_NUM_THREADS=1 python benchmarks/tool_rollouts.py            # 3 seeds, ~30 CPU minutes at 1 thread
    python benchmarks/tool_rollouts.py --quick                      # a minute: the pipeline only

Task: crowded counting scenes (`reasoning_rl.tools.visual.count_rows`: 5-9 objects of 4-5 px on the 32x32
canvas; "How many red objects are there?" / "How many circles are there?"), held-out object multisets for
evaluation. The policy is the shipped `builtin:tiny-arith-lm` (a 0.8 M Llama over characters, pretrained on
arithmetic only), text-only: the image reaches it only through the tools' observations.

Per seed (the training seed: data order and sampling; the problems and the initial weights are the same):

* ``sft_tools``      SFT on expert tool traces (count with the question's colour or shape, then terminate with the
                     observed count; observations masked out of the loss), `--sft-steps` steps;
* ``rl_tools``       GRPO from ``sft_tools`` with multi-turn tool rollouts (tools count, locate, crop, draw_box; 2
                     turns), reward ``tool_answer``, `--rl-steps` steps;
* ``sft_no_tools``   SFT on tool-free traces (terminate with the answer at once), same steps;
* ``rl_no_tools``    GRPO from ``sft_no_tools`` with answer-only turns (``rollout.tools: []``), same steps.

Everything runs through `reasoning_rl.trainer.train` (the same code as `drl reason train`). Accuracy is the
``tool_answer`` reward of the greedy rollout on held-out problems (``greedy``) and of one sampled rollout at
the rollout temperature (``sampled``, `--temperature`, 0.6: at 1 the 100-step SFT policy breaks its ~160-character
action JSON in almost every sample, so RL would see no reward); ``answer_prior`` is the accuracy of answering each question's most frequent answer
on those problems, the best a policy without sight can do. Results: ``benchmarks/results/tool_rollouts.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "tool_rollouts.json"
TOOLS = ["count", "locate", "crop", "draw_box"]


def _rows(n: int, split: str, seed: int, solution: str) -> list[dict]:
    from reasoning_rl.tools.visual import count_rows

    rows = count_rows(n, split, seed)
    return [{"prompt": r["prompt"], "answer": r["answer"], "objects": r["objects"], "solution": r[solution]}
            for r in rows]


def _config(args, seed: int, out: Path, pretrained: str, rows: list[dict], held_out: list[dict], kind: str,
            tools: list[str]) -> dict:
    common = dict(
        seed=seed, output_dir=str(out),
        model=dict(pretrained=pretrained, use_lora=False, fused_logprob="off"),
        rollout=dict(num_generations=args.num_generations, prompts_per_step=args.prompts_per_step,
                     max_new_tokens=90, temperature=args.temperature, tools=tools, max_tool_rounds=2 if tools else 1,
                     batch_size=64),
        prompts=dict(source="list", problems=rows, problem_column="prompt", solution_column="solution"),
        reward=dict(name="tool_answer"), checkpoint=dict(every=0), logging=dict(completions_every=0),
    )
    if kind == "sft":
        return {**common, "num_steps": args.sft_steps,
                "rollout": {**common["rollout"], "prompts_per_step": args.sft_batch},
                "train": dict(learning_rate=args.sft_lr, lr_warmup_steps=10, micro_batch_size=args.sft_batch),
                "stages": [dict(name="sft", kind="sft", num_steps=args.sft_steps)]}
    return {**common, "num_steps": args.rl_steps,
            "train": dict(learning_rate=args.rl_lr, micro_batch_size=32),
            "eval": dict(problems=held_out, num_generations=1, seed=1234)}


def _eval(record: dict | None) -> dict:
    return {"greedy": record["greedy_reward"], "sampled": record["sampled_reward"],
            "tool_calls": record["tool_calls"], "tool_errors": record["tool_errors_mean"]}


def run_seed(args, seed: int, work: Path, held_out_tools: list[dict], held_out_direct: list[dict]) -> dict:
    from reasoning_rl.config import ReasonConfig
    from reasoning_rl.trainer import train

    out, t0 = {}, time.perf_counter()
    for name, solution, tools, held in (("tools", "solution", TOOLS, held_out_tools),
                                        ("no_tools", "direct_solution", [], held_out_direct)):
        rows = _rows(args.train_problems, "train", 0, solution)
        sft = train(ReasonConfig.model_validate(
            _config(args, seed, work / f"{name}_sft_{seed}", "builtin:tiny-arith-lm", rows, held, "sft", tools)))
        rl = train(ReasonConfig.model_validate(
            _config(args, seed, work / f"{name}_rl_{seed}", str(sft.weights_dir), rows, held, "grpo", tools)))
        steps = rl.history
        out[f"sft_{name}"] = _eval(rl.eval_before)
        out[f"rl_{name}"] = _eval(rl.eval_after)
        out[f"rl_{name}_curve"] = [{"step": h["step"], "reward": h["reward/mean"],
                                    "tool_calls": h.get("reason/tool_calls"), "tool_errors": h.get("reason/tool_errors")}
                                   for h in steps]
        out[f"sft_{name}_final_nll"] = sft.history[-1]["loss/sft_nll"]
        print(f"[tool_rollouts] seed {seed} {name}: SFT greedy {out[f'sft_{name}']['greedy']:.3f} -> RL greedy "
              f"{out[f'rl_{name}']['greedy']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    out["seconds"] = time.perf_counter() - t0
    return out


def summarise(per_seed: dict[str, dict]) -> dict:
    summary = {}
    for cond in ("sft_no_tools", "rl_no_tools", "sft_tools", "rl_tools"):
        for metric in ("greedy", "sampled"):
            values = [r[cond][metric] for r in per_seed.values()]
            summary[f"{cond}/{metric}"] = {"mean": statistics.mean(values),
                                           "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                                           "values": values}
    gain = [r["rl_tools"]["greedy"] - r["sft_tools"]["greedy"] for r in per_seed.values()]
    over = [r["rl_tools"]["greedy"] - r["rl_no_tools"]["greedy"] for r in per_seed.values()]
    summary["rl_tools_minus_sft_tools/greedy"] = {"mean": statistics.mean(gain), "values": gain,
                                                  "all_seeds_positive": all(g > 0 for g in gain)}
    summary["rl_tools_minus_rl_no_tools/greedy"] = {"mean": statistics.mean(over), "values": over,
                                                    "all_seeds_positive": all(g > 0 for g in over)}
    return summary


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-problems", type=int, default=2000)
    p.add_argument("--eval-problems", type=int, default=64)
    p.add_argument("--sft-steps", type=int, default=100)
    p.add_argument("--sft-batch", type=int, default=16)
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--rl-steps", type=int, default=25)
    p.add_argument("--rl-lr", type=float, default=3e-5)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--temperature", type=float, default=0.6,
                   help="rollout temperature of RL and of the sampled evaluation (the trainer's log-probs use it too)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--quick", action="store_true", help="a minute: 1 seed, a few steps (checks the pipeline only)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.train_problems, args.eval_problems = args.seeds[:1], 64, 8
        args.sft_steps, args.rl_steps, args.prompts_per_step, args.num_generations = 4, 2, 2, 4
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from reasoning_rl.tools.visual import answer_prior, count_rows

    held = count_rows(args.eval_problems, "eval", 0)
    # (eval rows carry the solution column the prompts config names; evaluation never reads it)
    held_tools = [{"prompt": r["prompt"], "answer": r["answer"], "objects": r["objects"], "solution": r["solution"]}
                  for r in held]
    held_direct = [{**r, "solution": h["direct_solution"]} for r, h in zip(held_tools, held, strict=True)]
    t0 = time.perf_counter()
    per_seed = {}
    with tempfile.TemporaryDirectory(prefix="drl_tool_rollouts_") as tmp:
        for seed in args.seeds:
            per_seed[str(seed)] = run_seed(args, seed, Path(tmp), held_tools, held_direct)
    result = {
        "task": "crowded counting scenes (reasoning_rl.tools.visual.count_rows), text-only tiny-arith-lm",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "answer_prior_eval": answer_prior(held),
        "summary": summarise(per_seed),
        "per_seed": per_seed,
        "minutes": (time.perf_counter() - t0) / 60,
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    s = result["summary"]
    print(f"[tool_rollouts] answer prior {result['answer_prior_eval']:.3f} | " + " | ".join(
        f"{c} {s[c + '/greedy']['mean']:.3f} +- {s[c + '/greedy']['std']:.3f}"
        for c in ("sft_no_tools", "rl_no_tools", "sft_tools", "rl_tools")) + f" | {result['minutes']:.1f} min")
    print(f"[tool_rollouts] wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
