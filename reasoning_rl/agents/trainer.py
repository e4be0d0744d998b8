"""The GLIDER loop: offline data -> behaviour cloning of both levels -> offline RL -> optional online fine-tuning.

`train()` is the outline; each phase is a function below it, in loop order:

    setup             the environment, the offline episodes (data/offline.jsonl), the backbone (built-in: built and
                      domain-pretrained on random-policy transcripts, saved to backbone/), LoRA, the critic heads and
                      their Polyak target, the two optimizers (adapters, critic), the batch samplers
    restore           resume from a checkpoint: weights, optimizers, RNG, samplers, target critic, online episodes
    per step (one global counter over the phases; each kind counts one step):
      bc_step             NLL of the high level's sub-tasks and the low level's relabelled actions (flat: actions)
      offline_rl_step     critic: TD on a batch of transitions, Polyak update of the target; actor (after
                          `critic_warmup`): advantage-weighted NLL of the high level (awac | q_weighted) + BC of the
                          low level (flat: weighted NLL of the actions)
      online_round        play `episodes_per_round` episodes in the (possibly changed) environment with exploration,
                          add them to the data, `updates_per_round` offline-RL (or, weighting none, BC) updates
      evaluate / log_step / save_checkpoint
    finish            final evaluation on the seen and unseen tasks, the adapters (peft) + critic heads in final/
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from diffusion_rl.core import run as run_helpers
from diffusion_rl.core.run import MetricAccumulator, OptimizerStepGuard, ProcessInfo, derive_seed, versions
from diffusion_rl.core.tb import Writer
from reasoning_rl.agents import data as agent_data
from reasoning_rl.agents import glider
from reasoning_rl.agents.agent import outcome, run_episodes
from reasoning_rl.agents.config import GliderConfig, dump_config
from reasoning_rl.agents.env import make_env

BUILTIN_WORD_LM = "builtin:rooms-word-lm"
RESUME_FREE = ("output_dir", "logging", "checkpoint", "eval", "online")


@dataclass
class TrainResult:
    output_dir: Path
    history: list[dict] = field(default_factory=list)
    eval_offline: dict | None = None  # after offline training (before online rounds), when there are any
    eval_final: dict | None = None


class _Stateful:
    """A list of online episodes or critic counters, as a checkpoint component."""

    def __init__(self, **values):
        self.values = values

    def state_dict(self) -> dict:
        return dict(self.values)

    def load_state_dict(self, state: dict) -> None:
        self.values.update(state)


class _TargetCritic:
    def __init__(self, module: torch.nn.Module):
        self.module = module

    def state_dict(self) -> dict:
        return {"tensors": [p.detach().clone() for p in self.module.parameters()]}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for p, v in zip(self.module.parameters(), state["tensors"], strict=True):
                p.copy_(v)


@dataclass
class Run(ProcessInfo):
    cfg: GliderConfig
    out: Path
    accelerator: Accelerator
    env: object
    model: torch.nn.Module
    tokenizer: object
    heads: glider.CriticHeads
    target: glider.CriticHeads
    actor_opt: torch.optim.Optimizer
    critic_opt: torch.optim.Optimizer
    actor_sched: object
    critic_sched: object
    actor_guard: OptimizerStepGuard
    critic_guard: OptimizerStepGuard
    writer: Writer
    offline: list[dict]
    online: _Stateful
    samplers: dict[str, agent_data.Sampler]
    start_step: int = 0


def train(cfg: GliderConfig, resume: str | None = None) -> TrainResult:
    """Run `cfg` (a `GliderConfig`); `resume` = `auto` or a checkpoint directory."""
    run = setup(cfg)
    result = TrainResult(output_dir=run.out)
    with run.writer:
        restore(run, resume)
        print_startup(run)
        total = cfg.total_steps()
        offline_end = cfg.bc.steps + cfg.offline_rl.steps
        for step in range(run.start_step, total):
            t0 = time.perf_counter()
            if step < cfg.bc.steps:
                record = bc_step(run, step)
            elif step < offline_end:
                record = offline_rl_step(run, step, step - cfg.bc.steps)
            else:
                if step == offline_end and cfg.online.rounds:
                    result.eval_offline = evaluate_now(run)
                    record_eval(run, "eval_offline", result.eval_offline, step)
                record = online_round(run, step)
            record["perf/step_s"] = time.perf_counter() - t0
            if cfg.eval.every and (step + 1) % cfg.eval.every == 0 and step + 1 < total:
                record.update(_eval_scalars(evaluate_now(run)))
            log_step(run, step, record)
            result.history.append(record)
            if (cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0) or step + 1 == total:
                save_checkpoint(run, step + 1)
        result.eval_final = finish(run, result)
    return result


# ================================================================================================
# set-up and resume
# ================================================================================================


def _env(cfg: GliderConfig, name: str | None = None):
    e = cfg.env
    return make_env(name or e.name, e.max_steps, e.split_seed, e.scienceworld_tasks, e.scienceworld_simplifications)


def offline_episodes(cfg: GliderConfig, env) -> list[dict]:
    """The offline data: rooms -> scripted expert / medium episodes on the seen tasks; scienceworld -> the gold
    action sequences, segmented into sub-tasks by the adapter."""
    d = cfg.data
    if cfg.env.name == "scienceworld":
        return env.gold_episodes(d.episodes, cfg.seed, d.subtask_steps)
    from reasoning_rl.agents.rooms import collect

    return collect(env, env.tasks("seen"), d.episodes, cfg.seed, d.expert_fraction, d.epsilon, d.recover,
                   d.subtask_steps)


def build_backbone(cfg: GliderConfig, env, out: Path):
    """(model, tokenizer): the built-in word LM (domain-pretrained here, or reloaded from `out/backbone`) or a
    `load_policy` model."""
    m = cfg.model
    if m.pretrained != BUILTIN_WORD_LM:
        from reasoning_rl.models import load_policy

        return load_policy(m.pretrained, seed=cfg.seed)
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    saved = out / "backbone"
    if (saved / "config.json").is_file():
        model = LlamaForCausalLM.from_pretrained(saved)
        return model, PreTrainedTokenizerFast.from_pretrained(saved)
    from reasoning_rl.agents.lm import build_word_lm, words_of

    words = words_of(env.vocabulary() + [glider.HIGH_PROMPT, glider.LOW_PROMPT, glider.FLAT_PROMPT])
    model, tokenizer = build_word_lm(words, cfg.seed, m.hidden_size, m.layers)
    if m.pretrain_steps:
        tasks = env.tasks("seen") + env.tasks("unseen")
        rows = agent_data.random_policy_rows(env, tasks, max(40, m.pretrain_steps), derive_seed(cfg.seed, 17))
        pretrain_backbone(model, tokenizer, rows, m.pretrain_steps, m.pretrain_learning_rate, cfg.seed, m.max_length)
    model.save_pretrained(saved, safe_serialization=True)
    tokenizer.save_pretrained(saved)
    return model, tokenizer


def pretrain_backbone(model, tokenizer, rows: list[dict], steps: int, lr: float, seed: int, max_length: int) -> float:
    """Causal-LM loss on every token of the rows (all weights); returns the last loss."""
    sampler = agent_data.Sampler(rows, derive_seed(seed, 18))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        b = sampler.batch(32)
        enc = glider.encode(tokenizer, b["prompt"], b["action"], max_length)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        loss = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.item()


def _constant(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def _samplers(cfg: GliderConfig, episodes: list[dict], old: dict | None = None) -> dict[str, agent_data.Sampler]:
    if cfg.agent.hierarchical:
        rows = {"high": agent_data.high_transitions(episodes), "low": agent_data.low_samples(episodes)}
    else:
        flat = agent_data.flat_transitions(episodes)
        rows = {"flat": flat, "flat_actor": [r for r in flat if not r["invalid"]]}
    out = {}
    for i, (name, r) in enumerate(rows.items()):
        out[name] = agent_data.Sampler(r, derive_seed(cfg.seed, 31, i))
        if old is not None:
            out[name].draws = old[name].draws
    return out


def setup(cfg: GliderConfig) -> Run:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    env = _env(cfg)
    data_file = out / "data" / "offline.jsonl"
    if data_file.is_file():
        offline = agent_data.load_episodes(data_file)
    else:
        offline = offline_episodes(cfg, env)
        agent_data.save_episodes(data_file, offline)
    model, tokenizer = build_backbone(cfg, env, out)
    from reasoning_rl.models import prepare_trainable

    m = cfg.model
    torch.manual_seed(derive_seed(cfg.seed, 19))
    model, params = prepare_trainable(model, m.use_lora, m.lora_rank, m.lora_alpha, m.lora_target_modules)
    heads = glider.CriticHeads(model.config.hidden_size, m.critic_width)
    target = copy.deepcopy(heads).requires_grad_(False)
    actor_opt = torch.optim.AdamW(params, lr=cfg.bc.learning_rate)
    critic_opt = torch.optim.AdamW(heads.parameters(), lr=cfg.offline_rl.critic_learning_rate)
    actor_sched, critic_sched = _constant(actor_opt), _constant(critic_opt)
    model, heads, actor_opt, critic_opt = accelerator.prepare(model, heads, actor_opt, critic_opt)
    target.to(accelerator.device)
    hint = "lower bc.learning_rate / offline_rl.actor_learning_rate"
    actor_guard = OptimizerStepGuard(accelerator, params, actor_opt, actor_sched, cfg.max_grad_norm, 5, hint)
    critic_guard = OptimizerStepGuard(accelerator, list(heads.parameters()), critic_opt, critic_sched,
                                      cfg.max_grad_norm, 5, "lower offline_rl.critic_learning_rate")
    (out / "config.yaml").write_text(dump_config(cfg))
    return Run(cfg, out, accelerator, env, model, tokenizer, heads, target, actor_opt, critic_opt, actor_sched,
               critic_sched, actor_guard, critic_guard, Writer(out / "tb"), offline,
               _Stateful(episodes=[], critic_steps=0), _samplers(cfg, offline))


def _components(run: Run) -> dict:
    return {"target_critic": _TargetCritic(run.target), "online": run.online,
            **{f"sampler_{k}": s for k, s in run.samplers.items()}}


def restore(run: Run, resume: str | None) -> None:
    if resume is None:
        return
    from diffusion_rl.core import checkpoint

    path = checkpoint.find_checkpoint(resume, run.out)
    saved, _ = checkpoint.load_trainer_state(path)
    if saved["components"]["online"]["episodes"]:  # the samplers must hold the online episodes before loading
        run.samplers = _samplers(run.cfg, run.offline + saved["components"]["online"]["episodes"])
    state = run_helpers.restore_checkpoint(run.accelerator, path, run.cfg.model_dump(mode="json"), _components(run),
                                           run.actor_guard, run.actor_sched, free=RESUME_FREE)
    run.critic_guard.global_step = run.online.values["critic_steps"]
    run.start_step = state.epochs_done
    print(f"[drl glider] resumed from {path} at step {run.start_step}")


def print_startup(run: Run) -> None:
    cfg = run.cfg
    trainable = sum(p.numel() for p in run.actor_guard.params)
    total = sum(p.numel() for p in run.model.parameters())
    summary = agent_data.summary(run.offline)
    derived = {
        "offline_episodes": summary["episodes"], "offline_success": round(summary["success"], 3),
        "rows": {k: len(s.rows) for k, s in run.samplers.items()}, "trainable_params": trainable,
        "total_params": total, "critic_params": sum(p.numel() for p in run.heads.parameters()),
        "total_steps": cfg.total_steps(), "tokenizer_size": len(run.tokenizer),
    }
    print(f"[drl glider] {'hierarchical' if cfg.agent.hierarchical else 'flat'} agent on {cfg.env.name}; "
          f"weighting={cfg.offline_rl.weighting}; " + ", ".join(f"{k}={v}" for k, v in derived.items()))
    run.writer.hparams(cfg, {k: v for k, v in derived.items() if not isinstance(v, dict)}, metric="eval/unseen_success")


# ================================================================================================
# the phases
# ================================================================================================


def _set_lr(opt, sched, lr: float) -> None:
    sched.base_lrs = [lr for _ in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = lr


def _actor_rows(run: Run) -> tuple[str, str | None]:
    return ("high", "low") if run.cfg.agent.hierarchical else ("flat_actor", None)


def bc_update(run: Run, batch_size: int) -> dict[str, float]:
    """One NLL step: hierarchical = half high-level sub-tasks + half low-level relabelled actions."""
    run.model.train()
    cfg, tok = run.cfg, run.tokenizer
    first, second = _actor_rows(run)
    if second is None:
        b = run.samplers[first].batch(batch_size)
        prompts, actions = b["prompt"], b["action"]
    else:
        hi, lo = run.samplers[first].batch(batch_size // 2), run.samplers[second].batch(batch_size - batch_size // 2)
        prompts, actions = hi["prompt"] + lo["prompt"], hi["action"] + lo["action"]
    loss, info = glider.actor_loss(run.model, run.target, run.heads, tok, prompts, actions, None, 1.0, 1.0,
                                   cfg.model.max_length)
    run.accelerator.backward(loss)
    grad = run.actor_guard.step(loss, "(bc)")
    return {"loss/bc": loss.item(), **info, "perf/actor_grad_norm": grad or float("nan")}


def bc_step(run: Run, step: int) -> dict[str, float]:
    _set_lr(run.actor_opt, run.actor_sched, run.cfg.bc.learning_rate)
    return bc_update(run, run.cfg.bc.batch_size)


def rl_update(run: Run, rl_step: int) -> dict[str, float]:
    """Critic TD step + Polyak, then (after the warm-up) the weighted actor step (+ low-level BC)."""
    cfg, o, tok = run.cfg, run.cfg.offline_rl, run.tokenizer
    if o.weighting == "none":
        return bc_update(run, o.batch_size)
    critic_rows = "high" if cfg.agent.hierarchical else "flat"
    batch = run.samplers[critic_rows].batch(o.batch_size)
    run.model.train()
    loss_c, info = glider.critic_losses(run.model, run.heads, run.target, tok, batch, o.gamma, cfg.model.max_length,
                                        o.critic_trains_backbone)
    run.accelerator.backward(loss_c)
    run.critic_guard.step(loss_c, "(critic)")
    if o.critic_trains_backbone:  # the TD loss's gradient on the shared adapters
        run.actor_guard.step(loss_c, "(critic, backbone)")
    glider.polyak_update(run.target, run.heads, o.tau)
    run.online.values["critic_steps"] += 1
    if rl_step < o.critic_warmup:
        return info
    first, second = _actor_rows(run)
    b = run.samplers[first].batch(o.batch_size)
    loss_a, info_a = glider.actor_loss(run.model, run.target, run.heads, tok, b["prompt"], b["action"], o.weighting,
                                       o.awac_lambda, o.max_weight, cfg.model.max_length)
    loss = loss_a
    if second is not None:  # the low level: BC on sub-task-relabelled steps
        lo = run.samplers[second].batch(o.batch_size)
        loss_low, _ = glider.actor_loss(run.model, run.target, run.heads, tok, lo["prompt"], lo["action"], None, 1.0,
                                        1.0, cfg.model.max_length)
        loss = loss + loss_low
        info_a["loss/low_bc"] = loss_low.item()
    run.accelerator.backward(loss)
    grad = run.actor_guard.step(loss, "(actor)")
    return {**info, **info_a, "loss/actor": loss_a.item(), "perf/actor_grad_norm": grad or float("nan")}


def offline_rl_step(run: Run, step: int, rl_step: int) -> dict[str, float]:
    _set_lr(run.actor_opt, run.actor_sched, run.cfg.offline_rl.actor_learning_rate)
    return rl_update(run, rl_step)


def online_round(run: Run, step: int) -> dict[str, float]:
    """Play with exploration in the online environment, add the episodes to the data, train on everything."""
    cfg, on = run.cfg, run.cfg.online
    k = step - cfg.bc.steps - cfg.offline_rl.steps
    env_name = on.env or cfg.env.name
    tasks = _env(cfg, env_name).tasks("seen")
    jobs = [(tasks[(k * on.episodes_per_round + i) % len(tasks)], derive_seed(cfg.seed, 41, k, i))
            for i in range(on.episodes_per_round)]
    records = run_episodes(run.accelerator.unwrap_model(run.model), run.tokenizer, lambda: _env(cfg, env_name), jobs,
                           cfg.agent.hierarchical, cfg.data.subtask_steps, on.temperature, on.epsilon,
                           derive_seed(cfg.seed, 43, k), cfg.model.max_new_tokens)
    run.online.values["episodes"] = run.online.values["episodes"] + records
    run.samplers = _samplers(cfg, run.offline + run.online.values["episodes"], run.samplers)
    _set_lr(run.actor_opt, run.actor_sched, cfg.offline_rl.actor_learning_rate)
    metrics = MetricAccumulator()
    for u in range(on.updates_per_round):
        metrics.add(rl_update(run, cfg.offline_rl.critic_warmup + u))  # the critic is warm by now
    played = outcome(records)
    return {**metrics.result(), "reason/online_success": played["success"],
            "reason/online_invalid_rate": played["invalid_rate"],
            "reason/online_episodes": float(len(run.online.values["episodes"]))}


# ================================================================================================
# evaluation, logging, checkpoints
# ================================================================================================


def evaluate_now(run: Run, env_name: str | None = None) -> dict:
    from reasoning_rl.agents.evaluation import evaluate_agent

    env_name = env_name or run.cfg.online.env or run.cfg.env.name
    return evaluate_agent(run.accelerator.unwrap_model(run.model), run.tokenizer, run.cfg, env_name,
                          run.cfg.eval.episodes, run.cfg.eval.seed)


def _eval_scalars(results: dict, prefix: str = "eval") -> dict[str, float]:
    return {f"{prefix}/{split}_{k}": v for split in ("seen", "unseen") for k, v in results[split].items()
            if k != "episodes"}


def record_eval(run: Run, name: str, results: dict, step: int) -> None:
    run.writer.epoch(_eval_scalars(results, f"eval/{name.removeprefix('eval_')}"), step)
    (run.out / f"{name}.json").write_text(json.dumps(results, indent=1))


def log_step(run: Run, step: int, record: dict) -> None:
    record = {"step": step, **record}
    run.writer.epoch(record, step)
    with open(run.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if step % run.cfg.logging.log_every == 0 or step + 1 == run.cfg.total_steps():
        shown = {k: round(v, 4) for k, v in record.items() if k.startswith(("loss/", "reason/online_success", "eval/"))}
        print(f"[drl glider] step {step + 1}/{run.cfg.total_steps()} {shown}", flush=True)


def save_checkpoint(run: Run, steps_done: int) -> None:
    run_helpers.save_checkpoint(run.accelerator, run.out / "checkpoints", steps_done, run.cfg, _components(run),
                                run.actor_guard, run.cfg.checkpoint.keep_last, versions())


def finish(run: Run, result: TrainResult) -> dict:
    from safetensors.torch import save_file

    from reasoning_rl.models import save_trained

    final = run.out / "final"
    model = run.accelerator.unwrap_model(run.model)
    save_trained(model, run.tokenizer, run.cfg.model.use_lora, final)
    heads = run.accelerator.unwrap_model(run.heads)
    save_file({k: v.contiguous() for k, v in heads.state_dict().items()}, str(final / "critic.safetensors"))
    results = evaluate_now(run)
    record_eval(run, "eval_final", results, run.cfg.total_steps())
    print(f"[drl glider] final: seen success {results['seen']['success']:.3f}, unseen success "
          f"{results['unseen']['success']:.3f} on {results['env']}; saved to {final}")
    return results
