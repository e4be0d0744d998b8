"""The denoising-MDP trainer: DDPO / GRPO with pluggable step-level credit.

`train()` is the outline; each phase is a function below it, in loop order:

    setup             accelerator, pipeline + LoRA, optimizer, lr schedule, reward, credit, prompts, trackers
    restore           resume from a checkpoint: weights, optimizer, RNG, trackers, credit buffers, sampler, EMA
    evaluate_before   fixed-seed held-out evaluation of the starting model
    per epoch:
      sample_epoch        every process samples `batch_size x num_batches_per_epoch` trajectories (K per prompt),
                          recording x_t, x_{t-1}, t, log pi_old and the x0-similarity curve of every step; batch i
                          is scored in a worker thread while batch i+1 is sampled
      compute_advantages  rewards, prompts and similarity curves gathered from all processes; per-prompt
                          standardisation (stage 1), then the credit assigner's per-step advantages [N, T] in
                          true sampling order; each process takes back its own rows
      train_epoch         inner PPO epochs over (sample, step) pairs: shuffle samples, choose and shuffle steps
                          per sample (the step advantages ride the same permutation), recompute log pi_theta of
                          the stored transitions, clipped surrogate (+ KL), accumulate over steps and
                          micro-batches, then one guarded optimizer step (non-finite steps skipped on all ranks)
      log_epoch           the epoch's record: TensorBoard, metrics.jsonl, credit profile, console
      evaluate / validate / save_checkpoint
                          held-out eval; the validation score on other prompts (also after the last epoch) that
                          picks the best-of-run weights
    finish            the best-of-run (or EMA) weights put in place, final evaluation, before/after figure,
                          trained weights saved

Launch with `drl train` (one process) or `accelerate launch -m diffusion_rl.cli train ...`.
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
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from diffusers.optimization import get_scheduler
from PIL import Image
from tqdm.auto import tqdm

import rewards
from diffusion_rl import credit
from diffusion_rl.config import RunConfig, dump_config
from diffusion_rl.core import checkpoint, grpo
from diffusion_rl.core import run as run_helpers
from diffusion_rl.core.run import (  # noqa: F401  (NonFiniteTrainingError, ResumeError: importable from here)
    EMA,
    BestWeights,
    MetricAccumulator,
    NonFiniteTrainingError,
    OptimizerStepGuard,
    ParameterValues,
    ProcessInfo,
    ResumeError,
    TrainerCallback,
    derive_seed,
    restore_checkpoint,
    versions,
)
from diffusion_rl.evaluation import eval_prompts_from, evaluate
from diffusion_rl.families import Family, family_of
from diffusion_rl.models import (
    builtin_max_sequence_length,
    load_pipeline,
    prepare_trainable_denoiser,
    save_trained_weights,
    set_attention_backend,
)
from diffusion_rl.prompts import PromptSampler, PromptSet, load_prompts
from diffusion_rl.sampling import (
    DDIMRule,
    FlowRule,
    Trajectories,
    default_rule,
    recompute_log_prob,
    sample_trajectories,
)
from diffusion_rl.tb import Writer, grid_cells, image_grid, labelled_grid, side_by_side

EVAL_GRID_IMAGES, EVAL_GRID_COLUMNS = 64, 8  # images/eval_<tag>.png: the first 64 eval images, 8 per row
# Config sections a resumed run may change freely; any other difference is reported (model changes are errors).
RESUME_FREE = ("num_epochs", "output_dir", "logging", "checkpoint", "eval")


@dataclass
class TrainResult:
    output_dir: Path
    history: list[dict] = field(default_factory=list)  # one metrics dict per epoch run in this call
    weights_dir: Path | None = None
    eval_before: dict | None = None
    eval_after: dict | None = None
    best_epoch: int | None = None  # validation.keep_best: the epochs done when the weights that end the run were kept
    pipeline: object | None = None  # the diffusers pipeline with the trained denoiser, ready to sample
    process_index: int = 0


@dataclass
class Run(ProcessInfo):
    """Everything `setup` builds once per `train()` call; the phases read and update it."""

    cfg: RunConfig
    out: Path
    accelerator: Accelerator
    pipe: object  # the diffusers pipeline; family.denoiser(pipe) is the raw (unwrapped) UNet / transformer
    family: Family  # sd / sdxl (DDIM MDP) or sd3 / flux (flow MDP): conditioning, model call, latents
    rule: DDIMRule | FlowRule  # the stochastic step and its log-prob
    denoiser: torch.nn.Module  # the accelerate-prepared UNet / transformer that runs the forward (DDP syncs its grads)
    params: list[torch.nn.Parameter]  # every trainable parameter: the denoiser's, then the text encoder's
    text_encoder_params: list[torch.nn.Parameter]  # model.text_encoder_lora_rank: its adapter (not accelerate-prepared)
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    guard: OptimizerStepGuard
    ema: EMA | None
    best: BestWeights | None  # validation.keep_best: the best-scoring weights so far
    validation_prompts: list[str]  # empty = no validation
    reward_fn: rewards.RewardFn
    eval_reward: rewards.RewardFn
    assigner: credit.CreditAssigner
    prompt_set: PromptSet
    sampler: PromptSampler
    trackers: dict[str, grpo.PerPromptStatTracker]  # one per reward ("reward", or each component in advantage mode)
    component_weights: dict[str, float]  # reward.combine=advantage: weight per component; else empty
    writer: Writer
    callbacks: Sequence[TrainerCallback]
    num_steps: int  # T, denoising steps per trajectory
    steps_trained: int  # k, steps trained per trajectory
    start_epoch: int = 0

    def stateful(self) -> dict:
        """The parts a checkpoint saves beside accelerate's state (names are the checkpoint's keys)."""
        return {
            "trackers": _Trackers(self.trackers),
            "credit": self.assigner if hasattr(self.assigner, "state_dict") else None,
            "prompt_sampler": self.sampler,
            "ema": self.ema,
            "best": self.best,
            "text_encoder_lora": ParameterValues(self.text_encoder_params, "text-encoder LoRA")
            if self.text_encoder_params else None,
        }


@dataclass
class EpochSamples:
    """One epoch's trajectories (this process) and their rewards (all processes, process order)."""

    trajectories: Trajectories  # N local trajectories
    prompts: list[str]  # [N] local
    prompts_all: list[str]  # [N * world]
    rewards_all: torch.Tensor  # [N * world] fp32, NaN = unscorable
    valid: torch.Tensor  # [N * world] bool
    components_all: dict[str, torch.Tensor]  # multi-reward: each component's raw scores [N * world]
    sample_s: float
    reward_wait_s: float


