"""The diffusion trainer's typed run configuration (`RunConfig`) and its cross-field rules.

The machinery (strict sections, YAML, `--set` overrides, one error listing every problem, field docs) and the
sections both trainers share (reward, advantage, checkpoint) live in `diffusion_rl.core.config`; this module
adds the diffusion sections and rules. Every field has a docstring (`drl config show --doc`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from diffusion_rl.core import config as core_config
from diffusion_rl.core.config import (  # noqa: F401  (re-exported: the names users import from here)
    AdvantageConfig,
    CheckpointConfig,
    ConfigError,
    MixedPrecision,
    RewardComponent,
    RewardConfig,
    apply_overrides,
    parse_override,
    read_yaml,
)
from diffusion_rl.core.config import Section as _Section


class ModelConfig(_Section):
    pretrained: str = "builtin:tiny-random"
    """A StableDiffusion (1.x/2.x), StableDiffusionXL, StableDiffusion3 (3 / 3.5) or Flux (FLUX.1) pipeline: a hub id
    (e.g. `runwayml/stable-diffusion-v1-5`, `stabilityai/stable-diffusion-3.5-medium`), a local directory holding
    `model_index.json` (the family follows its `_class_name`: SD and SDXL train on the DDIM MDP, SD3 and FLUX on
    the rectified-flow SDE MDP), `builtin:tiny-random` / `tiny-random-sdxl` / `tiny-random-sd3` / `tiny-random-flux`
    (tiny randomly initialised pipelines built offline), or the shipped shapes-world models `builtin:tiny-shapes`
    (DDIM UNet) and `builtin:tiny-shapes-flow` (rectified-flow SD3-style transformer)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load; pin it for reproducibility."""
    local_files_only: bool = False
    """Never contact the hub; load only from the local cache or directory."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Dtype of the frozen weights (UNet base, VAE, text encoder). Trainable parameters are always fp32."""
    use_lora: bool = True
    """Train LoRA adapters (peft) on the denoiser (UNet or transformer); false fine-tunes all of it."""
    lora_rank: int = Field(4, ge=1)
    """LoRA rank r."""
    lora_alpha: float = Field(4.0, gt=0)
    """LoRA alpha (scale = alpha / r)."""
    lora_target_modules: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]
    """Denoiser module names that receive LoRA adapters (attention projections by default; on SD3 / FLUX add
    add_q_proj, add_k_proj, add_v_proj, to_add_out for the text stream)."""
    text_encoder_lora_rank: int = Field(0, ge=0)
    """LoRA rank on the text encoder's attention and MLP layers (q/k/v/out projections, fc1, fc2), trained with the
    denoiser's LoRA; 0 = the text encoder stays frozen. SD 1.x / 2.x models."""
    text_encoder_lora_alpha: float | None = Field(None, gt=0)
    """The text encoder's LoRA alpha (scale = alpha / r); null = its rank (scale 1)."""
    attention: Literal["sdpa", "xformers"] = "sdpa"
    """Attention kernel: PyTorch scaled-dot-product attention, or xformers (CUDA with xformers installed only)."""
    max_sequence_length: int | None = Field(None, ge=1)
    """T5 tokens per prompt for SD3 / FLUX (the pipelines' max_sequence_length); None = what a built-in model was
    trained with, else the pipeline's default (SD3 256, FLUX 512)."""
    gradient_checkpointing: bool = False
    """Recompute the denoiser's activations in the backward pass (large transformers; ~30 % more compute)."""
    seed: int = 0
    """Seed of the weights of `builtin:tiny-random*` (ignored for other models)."""


