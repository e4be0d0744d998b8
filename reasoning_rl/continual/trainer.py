"""SEE, the sequential ensemble of LoRA experts (arXiv 2504.06664): continual fine-tuning without a router.

`train()` is the outline; each phase is a function below it, in loop order:

    setup             base model + tokenizer, the tasks' items (reasoning_rl.continual.tasks), TensorBoard
    restore           resume between tasks: the finished experts' weights, the accuracy matrix, the RNG
    print_startup     the derived numbers (examples per expert, steps, parameters per expert)
    per task k (a stage):
      build_examples  task k's items as `accept + completion`, a rehearsal sample of tasks < k and general queries
                      as `reject` (SEE's task reconstruction)
      add_expert      a new LoRA adapter expert_k on the shared frozen base; only it is trainable
      train_expert    next-token NLL on those examples (fp32), AdamW over expert_k alone
      evaluate_stage  the system of experts 0..k: accuracy on every task (a column of the accuracy matrix),
                      routing accuracy, OOD detection rate
      save_checkpoint atomic (diffusion_rl.core.checkpoint): every expert's weights + the matrix + the RNG
    finish            experts/expert_<k>/ in peft format, see.json (matrix, forgetting, routing, OOD)

A resumed run may list more tasks than its checkpoint (the old ones a prefix): only the new experts train.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed

from diffusion_rl.core import checkpoint
from diffusion_rl.core.run import ResumeError, check_resume_config, derive_seed, versions
from diffusion_rl.core.tb import Writer
from reasoning_rl.continual import experts as ex
from reasoning_rl.continual.config import SEEConfig, dump_config
from reasoning_rl.continual.tasks import Example, TaskData, expert_examples, load_tasks
from reasoning_rl.models import load_policy

# Config sections a resumed run may change without a warning (`tasks` may grow; its saved part must not change).
RESUME_FREE = ("output_dir", "eval", "logging", "checkpoint", "tasks", "ood")
RESUME_FIXED = ("model", "see", "general", "train", "seed")
RESULTS = "see.json"


@dataclass
class Run:
    """Everything `setup` builds once per `train()` call; the phases read and update it."""

    cfg: SEEConfig
    out: Path
    accelerator: Accelerator  # one process: its save_state / load_state carry the RNG in checkpoints
    model: torch.nn.Module  # the base model; a PeftModel holding every expert once the first is added
    tokenizer: object
    data: TaskData
    writer: Writer
    start_stage: int = 0
    global_step: int = 0
    matrix: dict[str, list[float]] = field(default_factory=dict)  # task -> accuracy after stage 0, 1, ...
    stages: list[dict] = field(default_factory=list)  # per stage: routing, OOD, accept rates, loss

    @property
    def experts(self) -> list[str]:
        return [ex.expert_name(i) for i in range(len(self.stages))]


@dataclass
class SEEResult:
    output_dir: Path
    matrix: dict[str, list[float]]
    stages: list[dict]
    model: object | None = None
    tokenizer: object | None = None


def train(cfg: SEEConfig, resume: str | None = None) -> SEEResult:
    """Train one expert per task of `cfg.tasks`, in order; `resume` (`auto` or a checkpoint directory) continues
    after the last finished task."""
    run = setup(cfg)
    with run.writer:
        restore(run, resume)
        print_startup(run)
        for stage in range(run.start_stage, len(cfg.tasks)):
            t0 = time.perf_counter()
            examples = build_examples(run, stage)
            add_expert(run, stage)
            losses = train_expert(run, stage, examples)
            t_train = time.perf_counter() - t0
            evaluate_stage(run, stage, losses, t_train, time.perf_counter())
            every = cfg.checkpoint.every
            if (every and (stage + 1) % every == 0) or stage + 1 == len(cfg.tasks):
                save_checkpoint(run, stage + 1)
        finish(run)
    return SEEResult(run.out, run.matrix, run.stages, run.model, run.tokenizer)


# ================================================================================================
# set-up and resume
# ================================================================================================


def setup(cfg: SEEConfig) -> Run:
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # one process; the GPU when there is one
    set_seed(cfg.seed)
    m = cfg.model
    model, tokenizer = load_policy(m.pretrained, m.revision, m.dtype, m.local_files_only, False, None, m.seed)
    model.to(accelerator.device).requires_grad_(False)
    model.eval()
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    out = Path(cfg.output_dir)
    return Run(cfg=cfg, out=out, accelerator=accelerator, model=model, tokenizer=tokenizer, data=load_tasks(cfg),
               writer=Writer(out / "tensorboard"), matrix={t.name: [] for t in cfg.tasks})


def restore(run: Run, resume: str | None) -> None:
    """Rebuild the finished experts from the checkpoint's tensors, its matrix and stage records, and the RNG."""
    if not resume:
        return
    ckpt = checkpoint.find_checkpoint(resume, run.out)
    state, tensors = checkpoint.load_trainer_state(ckpt)
    saved_cfg, current = state["config"], run.cfg.model_dump(mode="json")
    changed = check_resume_config(saved_cfg, current, RESUME_FREE, RESUME_FIXED)
    done = state["stages_done"]
    if current["tasks"][:done] != saved_cfg["tasks"][:done]:
        raise ResumeError(f"the first {done} tasks differ from the checkpoint's ({[t['name'] for t in saved_cfg['tasks'][:done]]}"
                          f" vs {[t['name'] for t in current['tasks'][:done]]}); their experts are trained. Keep them "
                          "as they were and append new tasks after them")
    if changed:
        print(f"[drl] warning: config sections differ from the checkpoint's: {changed}")
    from peft import set_peft_model_state_dict

    lora = _lora(run.cfg)
    for i in range(done):
        name = ex.expert_name(i)
        run.model = ex.add_expert(run.model, name, lora, seed=0)
        weights = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{name}::")}
        result = set_peft_model_state_dict(run.model, weights, adapter_name=name)
        if getattr(result, "unexpected_keys", None):
            raise checkpoint.CheckpointError(f"{ckpt}: {name}'s weights do not fit the model ({result.unexpected_keys[:3]})")
    run.accelerator.load_state(str(ckpt))
    run.start_stage, run.global_step = done, state["global_step"]
    run.stages = state["stages"]
    for task in run.cfg.tasks:
        run.matrix[task.name] = state["matrix"].get(task.name, [])
    for i in range(done):  # a task appended on resume: measure it on the systems of the stages already done
        missing = [n for n, row in run.matrix.items() if len(row) <= i]
        if missing:
            res = evaluate_system(run, i + 1)
            for n in missing:
                run.matrix[n].append(res["accuracy"][n])
    print(f"[drl] resumed from {ckpt}: {done} expert(s) trained ({', '.join(t.name for t in run.cfg.tasks[:done])})")