def train(
    cfg: RunConfig,
    reward_fn: Callable | None = None,
    credit_fn: Callable | None = None,
    resume: str | None = None,
    eval_before: dict | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """Run `cfg`. `reward_fn(images, prompts, metadata) -> (scores, info)` and `credit_fn(ctx) -> [N, T]`
    override the configured reward and credit assigner (the Python API for reward-shaping experiments).
    `eval_before` is a result of the before-training evaluation that is already known (for instance from an
    earlier run of a sweep with the same model, eval and sampling settings: the untrained model is the base
    model whatever the seed); it is logged as given, and no before-grid is drawn. `callbacks` are told when
    each epoch starts and ends (`diffusion_rl.core.run.TrainerCallback`)."""
    run = setup(cfg, reward_fn, credit_fn, callbacks)
    result = TrainResult(output_dir=run.out, process_index=run.rank)
    scorer = rewards.AsyncScorer(run.reward_fn) if cfg.reward.overlap else None
    with run.writer, scorer or contextlib.nullcontext():  # both closed on every path, exceptions included
        restore(run, resume)
        print_startup(run)
        result.eval_before = evaluate_before(run, eval_before)
        for epoch in range(run.start_epoch, cfg.num_epochs):
            for cb in run.callbacks:
                cb.on_epoch_start(epoch)
            t_epoch = time.perf_counter()
            samples = sample_epoch(run, epoch, scorer)
            step_adv, credit_result, similarities = compute_advantages(run, samples, epoch)
            t_train = time.perf_counter()
            losses = train_epoch(run, samples.trajectories, step_adv, epoch)
            timings = {"sample_s": samples.sample_s, "reward_wait_s": samples.reward_wait_s,
                       "train_s": time.perf_counter() - t_train, "epoch_s": time.perf_counter() - t_epoch}
            record = epoch_record(run, epoch, samples, credit_result, losses, timings)
            if _eval_due(cfg, epoch):
                record.update({f"eval/{k}": v for k, v in evaluate_model(run).items()})
            if run.validation_prompts and ((epoch + 1) % cfg.validation.every == 0 or epoch + 1 == cfg.num_epochs):
                record.update(validate(run, epoch + 1))  # before the checkpoint, which keeps the best weights
            log_epoch(run, epoch, record, samples, credit_result, similarities)
            result.history.append(record)
            for cb in run.callbacks:
                cb.on_epoch_end(epoch, record)
            if (cfg.checkpoint.every and (epoch + 1) % cfg.checkpoint.every == 0) or epoch + 1 == cfg.num_epochs:
                save_checkpoint(run, epoch + 1)
        finish(run, result)
    return result


# ================================================================================================
# set-up and resume
# ================================================================================================


def setup(cfg: RunConfig, reward_fn: Callable | None, credit_fn: Callable | None,
          callbacks: Sequence[TrainerCallback] = ()) -> Run:
    k_train = cfg.num_train_timesteps()
    validation_prompts = _validation_prompts(cfg)  # before anything loads: a bad choice fails at once
    # accelerate keeps one process-wide state; each train() call configures it afresh (sweeps in one
    # process may change mixed precision), keeping the distributed process group (PartialState).
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        # Without CUDA, a multi-process launch (torchrun / accelerate launch --multi_gpu) runs gloo on the CPU.
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.train.mixed_precision,
        # one optimizer step accumulates every trained step of every micro-batch
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps * k_train,
    )
    set_seed(cfg.seed, device_specific=True)
    torch.backends.cuda.matmul.allow_tf32 = True

    pipe, family, denoiser, params, text_encoder_params, optimizer, lr_scheduler = _setup_model_and_optimizer(
        cfg, accelerator)
    s = cfg.sample
    rule = default_rule(family, s.eta, s.noise_level, s.timestep_shift)
    _check_family_options(cfg, family)
    guard = OptimizerStepGuard(accelerator, params, optimizer, lr_scheduler, cfg.train.max_grad_norm,
                               cfg.train.max_consecutive_nonfinite)
    configured_reward = reward_fn is None
    reward_fn = cfg.reward.build() if configured_reward else rewards.as_reward(reward_fn)
    assigner = (credit.as_credit_assigner(credit_fn) if credit_fn is not None
                else credit.make_credit(cfg.credit.kind, **_credit_options(cfg)))
    prompt_set = load_prompts(cfg.prompts)
    a = cfg.advantage
    component_weights = dict(getattr(reward_fn, "weights", {})) if cfg.reward.combine == "advantage" else {}
    trackers = {name: grpo.PerPromptStatTracker(a.buffer_size, a.min_count, a.scale_std)
                for name in (component_weights or {"reward": 1.0})}
    out = Path(cfg.output_dir)
    return Run(
        cfg=cfg, out=out, accelerator=accelerator, pipe=pipe, family=family, rule=rule, denoiser=denoiser,
        params=params, optimizer=optimizer,
        text_encoder_params=text_encoder_params,
        lr_scheduler=lr_scheduler, guard=guard, ema=EMA(params, cfg.train.ema_decay) if cfg.train.ema else None,
        best=BestWeights(params) if validation_prompts and cfg.validation.keep_best else None,
        validation_prompts=validation_prompts,
        reward_fn=reward_fn, eval_reward=_load_eval_reward(cfg, reward_fn, configured_reward), assigner=assigner,
        prompt_set=prompt_set,
        sampler=PromptSampler(prompt_set, cfg.seed, accelerator.num_processes, accelerator.process_index),
        trackers=trackers, component_weights=component_weights,
        writer=Writer(out / "tensorboard", enabled=accelerator.is_main_process), callbacks=list(callbacks),
        num_steps=cfg.sample.num_steps, steps_trained=k_train,
    )


