"""The denoising-MDP trainer: DDPO / GRPO with pluggable step-level credit, in one loop.

Each epoch:
    1. SAMPLING   every process samples `batch_size x num_batches_per_epoch` trajectories (K per prompt),
                  recording x_t, x_{t-1}, t, log pi_old and the predicted x0 at every step; rewards of
                  batch i are scored in a worker thread while batch i+1 is sampled.
    2. ADVANTAGES rewards, prompts and similarity curves are gathered from all processes; per-prompt
                  standardisation (stage 1), then the credit assigner turns them into per-step
                  advantages [N, T] in true sampling order; each process takes back its own rows.
    3. TRAINING   inner PPO epochs over (sample, step) pairs: shuffle samples, choose and shuffle steps
                  per sample (the step advantages ride the same permutation), recompute log pi_theta of
                  the stored transitions, clipped surrogate, accumulate over steps and micro-batches,
                  clip the gradient norm, AdamW step. Non-finite steps are skipped on all ranks.
    4. LOGGING / CHECKPOINT.

Launch with `drl train` (one process) or `accelerate launch -m diffusion_rl.cli train ...`.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import gather_object, set_seed
from diffusers.optimization import get_scheduler
from PIL import Image
from tqdm.auto import tqdm

import rewards
from diffusion_rl import checkpoint, credit, grpo, tb
from diffusion_rl.config import RunConfig, dump_config
from diffusion_rl.evaluation import eval_prompts_from, evaluate
from diffusion_rl.models import (
    load_pipeline,
    prepare_trainable_unet,
    save_trained_weights,
    set_attention_backend,
)
from diffusion_rl.prompts import PromptSampler, load_prompts
from diffusion_rl.sampling import Trajectories, recompute_log_prob, sample_trajectories
from diffusion_rl.tb import image_grid, side_by_side


class NonFiniteTrainingError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class ResumeError(RuntimeError):
    """The checkpoint does not fit the current configuration."""


@dataclass
class TrainResult:
    output_dir: Path
    history: list[dict] = field(default_factory=list)  # one metrics dict per epoch run in this call
    weights_dir: Path | None = None
    eval_before: dict | None = None
    eval_after: dict | None = None
    pipeline: object | None = None  # the StableDiffusionPipeline with the trained UNet, ready to sample
    process_index: int = 0


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers: independent streams per (seed, epoch, rank, batch, sample)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFF)) * 1099511628211) & ((1 << 63) - 1)
    return h


# Fields a resumed run may change freely; any other difference is reported (model fields are errors).
_RESUME_FREE = ("num_epochs", "output_dir", "logging", "checkpoint", "eval")


def _check_resume_config(saved: dict, current: RunConfig) -> list[str]:
    now = current.model_dump(mode="json")
    changed = [k for k in now if k not in _RESUME_FREE and now[k] != saved.get(k)]
    if "model" in changed:
        raise ResumeError(
            f"model settings differ from the checkpoint's ({saved.get('model')} vs {now['model']}); "
            "the saved weights do not fit. Resume with the checkpoint's model settings."
        )
    return changed


def training_view(
    samples: Trajectories, step_adv: torch.Tensor, k: int, selection: str, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Shuffle samples, then choose and shuffle k steps per sample. Everything indexed by (sample, step)
    moves together, so each trained pair keeps its own latents, timestep, old log-prob and advantage.

    step_adv [N, T] is in true sampling order; returns tensors [N, k, ...] plus `perm` [N], `steps` [N, k].
    """
    n = len(samples)
    perm = torch.randperm(n, generator=generator)  # [N] shuffle samples
    steps = credit.select_steps(step_adv[perm], k, selection, generator)  # [N, k] true step indices, shuffled
    rows = perm[:, None]
    return {
        "perm": perm,
        "steps": steps,
        "latents": samples.latents[rows, steps],  # [N, k, C, h, w]
        "next_latents": samples.next_latents[rows, steps],
        "timesteps": samples.timesteps[rows, steps],  # [N, k]
        "log_probs": samples.log_probs[rows, steps],
        "advantages": step_adv[rows, steps],
        "prompt_embeds": samples.prompt_embeds[perm],  # [N, L, D]
        "negative_embeds": samples.negative_embeds[perm],
    }