def _lora(cfg: SEEConfig):
    m = cfg.model
    return ex.lora_config(m.lora_rank, m.lora_alpha, m.lora_target_modules)


def print_startup(run: Run) -> None:
    cfg, s, t = run.cfg, run.cfg.see, run.cfg.train
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / "config.yaml").write_text(dump_config(cfg))
    per_expert = []
    for k, task in enumerate(cfg.tasks):
        own = len(run.data.train[task.name])
        rehearsal = sum(min(s.rehearsal_per_task, len(run.data.train[p.name])) for p in cfg.tasks[:k])
        per_expert.append((task.name, own, rehearsal + min(s.general_negatives, len(run.data.general))))
    derived = {"tasks": len(cfg.tasks), "total_steps": len(cfg.tasks) * t.steps_per_task,
               "examples_per_step": t.batch_size,
               "base_parameters": sum(p.numel() for p in run.model.parameters()),
               **{f"examples_{n}": f"{a} accept + {b} reject" for n, a, b in per_expert}}
    run.writer.hparams(cfg, derived, metric="eval/accuracy/mean")
    print(f"[drl] run directory: {run.out.resolve()}")
    print(f"[drl] SEE: {len(cfg.tasks)} tasks ({', '.join(x.name for x in cfg.tasks)}), one LoRA expert each (rank "
          f"{cfg.model.lora_rank}) on {cfg.model.pretrained} ({derived['base_parameters']:,} frozen parameters) | "
          f"{t.steps_per_task} steps x {t.batch_size} examples per expert | experts asked {s.order.replace('_', ' ')}, "
          f"none accepts -> the base model")
    for name, a, b in per_expert:
        print(f"[drl]   expert for {name}: {a} own examples ({s.accept_marker!r} + answer), {b} rehearsal/general "
              f"examples ({s.reject_marker!r})")
    print(f"[drl]   eval: {sum(len(v) for v in run.data.eval.values())} task queries, {len(run.data.ood)} OOD queries")