def _setup_model_and_optimizer(cfg: RunConfig, accelerator: Accelerator):
    m, t = cfg.model, cfg.train
    pipe = load_pipeline(m.pretrained, m.revision, m.dtype, m.local_files_only, m.seed)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(accelerator.device)
    family = family_of(pipe, m.max_sequence_length or builtin_max_sequence_length(m.pretrained))
    raw = family.denoiser(pipe)
    set_attention_backend(raw, m.attention)
    params = prepare_trainable_denoiser(pipe, m.use_lora, m.lora_rank, m.lora_alpha, m.lora_target_modules,
                                        m.text_encoder_lora_rank, m.text_encoder_lora_alpha)
    if m.gradient_checkpointing:
        raw.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                  weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)
    # Prepare the module that owns the LoRA parameters *and* runs the forward, so DDP syncs them.
    denoiser, optimizer = accelerator.prepare(raw, optimizer)
    # the text encoder's adapter params come last in `params` (prepare_trainable_denoiser)
    text_encoder_params = ([p for p in pipe.text_encoder.parameters() if p.requires_grad]
                           if m.text_encoder_lora_rank else [])
    if accelerator.num_processes > 1:
        # not prepared (DDP broadcasts the denoiser's initial weights only): every rank starts from rank 0's draw
        from accelerate.utils import broadcast

        for p in text_encoder_params:
            p.data.copy_(broadcast(p.data, from_process=0))
    # Not handed to accelerate (whose wrapper steps it once per process): the lr is a function of the global
    # step, stepped after each optimizer step and fast-forwarded on resume.
    lr_scheduler = get_scheduler(
        "constant_with_warmup" if t.lr_schedule == "constant" else t.lr_schedule, optimizer,
        num_warmup_steps=t.lr_warmup_steps, num_training_steps=cfg.num_optimizer_steps(),
    )
    return pipe, family, denoiser, params, text_encoder_params, optimizer, lr_scheduler


def _check_family_options(cfg: RunConfig, family: Family) -> None:
    """Options that only one MDP has, refused where the loaded model has the other (the family is known only
    once the pipeline's index is read)."""
    s, problems = cfg.sample, []
    if cfg.model.text_encoder_lora_rank and family.name != "sd":
        problems.append(f"model.text_encoder_lora_rank={cfg.model.text_encoder_lora_rank} is for SD 1.x / 2.x models; "
                        f"{cfg.model.pretrained} is a {family.name} model: set it to 0")
    if family.mdp == "ddim":
        for name in ("sde_window_size", "timestep_shift"):
            if getattr(s, name) is not None:
                problems.append(f"sample.{name}={getattr(s, name)} is for flow models (SD3, FLUX); "
                                f"{cfg.model.pretrained} is a {family.name} model on the DDIM MDP: unset it")
    if problems:
        from diffusion_rl.config import ConfigError

        raise ConfigError(problems)


def sde_window(cfg: RunConfig, epoch: int) -> tuple[int, int]:
    """The epoch's trained steps [lo, hi): an SDE window drawn per epoch (the same on every process) for
    Flow-GRPO-Fast, else every step but the skipped final ones."""
    s = cfg.sample
    if s.sde_window_size is None:
        return 0, s.num_steps - cfg.train.skip_final_steps
    lo, hi = s.sde_window_range or (0, s.num_steps)
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, 0, 2_000_000))
    start = int(torch.randint(lo, hi - s.sde_window_size + 1, (1,), generator=g))
    return start, start + s.sde_window_size


