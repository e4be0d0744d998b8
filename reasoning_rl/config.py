"""The reasoning trainer's typed run configuration (`ReasonConfig`) and its cross-field rules.

It mirrors the diffusion trainer's `RunConfig` section by section (model, rollout ~ sample, prompts, reward,
advantage, train, logging, checkpoint, eval), on the same machinery (`diffusion_rl.core.config`): unknown keys
rejected with a suggestion, a docstring on every field (`drl reason config show --doc`), every problem reported
at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from diffusion_rl.core import config as core_config
from diffusion_rl.core.config import (  # noqa: F401  (re-exported)
    CheckpointConfig,
    ConfigError,
    MixedPrecision,
    RewardConfig,
    Section,
)


class ModelConfig(Section):
    pretrained: str = "builtin:tiny-random-lm"
    """Causal LM or image-text model: a hub id (e.g. `Qwen/Qwen2.5-0.5B-Instruct`, `Qwen/Qwen2-VL-2B-Instruct`), a
    local directory with `config.json`, `builtin:tiny-random-lm` (a tiny random Qwen2 with a character tokenizer)
    or `builtin:tiny-random-vlm` (a tiny random Qwen2-VL with its processor), both built offline, or
    `builtin:tiny-arith-lm` (a shipped Llama trained on the arithmetic world, `reasoning_rl.world.pretrain`),
    `builtin:tiny-arith-lm-mixed` (the same further trained on a corpus where half of the solutions are bare
    answers: it often answers without working, the room `configs/reason_default.yaml` trains into) or
    `builtin:tiny-shapes-vlm` (a shipped Qwen2-VL trained on the visual world, `reasoning_rl.world.pretrain_vlm`)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load; pin it for reproducibility."""
    local_files_only: bool = False
    """Never contact the hub; load only from the local cache or directory."""
    gguf_file: str | None = None
    """A GGUF file inside `pretrained` (a local directory) to load through transformers (dequantised)."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Dtype of the frozen weights. Trainable LoRA parameters are fp32; log-probs are computed in fp32."""
    trust_remote_code: bool = False
    """Run a model repository's own Python code. Off: only architectures transformers ships load."""
    use_lora: bool = True
    """Train LoRA adapters (peft); false fine-tunes every weight (a frozen copy is the KL reference)."""
    lora_rank: int = Field(8, ge=1)
    """LoRA rank r."""
    lora_alpha: float = Field(16.0, gt=0)
    """LoRA alpha (scale = alpha / r)."""
    lora_target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    """Module names that receive LoRA adapters (the attention and MLP projections of Llama/Qwen-style models)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% more compute)."""
    fused_logprob: Literal["auto", "off", "torch", "triton"] = "auto"
    """Per-token log-probs from the last hidden states without the [tokens x vocab] logits (reasoning_rl.kernels):
    `auto` = Triton kernels on CUDA, chunked PyTorch elsewhere; `torch` / `triton` force a backend (triton off CUDA
    needs TRITON_INTERPRET=1); `off` runs the LM head on every completion position. Same numbers to fp32
    rounding; needs a plain linear LM head (no LoRA on `lm_head`)."""
    freeze_vision_tower: bool = True
    """Vision-language models: keep the image encoder frozen under full fine-tuning (LoRA never touches it)."""
    seed: int = 0
    """Seed of the weights of `builtin:tiny-random-lm` (ignored for other models)."""

    @field_validator("fused_logprob", mode="before")
    @classmethod
    def _yaml_off(cls, value):
        # YAML 1.1 reads a bare `off` as false (and `on` as true): take them as the words the user wrote
        return {False: "off", True: "auto"}.get(value, value) if isinstance(value, bool) else value