# ================================================================================================
# one stage
# ================================================================================================


def build_examples(run: Run, stage: int) -> list[Example]:
    cfg, s = run.cfg, run.cfg.see
    task = cfg.tasks[stage]
    earlier = [run.data.train[t.name] for t in cfg.tasks[:stage]]
    return expert_examples(run.data.train[task.name], earlier, run.data.general, s.accept_marker, s.reject_marker,
                           s.rehearsal_per_task, s.general_negatives, derive_seed(cfg.seed, stage))


def add_expert(run: Run, stage: int) -> None:
    run.model = ex.add_expert(run.model, ex.expert_name(stage), _lora(run.cfg), derive_seed(run.cfg.seed, stage, 1))
    if stage == 0:
        trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
        print(f"[drl]   {trainable:,} trainable parameters per expert")


def train_expert(run: Run, stage: int, examples: list[Example]) -> list[float]:
    cfg, t = run.cfg, run.cfg.train
    name, task = ex.expert_name(stage), cfg.tasks[stage].name
    log = run.out / "metrics.jsonl"

    def on_step(step: int, info: dict) -> None:
        run.global_step += 1
        run.writer.scalars("loss", {"nll": info["loss"]}, run.global_step)
        run.writer.scalars("reason", {"lr": info["lr"], "grad_norm": info["grad_norm"], "stage": stage},
                           run.global_step)
        if (step + 1) % cfg.logging.log_every == 0 or step + 1 == t.steps_per_task:
            print(f"[drl] task {stage} ({task}) step {step + 1}/{t.steps_per_task} | loss {info['loss']:.4f} | "
                  f"lr {info['lr']:.2e}", flush=True)
            with open(log, "a") as f:
                f.write(json.dumps({"stage": stage, "task": task, "step": step + 1, "global_step": run.global_step,
                                    **info}) + "\n")

    return ex.train_adapter(run.model, name, run.tokenizer, examples, steps=t.steps_per_task, batch_size=t.batch_size,
                            learning_rate=t.learning_rate, warmup_steps=t.lr_warmup_steps,
                            weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
                            seed=derive_seed(cfg.seed, stage, 2), use_chat_template=cfg.see.use_chat_template,
                            reject_share=cfg.see.reject_share,
                            on_step=on_step)


def evaluate_system(run: Run, n_experts: int) -> dict:
    """The system of the first `n_experts` experts on every task's eval items and the OOD queries."""
    cfg = run.cfg
    owner = {t.name: ex.expert_name(i) for i, t in enumerate(cfg.tasks)}
    return ex.evaluate_system(run.model, run.tokenizer, run.experts[:n_experts], cfg.see.order, run.data.eval,
                              run.data.ood, cfg.see.accept_marker, cfg.see.reject_marker, cfg.eval.max_new_tokens,
                              cfg.eval.batch_size, cfg.see.use_chat_template, owner)