def restore(run: Run, resume: str | None) -> None:
    """Resume from `resume` ('auto' or a checkpoint directory): every piece of state the checkpoint holds."""
    if not resume:
        return
    ckpt = checkpoint.find_checkpoint(resume, run.out)
    state = restore_checkpoint(run.accelerator, ckpt, run.cfg.model_dump(mode="json"), run.stateful(), run.guard,
                               run.lr_scheduler, RESUME_FREE)
    run.start_epoch = state.epochs_done
    if run.main:
        print(f"[drl] resumed from {ckpt} at epoch {state.epochs_done}, global step {state.global_step}")


def print_startup(run: Run) -> None:
    """The derived numbers, the run directory and the hyperparameters (TensorBoard), on the main process."""
    cfg, geo = run.cfg, run.cfg.geometry(run.world)
    run.writer.hparams(cfg, geo)
    if not run.main:
        return
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / "config.yaml").write_text(dump_config(cfg))
    trainable = sum(p.numel() for p in run.params)
    print(f"[drl] run directory: {run.out.resolve()}")
    print(
        f"[drl] {run.world} process(es) | samples/epoch {geo['samples_per_epoch']} "
        f"({geo['prompts_per_epoch']} prompts x {cfg.sample.images_per_prompt}) | trained steps/trajectory "
        f"{run.steps_trained}/{run.num_steps} | updates/epoch {geo['updates_per_epoch']} | effective batch "
        f"{geo['effective_batch_trajectories']} trajectories = {geo['effective_batch_transitions']} transitions"
    )
    adapter = f"LoRA r={cfg.model.lora_rank}" if cfg.model.use_lora else f"full {run.family.denoiser_attr}"
    if run.text_encoder_params:
        adapter += (f" + text-encoder LoRA r={cfg.model.text_encoder_lora_rank} "
                    f"({sum(p.numel() for p in run.text_encoder_params):,} params)")
    print(
        f"[drl] model {cfg.model.pretrained} ({run.family.name}, {run.family.mdp} MDP) | {adapter} | {trainable:,} trainable params | reward "
        f"{run.reward_fn.name} | credit {getattr(run.assigner, 'name', 'custom')}"
        + (f" | EMA decay {cfg.train.ema_decay}" if run.ema else "")
    )
    if run.validation_prompts:
        v = cfg.validation
        print(f"[drl] validation: {len(run.validation_prompts)} prompts x {v.images_per_prompt} every {v.every} epochs "
              f"and after the last | " + ("the best-scoring weights end the run" if run.best else "logged only"))


def evaluate_before(run: Run, known: dict | None) -> dict | None:
    """The held-out evaluation of the starting model (only when a run starts, not on resume)."""
    if not run.cfg.eval.prompts or run.start_epoch > 0:
        return None
    result = dict(known) if known is not None else evaluate_model(run, "before")
    run.writer.scalars("eval", result, 0)
    if run.main:
        print(f"[drl] eval before training: {run.eval_reward.name} = {result['mean']:.4f}")
    return result


# ================================================================================================
# 1. sampling
# ================================================================================================


def sample_epoch(run: Run, epoch: int, scorer: rewards.AsyncScorer | None) -> EpochSamples:
    """Sample this process's trajectories for `epoch`, score them, and gather the rewards of all processes."""
    cfg, K = run.cfg, run.cfg.sample.images_per_prompt
    t_start = time.perf_counter()
    run.denoiser.eval()
    lo, hi = sde_window(cfg, epoch)
    stochastic = torch.zeros(run.num_steps, dtype=torch.bool)
    stochastic[lo:hi if cfg.sample.sde_window_size else run.num_steps] = True  # SDE steps; ODE outside a window
    batches = run.sampler.epoch_indices(epoch, cfg.sample.num_batches_per_epoch, cfg.sample.batch_size // K)
    trajectories, pending, prompts_local = [], [], []
    for b, prompt_ids in enumerate(tqdm(batches, desc=f"epoch {epoch} sampling", disable=not run.main, leave=False)):
        prompts = [run.prompt_set.prompts[i] for i in prompt_ids for _ in range(K)]  # K consecutive samples per prompt
        metadata = [run.prompt_set.metadata[i] for i in prompt_ids for _ in range(K)]
        generators = [torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, run.rank, b, j))
                      for j in range(len(prompts))]
        batch = sample_trajectories(
            run.pipe, run.denoiser, prompts, generators, run.num_steps, cfg.sample.guidance_scale, cfg.sample.eta,
            cfg.sample.negative_prompt, autocast=run.accelerator.autocast, family=run.family, rule=run.rule,
            stochastic_steps=stochastic,
        )
        images = batch.images.cpu()
        # Score in the worker thread while the next batch samples (or right away when overlap is off).
        pending.append(scorer.submit(images, prompts, metadata) if scorer else run.reward_fn(images, prompts, metadata))
        trajectories.append(batch)
        prompts_local += prompts
    t_sampled = time.perf_counter()
    scored = [p.result() if scorer else p for p in pending]
    t_scored = time.perf_counter()

    acc, device = run.accelerator, run.accelerator.device
    rewards_all = acc.gather(torch.cat([s for s, _ in scored]).float().to(device)).cpu()  # [N * world]
    prompts_all = gather_object(prompts_local)
    components_all = {
        name: acc.gather(torch.cat([info["components"][name] for _, info in scored]).float().to(device)).cpu()
        for name in scored[0][1].get("components") or {}
    }
    valid = torch.isfinite(rewards_all)
    _check_unscorable(cfg, run.reward_fn.name, rewards_all, valid, prompts_all, epoch)
    return EpochSamples(
        trajectories=Trajectories.cat(trajectories), prompts=prompts_local, prompts_all=prompts_all,
        rewards_all=rewards_all, valid=valid, components_all=components_all,
        sample_s=t_sampled - t_start, reward_wait_s=t_scored - t_sampled,
    )