class RolloutConfig(Section):
    num_generations: int = Field(4, ge=1)
    """G: completions sampled per prompt (the group of the per-prompt statistics)."""
    prompts_per_step: int = Field(4, ge=1)
    """Prompts per process per training step (so completions per step = prompts_per_step x num_generations)."""
    max_new_tokens: int = Field(32, ge=1)
    """Longest completion, in tokens; longer ones are cut and marked truncated."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature; the training forward divides the logits by the same value, so log-probs match."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass (1 = off)."""
    top_k: int = Field(0, ge=0)
    """Sample from the k most likely tokens only (0 = off)."""
    stop_strings: list[str] = []
    """Generation stops at the first of these strings (it is kept in the completion)."""
    batch_size: int = Field(16, ge=1)
    """Sequences per `generate` call (memory knob; results do not depend on it)."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop problems whose G rewards are all equal (no signal) and draw new problems until
    prompts_per_step are kept or max_generation_rounds rounds have run."""
    max_generation_rounds: int = Field(3, ge=1)
    """With dynamic_sampling: generation rounds per step at most (a step may train on fewer problems)."""
    backend: Literal["transformers", "vllm"] = "transformers"
    """Who samples the completions: transformers `generate` on the policy itself, or an in-process vLLM engine
    (`reasoning_rl.vllm_rollout`; CUDA only, `pip install 'diffusion-rl[vllm]'`; text prompts only) that receives the
    policy's current weights (LoRA merged) before each step's generation. Evaluation always uses transformers."""
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    """backend=vllm: share of the GPU's memory the engine may take for its weights and KV cache (the rest is the
    trainer's; TRL's colocate default 0.3)."""
    vllm_max_model_len: int | None = Field(None, ge=2)
    """backend=vllm: the engine's context length (longest prompt + max_new_tokens); empty = the model config's."""
    vllm_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """backend=vllm: the engine's weight dtype (`auto` = vLLM's choice from the model config). The pushed weights
    are cast to it; the trainer's log-probs stay fp32, and the importance-sampling correction covers the mismatch."""
    vllm_seed: int = 0
    """backend=vllm: the engine's seed (plus the process index); each request's seed comes from the trainer's
    per-step seed."""
    vllm_importance_sampling: Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = (
        "token_truncate")
    """backend=vllm: correct the policy loss for vLLM sampling from a slightly different distribution than the
    trainer's (TRL's vllm_importance_sampling_mode): each token's loss times w = rho = pi_train / pi_vllm of its
    token (`token_*`) or of its whole sequence (`sequence_*`), truncated to [min, max] (`*_truncate`, TIS) or zeroed
    outside it (`*_mask`); `none` = no correction. Costs one no-grad forward per step."""
    vllm_importance_sampling_max: float | None = Field(3.0, gt=0)
    """backend=vllm: upper bound C_max of the importance-sampling weights (TRL 3.0); empty = none."""
    vllm_importance_sampling_min: float | None = Field(None, ge=0)
    """backend=vllm: lower bound C_min of the importance-sampling weights; empty = none."""
    tools: list[str] | None = None
    """Multi-turn tool rollouts (V-ToolRL / OpenThinkIMG, `reasoning_rl.tools`): the registered tools the policy may
    call (built in: count, locate, crop, draw_box; add yours with `reasoning_rl.tools.register_tool`). Each turn is
    an action JSON {"thought", "actions": [{"name", "arguments"}]}; `terminate` {"ans"} ends the rollout (always
    allowed, so `[]` = answer-only turns). Observations are appended token-in / token-out and masked out of the loss.
    Empty (null) = ordinary single-turn completions. Text-only policies."""
    max_tool_rounds: int = Field(3, ge=1)
    """With tools: K, the policy turns per rollout at most (each up to max_new_tokens tokens; OpenThinkIMG uses 6)."""
    tool_state: str = "visual"
    """With tools: the per-rollout tool state built from the problem's row (`reasoning_rl.tools.STATES`): `visual`
    (the scene's image and objects, for the visual-world tools) or `metadata` (a copy of the row's columns)."""
    tool_observation_template: str = "\n<|im_start|>user\n{observation}<|im_end|>\n<|im_start|>assistant\n"
    """With tools: how an observation enters the context after the policy's end-of-turn token ({observation} = the
    tools' text); the default is a ChatML user turn and the next assistant header."""