class SampleConfig(_Section):
    num_steps: int = Field(10, ge=1)
    """DDIM sampling steps T per trajectory (the MDP horizon)."""
    guidance_scale: float = Field(5.0, ge=1.0)
    """Classifier-free guidance weight w (1 disables guidance); also used when recomputing log-probs."""
    eta: float = Field(1.0, gt=0)
    """DDIM eta (SD, SDXL); must be > 0 so each step is a Gaussian policy with a finite log-probability."""
    noise_level: float = Field(0.7, gt=0)
    """Flow models (SD3, FLUX): the SDE noise level a of Flow-GRPO's step, sigma_t = a sqrt(t / (1 - t))."""
    sde_window_size: int | None = Field(None, ge=1)
    """Flow models: only this many consecutive steps are SDE steps (sampled and trained), ODE elsewhere
    (Flow-GRPO-Fast / MixGRPO); None = every step is an SDE step."""
    sde_window_range: tuple[int, int] | None = None
    """Flow models with sde_window_size: the window starts at a step drawn each epoch from [lo, hi - size]
    (seeded, the same on every process); None = (0, num_steps)."""
    timestep_shift: float | None = Field(None, gt=0)
    """Flow models: the static timestep shift of the scheduler (SD3 ships 3.0); None = the pipeline's own. FLUX
    shifts by resolution and rejects an override."""
    batch_size: int = Field(8, ge=1)
    """Trajectories sampled per process per sampling batch."""
    num_batches_per_epoch: int = Field(2, ge=1)
    """Sampling batches per process per epoch."""
    images_per_prompt: int = Field(4, ge=1)
    """K: trajectories per prompt within a batch (the group used for per-prompt statistics)."""
    negative_prompt: str = ""
    """Negative prompt for classifier-free guidance."""


class PromptsConfig(_Section):
    source: Literal["list", "file", "dataset", "world"] = "list"
    """Where prompts come from: the `prompts` list, a text/JSONL `path`, a `datasets` dataset, or the embedded
    shapes world's `split` (train or eval)."""
    prompts: list[str] = ["a photo of a cat", "a photo of a dog", "a red apple", "a blue car"]
    """Prompts used when source = list."""
    path: str | None = None
    """Text file (one prompt per line) or JSONL file (objects with a `prompt` key; other keys become metadata)."""
    dataset: str | None = None
    """`datasets` hub id or local path (a saved dataset or a data file) when source = dataset."""
    split: str = "train"
    """Dataset split (for source = world: train or eval)."""
    column: str = "prompt"
    """Dataset column holding the prompt text."""


class CreditConfig(_Section):
    kind: Literal["sparse", "uniform", "coca"] = "sparse"
    """Step-level credit: sparse (DDPO, same advantage at every step), uniform (reward-to-go of 1/T by true step)
    or coca (cosine of each step's predicted x0 with the final latent decides each step's share)."""
    window: int = Field(5, ge=1)
    """CoCA smoothing window w; must divide sample.num_steps."""
    alpha: float = Field(0.0, ge=0, le=1)
    """CoCA blend: R = A * (alpha + (1 - alpha) * reward_to_go); 1 = sparse, 0 = pure CoCA."""
    stage2: Literal["paper", "batch", "running", "global", "none"] = "paper"
    """CoCA second standardisation of the step returns: per prompt with the published statistics (paper), the current
    batch (batch) or the whole buffer (running); over the whole batch's step-return matrix (global: what the published
    code does when per-prompt tracking is off, so it is the mode to pair with advantage.per_prompt_stat_tracking=false);
    or none."""
    buffer_size: int = Field(32, ge=1)
    """CoCA stage-2 buffer length per prompt."""
    min_count: int = Field(16, ge=1)
    """CoCA stage-2 entries needed before per-prompt statistics replace batch statistics."""