def _check_unscorable(cfg: RunConfig, name: str, scores: torch.Tensor, valid: torch.Tensor, prompts: list[str],
                      epoch: int) -> None:
    n_bad = int((~valid).sum())
    if n_bad and cfg.reward.nonfinite == "error":
        examples = [prompts[i] for i in torch.nonzero(~valid).flatten().tolist()[:3]]
        raise rewards.RewardError(
            f"reward {name!r} returned {n_bad} non-finite score(s) in epoch {epoch} (e.g. for prompts {examples}); "
            "fix the reward or set reward.nonfinite=mask to skip such samples"
        )
    if n_bad / len(valid) > cfg.reward.max_unscorable_fraction:
        raise rewards.RewardError(
            f"reward {name!r}: {n_bad}/{len(valid)} samples unscorable in epoch {epoch}, more than "
            f"reward.max_unscorable_fraction={cfg.reward.max_unscorable_fraction}"
        )


# ================================================================================================
# 2. advantages and credit
# ================================================================================================


def compute_advantages(run: Run, samples: EpochSamples, epoch: int):
    """Stage 1 (per-prompt or batch standardisation, clipped) over all processes, then the credit assigner.
    Returns (this process's per-step advantages [N, T] in true sampling order, the CreditResult over all
    processes, the gathered similarity curves [N * world, T+1])."""
    a, acc = run.cfg.advantage, run.accelerator
    valid = samples.valid
    if run.component_weights:  # advantage-level combination: normalise each reward, then weight
        adv = sum(
            w * run.trackers[name].update(samples.prompts_all, torch.where(valid, samples.components_all[name], torch.nan))
            for name, w in run.component_weights.items()
        )
    elif a.per_prompt_stat_tracking:
        adv = run.trackers["reward"].update(samples.prompts_all, samples.rewards_all)
    else:
        adv = grpo.batch_advantages(samples.rewards_all, scale_std=a.scale_std)
    adv = grpo.clip_advantages(torch.where(valid, adv, 0.0), a.clip)  # [N * world]
    local = samples.trajectories
    ctx = credit.CreditContext(
        advantages=adv,
        similarities=acc.gather(local.similarities.to(acc.device)).cpu(),  # [N * world, T+1]
        timesteps=acc.gather(local.timesteps.to(acc.device)).cpu(),  # [N * world, T]
        prompts=samples.prompts_all,
        valid=valid,
    )
    credit_result = run.assigner(ctx)
    step_adv = credit_result.step_advantages.reshape(run.world, len(local), run.num_steps)[run.rank]  # [N, T]
    return step_adv, credit_result, ctx.similarities


# ================================================================================================
# 3. training
# ================================================================================================


def training_view(
    samples: Trajectories, step_adv: torch.Tensor, k: int, selection: str, generator: torch.Generator,
    first_step: int = 0,
) -> dict[str, torch.Tensor]:
    """Shuffle samples, then choose and shuffle k steps per sample. Everything indexed by (sample, step)
    moves together, so each trained pair keeps its own latents, timestep, old log-prob and advantage.

    step_adv [N, W] is in true sampling order and covers the trainable steps first_step .. first_step + W - 1 (a
    flow model's SDE window; else steps 0 ..); returns tensors [N, k, ...] plus `perm` [N], `steps` [N, k] (true
    step indices).
    """
    n = len(samples)
    perm = torch.randperm(n, generator=generator)  # [N] shuffle samples
    chosen = credit.select_steps(step_adv[perm], k, selection, generator)  # [N, k] indices into the window
    steps = chosen + first_step  # [N, k] true step indices, shuffled
    rows = perm[:, None]
    return {
        "perm": perm,
        "steps": steps,
        "latents": samples.latents[rows, steps],  # [N, k, C, h, w]
        "next_latents": samples.next_latents[rows, steps],
        "timesteps": samples.timesteps[rows, steps],  # [N, k]
        "next_timesteps": samples.next_timesteps[rows, steps],
        "log_probs": samples.log_probs[rows, steps],
        "advantages": step_adv[rows, chosen],
        "cond": {key: value[perm] for key, value in samples.cond.items()},  # each [N, ...]
    }


def train_epoch(run: Run, trajectories: Trajectories, step_adv: torch.Tensor, epoch: int) -> dict[str, float]:
    """The inner PPO epochs over this epoch's trajectories; returns the loss metrics averaged over micro-steps
    (ratio_min / ratio_max: the true extremes), the mean pre-clip gradient norm and the update count."""
    cfg = run.cfg
    run.denoiser.train()
    metrics, grad_norms = MetricAccumulator(), []
    # the trainable steps: the first T - skip_final_steps, or a flow model's SDE window; true indices are kept
    lo, hi = sde_window(cfg, epoch)
    trainable_adv = step_adv[:, lo:hi]  # [N, W]
    for inner in range(cfg.train.num_inner_epochs):
        shuffle = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, run.rank, 1_000_000 + inner))
        view = training_view(trajectories, trainable_adv, run.steps_trained, cfg.train.timestep_selection, shuffle, lo)
        for start in tqdm(range(0, len(trajectories), cfg.train.batch_size), desc=f"epoch {epoch} training",
                          disable=not run.main, leave=False):
            micro = slice(start, start + cfg.train.batch_size)
            for j in range(run.steps_trained):
                loss, step_metrics = _train_step(run, view, micro, j)
                metrics.add(step_metrics)
                if run.accelerator.sync_gradients:
                    _average_text_encoder_grads(run)
                    grad_norm = run.guard.step(loss, where=f"(epoch {epoch})")
                    if grad_norm is not None:
                        grad_norms.append(grad_norm)
                        if run.ema:
                            run.ema.update()
    return {**metrics.result(), "grad_norm": sum(grad_norms) / max(len(grad_norms), 1), "updates": len(grad_norms)}


