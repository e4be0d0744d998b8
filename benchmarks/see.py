"""SEE vs one-LoRA continual fine-tuning baselines on the arithmetic world's conflicting task sequence.

    python benchmarks/see.py --seeds 0 1 2 --out benchmarks/results/see.json
    # or one process per seed, then merge:
    python benchmarks/see.py --seeds 0 --out benchmarks/results/see_seed0.json   (1, 2 likewise)
    python benchmarks/see.py --merge benchmarks/results/see_seed*.json --out benchmarks/results/see.json

Task sequence (configs/see_continual.yaml): add -> sub -> mul problems of the arithmetic world, each task with its
own answer format inside <answer> (`9`, `=9`, `*9`), so a model fine-tuned on a later task answers earlier tasks in
the later task's format: forgetting shows. Every method trains LoRA (same rank, lr, batch and steps per task) on
the shipped tiny arithmetic model (`builtin:tiny-arith-lm`):

* see        - SEE (reasoning_rl.continual.trainer.train): a new expert per task on own data (accept + answer)
               and a rehearsal sample of earlier tasks + general queries (reject); routed newest-first, none
               accepts -> the base model.
* seq_ft     - one LoRA fine-tuned on each task in turn (own data only).
* rehearsal  - one LoRA fine-tuned on each task in turn plus the same rehearsal sample of every earlier task
               (with its answers), drawn at the same share of each batch as SEE's reject examples.
* multitask  - one LoRA trained once on all tasks' data together for (tasks x steps_per_task) steps (the
               non-continual reference; it has no stages, so no forgetting number).

Reported per method: the accuracy matrix (task x after-stage, exact match of the <answer> tag on held-out
problems), the average accuracy after the last task, the average forgetting (Chaudhry et al.: best earlier
accuracy minus final, over all but the last task); for SEE also routing accuracy and OOD detection; mean and
sample std over the seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from reasoning_rl.continual import experts as ex  # noqa: E402
from reasoning_rl.continual.config import SEEConfig, load_config  # noqa: E402
from reasoning_rl.continual.tasks import Example, answer_examples, load_tasks  # noqa: E402
from reasoning_rl.continual.trainer import train as see_train  # noqa: E402
from reasoning_rl.models import load_policy  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "see_continual.yaml"
METHODS = ("see", "seq_ft", "rehearsal", "multitask")


def _train_kwargs(cfg: SEEConfig, seed: int) -> dict:
    t = cfg.train
    return dict(batch_size=t.batch_size, learning_rate=t.learning_rate, warmup_steps=t.lr_warmup_steps,
                weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, seed=seed,
                use_chat_template=cfg.see.use_chat_template)


def _plain_accuracy(model, tokenizer, cfg: SEEConfig, evals: dict) -> dict[str, float]:
    """Accuracy of the active adapter (no indicator, no routing) on every task's eval items."""
    out = {}
    for name, items in evals.items():
        ids = tokenizer(ex.prompt_texts(tokenizer, [it.prompt for it in items], cfg.see.use_chat_template),
                        add_special_tokens=False).input_ids
        texts = ex.answer(model, tokenizer, ids, None, ["single"], [], cfg.eval.max_new_tokens, cfg.eval.batch_size)
        out[name] = sum(ex.correct(texts, items)) / len(items)
    return out


def one_lora(cfg: SEEConfig, method: str) -> dict:
    """seq_ft / rehearsal / multitask: one LoRA adapter, no indicator."""
    model, tokenizer = load_policy(cfg.model.pretrained)
    model.requires_grad_(False)
    m = cfg.model
    model = ex.add_expert(model, "single", ex.lora_config(m.lora_rank, m.lora_alpha, m.lora_target_modules),
                          seed=cfg.seed)
    data = load_tasks(cfg)
    names = [t.name for t in cfg.tasks]
    matrix: dict[str, list[float]] = {n: [] for n in names}
    steps = cfg.train.steps_per_task
    if method == "multitask":
        items = [it for n in names for it in data.train[n]]
        ex.train_adapter(model, "single", tokenizer, answer_examples(items), steps=steps * len(names),
                         **_train_kwargs(cfg, cfg.seed))
        for n, v in _plain_accuracy(model, tokenizer, cfg, data.eval).items():
            matrix[n].append(v)
        return {"matrix": matrix}
    rng = random.Random(f"see-bench-rehearsal-{cfg.seed}")
    for k, name in enumerate(names):
        examples = answer_examples(data.train[name])
        if method == "rehearsal":
            for earlier in names[:k]:
                sample = rng.sample(data.train[earlier], min(cfg.see.rehearsal_per_task, len(data.train[earlier])))
                examples += [Example(it.prompt, it.completion, "rehearsal", it.task) for it in sample]
        ex.train_adapter(model, "single", tokenizer, examples, steps=steps,
                         reject_share=cfg.see.reject_share if method == "rehearsal" else None,
                         **_train_kwargs(cfg, cfg.seed * 1000 + k))
        for n, v in _plain_accuracy(model, tokenizer, cfg, data.eval).items():
            matrix[n].append(v)
    return {"matrix": matrix}