class PromptsConfig(Section):
    source: Literal["list", "jsonl", "dataset", "world", "reasoning_gym"] = "list"
    """Where problems come from: the `problems` list, a JSONL file (`path`), a `datasets` dataset, an embedded world
    (`world`: generated problems with `prompt`, `answer` and `solution` columns; set problem_column: prompt), or
    reasoning-gym tasks (`tasks`; score them with reward `reasoning_gym`)."""
    problems: list[dict] = [{"problem": "What is 2 + 3?", "answer": "5"}, {"problem": "What is 4 + 1?", "answer": "5"}]
    """Problems used when source = list: mappings with at least the problem column."""
    path: str | None = None
    """JSONL file (one object per line) when source = jsonl."""
    dataset: str | None = None
    """`datasets` hub id or local path (a saved dataset or a data file) when source = dataset."""
    split: str = "train"
    """Dataset split (source = world or reasoning_gym: `train` or `eval`, which never overlap)."""
    world: Literal["arithmetic", "shapes_vqa"] = "arithmetic"
    """source = world: `arithmetic` (multi-step word problems, `reasoning_rl.world.text`) or `shapes_vqa` (shapes-world
    images with count / colour / shape / position questions, `reasoning_rl.world.visual`; set image_column: image)."""
    size: int = Field(1000, ge=1)
    """source = world or reasoning_gym: how many problems to generate."""
    generator_seed: int = 0
    """source = world or reasoning_gym: seed of the generated problems (the split does not depend on it)."""
    steps: list[int] = [1, 2, 3, 4]
    """world arithmetic: step counts of the problems (the difficulty knob), drawn uniformly."""
    question_types: list[Literal["count", "colour", "shape", "position"]] = ["count", "colour", "shape", "position"]
    """world shapes_vqa: question types, in turn."""
    image_scale: int = Field(1, ge=1)
    """world shapes_vqa: integer enlargement of the 32x32 scenes (boxes are given in the enlarged pixels)."""
    tasks: list[str] = []
    """source = reasoning_gym: task names (e.g. chain_sum, basic_arithmetic, countdown); problems are shared out over
    them in turn."""
    task_options: dict[str, dict] = {}
    """source = reasoning_gym: per-task generator options, e.g. {chain_sum: {min_terms: 2, max_terms: 3}}."""
    problem_column: str = "problem"
    """Column holding the problem text."""
    answer_column: str | None = "answer"
    """Column holding the reference answer (passed to rewards as metadata["answer"]); empty = none."""
    solution_column: str | None = None
    """Optional column with a reference solution trace (metadata["solution"])."""
    off_policy_column: str | None = None
    """LUFFY: column with an off-policy reasoning trace per problem (e.g. a stronger model's solution), used as
    train.off_policy_per_group of the G completions; read into metadata["off_policy"]."""
    image_column: str | None = None
    """Column with each problem's image (a path, relative to a JSONL file's folder or absolute; or a `datasets`
    Image); set for vision-language models, empty for text-only problems."""
    min_pixels: int | None = Field(None, ge=1)
    """Vision-language models: resize each image to at least this many pixels (Qwen2-VL's min_pixels)."""
    max_pixels: int | None = Field(None, ge=1)
    """Vision-language models: resize each image to at most this many pixels (Qwen2-VL's max_pixels)."""
    system_prompt: str | None = None
    """System message put before each problem in the chat template."""
    use_chat_template: bool = True
    """Format problems with the tokenizer's chat template (an error if it has none); false = the raw text."""