class TrainConfig(_Section):
    batch_size: int = Field(4, ge=1)
    """Trajectories per training micro-batch per process."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Training micro-batches accumulated per optimizer step (each spans all trained timesteps)."""
    num_inner_epochs: int = Field(1, ge=1)
    """PPO passes over each epoch's samples."""
    timestep_fraction: float = Field(1.0, gt=0, le=1)
    """Fraction of the T steps trained per trajectory."""
    timestep_selection: Literal["all", "random", "credit"] = "all"
    """Which steps are trained: all, a random subset (timestep_fraction), or the steps holding the most credit."""
    skip_final_steps: int = Field(0, ge=0)
    """Last denoising steps that are never trained (their credit still counts). DDIM's final step has a tiny std
    (0.03 against 0.2-0.5 for the others at 10 steps), so its log-prob gradient is ~15x larger than any other
    step's while it carries almost no reward signal: left in, it swamps the update (docs/credit_efficiency.md)."""
    learning_rate: float = Field(3e-4, gt=0)
    """AdamW learning rate (the peak, when lr_schedule is not constant)."""
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate schedule over the run's optimizer steps (diffusers.optimization.get_scheduler): constant, or
    decay to 0 by the last step along a half cosine or a straight line. A function of the global step, so a resumed
    run continues on the same curve."""
    lr_warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warm-up from 0 to learning_rate at the start of the schedule."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_weight_decay: float = 1e-4
    """AdamW weight decay."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Clip the total gradient norm before each optimizer step."""
    clip_range: float = Field(1e-4, gt=0)
    """PPO clip: ratio kept in [1 - clip_range, 1 + clip_range_high]; the ratio is of mean-over-dims log-probs."""
    clip_range_high: float | None = Field(None, gt=0)
    """Upper clip range (defaults to clip_range)."""
    loss_aggregation: Literal["seq_mean", "token_mean", "constant"] = "token_mean"
    """How per-step losses are averaged (see diffusion_rl.grpo.policy_loss)."""
    guidance_scale: float | None = Field(None, ge=1.0)
    """Classifier-free guidance when recomputing log-probs for training; None = sample.guidance_scale (on-policy).
    1 trains the conditional model alone while sampling with guidance (Flow-GRPO's CFG-free training): the ratio
    then starts away from 1, so pair it with a wider clip_range."""
    kl_coef: float = Field(0.0, ge=0)
    """Weight of a KL penalty to the reference (the UNet with LoRA disabled); needs use_lora."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator for the penalty."""
    mixed_precision: MixedPrecision = "no"
    """accelerate mixed precision for the UNet forward (no, fp16 or bf16; a bare YAML `no` is accepted); log-probs,
    credit and losses stay fp32. fp16 uses a gradient scaler: an overflowing step is skipped and the scale backs off."""
    ema: bool = False
    """Keep an exponential moving average of the trainable weights (Flow-GRPO keeps one) and use it for evaluation
    and for the saved weights; sampling for training always uses the live weights. Checkpointed, resume-exact."""
    ema_decay: float = Field(0.9, ge=0, lt=1)
    """EMA decay per optimizer step: ema = decay * ema + (1 - decay) * weights."""
    max_consecutive_nonfinite: int = Field(3, ge=1)
    """Abort after this many optimizer steps in a row skipped for a non-finite loss or gradient (fp16 gradient-scaler
    overflows with a finite loss back the scale off instead and count only once the scale has fallen below 1)."""


class LoggingConfig(_Section):
    image_every: int = Field(1, ge=0)
    """Write a grid of sampled images to TensorBoard every N epochs (0 = never)."""
    num_images: int = Field(8, ge=1)
    """Images in that grid."""


class EvalConfig(_Section):
    every: int = Field(0, ge=0)
    """Evaluate every N epochs (0 = only before and after training; no evaluation at all while eval.prompts is empty)."""
    prompts: list[str] | str = []
    """Held-out prompts: a list, a .txt/.jsonl file, or `world:eval` (the shapes world's eval split); empty = no eval."""
    reward: RewardConfig | None = None
    """The reward the held-out images are scored with: a registered name, or {name, options} (the metric to
    report when training on a shaped reward); null = the training reward."""
    seed: int = 1234
    """Evaluation noise seed, independent of the training sampler."""
    images_per_prompt: int = Field(1, ge=1)
    """Samples per evaluation prompt."""


class ValidationConfig(_Section):
    """Best-of-run model selection. The model is scored on validation prompts every `every` epochs and after the
    last one; with keep_best, the weights that scored highest become the run's result (the after-training eval and
    the saved weights). The validation prompts must not include eval.prompts: the held-out eval stays unbiased."""

    prompts: list[str] | str = []
    """Validation prompts: a list, a .txt/.jsonl file, or `world:train`; empty = no validation."""
    num_prompts: int = Field(0, ge=0)
    """Score a fixed subset of this many prompts, drawn once with `seed` (0 = all of them)."""
    every: int = Field(3, ge=1)
    """Validate every N epochs, and always after the last epoch."""
    images_per_prompt: int = Field(2, ge=1)
    """Samples per validation prompt."""
    seed: int = 4321
    """Validation noise seed (and the subset's), independent of the training sampler and of eval.seed."""
    keep_best: bool = True
    """End the run with the best-scoring weights instead of the last ones (false: only log the validation score)."""