def evaluate_stage(run: Run, stage: int, losses: list[float], train_s: float, t_eval: float) -> None:
    run.stages.append({})  # the new expert counts from here on (run.experts)
    res = evaluate_system(run, stage + 1)
    for name in run.matrix:
        run.matrix[name].append(res["accuracy"][name])
    record = {"task": run.cfg.tasks[stage].name, "final_loss": losses[-1], "train_s": train_s,
              "eval_s": time.perf_counter() - t_eval, "accuracy_mean": res["accuracy"]["mean"],
              "routing_mean": res["routing"]["mean"], "routing": res["routing"], "accept": res["accept"],
              "ood_detection": res.get("ood_detection"), "ood_accuracy": res.get("ood_accuracy")}
    run.stages[-1] = record
    w, step = run.writer, run.global_step
    w.scalars("eval", {f"accuracy/{k}": v for k, v in res["accuracy"].items()}, step)
    w.scalars("eval", {f"routing/{k}": v for k, v in res["routing"].items()}, step)
    w.scalars("eval", {f"accept/{k}": v for k, v in res["accept"].items()}, step)
    if "ood_detection" in res:
        w.scalars("eval", {"ood_detection": res["ood_detection"], "ood_accuracy": res["ood_accuracy"]}, step)
    w.scalars("perf", {"train_s": train_s, "eval_s": record["eval_s"]}, step)
    w.text("samples", "\n\n".join(f"[{s['task']} -> {s['routed_to']}] {s['completion']} (gold {s['gold']})"
                                  for s in res["samples"]), step)
    accs = " ".join(f"{k}:{v:.2f}" for k, v in res["accuracy"].items())
    print(f"[drl] after task {stage} ({record['task']}): accuracy {accs} | routing {record['routing_mean']:.2f} | "
          f"OOD detection {record['ood_detection'] if record['ood_detection'] is None else round(record['ood_detection'], 2)}"
          f" | train {train_s:.0f} s, eval {record['eval_s']:.0f} s", flush=True)


def _expert_tensors(run: Run) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    out = {}
    for name in run.experts:
        for key, value in get_peft_model_state_dict(run.model, adapter_name=name).items():
            out[f"{name}::{key}"] = value.detach().cpu().contiguous().clone()
    return out


def save_checkpoint(run: Run, stages_done: int) -> Path:
    state = {"stages_done": stages_done, "global_step": run.global_step, "matrix": run.matrix, "stages": run.stages,
             "config": run.cfg.model_dump(mode="json"),
             "versions": versions("torch", "transformers", "peft", "accelerate")}
    path = checkpoint.save(run.accelerator, run.out / "checkpoints", stages_done, state, dump_config(run.cfg),
                           run.cfg.checkpoint.keep_last, tensors=_expert_tensors(run))
    print(f"[drl] checkpoint {path}")
    return path


def results(matrix: dict[str, list[float]], stages: list[dict]) -> dict:
    """see.json: the accuracy matrix (task x after-stage), average accuracy after the last stage, forgetting and
    the last stage's routing / OOD numbers."""
    names = list(matrix)
    rows = [matrix[n] for n in names]
    last = stages[-1] if stages else {}
    return {"tasks": names, "matrix": {n: {f"after_{i}": v for i, v in enumerate(matrix[n])} for n in names},
            "average_accuracy": sum(r[-1] for r in rows) / len(rows) if rows and rows[0] else None,
            "forgetting": ex.forgetting(rows), "routing_accuracy": last.get("routing_mean"),
            "routing": last.get("routing"), "ood_detection": last.get("ood_detection"), "stages": stages}


def finish(run: Run) -> None:
    """experts/expert_<k>/ (peft format, one folder per adapter: PeftModel.from_pretrained(base, it)) and see.json."""
    experts_dir = run.out / "experts"
    if run.experts:
        run.model.save_pretrained(experts_dir, selected_adapters=run.experts, safe_serialization=True)
        for name in run.experts:  # peft puts every non-`default` adapter in its own sub-folder; make it explicit
            if not (experts_dir / name / "adapter_config.json").is_file():
                raise RuntimeError(f"peft did not write {experts_dir / name}; check the installed peft version")
    summary = {**results(run.matrix, run.stages), "experts": {t.name: ex.expert_name(i) for i, t in
                                                               enumerate(run.cfg.tasks[: len(run.experts)])}}
    (run.out / RESULTS).write_text(json.dumps(summary, indent=1) + "\n")
    print(f"[drl] done: average accuracy {summary['average_accuracy']:.3f}, forgetting {summary['forgetting']:.3f}, "
          f"routing {summary['routing_accuracy']:.2f}; experts in {experts_dir}, results in {run.out / RESULTS}")