class AdvantageConfig(Section):
    scale: Literal["group", "batch", "none"] = "group"
    """group: A = (R - baseline) / (group std + epsilon) (GRPO); batch: divided by the whole step's std instead
    (Lite-PPO); none: A = R - baseline (Dr.GRPO)."""
    baseline: Literal["mean", "rloo"] = "mean"
    """The group baseline: the group's mean reward, or the mean of the other G - 1 (RLOO)."""
    epsilon: float = Field(1e-4, gt=0)
    """Added to the group std before dividing (TRL 1e-4, verl 1e-6)."""
    unbiased_std: bool = True
    """Bessel-corrected (n - 1) group std, as every LLM framework uses."""
    overlong_buffer: int = Field(0, ge=0)
    """DAPO soft overlong punishment: completions longer than rollout.max_new_tokens - overlong_buffer lose reward
    linearly, down to -overlong_penalty_factor at max_new_tokens (0 = off)."""
    overlong_penalty_factor: float = Field(1.0, ge=0)
    """The largest overlong penalty."""
    pad: bool = False
    """ReVisual-R1 Prioritized Advantage Distillation: after the advantages, keep completions with pad_t_low <= |A|
    <= pad_t_high and train on round(pad_ratio x N) of them drawn by priority."""
    pad_ratio: float = Field(1.5, gt=0)
    """PAD: completions drawn, as a multiple of the step's completions (the released script uses 1.5)."""
    pad_t_low: float = Field(0.03, ge=0)
    """PAD: smallest |A| kept."""
    pad_t_high: float | None = Field(0.97, gt=0)
    """PAD: largest |A| kept (empty = no upper bound)."""
    pad_priority: Literal["power", "softmax"] = "power"
    """PAD priority: |A|^pad_alpha (the released code) or softmax(|A| / pad_temperature) (the paper)."""
    pad_alpha: float = Field(1.5, gt=0)
    """PAD: exponent of the power priority."""
    pad_temperature: float | None = Field(None, gt=0)
    """PAD: temperature of the softmax priority (needed with pad_priority=softmax)."""
    pad_replacement: bool = True
    """PAD: draw with replacement (the released code) or without (each completion at most once)."""


class CreditConfig(Section):
    kind: Literal["sparse", "arithmetic_facts"] = "sparse"
    """sparse: every token of a completion gets its outcome advantage (GRPO); arithmetic_facts: the result tokens of
    each equation the completion writes in its <think> block also get +weight when the equation is a true fact and
    -weight when not (reasoning_rl.world.fact_credit; the arithmetic world's traces)."""
    weight: float = Field(0.5, ge=0)
    """Size of a verified step's credit, in units of the outcome advantage (which GRPO scales to unit group std)."""