class RunConfig(_Section):
    """A full `drl train` run. Defaults are the embedded CPU default (tiny model, runs in seconds)."""

    seed: int = 42
    """Seed for prompts, noise and shuffles (combined with the process index)."""
    num_epochs: int = Field(2, ge=1)
    """Epochs: each samples trajectories, scores them and runs the inner PPO epochs."""
    output_dir: str = "runs/default"
    """Run directory: TensorBoard logs, images, checkpoints, final LoRA/UNet, resolved config."""
    model: ModelConfig = ModelConfig()
    sample: SampleConfig = SampleConfig()
    prompts: PromptsConfig = PromptsConfig()
    reward: RewardConfig = RewardConfig(name="jpeg_compressibility")
    advantage: AdvantageConfig = AdvantageConfig()
    credit: CreditConfig = CreditConfig()
    train: TrainConfig = TrainConfig()
    logging: LoggingConfig = LoggingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    validation: ValidationConfig = ValidationConfig()

    def num_train_timesteps(self) -> int:
        trainable = self.sample.sde_window_size or (self.sample.num_steps - self.train.skip_final_steps)
        return int(trainable * self.train.timestep_fraction)

    def num_optimizer_steps(self) -> int:
        """Optimizer steps in the whole run (the same on every process): the lr schedule's length."""
        return self.num_epochs * self.geometry(1)["updates_per_epoch"]

    def geometry(self, world_size: int) -> dict[str, int]:
        """Derived batch numbers, printed at start-up."""
        local = self.sample.batch_size * self.sample.num_batches_per_epoch
        per_update = self.train.batch_size * self.train.gradient_accumulation_steps
        return {
            "samples_per_epoch": local * world_size,
            "samples_per_epoch_per_process": local,
            "prompts_per_epoch": local * world_size // self.sample.images_per_prompt,
            "trained_steps_per_trajectory": self.num_train_timesteps(),
            "updates_per_epoch": self.train.num_inner_epochs * (local // per_update),
            "effective_batch_trajectories": per_update * world_size,
            "effective_batch_transitions": per_update * world_size * self.num_train_timesteps(),
        }

    def hash(self) -> str:
        return core_config.config_hash(self)


def cross_field_problems(cfg: RunConfig) -> list[str]:
    """Rules that involve several fields; each message names the values and the fix."""
    problems: list[str] = []
    s, t, c = cfg.sample, cfg.train, cfg.credit
    local = s.batch_size * s.num_batches_per_epoch
    per_update = t.batch_size * t.gradient_accumulation_steps
    if s.batch_size % s.images_per_prompt:
        problems.append(
            f"sample.batch_size ({s.batch_size}) must be divisible by sample.images_per_prompt "
            f"({s.images_per_prompt}) so every batch holds whole prompt groups; e.g. set sample.batch_size="
            f"{s.images_per_prompt * max(1, s.batch_size // s.images_per_prompt)}"
        )
    if local % per_update:
        problems.append(
            f"samples per process per epoch (sample.batch_size {s.batch_size} x sample.num_batches_per_epoch "
            f"{s.num_batches_per_epoch} = {local}) must be divisible by train.batch_size x "
            f"train.gradient_accumulation_steps ({t.batch_size} x {t.gradient_accumulation_steps} = {per_update})"
        )
    if t.batch_size > local:
        problems.append(f"train.batch_size ({t.batch_size}) exceeds the samples per process per epoch ({local})")
    if c.kind == "coca" and s.num_steps % c.window:
        problems.append(
            f"credit.window ({c.window}) must divide sample.num_steps ({s.num_steps}) for CoCA's window "
            f"smoothing; pick a divisor of {s.num_steps}, e.g. "
            f"{max(d for d in range(1, min(c.window, s.num_steps) + 1) if s.num_steps % d == 0)}"
        )
    if t.skip_final_steps >= s.num_steps:
        problems.append(
            f"train.skip_final_steps ({t.skip_final_steps}) leaves none of the sample.num_steps ({s.num_steps}) steps "
            f"to train; use at most {s.num_steps - 1}"
        )
    elif cfg.num_train_timesteps() < 1:
        problems.append(
            f"train.timestep_fraction ({t.timestep_fraction}) x sample.num_steps ({s.num_steps}) trains no step; "
            f"raise it to at least {1 / s.num_steps:.3g}"
        )
    if s.sde_window_size is not None:
        lo, hi = s.sde_window_range or (0, s.num_steps)
        if not 0 <= lo < hi <= s.num_steps or hi - lo < s.sde_window_size:
            problems.append(
                f"sample.sde_window_range {s.sde_window_range} must satisfy 0 <= lo < hi <= sample.num_steps "
                f"({s.num_steps}) with hi - lo >= sample.sde_window_size ({s.sde_window_size}); e.g. (0, {s.num_steps})"
            )
        if t.skip_final_steps:
            problems.append(f"train.skip_final_steps ({t.skip_final_steps}) with sample.sde_window_size: the window "
                            "alone decides the trained steps; set train.skip_final_steps=0")
    elif s.sde_window_range is not None:
        problems.append(f"sample.sde_window_range {s.sde_window_range} needs sample.sde_window_size")
    if t.timestep_selection == "all" and t.timestep_fraction != 1.0:
        problems.append(
            f"train.timestep_selection=all trains every step but train.timestep_fraction is {t.timestep_fraction}; "
            "set timestep_selection to random or credit, or timestep_fraction to 1.0"
        )
    total_updates = cfg.num_optimizer_steps()
    if t.lr_warmup_steps > total_updates:
        problems.append(
            f"train.lr_warmup_steps ({t.lr_warmup_steps}) exceeds the run's optimizer steps ({cfg.num_epochs} epochs "
            f"x {total_updates // cfg.num_epochs} updates = {total_updates}); use at most {total_updates}"
        )
    if t.kl_coef > 0 and not cfg.model.use_lora:
        problems.append("train.kl_coef > 0 needs model.use_lora=true (the reference is the denoiser with LoRA disabled)")
    if cfg.model.text_encoder_lora_rank and not cfg.model.use_lora:
        problems.append(f"model.text_encoder_lora_rank={cfg.model.text_encoder_lora_rank} needs model.use_lora=true "
                        "(the text encoder's adapter is saved beside the denoiser's LoRA); set it to 0 or use LoRA")
    if cfg.model.text_encoder_lora_rank and t.kl_coef > 0:
        problems.append(f"train.kl_coef={t.kl_coef} with model.text_encoder_lora_rank="
                        f"{cfg.model.text_encoder_lora_rank}: the KL reference does not switch off the text "
                        "encoder's adapter; set train.kl_coef=0 or model.text_encoder_lora_rank=0")
    if c.kind == "coca" and c.stage2 == "paper" and c.buffer_size % 2:
        problems.append(
            f"credit.buffer_size ({c.buffer_size}) must be even with credit.stage2=paper: the published buffer stores "
            f"(mean, std) array pairs; use {c.buffer_size + 1} (CoCA: 32)"
        )
    if c.kind == "coca" and not cfg.advantage.per_prompt_stat_tracking and c.stage2 in ("paper", "batch", "running"):
        problems.append(
            f"advantage.per_prompt_stat_tracking=false standardises stage 1 over the whole batch, but credit.stage2="
            f"{c.stage2} standardises the step returns per prompt; set credit.stage2=global (the published code's "
            "behaviour in that case) or none, or turn per-prompt tracking back on"
        )
    problems += core_config.reward_problems(cfg.reward) + core_config.advantage_problems(cfg.advantage)
    if cfg.eval.reward is not None:
        problems += [f"eval.{problem}" for problem in core_config.reward_problems(cfg.eval.reward)]
    p = cfg.prompts
    if p.source == "list" and not p.prompts:
        problems.append("prompts.prompts is empty; add prompts or use prompts.source=file/dataset")
    if p.source == "file" and not p.path:
        problems.append("prompts.source=file needs prompts.path (a .txt or .jsonl file)")
    if p.source == "dataset" and not p.dataset:
        problems.append("prompts.source=dataset needs prompts.dataset (a hub id or local path)")
    return problems


def build_config(raw: dict, source: str = "config") -> RunConfig:
    """Validate; field errors and cross-field errors are reported together in one ConfigError."""
    return core_config.build(RunConfig, raw, source, cross_field_problems)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Load a YAML config (or the embedded defaults when `path` is None) and apply `--set` overrides."""
    return core_config.load(RunConfig, path, overrides, cross_field_problems, paths_beside_file=("prompts.path",))


def dump_config(cfg: RunConfig) -> str:
    return core_config.dump(cfg)


def documented_fields(model=RunConfig, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted path, docstring) for every leaf field of the run config."""
    return core_config.documented_fields(model, prefix)
