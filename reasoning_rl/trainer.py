"""The reasoning trainer: GRPO for causal language models, on the same core as the diffusion trainer.

`train()` is the outline; each phase is a function below it, in loop order (the diffusion trainer's names,
with "epoch" -> "step" and trajectories -> completions):

    setup             accelerator, model + tokenizer/processor + LoRA, optimizer, lr schedule, reward, problems,
                      sampler
    restore           resume from a checkpoint: weights, optimizer, RNG, prompt sampler, counters
    evaluate_before   greedy and sampled accuracy on the held-out problems
    per step:
      generate_step       every process takes `prompts_per_step` problems and samples G completions of each
                          (left-padded prompts, completions up to eos / a stop string / max_new_tokens; with
                          rollout.tools up to K action turns, tool observations appended token-in / token-out
                          and masked out of the loss, reasoning_rl.tools.rollout); the reward scores them
      compute_advantages  per-group standardisation over each problem's G completions (GRPO; Dr.GRPO without
                          the std), NaN rewards -> advantage 0
      add_step_credit     (credit.kind != sparse) a verifier's +-weight on the tokens of each checked step
                          (arithmetic_facts: each equation's result), making the advantages [B, C]
      train_step          `num_iterations` passes over the completions in micro-batches: recompute
                          log pi_theta per token (temperature applied, fp32), token or sequence (GSPO) ratio,
                          clipped surrogate (clip-higher, dual clip) + beta * KL to the adapter-disabled model
                          - entropy bonus, aggregated grpo / bnpo / dapo / dr_grpo; one guarded optimizer step
                          per pass
      log_step            reward/, loss/, reason/ scalars, sample completions as text, metrics.jsonl
      evaluate / save_checkpoint
    finish            final evaluation, the trained LoRA (or model) saved with its tokenizer

Launch with `drl reason train` (one process) or `accelerate launch -m diffusion_rl.cli reason train ...`.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

import rewards
from diffusion_rl.core import checkpoint, grpo
from diffusion_rl.core import run as run_helpers
from diffusion_rl.core.methods import (
    DynamicSampler,
    luffy_loss,
    make_entropy_schedule,
    pad_select,
    replace_with_off_policy,
)
from diffusion_rl.core.prompts import PromptSampler, PromptSet
from diffusion_rl.core.run import (
    MetricAccumulator,
    OptimizerStepGuard,
    ProcessInfo,
    ResumeError,
    TrainerCallback,
    derive_seed,
    restore_checkpoint,
    versions,
)
from diffusion_rl.core.tb import Writer
from reasoning_rl.config import ReasonConfig, dump_config
from reasoning_rl.credit import step_credit
from reasoning_rl.data import format_prompt, held_out_problems, load_problems
from reasoning_rl.evaluation import evaluate
from reasoning_rl.gguf_checkpoint import as_plain_checkpoint
from reasoning_rl.models import load_policy, prepare_trainable, save_trained, set_image_pixels
from reasoning_rl.rollout import Rollouts, encode_prompts, generate, token_log_probs
from reasoning_rl.tools import get_state, get_tools
from reasoning_rl.tools.rollout import evaluate_with_tools, expert_rollouts, generate_with_tools, tool_metrics

# Config sections a resumed run may change freely; any other difference is reported (model changes are errors).
RESUME_FREE = ("num_steps", "output_dir", "logging", "checkpoint", "eval")


@dataclass
class TrainResult:
    output_dir: Path
    history: list[dict] = field(default_factory=list)  # one metrics dict per step run in this call
    weights_dir: Path | None = None
    eval_before: dict | None = None
    eval_after: dict | None = None
    model: object | None = None  # the trained model (peft-wrapped under LoRA), ready to generate
    processor: object | None = None  # the tokenizer, or the vision-language model's processor
    process_index: int = 0


@dataclass
class Run(ProcessInfo):
    """Everything `setup` builds once per `train()` call; the phases read and update it."""

    cfg: ReasonConfig
    out: Path
    accelerator: Accelerator
    model: torch.nn.Module  # the accelerate-prepared model (DDP syncs its trainable gradients)
    raw_model: torch.nn.Module  # the same model unwrapped (generation, the reference, saving)
    processor: object  # the tokenizer, or a vision-language model's processor (it holds the tokenizer)
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    guard: OptimizerStepGuard
    reward_fn: rewards.RewardFn
    stages: list  # the curriculum (reasoning_rl.config.StageConfig, problems and lr filled in)
    stage_problems: list[PromptSet]  # per stage
    stage_samplers: list[PromptSampler]  # per stage
    entropy_schedule: object  # diffusion_rl.core.methods entropy-coefficient schedule (checkpointed)
    writer: Writer
    callbacks: Sequence[TrainerCallback]
    start_step: int = 0
    vllm: object | None = None  # rollout.backend=vllm: the engine (reasoning_rl.vllm_rollout.VLLMRollout)
    tools: dict | None = None  # rollout.tools: the callable tools by name (None = single-turn rollouts)
    tool_state: Callable | None = None  # rollout.tool_state: metadata row -> the rollout's tool state
    held_out: PromptSet | None = None  # eval.problems / eval.prompts, loaded at the first evaluation
    eval_reward_fn: rewards.RewardFn | None = None  # eval.reward (None: the training reward)

    def stateful(self) -> dict:
        return {"curriculum": _Curriculum(self.stages, self.stage_samplers), "entropy_schedule": self.entropy_schedule}

    def stage_at(self, step: int) -> int:
        """Index of the stage that global step `step` belongs to."""
        end = 0
        for i, stage in enumerate(self.stages):
            end += stage.num_steps
            if step < end:
                return i
        return len(self.stages) - 1


def train(
    cfg: ReasonConfig,
    reward_fn: Callable | None = None,
    advantage_fn: Callable | None = None,
    resume: str | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """Run `cfg`. `reward_fn(completions, prompts, metadata) -> (scores, info)` overrides the configured reward;
    `advantage_fn(rewards [B], group_ids [B]) -> advantages [B]` replaces the group standardisation (the Python
    API for reward- and advantage-shaping experiments)."""
    run = setup(cfg, reward_fn, callbacks)
    result = TrainResult(output_dir=run.out, process_index=run.rank)
    with run.writer:
        restore(run, resume)
        print_startup(run)
        result.eval_before = evaluate_before(run)
        total = cfg.total_steps()
        for step in range(run.start_step, total):
            for cb in run.callbacks:
                cb.on_epoch_start(step)
            t_step = time.perf_counter()
            stage = enter_stage(run, step)
            if stage.kind == "sft":  # supervised on the reference solutions: no generation, no reward
                rollouts, scores = solution_batch(run, step), None
                t_generated = time.perf_counter()
                advantages, losses = None, sft_step(run, rollouts, step)
            else:
                rollouts, scores, sampling_info = generate_step(run, step)
                t_generated = time.perf_counter()
                advantages = compute_advantages(run, rollouts, scores, advantage_fn)
                trained, trained_advantages, pad_info = select_for_training(run, rollouts, advantages, step)
                trained_advantages, credit_info = add_step_credit(run, trained, trained_advantages)
                losses = {**train_step(run, trained, trained_advantages, step), **sampling_info, **pad_info,
                          **credit_info}
            timings = {"generate_s": t_generated - t_step, "train_s": time.perf_counter() - t_generated,
                       "step_s": time.perf_counter() - t_step}
            record = step_record(run, step, rollouts, scores, advantages, losses, timings)
            if cfg.has_eval() and cfg.eval.every and (step + 1) % cfg.eval.every == 0 and step + 1 < total:
                record.update({f"eval/{k}": v for k, v in evaluate_model(run).items()})
            log_step(run, step, record, rollouts, scores)
            result.history.append(record)
            for cb in run.callbacks:
                cb.on_epoch_end(step, record)
            if (cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0) or step + 1 == total:
                save_checkpoint(run, step + 1)
        finish(run, result)
    return result


# ================================================================================================
# set-up and resume
# ================================================================================================


def setup(cfg: ReasonConfig, reward_fn: Callable | None, callbacks: Sequence[TrainerCallback] = ()) -> Run:
    AcceleratorState._reset_state(reset_partial_state=False)
    # micro-batches are accumulated by train_step itself (their number varies with PAD and dynamic sampling)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.train.mixed_precision)
    set_seed(cfg.seed, device_specific=True)
    m, t = cfg.model, cfg.train
    raw_model, processor = load_policy(m.pretrained, m.revision, m.dtype, m.local_files_only, m.trust_remote_code,
                                       m.gguf_file, m.seed)
    if m.gguf_file:  # dequantised weights: an ordinary model (full fine-tuning saves it)
        raw_model = as_plain_checkpoint(raw_model)
    set_image_pixels(processor, cfg.prompts.min_pixels, cfg.prompts.max_pixels)
    raw_model, params = prepare_trainable(raw_model, m.use_lora, m.lora_rank, m.lora_alpha, m.lora_target_modules,
                                          m.gradient_checkpointing, m.freeze_vision_tower)
    raw_model.to(accelerator.device)
    # fused: one kernel for all parameters (on a CPU 9 ms instead of 70 ms per step at 4.9 M parameters)
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                  weight_decay=t.adam_weight_decay, eps=t.adam_epsilon,
                                  fused=all(p.device.type in ("cpu", "cuda") for p in params))
    model, optimizer = accelerator.prepare(raw_model, optimizer)
    lr_scheduler = get_scheduler(
        "constant_with_warmup" if t.lr_schedule == "constant" else t.lr_schedule, optimizer,
        num_warmup_steps=t.lr_warmup_steps, num_training_steps=cfg.total_steps() * t.num_iterations,
    )
    guard = OptimizerStepGuard(accelerator, params, optimizer, lr_scheduler, t.max_grad_norm,
                               t.max_consecutive_nonfinite)
    reward_fn = cfg.reward.build() if reward_fn is None else rewards.as_reward(reward_fn)
    stages = cfg.curriculum()
    stage_problems = [load_problems(st.prompts) for st in stages]
    out = Path(cfg.output_dir)
    vllm = _vllm_engine(cfg, accelerator.unwrap_model(model), processor, accelerator) if cfg.rollout.backend == "vllm" else None
    return Run(
        cfg=cfg, out=out, accelerator=accelerator, model=model, raw_model=accelerator.unwrap_model(model),
        processor=processor, params=params, optimizer=optimizer, lr_scheduler=lr_scheduler, guard=guard,
        reward_fn=reward_fn, stages=stages, stage_problems=stage_problems,
        stage_samplers=[PromptSampler(p, cfg.seed + i, accelerator.num_processes, accelerator.process_index)
                        for i, p in enumerate(stage_problems)],
        entropy_schedule=_entropy_schedule(cfg), writer=Writer(out / "tensorboard", enabled=accelerator.is_main_process),
        callbacks=list(callbacks), vllm=vllm,
        tools=None if cfg.rollout.tools is None else get_tools(cfg.rollout.tools),
        tool_state=None if cfg.rollout.tools is None else get_state(cfg.rollout.tool_state),
    )


def _vllm_engine(cfg: ReasonConfig, model, processor, accelerator):
    """The in-process vLLM engine of rollout.backend=vllm (a clear error without vllm or CUDA)."""
    from reasoning_rl.vllm_rollout import VLLMRollout

    m, r = cfg.model, cfg.rollout
    return VLLMRollout(
        model, processor, m.pretrained, gguf_file=m.gguf_file, revision=m.revision,
        trust_remote_code=m.trust_remote_code, gpu_memory_utilization=r.vllm_gpu_memory_utilization,
        max_model_len=r.vllm_max_model_len, dtype=r.vllm_dtype, seed=r.vllm_seed,
        max_num_seqs=r.prompts_per_step * r.num_generations, logprobs=r.vllm_importance_sampling != "none",
        process_index=accelerator.process_index, local_process_index=accelerator.local_process_index,
        num_processes=accelerator.num_processes,
    )


def restore(run: Run, resume: str | None) -> None:
    if not resume:
        return
    ckpt = checkpoint.find_checkpoint(resume, run.out)
    state = restore_checkpoint(run.accelerator, ckpt, run.cfg.model_dump(mode="json"), run.stateful(), run.guard,
                               run.lr_scheduler, RESUME_FREE)
    run.start_step = state.epochs_done
    if run.main:
        print(f"[drl] resumed from {ckpt} at step {state.epochs_done}, global step {state.global_step}")


def print_startup(run: Run) -> None:
    cfg, geo = run.cfg, run.cfg.geometry(run.world)
    run.writer.hparams(cfg, geo)
    if not run.main:
        return
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / "config.yaml").write_text(dump_config(cfg))
    trainable = sum(p.numel() for p in run.params)
    total = sum(p.numel() for p in run.raw_model.parameters())
    print(f"[drl] run directory: {run.out.resolve()}")
    print(
        f"[drl] {run.world} process(es) | prompts/step {geo['prompts_per_step']} | completions/step "
        f"{geo['completions_per_step']} ({cfg.rollout.num_generations} per prompt) | updates/step "
        f"{geo['updates_per_step']} | micro-batches/update {geo['micro_batches_per_update']} | tokens/step "
        f"<= {geo['max_tokens_per_step']}"
    )
    adapter = f"LoRA r={cfg.model.lora_rank}" if cfg.model.use_lora else "full fine-tune"
    print(f"[drl] model {cfg.model.pretrained} | {adapter} | {trainable:,} of {total:,} params trainable | "
          f"reward {run.reward_fn.name} | {sum(len(p.prompts) for p in run.stage_problems)} problems")
    if run.tools is not None:
        print(f"[drl] tool rollouts: tools {sorted(run.tools)} + terminate | <= {cfg.rollout.max_tool_rounds} turns of "
              f"<= {cfg.rollout.max_new_tokens} tokens | state {cfg.rollout.tool_state}")
    if len(run.stages) > 1:
        print("[drl] curriculum: " + " -> ".join(f"{st.name} ({st.kind}, {st.num_steps} steps, lr {st.learning_rate:g})"
                                                 for st in run.stages))


def evaluate_before(run: Run) -> dict | None:
    if not run.cfg.has_eval() or run.start_step > 0:
        return None
    result = evaluate_model(run)
    run.writer.scalars("eval", result, 0)
    if run.main:
        print("[drl] eval before training: " + " | ".join(f"{k} {v:.4f}" for k, v in result.items()))
    return result


# ================================================================================================
# 1. generation and reward
# ================================================================================================


def generate_step(run: Run, step: int) -> tuple[Rollouts, torch.Tensor, dict]:
    """This process's completions for `step` and their rewards [B] (NaN = unscorable): one round, or with dynamic
    sampling rounds of new problems until `prompts_per_step` problems with reward spread are kept."""
    r = run.cfg.rollout
    rounds = r.max_generation_rounds if r.dynamic_sampling else 1
    batches = run.stage_samplers[run.stage_at(step)].epoch_indices(step, rounds, r.prompts_per_step)
    if run.vllm is not None:  # the engine samples from the weights the last step left (LoRA merged)
        run.vllm.sync_weights(run.raw_model)
    if not r.dynamic_sampling:
        rollouts, scores = _generate_round(run, step, 0, batches[0])
        return rollouts, scores, {**_importance_info(rollouts), "generated_tokens": _sampled_tokens(rollouts)}
    sampler = DynamicSampler(target_groups=r.prompts_per_step, max_rounds=rounds)
    parts, scores = [], []
    for round_index, ids in enumerate(batches):
        rollouts, round_scores = _generate_round(run, step, round_index, ids)
        parts.append(rollouts)
        scores.append(round_scores)
        if sampler.add(None, round_scores, torch.arange(len(rollouts)) // r.num_generations):
            break
    keep = sampler.selected()
    info = {f"dynamic_sampling_{k}": float(v) for k, v in sampler.metrics().items()}
    info["generated_tokens"] = sum(_sampled_tokens(p) for p in parts)  # discarded rounds cost tokens too
    rollouts = Rollouts.cat(parts).select(keep)
    return rollouts, torch.cat(scores)[keep], {**info, **_importance_info(rollouts)}


def _sampled_tokens(rollouts: Rollouts) -> int:
    """Completion tokens the policy generated (LUFFY's dataset traces are not generated)."""
    lengths = rollouts.lengths
    if rollouts.off_policy is not None:
        lengths = lengths[~rollouts.off_policy.bool()]
    return int(lengths.sum())


def _generate_round(run: Run, step: int, round_index: int, ids: list[int]) -> tuple[Rollouts, torch.Tensor]:
    cfg, r = run.cfg, run.cfg.rollout
    problems, metadata, texts, images = _stage_inputs(run, step, ids)
    torch.manual_seed(derive_seed(cfg.seed, step, run.rank, round_index))  # generate samples from the global RNG
    run.model.eval()
    if run.tools is not None:  # multi-turn: policy turns and tool observations, token-in / token-out
        rollouts = generate_with_tools(
            run.raw_model, run.processor, texts, problems, metadata, r.num_generations, r.max_new_tokens,
            r.temperature, r.top_p, r.top_k, r.batch_size, run.tools, r.max_tool_rounds, run.tool_state,
            r.tool_observation_template)
    else:
        sample = generate if run.vllm is None else run.vllm.generate
        rollouts = sample(
            run.raw_model, run.processor, texts, problems, metadata, r.num_generations, r.max_new_tokens,
            r.temperature, r.top_p, r.top_k, r.stop_strings, r.batch_size, images,
        )
    m = cfg.train.off_policy_per_group
    if m:  # LUFFY: m of each group's G completions become the problem's off-policy trace
        slots = replace_with_off_policy(torch.arange(len(rollouts)) // r.num_generations, m)
        rollouts = rollouts.with_traces(slots, [meta["off_policy"] for meta in rollouts.metadata], run.processor)
    if rollouts.sampling_logp is not None and r.vllm_importance_sampling != "none":
        from reasoning_rl.vllm_rollout import importance_weights

        # the trainer's log-probs of the sampled tokens at the weights the engine sampled with, against the engine's
        rollouts.trainer_logp = _log_probs_no_grad(run, rollouts, run.raw_model)
        rollouts.is_weights = importance_weights(
            rollouts.trainer_logp, rollouts.sampling_logp, rollouts.completion_mask, r.vllm_importance_sampling,
            r.vllm_importance_sampling_max, r.vllm_importance_sampling_min)
    scores, _ = run.reward_fn(rollouts.completions, rollouts.prompts, rollouts.metadata)
    scores = scores.float().cpu()
    _check_unscorable(run, scores, step)
    return rollouts, scores


def _importance_info(rollouts: Rollouts) -> dict[str, float]:
    """rollout.backend=vllm: the importance-sampling weights' and the log-prob mismatch's statistics (else empty)."""
    if rollouts.is_weights is None:
        return {}
    from reasoning_rl.vllm_rollout import importance_metrics

    return importance_metrics(rollouts.is_weights, rollouts.trainer_logp, rollouts.sampling_logp,
                              rollouts.completion_mask)


def _stage_inputs(run: Run, step: int, ids: list[int]):
    """The problems `ids` of the current stage: texts, metadata, formatted prompts and images (or None)."""
    i = run.stage_at(step)
    pcfg, pset = run.stages[i].prompts, run.stage_problems[i]
    problems = [pset.prompts[j] for j in ids]
    metadata = [pset.metadata[j] for j in ids]
    images = [m["image"] for m in metadata] if pcfg.image_column else None
    texts = [format_prompt(run.processor, p, pcfg.system_prompt, pcfg.use_chat_template, images is not None)
             for p in problems]
    return problems, metadata, texts, images


def enter_stage(run: Run, step: int):
    """The stage of `step`, with its learning rate in place (the lr schedule's peak becomes the stage's)."""
    stage = run.stages[run.stage_at(step)]
    sched = run.lr_scheduler
    sched.base_lrs = [stage.learning_rate for _ in run.optimizer.param_groups]
    for group, factor in zip(run.optimizer.param_groups, sched.lr_lambdas, strict=True):
        group["lr"] = stage.learning_rate * factor(sched.last_epoch)
    return stage


def solution_batch(run: Run, step: int) -> Rollouts:
    """An SFT batch: `prompts_per_step` problems of the stage with their reference solutions as completions."""
    (ids,) = run.stage_samplers[run.stage_at(step)].epoch_indices(step, 1, run.cfg.rollout.prompts_per_step)
    problems, metadata, texts, images = _stage_inputs(run, step, ids)
    device = run.accelerator.device
    batch = encode_prompts(run.processor, texts, images, device)
    tokenizer = getattr(run.processor, "tokenizer", run.processor)
    batch.prompts, batch.metadata, batch.pad_id = problems, metadata, tokenizer.pad_token_id
    batch.completion_ids = torch.empty(len(ids), 0, dtype=torch.long, device=device)
    batch.completion_mask = torch.empty(len(ids), 0, dtype=torch.long, device=device)
    batch.stopped = torch.zeros(len(ids), dtype=torch.bool, device=device)
    batch.completions = [""] * len(ids)
    if run.tools is not None:  # expert tool-use traces: the policy's turns (a JSON list), the tools run for real
        turns = [json.loads(s) if isinstance(s := m["solution"], str) and s.lstrip().startswith("[") else [str(s)]
                 for m in metadata]
        r = run.cfg.rollout
        return expert_rollouts(run.processor, texts, problems, metadata, turns, run.tools, r.max_tool_rounds,
                               run.tool_state, r.tool_observation_template, device)
    return batch.with_traces(torch.ones(len(ids), dtype=torch.bool), [str(m["solution"]) for m in metadata],
                             run.processor)


def sft_step(run: Run, batch: Rollouts, step: int) -> dict[str, float]:
    """Completion-only NLL of the reference solutions (token mean over the batch), one guarded optimizer step."""
    t, acc = run.cfg.train, run.accelerator
    run.model.train()
    micro_batches = list(torch.arange(len(batch)).split(t.micro_batch_size))
    # tool traces: the observations are context, not targets
    targets = batch.completion_mask if batch.tool_mask is None else batch.completion_mask * batch.tool_mask
    n_tokens = float(acc.reduce(targets.sum().float(), reduction="sum"))
    total = torch.zeros((), device=acc.device)
    for i, idx in enumerate(micro_batches):
        with acc.no_sync(run.model) if i < len(micro_batches) - 1 else contextlib.nullcontext():
            with acc.autocast():
                logp, _ = token_log_probs(run.model, batch.prompt_ids[idx], batch.prompt_mask[idx],
                                          batch.completion_ids[idx], batch.completion_mask[idx], 1.0,
                                          vision=batch.vision(idx), fused=run.cfg.model.fused_logprob)
            loss = -(logp * targets[idx]).sum() / (max(n_tokens, 1.0) / run.world)  # DDP's mean over processes -> the global mean
            acc.backward(loss)
        total = total + loss.detach()
    grad_norm = run.guard.step(total, where=f"(step {step}, sft)")
    return {"sft_nll": float(total) , "grad_norm": grad_norm or 0.0, "updates": int(grad_norm is not None)}


def _check_unscorable(run: Run, scores: torch.Tensor, step: int) -> None:
    cfg, valid = run.cfg, torch.isfinite(scores)
    if cfg.reward.nonfinite == "error" and not bool(valid.all()):
        raise rewards.RewardError(
            f"reward {run.reward_fn.name!r} returned {int((~valid).sum())} non-finite score(s) at step {step}; fix the "
            "reward or set reward.nonfinite=mask to skip such completions"
        )
    if float((~valid).float().mean()) > cfg.reward.max_unscorable_fraction:
        raise rewards.RewardError(
            f"reward {run.reward_fn.name!r}: {int((~valid).sum())}/{len(valid)} completions unscorable at step {step}, "
            f"more than reward.max_unscorable_fraction={cfg.reward.max_unscorable_fraction}"
        )


# ================================================================================================
# 2. advantages
# ================================================================================================


def compute_advantages(run: Run, rollouts: Rollouts, scores: torch.Tensor, advantage_fn: Callable | None) -> torch.Tensor:
    """[B] fp32: each completion's reward (with DAPO's soft overlong penalty when set) standardised within its
    problem's G completions (all on this process)."""
    G, a = run.cfg.rollout.num_generations, run.cfg.advantage
    group_ids = torch.arange(len(rollouts)) // G  # [B]: G consecutive completions per problem
    if a.overlong_buffer:
        scores = scores + grpo.soft_overlong_penalty(rollouts.lengths.cpu(), run.cfg.rollout.max_new_tokens,
                                                      a.overlong_buffer, a.overlong_penalty_factor)
    if advantage_fn is not None:
        adv = torch.as_tensor(advantage_fn(scores, group_ids), dtype=torch.float32)
        if adv.shape != scores.shape:
            raise ValueError(f"advantage_fn returned shape {tuple(adv.shape)}; expected [B] = {tuple(scores.shape)}")
        return torch.where(torch.isfinite(scores), adv, 0.0)
    return grpo.group_advantages(scores, group_ids, eps=a.epsilon, unbiased=a.unbiased_std, scale=a.scale,
                                 baseline=a.baseline)


def select_for_training(run: Run, rollouts: Rollouts, advantages: torch.Tensor, step: int):
    """PAD (when on): the completions to train on, drawn by |advantage| priority within the band; else all."""
    a = run.cfg.advantage
    if not a.pad:
        return rollouts, advantages, {}
    generator = torch.Generator().manual_seed(derive_seed(run.cfg.seed, step, run.rank, 2_000_000))
    index, metrics = pad_select(
        advantages, ratio=a.pad_ratio, t_low=a.pad_t_low, t_high=a.pad_t_high, priority=a.pad_priority,
        alpha=a.pad_alpha, temperature=a.pad_temperature, replacement=a.pad_replacement, generator=generator,
    )
    return rollouts.select(index), advantages[index], {f"pad_{k}": float(v) for k, v in metrics.items()}


def add_step_credit(run: Run, rollouts: Rollouts, advantages: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """credit.kind sparse: the [B] advantages unchanged. Else [B, C] fp32: each token's outcome advantage plus
    credit.weight x the verifier's sign (+1 right, -1 wrong, 0 unchecked) of the step the token writes."""
    c = run.cfg.credit
    if c.kind == "sparse" or not len(rollouts):
        return advantages, {}
    tokenizer = getattr(run.processor, "tokenizer", run.processor)
    credit, info = step_credit(c.kind, tokenizer, rollouts.completions, rollouts.completion_ids.cpu(),
                               rollouts.completion_mask.cpu())  # [B, C]
    if rollouts.off_policy is not None:  # LUFFY's dataset traces are right by construction: outcome credit only
        credit[rollouts.off_policy.bool().cpu()] = 0.0
    return advantages.float()[:, None] + c.weight * credit, info


# ================================================================================================
# 3. training
# ================================================================================================


def train_step(run: Run, rollouts: Rollouts, advantages: torch.Tensor, step: int) -> dict[str, float]:
    """`num_iterations` PPO passes over the step's completions, one guarded optimizer step per pass."""
    cfg, t = run.cfg, run.cfg.train
    device = run.accelerator.device
    loss_mask = rollouts.completion_mask.clone()
    if t.mask_truncated_completions:
        loss_mask = loss_mask * rollouts.stopped[:, None].long()  # cut completions get no loss
    if rollouts.tool_mask is not None:  # tool observations: no policy loss, KL or entropy term
        loss_mask = loss_mask * rollouts.tool_mask
    # log pi_old: the sampling policy. With one pass it equals the current policy (ratio 1, detached), so it is
    # only computed when the batch is reused.
    old_logp = None
    if t.num_iterations > 1 and len(rollouts):  # (rollout.backend=vllm with importance sampling has them already: same weights)
        old_logp = rollouts.trainer_logp if rollouts.trainer_logp is not None else _log_probs_no_grad(run, rollouts, run.raw_model)
    ref_logp = _reference_log_probs(run, rollouts) if t.beta > 0 and len(rollouts) else None
    run.model.train()
    metrics, grad_norms = MetricAccumulator(), []
    B, acc = len(rollouts), run.accelerator
    # dapo: every completion token of the pass, on every process, weighs the same: each micro-batch divides its sum
    # by N_global / world, the micro-batches' gradients add up, and DDP averages over processes.
    n_global = float(acc.reduce(loss_mask.sum().float().to(device), reduction="sum"))
    per_process_count = max(n_global, 1.0) / run.world
    entropy_coef = run.entropy_schedule.value()
    luffy = rollouts.off_policy is not None and bool(rollouts.off_policy.any())
    if rollouts.is_weights is not None:  # vLLM importance sampling: per-token loss x w == the advantage x w (w >= 0)
        advantages = advantages.to(rollouts.is_weights.device)
        advantages = (advantages[:, None] if advantages.dim() == 1 else advantages) * rollouts.is_weights  # [B, C]
    for iteration in range(t.num_iterations):
        order = torch.randperm(B, generator=torch.Generator().manual_seed(derive_seed(cfg.seed, step, run.rank, iteration)))
        micro_batches = [mb for mb in order.split(t.micro_batch_size) if len(mb)]  # B = 0: none
        entropies, total = [], torch.zeros((), device=device)
        for i, idx in enumerate(tqdm(micro_batches, desc=f"step {step} training", disable=not run.main, leave=False)):
            # gradients are all-reduced once per pass, at its last micro-batch (the same count on every process)
            with acc.no_sync(run.model) if i < len(micro_batches) - 1 else contextlib.nullcontext():
                with acc.autocast():
                    logp, entropy = token_log_probs(
                        run.model, rollouts.prompt_ids[idx], rollouts.prompt_mask[idx], rollouts.completion_ids[idx],
                        rollouts.completion_mask[idx], cfg.rollout.temperature,
                        with_entropy=entropy_coef > 0 or t.entropy_schedule == "adaptive", vision=rollouts.vision(idx),
                        fused=cfg.model.fused_logprob,
                    )
                common = dict(
                    ratio_level=t.ratio_level, clip_low=t.clip_range, clip_high=t.clip_range_high,
                    dual_clip=t.dual_clip, aggregation=t.loss_aggregation, num_items_in_batch=per_process_count,
                    max_completion_length=max(cfg.rollout.max_new_tokens, rollouts.completion_ids.shape[1]),
                    entropy=entropy if entropy_coef > 0 else None, entropy_coef=entropy_coef,
                )
                old = old_logp[idx] if old_logp is not None else None  # None: on policy, ratio 1 in value
                if luffy:
                    loss, step_metrics = luffy_loss(logp, old, advantages[idx].to(device), loss_mask[idx].to(device),
                                                    rollouts.off_policy[idx],
                                                    gamma=t.luffy_gamma if t.luffy_policy_shaping else None, **common)
                else:
                    loss, step_metrics = grpo.grpo_loss(
                        logp, old, advantages[idx].to(device), loss_mask[idx].to(device),
                        logp_ref=ref_logp[idx] if ref_logp is not None else None, beta=t.beta,
                        kl_estimator=t.kl_estimator, **common,
                    )
                # dapo's divisor already spans the pass; the other aggregations average the micro-batches
                scaled = loss if t.loss_aggregation == "dapo" else loss / len(micro_batches)
                acc.backward(scaled)
            total = total + scaled.detach()
            metrics.add(step_metrics)
            if entropy is not None:
                entropies.append(((entropy * loss_mask[idx]).sum() / loss_mask[idx].sum().clamp(min=1)).detach())
        if not micro_batches:  # nothing to train on here (e.g. PAD kept no completion): join the all-reduce
            acc.backward(sum(p.sum() for p in run.params) * 0.0)
        grad_norm = run.guard.step(total, where=f"(step {step})")
        if grad_norm is not None:
            grad_norms.append(grad_norm)
    mean_entropy = float(torch.stack(entropies).mean()) if entropies else None
    run.entropy_schedule.step(mean_entropy)
    return {**metrics.result(), "grad_norm": sum(grad_norms) / max(len(grad_norms), 1), "updates": len(grad_norms),
            "entropy_coef": entropy_coef}


@torch.no_grad()
def _log_probs_no_grad(run: Run, rollouts: Rollouts, model) -> torch.Tensor:
    """[B, C] fp32 log-probs of the completions under `model`, in micro-batches, under the training autocast."""
    t = run.cfg.train
    parts = []
    for start in range(0, len(rollouts), t.micro_batch_size):
        rows = slice(start, start + t.micro_batch_size)
        with run.accelerator.autocast():
            logp, _ = token_log_probs(model, rollouts.prompt_ids[rows], rollouts.prompt_mask[rows],
                                      rollouts.completion_ids[rows], rollouts.completion_mask[rows],
                                      run.cfg.rollout.temperature, vision=rollouts.vision(rows),
                                      fused=run.cfg.model.fused_logprob)
        parts.append(logp)
    return torch.cat(parts)


def _reference_log_probs(run: Run, rollouts: Rollouts) -> torch.Tensor:
    """log pi_ref [B, C]: the model with its LoRA adapters disabled (no second copy in memory)."""
    with run.raw_model.disable_adapter():
        return _log_probs_no_grad(run, rollouts, run.raw_model)


# ================================================================================================
# 4. logging, evaluation, checkpoints
# ================================================================================================


def step_record(run: Run, step: int, rollouts: Rollouts, scores: torch.Tensor, advantages: torch.Tensor,
                losses: dict, timings: dict) -> dict:
    """The metrics of one step, gathered over processes, by TensorBoard group."""
    acc, device = run.accelerator, run.accelerator.device
    stage = {"reason/stage_index": run.stage_at(step)}
    if scores is None:  # an sft step
        losses = dict(losses)
        losses.pop("updates")
        return {"step": step, "global_step": run.guard.global_step, **stage,
                "loss/learning_rate": run.lr_scheduler.get_last_lr()[0], **{f"loss/{k}": v for k, v in losses.items()},
                **{f"perf/{k}": v for k, v in timings.items()}}
    scores_all = acc.gather(scores.to(device)).cpu()  # [B * world]
    lengths = acc.gather(rollouts.lengths.float().to(device)).cpu()
    stopped = acc.gather(rollouts.stopped.float().to(device)).cpu()
    prompts_all = gather_object(rollouts.prompts)
    finite = scores_all[torch.isfinite(scores_all)]
    losses = dict(losses)
    losses.pop("updates")
    generated = acc.gather(torch.tensor([losses.pop("generated_tokens", 0)], device=device)).sum()
    tools = {} if rollouts.tool_stats is None else {
        f"reason/{k}": v for k, v in tool_metrics(acc.gather(rollouts.tool_stats.to(device)).cpu()).items()}
    return {
        "step": step,
        "global_step": run.guard.global_step,
        **stage,
        "reward/mean": float(finite.mean()) if len(finite) else float("nan"),
        "reward/std": float(finite.std()) if len(finite) > 1 else 0.0,
        "reward/unscorable": int((~torch.isfinite(scores_all)).sum()),
        "reason/frac_reward_zero_std": grpo.frac_zero_std_groups(prompts_all, scores_all),
        "reason/completion_length_mean": float(lengths.mean()),
        "reason/completion_length_min": float(lengths.min()),
        "reason/completion_length_max": float(lengths.max()),
        "reason/clipped_ratio": float(1.0 - stopped.mean()),
        "reason/advantage_abs_mean": float(advantages.abs().mean()),
        **tools,
        "loss/learning_rate": run.lr_scheduler.get_last_lr()[0],
        **{(k if k.startswith("credit/") else f"loss/{k}"): v for k, v in losses.items()},  # credit/: add_step_credit
        "loss/nonfinite_skipped_total": run.guard.nonfinite_skipped,
        **{f"perf/{k}": v for k, v in timings.items()},
        "perf/completions_per_s": len(scores_all) / max(timings["step_s"], 1e-9),
        "perf/generated_tokens": int(generated),  # this step, all processes (with dynamic sampling: every round)
    }


def log_step(run: Run, step: int, record: dict, rollouts: Rollouts, scores: torch.Tensor) -> None:
    run.writer.epoch(record, step + 1)
    if not run.main:
        return
    if scores is None:  # an sft step
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"[drl] step {step} ({run.stages[run.stage_at(step)].name}, sft): nll {record['loss/sft_nll']:.4f} | "
              f"{record['perf/step_s']:.1f} s")
        return
    every, n = run.cfg.logging.completions_every, run.cfg.logging.num_completions
    if every and (step + 1) % every == 0:
        rows = [{"step": step, "prompt": p, "completion": c, "reward": float(s)}
                for p, c, s in zip(rollouts.prompts[:n], rollouts.completions[:n], scores[:n].tolist(), strict=True)]
        run.writer.text("reason/completions", "\n\n".join(
            f"**{r['prompt']}** (reward {r['reward']:.3f})\n\n    {r['completion']}" for r in rows), step + 1)
        with open(run.out / "completions.jsonl", "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(run.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(
        f"[drl] step {step}: reward {record['reward/mean']:.4f} +- {record['reward/std']:.4f} | length "
        f"{record['reason/completion_length_mean']:.1f} | zero-std groups {record['reason/frac_reward_zero_std']:.2f} | "
        f"clipfrac {record.get('loss/clipfrac', 0):.3f} | {record['perf/step_s']:.1f} s"
        + (f" | eval greedy {record['eval/greedy_reward']:.4f}" if "eval/greedy_reward" in record else "")
    )


def evaluate_model(run: Run) -> dict[str, float]:
    """`reasoning_rl.evaluation.evaluate` on the held-out problems (what `drl reason eval` reports)."""
    cfg, r = run.cfg, run.cfg.rollout
    if run.held_out is None:  # loaded once (a generated source is not re-drawn at every evaluation)
        run.held_out = held_out_problems(cfg)
    held_out = run.held_out
    if run.eval_reward_fn is None:
        run.eval_reward_fn = cfg.eval.reward.build() if cfg.eval.reward is not None else run.reward_fn
    if run.tools is not None:
        texts = [format_prompt(run.processor, p, cfg.prompts.system_prompt, cfg.prompts.use_chat_template)
                 for p in held_out.prompts]
        return evaluate_with_tools(
            run.raw_model, run.processor, texts, held_out.prompts, held_out.metadata, run.eval_reward_fn, tools=run.tools,
            max_rounds=r.max_tool_rounds, make_state=run.tool_state, observation_template=r.tool_observation_template,
            num_samples=cfg.eval.num_generations, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
            top_p=r.top_p, top_k=r.top_k, batch_size=r.batch_size, seed=cfg.eval.seed)
    results, _ = evaluate(
        run.raw_model, run.processor, held_out, run.eval_reward_fn, num_samples=cfg.eval.num_generations,
        max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
        stop_strings=r.stop_strings, batch_size=r.batch_size, system_prompt=cfg.prompts.system_prompt,
        use_chat_template=cfg.prompts.use_chat_template, seed=cfg.eval.seed,
    )
    return results


def save_checkpoint(run: Run, steps_done: int) -> None:
    run_helpers.save_checkpoint(run.accelerator, run.out / "checkpoints", steps_done, run.cfg, run.stateful(),
                                run.guard, run.cfg.checkpoint.keep_last, _versions())


def finish(run: Run, result: TrainResult) -> None:
    cfg = run.cfg
    if cfg.has_eval():
        result.eval_after = evaluate_model(run)
        run.writer.scalars("eval", result.eval_after, cfg.total_steps())
        if run.main:
            print("[drl] eval after training: " + " | ".join(f"{k} {v:.4f}" for k, v in result.eval_after.items()))
    run.accelerator.wait_for_everyone()
    if run.main:
        result.weights_dir = save_trained(run.raw_model, run.processor, cfg.model.use_lora, run.out)
        print(f"[drl] done. weights: {result.weights_dir} | TensorBoard: tensorboard --logdir {run.out / 'tensorboard'}")
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    result.model, result.processor = run.raw_model, run.processor


class _Curriculum:
    """The stages and their prompt samplers as one checkpointed component (a resume must see the same stages)."""

    def __init__(self, stages: list, samplers: list[PromptSampler]):
        self.stages, self.samplers = stages, samplers

    def state_dict(self) -> dict:
        return {"stages": [[st.name, st.kind] for st in self.stages],
                "prompt_samplers": [s.state_dict() for s in self.samplers]}

    def load_state_dict(self, state: dict) -> None:
        mine = [[st.name, st.kind] for st in self.stages]  # step counts may grow (a longer run continues)
        if state["stages"] != mine:
            raise ResumeError(f"the checkpoint's curriculum {state['stages']} differs from this config's {mine}; "
                              "resume with the checkpoint's stages")
        for sampler, saved in zip(self.samplers, state["prompt_samplers"], strict=True):
            sampler.load_state_dict(saved)


def _entropy_schedule(cfg: ReasonConfig):
    t = cfg.train
    if t.entropy_schedule == "constant":
        return make_entropy_schedule("constant", coef=t.entropy_coef)
    if t.entropy_schedule == "exponential":
        return make_entropy_schedule("exponential", init=t.entropy_coef, decay=t.entropy_decay)
    return make_entropy_schedule("adaptive", target=t.entropy_target, init=t.entropy_coef, delta=t.entropy_delta,
                                 c_max=t.entropy_coef_max)


def _versions() -> dict:
    import diffusion_rl

    return {"drl": diffusion_rl.__version__, **versions("torch", "transformers", "accelerate", "peft")}