class TrainConfig(Section):
    learning_rate: float = Field(1e-5, gt=0)
    """AdamW learning rate (the peak, when lr_schedule is not constant)."""
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate schedule over the run's optimizer steps; a function of the global step (resume-exact)."""
    lr_warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warm-up from 0 to learning_rate."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Clip the total gradient norm before each optimizer step."""
    micro_batch_size: int = Field(8, ge=1)
    """Completions per training forward/backward (gradients are accumulated over the step's completions)."""
    num_iterations: int = Field(1, ge=1)
    """PPO passes over each step's completions (mu); > 1 makes the old log-probs differ from the current ones."""
    clip_range: float = Field(0.2, gt=0, lt=1)
    """PPO clip epsilon_low: the token ratio is kept >= 1 - clip_range."""
    clip_range_high: float | None = Field(None, gt=0)
    """PPO clip epsilon_high (clip-higher, DAPO 0.28); defaults to clip_range."""
    loss_aggregation: Literal["dapo", "grpo", "bnpo", "dr_grpo"] = "dapo"
    """How per-token losses are averaged: dapo = over every completion token of the step (all micro-batches and
    processes; TRL's default), grpo = each completion's token mean then the mean over completions (as published),
    bnpo = over the micro-batch's tokens, dr_grpo = sum / (completions x rollout.max_new_tokens)."""
    ratio_level: Literal["token", "sequence", "sequence_token"] = "token"
    """Importance ratio per token (GRPO), per sequence (GSPO: exp of the mean log-ratio), or GSPO-token."""
    dual_clip: float | None = Field(None, gt=1)
    """Dual-clip c (> 1): for negative advantages the loss is capped at -c * A (verl / EasyR1 use 3)."""
    entropy_coef: float = Field(0.0, ge=0)
    """Weight of an entropy bonus (the token-mean entropy is subtracted from the loss); the schedule's start value."""
    entropy_schedule: Literal["constant", "exponential", "adaptive"] = "constant"
    """Entropy-coefficient schedule: constant; exponential decay by entropy_decay per step (ReVisual-R1: 0.02, 0.985);
    adaptive (Skywork-OR1): moved by entropy_delta towards keeping the entropy at entropy_target, in
    [0, entropy_coef_max]."""
    entropy_decay: float = Field(0.985, gt=0, le=1)
    """Exponential schedule: factor per step."""
    entropy_target: float = Field(0.2, ge=0)
    """Adaptive schedule: target token entropy."""
    entropy_delta: float = Field(1e-4, gt=0)
    """Adaptive schedule: change of the coefficient per step."""
    entropy_coef_max: float = Field(0.005, ge=0)
    """Adaptive schedule: largest coefficient."""
    off_policy_per_group: int = Field(0, ge=0)
    """LUFFY: how many of each problem's G completions are its off-policy trace (prompts.off_policy_column); their
    tokens get the unclipped policy-shaping loss -A * pi / (pi + luffy_gamma). 0 = off."""
    luffy_gamma: float = Field(0.1, gt=0)
    """LUFFY policy-shaping gamma."""
    luffy_policy_shaping: bool = True
    """LUFFY: shape the off-policy tokens' loss with f(pi) = pi / (pi + luffy_gamma); false = the plain importance
    ratio f(pi) = pi (the paper's ablation without policy shaping)."""
    beta: float = Field(0.0, ge=0)
    """Weight of the KL penalty to the reference (the model with LoRA disabled) in the loss."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator for the penalty."""
    mask_truncated_completions: bool = False
    """Give completions cut at max_new_tokens no loss (DAPO's overlong filtering)."""
    mixed_precision: MixedPrecision = "no"
    """accelerate mixed precision for the forward (no, fp16 or bf16); log-probs and losses stay fp32."""
    max_consecutive_nonfinite: int = Field(3, ge=1)
    """Abort after this many optimizer steps in a row skipped for a non-finite loss or gradient."""


class LoggingConfig(Section):
    completions_every: int = Field(1, ge=0)
    """Write sample completions (prompt, completion, reward) as TensorBoard text every N steps (0 = never)."""
    num_completions: int = Field(4, ge=1)
    """Completions in that text."""


class EvalConfig(Section):
    every: int = Field(0, ge=0)
    """Evaluate every N steps (0 = only before and after training when eval.problems are given)."""
    problems: list[dict] = []
    """Held-out problems (same columns as the training prompts); empty = no evaluation (unless eval.prompts)."""
    prompts: PromptsConfig | None = None
    """Held-out problems from a source instead of a list, e.g. {source: world, world: shapes_vqa, split: eval,
    size: 200, problem_column: prompt, image_column: image} (a world's eval split; images cannot be written in
    YAML). Its own column settings apply."""
    reward: RewardConfig | None = None
    """The reward the held-out completions are scored with (e.g. exact_match when training on a shaped reward);
    null = the training reward."""
    num_generations: int = Field(1, ge=1)
    """Sampled completions per held-out problem (pass@n over them; the greedy completion is scored too)."""
    seed: int = 1234
    """Evaluation sampling seed, independent of training."""


class StageConfig(Section):
    name: str
    """Stage name (logged as reason/stage, recorded in checkpoints)."""
    kind: Literal["sft", "grpo"] = "grpo"
    """sft: supervised fine-tuning on the problems' reference solutions (completion-only NLL; needs
    prompts.solution_column); grpo: the RL step."""
    num_steps: int = Field(ge=1)
    """Training steps of this stage."""
    prompts: PromptsConfig | None = None
    """The stage's problems (e.g. text-only for a cold start, with images for multimodal RL); default: the run's."""
    learning_rate: float | None = Field(None, gt=0)
    """The stage's learning rate (the lr schedule's peak); default: train.learning_rate."""