def train(
    cfg: RunConfig,
    reward_fn: Callable | None = None,
    credit_fn: Callable | None = None,
    resume: str | None = None,
    eval_before: dict | None = None,
) -> TrainResult:
    """Run `cfg`. `reward_fn(images, prompts, metadata) -> (scores, info)` and `credit_fn(ctx) -> [N, T]`
    override the configured reward and credit assigner (the Python API for reward-shaping experiments).
    `eval_before` is a result of the before-training evaluation that is already known (for instance from an
    earlier run of a sweep with the same model, eval and sampling settings: the untrained model is the base
    model whatever the seed); it is logged as given, and no before-grid is drawn."""
    out = Path(cfg.output_dir)
    T = cfg.sample.num_steps
    k_train = cfg.num_train_timesteps()
    # accelerate keeps one process-wide state; each train() call configures it afresh (sweeps in one
    # process may change mixed precision), keeping the distributed process group (PartialState).
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        # Without CUDA, a multi-process launch (torchrun / accelerate launch --multi_gpu) runs gloo on the CPU.
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps * k_train,
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    set_seed(cfg.seed, device_specific=True)
    torch.backends.cuda.matmul.allow_tf32 = True

    # ---------------------------------------------------------------- model, optimizer
    pipe = load_pipeline(
        cfg.model.pretrained, cfg.model.revision, cfg.model.dtype, cfg.model.local_files_only, cfg.model.seed
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.to(accelerator.device)
    set_attention_backend(pipe.unet, cfg.model.attention)
    params = prepare_trainable_unet(
        pipe, cfg.model.use_lora, cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_target_modules
    )
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.train.learning_rate,
        betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
        weight_decay=cfg.train.adam_weight_decay,
        eps=cfg.train.adam_epsilon,
    )
    # Prepare the module that owns the LoRA parameters *and* runs the forward, so DDP syncs them.
    unet, optimizer = accelerator.prepare(pipe.unet, optimizer)
    # Not handed to accelerate (whose wrapper steps it once per process): the lr is a function of the global
    # step, stepped after each optimizer step and fast-forwarded on resume.
    lr_scheduler = get_scheduler(
        "constant_with_warmup" if cfg.train.lr_schedule == "constant" else cfg.train.lr_schedule,
        optimizer,
        num_warmup_steps=cfg.train.lr_warmup_steps,
        num_training_steps=cfg.num_optimizer_steps(),
    )

    # ---------------------------------------------------------------- reward, credit, prompts, trackers
    if reward_fn is None:
        reward_fn = _load_reward(cfg)
    elif not isinstance(reward_fn, rewards.RewardFn):
        reward_fn = rewards.CallableReward(getattr(reward_fn, "__name__", "custom_reward"), reward_fn)
    assigner = (
        credit.as_credit_assigner(credit_fn)
        if credit_fn is not None
        else credit.make_credit(cfg.credit.kind, **_credit_options(cfg))
    )
    prompt_set = load_prompts(cfg.prompts)
    sampler = PromptSampler(prompt_set, cfg.seed, world, rank)
    adv_cfg = cfg.advantage
    component_weights = dict(getattr(reward_fn, "weights", {})) if cfg.reward.combine == "advantage" else {}
    trackers = {
        name: grpo.PerPromptStatTracker(adv_cfg.buffer_size, adv_cfg.min_count, adv_cfg.scale_std)
        for name in (component_weights or {"reward": 1.0})
    }

    # ---------------------------------------------------------------- resume
    start_epoch, global_step, skipped_total = 0, 0, 0
    if resume:
        ckpt = checkpoint.find_checkpoint(resume, out)
        state = checkpoint.load_trainer_state(ckpt)
        if state["world_size"] != world:
            raise ResumeError(
                f"checkpoint {ckpt} was written by {state['world_size']} process(es), this run has {world}; "
                "resume with the same number of processes (the batch geometry depends on it)"
            )
        changed = _check_resume_config(state["config"], cfg)
        if changed and main:
            print(f"[drl] warning: resuming with changed settings in {changed}; the config file value is used")
        accelerator.load_state(str(ckpt))
        for name, tracker in trackers.items():
            tracker.load_state_dict(state["trackers"][name])
        if hasattr(assigner, "load_state_dict") and state.get("credit") is not None:
            assigner.load_state_dict(state["credit"])
        sampler.load_state_dict(state["prompt_sampler"])
        start_epoch, global_step, skipped_total = state["epochs_done"], state["global_step"], state["nonfinite_skipped"]
        with warnings.catch_warnings():  # torch warns of a scheduler step before any optimizer step
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(global_step):
                lr_scheduler.step()
        if main:
            print(f"[drl] resumed from {ckpt} at epoch {start_epoch}, global step {global_step}")

    # ---------------------------------------------------------------- start-up summary
    geo = cfg.geometry(world)
    writer = tb.Writer(out / "tensorboard") if main else None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(cfg))
        trainable = sum(p.numel() for p in params)
        print(f"[drl] run directory: {out.resolve()}")
        print(
            f"[drl] {world} process(es) | samples/epoch {geo['samples_per_epoch']} "
            f"({geo['prompts_per_epoch']} prompts x {cfg.sample.images_per_prompt}) | trained steps/trajectory "
            f"{k_train}/{T} | updates/epoch {geo['updates_per_epoch']} | effective batch "
            f"{geo['effective_batch_trajectories']} trajectories = {geo['effective_batch_transitions']} transitions"
        )
        print(
            f"[drl] model {cfg.model.pretrained} | {'LoRA r=' + str(cfg.model.lora_rank) if cfg.model.use_lora else 'full UNet'} "
            f"| {trainable:,} trainable params | reward {reward_fn.name} | credit {getattr(assigner, 'name', 'custom')}"
        )
        writer.hparams(cfg, geo)

    result = TrainResult(output_dir=out, process_index=rank)
    eval_reward = _load_eval_reward(cfg, reward_fn)
    if cfg.eval.prompts and start_epoch == 0:
        result.eval_before = (
            dict(eval_before) if eval_before is not None
            else _evaluate(cfg, pipe, unet, eval_reward, out if main else None, "before")
        )
        if main:
            writer.scalars("eval", result.eval_before, 0)
            print(f"[drl] eval before training: {eval_reward.name} = {result.eval_before['mean']:.4f}")

    scorer = rewards.AsyncScorer(reward_fn) if cfg.reward.overlap else None
    consecutive_bad = 0
    autocast = accelerator.autocast
    for epoch in range(start_epoch, cfg.num_epochs):
        t_epoch = time.perf_counter()
        # ============================================================ 1. SAMPLING
        unet.eval()
        K = cfg.sample.images_per_prompt
        batches = sampler.epoch_indices(epoch, cfg.sample.num_batches_per_epoch, cfg.sample.batch_size // K)
        trajs, pending, prompts_local, meta_local = [], [], [], []
        for b, idx in enumerate(tqdm(batches, desc=f"epoch {epoch} sampling", disable=not main, leave=False)):
            prompts = [prompt_set.prompts[i] for i in idx for _ in range(K)]  # K consecutive samples per prompt
            metadata = [prompt_set.metadata[i] for i in idx for _ in range(K)]
            gens = [
                torch.Generator().manual_seed(_seed(cfg.seed, epoch, rank, b, j)) for j in range(len(prompts))
            ]
            traj = sample_trajectories(
                pipe, unet, prompts, gens, T, cfg.sample.guidance_scale, cfg.sample.eta,
                cfg.sample.negative_prompt, autocast=autocast,
            )
            images = traj.images.cpu()
            # Score in the worker thread while the next batch samples (or right away when overlap is off).
            pending.append(scorer.submit(images, prompts, metadata) if scorer else reward_fn(images, prompts, metadata))
            trajs.append(traj)
            prompts_local += prompts
            meta_local += metadata
        t_sampled = time.perf_counter()
        scored = [p.result() if scorer else p for p in pending]
        t_scored = time.perf_counter()
        samples = Trajectories.cat(trajs)  # local, N = batch_size * num_batches
        N = len(samples)
        rewards_local = torch.cat([s for s, _ in scored]).float()  # [N]

        # ============================================================ 2. ADVANTAGES (over all processes)
        dev = accelerator.device
        rewards_all = accelerator.gather(rewards_local.to(dev)).cpu()  # [N * world], process order
        prompts_all = gather_object(prompts_local)
        valid = torch.isfinite(rewards_all)
        n_bad = int((~valid).sum())
        if n_bad and cfg.reward.nonfinite == "error":
            bad = [prompts_all[i] for i in torch.nonzero(~valid).flatten().tolist()[:3]]
            raise rewards.RewardError(
                f"reward {reward_fn.name!r} returned {n_bad} non-finite score(s) in epoch {epoch} "
                f"(e.g. for prompts {bad}); fix the reward or set reward.nonfinite=mask to skip such samples"
            )
        if n_bad / len(valid) > cfg.reward.max_unscorable_fraction:
            raise rewards.RewardError(
                f"reward {reward_fn.name!r}: {n_bad}/{len(valid)} samples unscorable in epoch {epoch}, more than "
                f"reward.max_unscorable_fraction={cfg.reward.max_unscorable_fraction}"
            )
        components_all = {  # multi-reward: each component's raw scores over all processes
            name: accelerator.gather(torch.cat([i["components"][name] for _, i in scored]).float().to(dev)).cpu()
            for name in scored[0][1].get("components") or {}
        }
        if component_weights:  # advantage-level combination: normalise each reward, then weight
            adv = sum(
                w * trackers[n].update(prompts_all, torch.where(valid, components_all[n], torch.nan))
                for n, w in component_weights.items()
            )
        elif adv_cfg.per_prompt_stat_tracking:
            adv = trackers["reward"].update(prompts_all, rewards_all)
        else:
            adv = grpo.batch_advantages(rewards_all, scale_std=adv_cfg.scale_std)
        adv = grpo.clip_advantages(torch.where(valid, adv, 0.0), adv_cfg.clip)  # [N * world]
        ctx = credit.CreditContext(
            advantages=adv,
            similarities=accelerator.gather(samples.similarities.to(dev)).cpu(),  # [N * world, T+1]
            timesteps=accelerator.gather(samples.timesteps.to(dev)).cpu(),
            prompts=prompts_all,
            valid=valid,
        )
        cres = assigner(ctx)
        step_adv = cres.step_advantages.reshape(world, N, T)[rank]  # [N, T] this process's rows, true order

        # ============================================================ 3. TRAINING
        unet.train()
        sums: dict[str, float] = {}
        n_micro = 0
        # the trainable steps are the first T - skip_final_steps; training_view keeps true step indices
        trainable_adv = step_adv[:, : T - cfg.train.skip_final_steps]  # [N, T - skip]
        for inner in range(cfg.train.num_inner_epochs):
            g = torch.Generator().manual_seed(_seed(cfg.seed, epoch, rank, 1_000_000 + inner))
            view = training_view(samples, trainable_adv, k_train, cfg.train.timestep_selection, g)
            lat, nxt, ts, old_lp, a = view["latents"], view["next_latents"], view["timesteps"], view["log_probs"], view["advantages"]
            pe, ne = view["prompt_embeds"], view["negative_embeds"]
            for b0 in tqdm(range(0, N, cfg.train.batch_size), desc=f"epoch {epoch} training", disable=not main, leave=False):
                mb = slice(b0, b0 + cfg.train.batch_size)
                for j in range(k_train):
                    with accelerator.accumulate(unet):
                        with autocast():
                            out_step = recompute_log_prob(
                                pipe, unet, lat[mb, j], nxt[mb, j], ts[mb, j], pe[mb], ne[mb],
                                cfg.sample.guidance_scale, cfg.sample.eta,
                            )
                        logp_ref = _reference_log_prob(cfg, pipe, lat[mb, j], nxt[mb, j], ts[mb, j], pe[mb], ne[mb])
                        loss, metrics = grpo.policy_loss(
                            out_step.log_prob[:, None],  # [b, 1]
                            old_lp[mb, j][:, None].to(dev),
                            a[mb, j][:, None].to(dev),
                            clip_low=cfg.train.clip_range,
                            clip_high=cfg.train.clip_range_high or cfg.train.clip_range,
                            adv_clip=adv_cfg.clip,
                            aggregation=cfg.train.loss_aggregation,
                            constant_divisor=float(cfg.train.batch_size) if cfg.train.loss_aggregation == "constant" else None,
                            logp_ref=logp_ref,
                            kl_coef=cfg.train.kl_coef,
                            kl_estimator=cfg.train.kl_estimator,
                        )
                        accelerator.backward(loss)
                        for key, v in metrics.items():
                            sums[key] = sums.get(key, 0.0) + float(v)
                        n_micro += 1
                        if accelerator.sync_gradients:
                            grad_norm = accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
                            # Decide on all ranks together: any non-finite loss or gradient skips the step.
                            bad = torch.tensor(
                                [float(not (math.isfinite(loss.item()) and math.isfinite(float(grad_norm))))], device=dev
                            )
                            if accelerator.reduce(bad, reduction="sum").item() > 0:
                                skipped_total += 1
                                consecutive_bad += 1
                                if consecutive_bad >= cfg.train.max_consecutive_nonfinite:
                                    raise NonFiniteTrainingError(
                                        f"{consecutive_bad} optimizer steps in a row had a non-finite loss or gradient "
                                        f"(epoch {epoch}, global step {global_step}); lower train.learning_rate or "
                                        "train.max_grad_norm, or check the reward for inf values"
                                    )
                            else:
                                optimizer.step()
                                if not all(torch.isfinite(p).all() for p in params):
                                    raise NonFiniteTrainingError(
                                        f"trainable parameters became non-finite at global step {global_step} "
                                        f"(epoch {epoch}); lower train.learning_rate"
                                    )
                                lr_scheduler.step()
                                global_step += 1
                                consecutive_bad = 0
                                sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm)
                                sums["updates"] = sums.get("updates", 0.0) + 1
                            optimizer.zero_grad(set_to_none=True)
        t_trained = time.perf_counter()

        # ============================================================ 4. LOGGING, EVAL, CHECKPOINT
        n_updates = max(sums.pop("updates", 0.0), 1.0)
        finite_rewards = rewards_all[valid]
        record = {
            "epoch": epoch,
            "global_step": global_step,
            "reward/mean": float(finite_rewards.mean()) if len(finite_rewards) else float("nan"),
            "reward/std": float(finite_rewards.std()) if len(finite_rewards) > 1 else 0.0,
            "reward/unscorable": n_bad,
            "reward/frac_zero_std_groups": _frac_zero_std(prompts_all, rewards_all),
            "loss/grad_norm": sums.pop("grad_norm", 0.0) / n_updates,
            "loss/learning_rate": lr_scheduler.get_last_lr()[0],  # after the epoch's last update
            **{f"loss/{k}": v / max(n_micro, 1) for k, v in sums.items()},
            "loss/nonfinite_skipped_total": skipped_total,
            "credit/steps_trained_per_trajectory": k_train,
            "credit/steps_skipped_per_trajectory": T - k_train,
            **{f"credit/share_{k}": v for k, v in credit.credit_shares(cres.contributions).items()},
            "perf/sample_s": t_sampled - t_epoch,
            "perf/reward_wait_s": t_scored - t_sampled,
            "perf/train_s": t_trained - t_scored,
            "perf/epoch_s": t_trained - t_epoch,
            "perf/samples_per_s": N * world / max(t_trained - t_epoch, 1e-9),
        }
        for name, comp in components_all.items():
            record[f"reward/{name}"] = float(comp[valid].nanmean())
        if cfg.eval.prompts and cfg.eval.every and (epoch + 1) % cfg.eval.every == 0 and epoch + 1 < cfg.num_epochs:
            ev = _evaluate(cfg, pipe, unet, eval_reward)
            record.update({f"eval/{k}": v for k, v in ev.items()})
        if main:
            writer.epoch(record, epoch + 1)
            writer.credit(cres, ctx.similarities, epoch + 1)
            if cfg.logging.image_every and (epoch + 1) % cfg.logging.image_every == 0:
                writer.images(samples.images[: cfg.logging.num_images], prompts_local, out / "images", epoch + 1)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            _append_credit_profile(out, epoch, cres)
            print(
                f"[drl] epoch {epoch}: reward {record['reward/mean']:.4f} +- {record['reward/std']:.4f} | "
                f"clipfrac {record.get('loss/clipfrac', 0):.3f} | approx_kl {record.get('loss/approx_kl', 0):.2e} | "
                f"{record['perf/epoch_s']:.1f} s"
            )
        result.history.append(record)
        last = epoch + 1 == cfg.num_epochs
        if (cfg.checkpoint.every and (epoch + 1) % cfg.checkpoint.every == 0) or last:
            state = {
                "epochs_done": epoch + 1,
                "global_step": global_step,
                "nonfinite_skipped": skipped_total,
                "world_size": world,
                "trackers": {n: t.state_dict() for n, t in trackers.items()},
                "credit": assigner.state_dict() if hasattr(assigner, "state_dict") else None,
                "prompt_sampler": sampler.state_dict(),
                "config": cfg.model_dump(mode="json"),
                "config_hash": cfg.hash(),
                "versions": _versions(),
            }
            checkpoint.save(accelerator, out / "checkpoints", epoch + 1, state, dump_config(cfg), cfg.checkpoint.keep_last)

    if scorer:
        scorer.close()
    if cfg.eval.prompts:
        result.eval_after = _evaluate(cfg, pipe, unet, eval_reward, out if main else None, "after")
        if main:
            writer.scalars("eval", result.eval_after, cfg.num_epochs)
            print(f"[drl] eval after training: {eval_reward.name} = {result.eval_after['mean']:.4f}")
            if result.eval_before is not None and (out / "images" / "eval_before.png").exists():
                _before_after_figure(out, eval_reward.name, result.eval_before, result.eval_after)
    accelerator.wait_for_everyone()
    if main:
        raw = accelerator.unwrap_model(unet)
        result.weights_dir = save_trained_weights(raw, cfg.model.use_lora, out / ("lora" if cfg.model.use_lora else "."))
        writer.close()
        print(f"[drl] done. weights: {result.weights_dir} | TensorBoard: tensorboard --logdir {out / 'tensorboard'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    result.pipeline = pipe
    return result


# ------------------------------------------------------------------------------------------------
# helpers (small, single use)
# ------------------------------------------------------------------------------------------------


def _load_reward(cfg: RunConfig) -> rewards.RewardFn:
    r = cfg.reward
    if r.components:
        specs = [{"name": c.name, "weight": c.weight, **({"label": c.label} if c.label else {}), **c.options} for c in r.components]
        return rewards.load_multi(specs, mode=r.combine)
    return rewards.load(r.name, **r.options)


def _load_eval_reward(cfg: RunConfig, train_reward: rewards.RewardFn) -> rewards.RewardFn:
    if cfg.eval.reward and cfg.eval.reward != train_reward.name:
        return rewards.load(cfg.eval.reward)
    return train_reward


def _credit_options(cfg: RunConfig) -> dict:
    c = cfg.credit
    if c.kind != "coca":
        return {}
    return {
        "window": c.window, "alpha": c.alpha, "stage2": c.stage2,
        "buffer_size": c.buffer_size, "min_count": c.min_count, "adv_clip": cfg.advantage.clip,
    }


def _reference_log_prob(cfg, pipe, lat, nxt, ts, pe, ne) -> torch.Tensor | None:
    """log pi_ref of the stored transition under the UNet with LoRA disabled (no second UNet in memory)."""
    if cfg.train.kl_coef == 0:
        return None
    with torch.no_grad():
        pipe.unet.disable_adapters()
        try:
            ref = recompute_log_prob(pipe, pipe.unet, lat, nxt, ts, pe, ne, cfg.sample.guidance_scale, cfg.sample.eta)
        finally:
            pipe.unet.enable_adapters()
    return ref.log_prob[:, None]


def _evaluate(cfg: RunConfig, pipe, unet, reward_fn, out: Path | None = None, tag: str = "") -> dict:
    """Fixed-seed sampling on the held-out prompts (diffusion_rl.evaluation); optionally saves a grid."""
    prompts = cfg.eval.prompts if isinstance(cfg.eval.prompts, list) else eval_prompts_from(cfg.eval.prompts)
    results, images, _ = evaluate(
        pipe, unet, prompts, [reward_fn], cfg.eval.seed, cfg.eval.images_per_prompt, cfg.sample.num_steps,
        cfg.sample.guidance_scale, cfg.sample.eta, max(cfg.sample.batch_size, 16), cfg.sample.negative_prompt,
    )
    if out is not None:
        (out / "images").mkdir(parents=True, exist_ok=True)
        image_grid(images[:64], nrow=8).save(out / "images" / f"eval_{tag}.png")
    return results[reward_fn.name]


def _before_after_figure(out: Path, reward_name: str, before: dict, after: dict) -> None:
    """images/eval_before_after.png: the two eval grids (same prompts, same seeds) side by side, scores on top."""
    panels = [(f"{tag}: {reward_name} {ev['mean']:.3f}", Image.open(out / "images" / f"eval_{tag}.png"))
              for tag, ev in (("before", before), ("after", after))]
    side_by_side(panels).save(out / "images" / "eval_before_after.png")
    print(f"[drl] before/after eval images: {out / 'images' / 'eval_before_after.png'}")


def _frac_zero_std(prompts: list[str], values: torch.Tensor) -> float:
    """Share of prompt groups whose rewards are all equal (they carry no learning signal)."""
    groups: dict[str, list[float]] = {}
    for p, v in zip(prompts, values.tolist(), strict=True):
        groups.setdefault(p, []).append(v)
    flat = [g for g in groups.values() if len(g) > 1 and max(g) - min(g) < 1e-12]
    return len(flat) / max(len(groups), 1)


def _append_credit_profile(out: Path, epoch: int, cres) -> None:
    row = {
        "epoch": epoch,
        "mean_contribution": cres.contributions.mean(0).tolist(),
        "mean_abs_step_advantage": cres.step_advantages.abs().mean(0).tolist(),
        "info": {k: v for k, v in cres.info.items() if isinstance(v, (int, float, str))},
    }
    with open(out / "credit_profile.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def _versions() -> dict:
    import accelerate
    import diffusers
    import peft
    import transformers

    import diffusion_rl

    return {
        "drl": diffusion_rl.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "accelerate": accelerate.__version__, "peft": peft.__version__,
    }