def _average_text_encoder_grads(run: Run) -> None:
    """The text encoder's adapter is not accelerate-prepared (DDP syncs the denoiser's grads only): average its
    grads over the processes before the optimizer step, so every rank takes the same step."""
    if run.world > 1:
        for p in run.text_encoder_params:
            if p.grad is not None:
                p.grad.copy_(run.accelerator.reduce(p.grad, reduction="mean"))


def _train_step(run: Run, view: dict, micro: slice, j: int) -> tuple[torch.Tensor, dict]:
    """One trained step j of one micro-batch: recompute log pi_theta (and log pi_ref), loss, backward."""
    cfg, acc = run.cfg, run.accelerator
    transition = {
        "latents": view["latents"][micro, j], "next_latents": view["next_latents"][micro, j],
        "timesteps": view["timesteps"][micro, j], "next_timesteps": view["next_timesteps"][micro, j],
        "cond": {key: value[micro] for key, value in view["cond"].items()},
    }
    with acc.accumulate(run.denoiser):
        with acc.autocast():
            logp = _log_prob(run, run.denoiser, transition)
            # under the same autocast as the policy forward, so the KL is exactly 0 at initialisation
            logp_ref = _reference_log_prob(run, transition)
        loss, metrics = grpo.policy_loss(
            logp.log_prob[:, None],  # [b, 1] fp32
            view["log_probs"][micro, j][:, None].to(acc.device),
            view["advantages"][micro, j][:, None].to(acc.device),
            clip_low=cfg.train.clip_range,
            clip_high=cfg.train.clip_range_high or cfg.train.clip_range,
            adv_clip=cfg.advantage.clip,
            aggregation=cfg.train.loss_aggregation,
            constant_divisor=float(cfg.train.batch_size) if cfg.train.loss_aggregation == "constant" else None,
            logp_ref=logp_ref,
            kl_coef=cfg.train.kl_coef,
            kl_estimator=cfg.train.kl_estimator,
        )
        acc.backward(loss)
    return loss, metrics


def _log_prob(run: Run, denoiser, transition: dict):
    """The step output of a stored transition under `denoiser` (log-prob fp32 [b], mean, std), with the training
    guidance (train.guidance_scale, else the sampling guidance)."""
    cfg = run.cfg
    guidance = cfg.train.guidance_scale if cfg.train.guidance_scale is not None else cfg.sample.guidance_scale
    return recompute_log_prob(
        run.pipe, denoiser, transition["latents"], transition["next_latents"], transition["timesteps"],
        transition["cond"], guidance, cfg.sample.eta, next_timesteps=transition["next_timesteps"],
        family=run.family, rule=run.rule,
    )


def _reference_log_prob(run: Run, transition: dict) -> torch.Tensor | None:
    """log pi_ref [b, 1] of the stored transition under the denoiser with LoRA disabled (no second copy in memory)."""
    if run.cfg.train.kl_coef == 0:
        return None
    raw = run.family.denoiser(run.pipe)
    with torch.no_grad():
        # the adapters are switched off on the raw module's layers, the forward runs through the prepared module
        # (under FSDP only the wrapper holds the gathered weights; under DDP it is the same computation)
        raw.disable_adapters()
        try:
            ref = _log_prob(run, run.denoiser, transition)
        finally:
            raw.enable_adapters()
    return ref.log_prob[:, None]


# ================================================================================================
# 4. logging, evaluation, checkpoints
# ================================================================================================


def epoch_record(run: Run, epoch: int, samples: EpochSamples, credit_result, losses: dict, timings: dict) -> dict:
    """The metrics of one epoch, by TensorBoard group."""
    T, k = run.num_steps, run.steps_trained
    finite = samples.rewards_all[samples.valid]
    losses = dict(losses)
    losses.pop("updates")
    record = {
        "epoch": epoch,
        "global_step": run.guard.global_step,
        "reward/mean": float(finite.mean()) if len(finite) else float("nan"),
        "reward/std": float(finite.std()) if len(finite) > 1 else 0.0,
        "reward/unscorable": int((~samples.valid).sum()),
        "reward/frac_zero_std_groups": grpo.frac_zero_std_groups(samples.prompts_all, samples.rewards_all),
        "loss/learning_rate": run.lr_scheduler.get_last_lr()[0],  # after the epoch's last update
        **{f"loss/{key}": value for key, value in losses.items()},
        "loss/nonfinite_skipped_total": run.guard.nonfinite_skipped,
        "loss/overflow_skipped_total": run.guard.overflow_skipped,
        "credit/steps_trained_per_trajectory": k,
        "credit/steps_skipped_per_trajectory": T - k,
        **{f"credit/share_{key}": v for key, v in credit.credit_shares(credit_result.contributions).items()},
        **{f"perf/{key}": v for key, v in timings.items()},
        "perf/samples_per_s": len(samples.rewards_all) / max(timings["epoch_s"], 1e-9),
    }
    for name, scores in samples.components_all.items():
        record[f"reward/{name}"] = float(scores[samples.valid].nanmean())
    return record