class ReasonConfig(Section):
    """A full `drl reason train` run. Defaults train the tiny random LM in seconds."""

    trainer: Literal["grpo"] = "grpo"
    """Which trainer runs this YAML (reasoning_rl.registry): `grpo` here (GRPO and its variants: DAPO, Dr.GRPO,
    PAD, LUFFY, staged); `glider` and `see` have their own configs."""
    seed: int = 42
    """Seed for prompts, sampling and shuffles (combined with the process index)."""
    num_steps: int = Field(4, ge=1)
    """Training steps: each generates completions, scores them and runs the PPO passes (with `stages`: their sum)."""
    output_dir: str = "runs/reason"
    """Run directory: TensorBoard logs, completions, checkpoints, final LoRA/model, resolved config."""
    model: ModelConfig = ModelConfig()
    rollout: RolloutConfig = RolloutConfig()
    prompts: PromptsConfig = PromptsConfig()
    reward: RewardConfig = RewardConfig(name="math_answer")
    advantage: AdvantageConfig = AdvantageConfig()
    credit: CreditConfig = CreditConfig()
    train: TrainConfig = TrainConfig()
    logging: LoggingConfig = LoggingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    stages: list[StageConfig] = []
    """A staged curriculum run in order in one run (ReVisual-R1: text SFT cold start, multimodal RL, text RL); each
    stage has its own kind, problems, steps and learning rate. Empty: one GRPO stage of num_steps steps. With
    stages, num_steps is their sum."""

    def curriculum(self) -> list[StageConfig]:
        """The stages, with the run's own problems and learning rate filled in where a stage sets none."""
        stages = self.stages or [StageConfig(name="grpo", kind="grpo", num_steps=self.num_steps)]
        return [st.model_copy(update={"prompts": st.prompts or self.prompts,
                                      "learning_rate": st.learning_rate or self.train.learning_rate})
                for st in stages]

    def total_steps(self) -> int:
        return sum(st.num_steps for st in self.curriculum())

    def has_eval(self) -> bool:
        """Whether held-out problems are configured (eval.problems or eval.prompts)."""
        return bool(self.eval.problems) or self.eval.prompts is not None

    def geometry(self, world_size: int) -> dict[str, int]:
        """Derived batch numbers, printed at start-up."""
        r, t = self.rollout, self.train
        completions = r.prompts_per_step * r.num_generations
        return {
            "prompts_per_step": r.prompts_per_step * world_size,
            "completions_per_step": completions * world_size,
            "completions_per_step_per_process": completions,
            "micro_batches_per_update": -(-completions // t.micro_batch_size),
            "updates_per_step": t.num_iterations,
            # (tool rollouts: up to max_tool_rounds policy turns each, observations not counted)
            "max_tokens_per_step": completions * world_size * r.max_new_tokens
            * (r.max_tool_rounds if r.tools is not None else 1),
        }

    def hash(self) -> str:
        return core_config.config_hash(self)


def cross_field_problems(cfg: ReasonConfig) -> list[str]:
    problems: list[str] = []
    p, r, t = cfg.prompts, cfg.rollout, cfg.train
    if p.source == "list" and not p.problems:
        problems.append("prompts.problems is empty; add problems or use prompts.source=jsonl/dataset")
    if p.source == "list":
        missing = [i for i, row in enumerate(p.problems) if p.problem_column not in row]
        if missing:
            problems.append(
                f"prompts.problems[{missing[0]}] has no {p.problem_column!r} key (prompts.problem_column); "
                f"each problem needs one, e.g. {{{p.problem_column}: 'What is 2 + 3?', answer: '5'}}"
            )
    if p.source == "jsonl" and not p.path:
        problems.append("prompts.source=jsonl needs prompts.path (a .jsonl file)")
    if p.source == "dataset" and not p.dataset:
        problems.append("prompts.source=dataset needs prompts.dataset (a hub id or local path)")
    problems += world_source_problems(p, "prompts")
    if cfg.eval.prompts is not None:
        problems += world_source_problems(cfg.eval.prompts, "eval.prompts")
        if cfg.eval.problems:
            problems.append("eval.problems and eval.prompts are both set; keep one source of held-out problems")
    for i, st in enumerate(cfg.stages):
        if st.prompts is not None:
            problems += world_source_problems(st.prompts, f"stages[{i}].prompts")
    if r.num_generations < 2:
        problems.append(
            f"rollout.num_generations ({r.num_generations}) < 2: a group of one has no spread, so every advantage "
            "is 0; use at least 2 (GRPO uses 8)"
        )
    problems += vllm_problems(cfg)
    problems += tool_problems(cfg)
    if t.off_policy_per_group and not p.off_policy_column:
        problems.append("train.off_policy_per_group > 0 (LUFFY) needs prompts.off_policy_column (the traces' column)")
    if t.off_policy_per_group >= r.num_generations:
        problems.append(
            f"train.off_policy_per_group ({t.off_policy_per_group}) must leave on-policy samples among "
            f"rollout.num_generations ({r.num_generations}); use at most {r.num_generations - 1}"
        )
    if t.off_policy_per_group and t.beta > 0:
        problems.append("LUFFY (train.off_policy_per_group > 0) has no KL term; set train.beta=0")
    if cfg.advantage.pad and cfg.advantage.pad_priority == "softmax" and cfg.advantage.pad_temperature is None:
        problems.append("advantage.pad_priority=softmax needs advantage.pad_temperature (e.g. 0.3)")
    if cfg.advantage.overlong_buffer >= r.max_new_tokens:
        problems.append(
            f"advantage.overlong_buffer ({cfg.advantage.overlong_buffer}) must be below rollout.max_new_tokens "
            f"({r.max_new_tokens}); DAPO uses 4096 of 20480"
        )
    if t.beta > 0 and not cfg.model.use_lora:
        problems.append("train.beta > 0 needs model.use_lora=true (the reference is the model with LoRA disabled)")
    if cfg.model.fused_logprob != "off" and cfg.model.use_lora and "lm_head" in cfg.model.lora_target_modules:
        problems.append("model.fused_logprob needs a plain LM head but model.lora_target_modules has 'lm_head'; "
                        "remove it or set model.fused_logprob=off")
    if cfg.model.gguf_file and cfg.model.use_lora is False and cfg.model.dtype != "float32":
        problems.append("model.gguf_file loads dequantised fp32 weights; use model.dtype=float32 with a GGUF file")
    for i, st in enumerate(cfg.stages):
        sp = st.prompts or cfg.prompts
        if st.kind == "sft" and not sp.solution_column:
            problems.append(f"stages[{i}] ({st.name}) is an sft stage: its prompts need a solution_column (the "
                            "reference solutions it is trained on)")
    if cfg.stages and len({st.name for st in cfg.stages}) < len(cfg.stages):
        problems.append(f"stages: names must be unique, got {[st.name for st in cfg.stages]}")
    if cfg.stages and cfg.num_steps != ReasonConfig.model_fields["num_steps"].default and cfg.num_steps != sum(
            st.num_steps for st in cfg.stages):
        problems.append(f"num_steps ({cfg.num_steps}) differs from the stages' sum "
                        f"({sum(st.num_steps for st in cfg.stages)}); drop num_steps or set it to that sum")
    problems += core_config.reward_problems(cfg.reward)
    return problems


def vllm_problems(cfg: ReasonConfig) -> list[str]:
    """Rules of rollout.backend=vllm."""
    r, problems = cfg.rollout, []
    if r.backend != "vllm":
        return problems
    sources = [cfg.prompts] + [st.prompts for st in cfg.stages if st.prompts is not None]
    if any(p.image_column for p in sources):
        problems.append("rollout.backend=vllm does not take image prompts yet (prompts.image_column is set); use "
                        "rollout.backend=transformers for vision-language models")
    if r.vllm_max_model_len is not None and r.vllm_max_model_len <= r.max_new_tokens:
        problems.append(f"rollout.vllm_max_model_len ({r.vllm_max_model_len}) must exceed rollout.max_new_tokens "
                        f"({r.max_new_tokens}): it holds the prompt and the completion")
    low, high = r.vllm_importance_sampling_min, r.vllm_importance_sampling_max
    if low is not None and high is not None and low > high:
        problems.append(f"rollout.vllm_importance_sampling_min ({low}) exceeds rollout.vllm_importance_sampling_max "
                        f"({high})")
    return problems


def tool_problems(cfg: ReasonConfig) -> list[str]:
    """Rules of rollout.tools (multi-turn tool rollouts)."""
    r, problems = cfg.rollout, []
    if r.tools is None:
        return problems
    from reasoning_rl import tools as tool_registry

    unknown = [n for n in r.tools if n not in tool_registry.TOOLS]
    if unknown:
        problems.append(f"rollout.tools names unregistered tool(s) {unknown}; registered: "
                        f"{tool_registry.available_tools()} (register your own with reasoning_rl.tools.register_tool "
                        "before loading the config)")
    if r.tool_state not in tool_registry.STATES:
        problems.append(f"rollout.tool_state {r.tool_state!r} is not registered; use one of "
                        f"{sorted(tool_registry.STATES)} or add one with reasoning_rl.tools.register_state")
    if "{observation}" not in r.tool_observation_template:
        problems.append(f"rollout.tool_observation_template {r.tool_observation_template!r} has no {{observation}} "
                        "placeholder; include it where the tools' text goes")
    if r.backend == "vllm":
        problems.append("rollout.tools runs with rollout.backend=transformers only; set rollout.backend=transformers")
    sources = [cfg.prompts] + [st.prompts for st in cfg.stages if st.prompts is not None]
    if any(p.image_column for p in sources):
        problems.append("rollout.tools takes text-only policies (observations enter the context as text); unset "
                        "prompts.image_column")
    if cfg.train.off_policy_per_group:
        problems.append("rollout.tools does not combine with LUFFY traces (train.off_policy_per_group); set it to 0")
    return problems


def world_source_problems(p: PromptsConfig, where: str) -> list[str]:
    """Rules of the generated sources (world, reasoning_gym)."""
    problems = []
    if p.source in ("world", "reasoning_gym") and p.split not in ("train", "eval"):
        problems.append(f"{where}.split must be train or eval with {where}.source={p.source}, got {p.split!r}")
    if p.source == "world" and p.world == "arithmetic" and (not p.steps or min(p.steps) < 1):
        problems.append(f"{where}.steps must list step counts >= 1 (e.g. [1, 2, 3, 4]), got {p.steps}")
    if p.source == "world" and p.world == "shapes_vqa" and not p.question_types:
        problems.append(f"{where}.question_types is empty; use some of count, colour, shape, position")
    if p.source == "reasoning_gym" and not p.tasks:
        problems.append(f"{where}.source=reasoning_gym needs {where}.tasks (reasoning-gym task names, e.g. [chain_sum])")
    if p.source == "reasoning_gym" and set(p.task_options) - set(p.tasks):
        problems.append(f"{where}.task_options names tasks not in {where}.tasks: {sorted(set(p.task_options) - set(p.tasks))}")
    return problems


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> ReasonConfig:
    """Load a YAML config (or the embedded defaults when `path` is None) and apply `--set` overrides."""
    return core_config.load(ReasonConfig, path, overrides, cross_field_problems, paths_beside_file=("prompts.path",))


def dump_config(cfg: ReasonConfig) -> str:
    return core_config.dump(cfg)


def documented_fields(model=ReasonConfig, prefix: str = "") -> list[tuple[str, str]]:
    return core_config.documented_fields(model, prefix)