def see(cfg: SEEConfig) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = cfg.model_copy(update={"output_dir": tmp})
        res = see_train(cfg)
    last = res.stages[-1]
    return {"matrix": res.matrix, "routing_accuracy": last["routing_mean"], "routing": last["routing"],
            "ood_detection": last["ood_detection"], "ood_accuracy": last["ood_accuracy"]}


def summarise(run: dict) -> dict:
    rows = list(run["matrix"].values())
    run["average_accuracy"] = sum(r[-1] for r in rows) / len(rows)
    run["forgetting"] = ex.forgetting(rows) if len(rows[0]) > 1 else None
    return run


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def aggregate(per_seed: dict[str, dict[str, dict]]) -> dict:
    """{method: {metric: {mean, std, values}}} over the seeds."""
    out = {}
    for method in METHODS:
        runs = [per_seed[s][method] for s in sorted(per_seed) if method in per_seed[s]]
        if not runs:
            continue
        out[method] = {}
        for metric in ("average_accuracy", "forgetting", "routing_accuracy", "ood_detection"):
            vals = [r[metric] for r in runs if r.get(metric) is not None]
            if vals:
                out[method][metric] = mean_std(vals)
    return out


LABELS = {"see": "SEE (one expert per task, routed)", "seq_ft": "sequential fine-tuning (one LoRA)",
          "rehearsal": "rehearsal (one LoRA + replay)", "multitask": "multi-task (all data at once)"}


def markdown_table(result: dict) -> str:
    """The docs table: mean ± std over the seeds of every method's metrics, then the per-task final accuracies."""
    def cell(metrics: dict, key: str) -> str:
        return f"{metrics[key]['mean']:.3f} ± {metrics[key]['std']:.3f}" if key in metrics else "-"

    seeds = sorted(result["per_seed"])
    tasks = result["tasks"]
    lines = ["| method | average accuracy after the last task | forgetting | routing accuracy | OOD detection | "
             + " | ".join(f"final {t}" for t in tasks) + " |", "|---" * (5 + len(tasks)) + "|"]
    for method, metrics in result["summary"].items():
        finals = []
        for t in tasks:
            vals = [result["per_seed"][s][method]["matrix"][t][-1] for s in seeds if method in result["per_seed"][s]]
            finals.append(f"{statistics.fmean(vals):.2f} ± {statistics.stdev(vals) if len(vals) > 1 else 0.0:.2f}")
        lines.append(f"| {LABELS[method]} | {cell(metrics, 'average_accuracy')} | {cell(metrics, 'forgetting')} | "
                     f"{cell(metrics, 'routing_accuracy')} | {cell(metrics, 'ood_detection')} | " + " | ".join(finals) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    ap.add_argument("--merge", type=Path, nargs="+", help="merge per-seed result files instead of running")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/see.json"))
    ap.add_argument("--table", type=Path, help="print the markdown table of a results file and exit")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.table:
        print(markdown_table(json.loads(args.table.read_text())))
        return {}
    if args.merge:
        parts = [json.loads(p.read_text()) for p in args.merge]
        per_seed = {k: v for p in parts for k, v in p["per_seed"].items()}
        result = {**parts[0], "per_seed": per_seed, "summary": aggregate(per_seed),
                  "minutes": sum(p["minutes"] for p in parts), "merged_from": [str(p) for p in args.merge]}
    else:
        t0 = time.time()
        per_seed: dict[str, dict] = {}
        for seed in args.seeds:
            cfg = load_config(args.config, [*args.overrides, f"seed={seed}"])
            per_seed[str(seed)] = {}
            for method in args.methods:
                t = time.time()
                run = see(cfg) if method == "see" else one_lora(cfg, method)
                run = summarise(run)
                run["minutes"] = (time.time() - t) / 60
                per_seed[str(seed)][method] = run
                print(f"[see-bench] seed {seed} {method}: average accuracy {run['average_accuracy']:.3f}, forgetting "
                      f"{run['forgetting']}, {run['minutes']:.1f} min | {json.dumps(run['matrix'])}", flush=True)
        cfg = load_config(args.config, args.overrides)
        result = {"config": str(args.config), "overrides": args.overrides, "tasks": [t.name for t in cfg.tasks],
                  "steps_per_task": cfg.train.steps_per_task, "threads": torch.get_num_threads(),
                  "per_seed": per_seed, "summary": aggregate(per_seed), "minutes": (time.time() - t0) / 60,
                  "command": " ".join(["python", "benchmarks/see.py", *(argv if argv is not None else sys.argv[1:])])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for method, metrics in result["summary"].items():
        print(f"[see-bench] {method:<10} " + " | ".join(f"{k} {v['mean']:.3f} ± {v['std']:.3f}" for k, v in metrics.items()))
    return result


if __name__ == "__main__":
    main()