def log_epoch(run: Run, epoch: int, record: dict, samples: EpochSamples, credit_result, similarities) -> None:
    run.writer.epoch(record, epoch + 1)
    run.writer.credit(credit_result, similarities, epoch + 1)
    if not run.main:
        return
    every = run.cfg.logging.image_every
    if every and (epoch + 1) % every == 0:
        n = run.cfg.logging.num_images
        run.writer.images(samples.trajectories.images[:n], samples.prompts, run.out / "images", epoch + 1)
    with open(run.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    _append_credit_profile(run.out, epoch, credit_result)
    print(
        f"[drl] epoch {epoch}: reward {record['reward/mean']:.4f} +- {record['reward/std']:.4f} | "
        f"clipfrac {record.get('loss/clipfrac', 0):.3f} | approx_kl {record.get('loss/approx_kl', 0):.2e} | "
        f"{record['perf/epoch_s']:.1f} s"
        + (f" | eval {record['eval/mean']:.4f}" if "eval/mean" in record else "")
        + (f" | validation {record['validation/mean']:.4f}" if "validation/mean" in record else "")
    )


def _eval_due(cfg: RunConfig, epoch: int) -> bool:
    """Periodic evaluation after `epoch` (the last epoch's is the after-training evaluation in `finish`)."""
    e = cfg.eval
    return bool(e.prompts and e.every and (epoch + 1) % e.every == 0 and epoch + 1 < cfg.num_epochs)


def evaluate_model(run: Run, tag: str | None = None) -> dict:
    """Fixed-seed sampling on the held-out prompts (diffusion_rl.evaluation), with the EMA weights when kept;
    with a `tag`, the grid is saved as images/eval_<tag>.png (and the prompts beside it)."""
    cfg = run.cfg
    prompts = _prompt_list(cfg.eval.prompts)
    with run.ema.applied() if run.ema else contextlib.nullcontext():
        results, images = _score_fixed_seed(run, prompts, cfg.eval.seed, cfg.eval.images_per_prompt)
    if tag is not None and run.main:
        (run.out / "images").mkdir(parents=True, exist_ok=True)
        image_grid(images[:EVAL_GRID_IMAGES], nrow=EVAL_GRID_COLUMNS).save(run.out / "images" / f"eval_{tag}.png")
    return results


def validate(run: Run, epochs_done: int) -> dict[str, float]:
    """Fixed-seed score on the validation prompts (the weights evaluate_model would score); with keep_best, the
    weights are kept when they beat the best so far. Returns the record's validation/ entries."""
    v = run.cfg.validation
    with run.ema.applied() if run.ema else contextlib.nullcontext():
        score = _score_fixed_seed(run, run.validation_prompts, v.seed, v.images_per_prompt)[0]["mean"]
        if run.world > 1:  # every rank scored the same images; the main process's score decides for all of them
            score = broadcast_object_list([score], from_process=0)[0]
        if run.best:
            run.best.offer(score, epochs_done)
    record = {"validation/mean": score}
    if run.best and run.best.weights:  # none yet while every score was NaN (unscorable)
        record |= {"validation/best": run.best.score, "validation/best_epoch": float(run.best.epoch)}
    return record


def _score_fixed_seed(run: Run, prompts: list[str], seed: int, images_per_prompt: int) -> tuple[dict, torch.Tensor]:
    """(the eval reward's {"mean", "std", "n", ...}, images [N, 3, H, W]) of fixed-seed samples of `prompts`."""
    s = run.cfg.sample
    results, images, _ = evaluate(
        run.pipe, run.denoiser, prompts, [run.eval_reward], seed, images_per_prompt, s.num_steps, s.guidance_scale,
        s.eta, max(s.batch_size, 16), s.negative_prompt, family=run.family, rule=run.rule,
    )
    return results[run.eval_reward.name], images


def save_checkpoint(run: Run, epochs_done: int) -> None:
    """Collective: accelerate's state on every rank, the trainer state beside it."""
    run_helpers.save_checkpoint(run.accelerator, run.out / "checkpoints", epochs_done, run.cfg, run.stateful(),
                                run.guard, run.cfg.checkpoint.keep_last, _versions())


def finish(run: Run, result: TrainResult) -> None:
    """After the last epoch: the EMA weights (when kept) become the model's, the after-training evaluation and
    the before/after figure, the trained weights saved; `result.pipeline` is ready to sample."""
    cfg = run.cfg
    if run.ema:
        run.ema.copy_to_params()
    if run.best and run.best.weights:
        run.best.copy_to_params()  # the validated weights (EMA ones when kept), which may be the last
        result.best_epoch = run.best.epoch
        if run.main:
            print(f"[drl] best-of-run: the weights after epoch {run.best.epoch} (validation "
                  f"{run.best.score:.4f}) end the run")
    elif run.best and run.main:
        print("[drl] warning: no validation score was finite (the reward could not score the validation images); "
              "the last weights end the run")
    if cfg.eval.prompts:
        result.eval_after = evaluate_model(run, "after")
        run.writer.scalars("eval", result.eval_after, cfg.num_epochs)
        if run.main:
            print(f"[drl] eval after training: {run.eval_reward.name} = {result.eval_after['mean']:.4f}")
            if result.eval_before is not None and (run.out / "images" / "eval_before.png").exists():
                _before_after_figure(run, result.eval_before, result.eval_after)
    run.accelerator.wait_for_everyone()
    state = run.accelerator.get_state_dict(run.denoiser)  # collective: under FSDP it gathers the full weights
    if run.main:
        raw = run.accelerator.unwrap_model(run.denoiser)
        result.weights_dir = save_trained_weights(
            raw, cfg.model.use_lora, run.out / ("lora" if cfg.model.use_lora else "."), run.family.name, state,
            text_encoder=run.pipe.text_encoder if run.text_encoder_params else None)
        print(f"[drl] done. weights: {result.weights_dir} | TensorBoard: tensorboard --logdir {run.out / 'tensorboard'}")
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    result.pipeline = run.pipe


# ------------------------------------------------------------------------------------------------
# helpers (small, single use)
# ------------------------------------------------------------------------------------------------


class _Trackers:
    """The per-reward stat trackers as one checkpointed component."""

    def __init__(self, trackers: dict[str, grpo.PerPromptStatTracker]):
        self.trackers = trackers

    def state_dict(self) -> dict:
        return {name: t.state_dict() for name, t in self.trackers.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, tracker in self.trackers.items():
            tracker.load_state_dict(state[name])


def _prompt_list(spec: list[str] | str) -> list[str]:
    """An eval / validation prompts field: the list itself, or the prompts of a file or of `world:<split>`."""
    return list(spec) if isinstance(spec, list) else eval_prompts_from(spec)


def _validation_prompts(cfg: RunConfig) -> list[str]:
    """validation.prompts, or a fixed subset of `num_prompts` of them drawn with validation.seed; refused when they
    share a prompt with the held-out eval (selection on eval prompts would bias the reported eval)."""
    v = cfg.validation
    if not v.prompts:
        return []
    prompts = _prompt_list(v.prompts)
    if v.num_prompts and v.num_prompts < len(prompts):
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(v.seed))
        prompts = [prompts[i] for i in sorted(order[: v.num_prompts].tolist())]
    if cfg.eval.prompts:
        held_out = _prompt_list(cfg.eval.prompts)
        shared = sorted(set(prompts) & set(held_out))
        if shared:
            from diffusion_rl.config import ConfigError

            raise ConfigError([
                f"validation.prompts ({v.prompts!r}) share {len(shared)} prompt(s) with eval.prompts, e.g. "
                f"{shared[0]!r}: choosing weights on them biases the reported eval; validate on other prompts, "
                "e.g. validation.prompts=world:train"
            ])
    return prompts


def _load_eval_reward(cfg: RunConfig, train_reward: rewards.RewardFn, configured: bool = True) -> rewards.RewardFn:
    """eval.reward, or the training reward. The training reward's object is reused when it is the configured
    one (`configured`: not a Python-API `reward_fn`) and eval.reward names the same reward with the same options,
    so a reward model is loaded once."""
    if cfg.eval.reward is None or (configured and cfg.eval.reward == cfg.reward):
        return train_reward
    return cfg.eval.reward.build()


def _credit_options(cfg: RunConfig) -> dict:
    c = cfg.credit
    if c.kind != "coca":
        return {}
    return {
        "window": c.window, "alpha": c.alpha, "stage2": c.stage2,
        "buffer_size": c.buffer_size, "min_count": c.min_count, "adv_clip": cfg.advantage.clip,
    }


def _before_after_figure(run: Run, before: dict, after: dict) -> None:
    """images/eval_before_after.png: the two eval grids (same prompts, same seeds) side by side, every image
    labelled with its prompt, the scores on top. Read back from the saved grids, so a resumed run draws it too."""
    cfg, images_dir = run.cfg, run.out / "images"
    prompts = _prompt_list(cfg.eval.prompts)
    labels = [p for p in prompts for _ in range(cfg.eval.images_per_prompt)][:EVAL_GRID_IMAGES]
    panels = []
    for tag, ev in (("before", before), ("after", after)):
        cells = grid_cells(Image.open(images_dir / f"eval_{tag}.png"), len(labels), EVAL_GRID_COLUMNS)
        panels.append((f"{tag}: {run.eval_reward.name} {ev['mean']:.3f}", labelled_grid(cells, labels)[0]))
    side_by_side(panels).save(images_dir / "eval_before_after.png")
    print(f"[drl] before/after eval images: {images_dir / 'eval_before_after.png'}")


def _append_credit_profile(out: Path, epoch: int, credit_result) -> None:
    row = {
        "epoch": epoch,
        "mean_contribution": credit_result.contributions.mean(0).tolist(),
        "mean_abs_step_advantage": credit_result.step_advantages.abs().mean(0).tolist(),
        "info": {k: v for k, v in credit_result.info.items() if isinstance(v, (int, float, str))},
    }
    with open(out / "credit_profile.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def _versions() -> dict:
    import diffusion_rl

    return {"drl": diffusion_rl.__version__,
            **versions("torch", "diffusers", "transformers", "accelerate", "peft")}
