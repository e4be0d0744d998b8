"""`drl reason eval RUN_DIR --task see`: a trained SEE run's accuracy matrix, routing accuracy and OOD detection.

Experts never change once trained, so the system "after stage i" is exactly the first i + 1 experts of the final
run: the whole task x after-stage matrix is recomputed from RUN_DIR/experts/ on the run's held-out items.
`--task see:oldest_first` / `see:newest_first` overrides the order the experts are asked in; `--limit N` evaluates
at most N queries per task (and N OOD queries); `--max-new-tokens` bounds the answers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from reasoning_rl import registry
from reasoning_rl.continual import experts as ex
from reasoning_rl.continual.config import load_config
from reasoning_rl.continual.tasks import load_tasks
from reasoning_rl.continual.trainer import results
from reasoning_rl.models import ModelLoadError, load_policy

ORDERS = ("newest_first", "oldest_first")


def load_run(run_dir: str | Path):
    """(PeftModel with every trained expert as a named adapter, tokenizer, the run's SEEConfig, expert names)."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ModelLoadError(f"--task see needs a SEE run directory (with config.yaml and experts/), got {run_dir!r}; "
                             "train one with `drl reason train configs/see_continual.yaml`")
    cfg = load_config(run / "config.yaml")
    names = [ex.expert_name(i) for i in range(len(cfg.tasks))
             if (run / "experts" / ex.expert_name(i) / "adapter_config.json").is_file()]
    if not names:
        raise ModelLoadError(f"{run} has no trained experts (experts/expert_0/ is missing); the run has not finished. "
                             f"Resume it with `drl reason train {run / 'config.yaml'} --output-dir {run} --resume auto`")
    from peft import PeftModel

    m = cfg.model
    base, tokenizer = load_policy(m.pretrained, m.revision, m.dtype, m.local_files_only, False, None, m.seed)
    base.to("cuda" if torch.cuda.is_available() else "cpu")
    model = PeftModel.from_pretrained(base, run / "experts" / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(run / "experts" / name, adapter_name=name)
    return model.eval(), getattr(tokenizer, "tokenizer", tokenizer), cfg, names


def run(model_or_run: str, arg: str | None, options: registry.EvalOptions) -> dict:
    """{"matrix": {task: {after_i: accuracy}}, "average_accuracy", "forgetting", "routing_accuracy",
    "routing": {task: ...}, "ood_detection", "stages": [...]} for the run directory `model_or_run`."""
    order = arg or None
    if order is not None and order not in ORDERS:
        raise ModelLoadError(f"--task see:{arg}: unknown expert order; use see, see:newest_first or see:oldest_first")
    model, tokenizer, cfg, names = load_run(model_or_run)
    order = order or cfg.see.order
    data = load_tasks(cfg)
    limit = options.limit
    evals = {n: items[:limit] if limit else items for n, items in data.eval.items()}
    ood = data.ood[:limit] if limit else data.ood
    owner = {t.name: ex.expert_name(i) for i, t in enumerate(cfg.tasks)}
    matrix: dict[str, list[float]] = {n: [] for n in evals}
    stages = []
    for k in range(1, len(names) + 1):
        res = ex.evaluate_system(model, tokenizer, names[:k], order, evals, ood, cfg.see.accept_marker,
                                 cfg.see.reject_marker, options.max_new_tokens or cfg.eval.max_new_tokens,
                                 cfg.eval.batch_size, cfg.see.use_chat_template, owner)
        for n in matrix:
            matrix[n].append(res["accuracy"][n])
        stages.append({"task": cfg.tasks[k - 1].name, "accuracy_mean": res["accuracy"]["mean"],
                       "routing_mean": res["routing"]["mean"], "routing": res["routing"], "accept": res["accept"],
                       "ood_detection": res.get("ood_detection"), "ood_accuracy": res.get("ood_accuracy")})
    out = results(matrix, stages)
    out.pop("tasks")
    out["stages"] = {f"after_{i}": s for i, s in enumerate(stages)}
    out.update(order=order, experts=len(names), queries_per_task=min(len(v) for v in evals.values()),
               ood_queries=len(ood))
    return out
