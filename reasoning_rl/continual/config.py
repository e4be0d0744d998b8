"""SEE's typed run configuration (`SEEConfig`, `trainer: see`) and its cross-field rules.

Same machinery as the GRPO trainer's `ReasonConfig` (`diffusion_rl.core.config`): unknown keys rejected with a
suggestion, a docstring on every field (`drl reason config show configs/see_continual.yaml --doc`), every problem
reported at once.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Literal

from pydantic import Field

from diffusion_rl.core import config as core_config
from diffusion_rl.core.config import CheckpointConfig, ConfigError, Section  # noqa: F401  (re-exported)

FAMILIES = ("any", "add", "sub", "mul", "mixed")
FORMAT_FIELDS = {"answer", "items", "name"}


class ModelConfig(Section):
    pretrained: str = "builtin:tiny-arith-lm"
    """The shared frozen base model: a hub id, a local transformers directory, or a built-in
    (`builtin:tiny-arith-lm`: the shipped Llama trained on the arithmetic world; `builtin:tiny-random-lm`). It is also
    the general model that answers what no expert accepts."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load; pin it for reproducibility."""
    local_files_only: bool = False
    """Never contact the hub; load only from the local cache or directory."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Dtype of the frozen base weights. LoRA parameters are fp32; log-probs and the loss are fp32."""
    lora_rank: int = Field(8, ge=1)
    """LoRA rank r of every expert."""
    lora_alpha: float = Field(16.0, gt=0)
    """LoRA alpha of every expert (scale = alpha / r)."""
    lora_target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    """Module names that receive each expert's LoRA (the attention and MLP projections of Llama/Qwen-style models)."""
    seed: int = 0
    """Seed of the weights of `builtin:tiny-random-lm` (ignored for other models)."""


class TaskConfig(Section):
    name: str
    """The task's name (unique in the sequence): the expert trained on it is `expert_<index>` and reports under it."""
    source: Literal["world", "jsonl"] = "world"
    """`world`: problems of the arithmetic text world (`reasoning_rl.world.text`) of one operation family; `jsonl`:
    a JSONL file with problem / answer columns (train on `train_path`, evaluate on `eval_path`)."""
    family: Literal["any", "add", "sub", "mul", "mixed"] = "any"
    """world: which problems belong to the task by their operations: `add` (additions only), `sub` (subtractions
    only), `mul` (at least one doubling / tripling), `mixed` (additions and subtractions, no multiplication), `any`."""
    steps: list[int] = [1, 2]
    """world: step counts of the problems (drawn uniformly before the family filter)."""
    answer_format: str = "{answer}"
    """world: how the task writes its answer inside `<answer>...</answer>` after the worked trace, with the fields
    {answer} (the number), {items} and {name} (from the problem text), e.g. `={answer}` or `*{answer}`. Tasks
    with conflicting formats are what makes forgetting visible."""
    train_path: str | None = None
    """jsonl: the training problems (one JSON object per line)."""
    eval_path: str | None = None
    """jsonl: the held-out problems (default: the last eval_size rows of train_path are held out instead)."""
    problem_column: str = "problem"
    """jsonl: the column with the problem text."""
    answer_column: str = "answer"
    """jsonl: the column with the reference answer (compared with the `<answer>` tag, exact match)."""
    target_column: str | None = None
    """jsonl: the column with the completion to train on (e.g. a worked solution ending in `<answer>..</answer>`);
    empty = `<answer>{answer}</answer>`."""
    train_size: int = Field(256, ge=1)
    """Training problems of the task (world: generated from the train split; jsonl: at most this many rows)."""
    eval_size: int = Field(64, ge=1)
    """Held-out problems of the task (world: the eval split, disjoint in arithmetic from the train split)."""


class SEESection(Section):
    accept_marker: str = "+"
    """The indicator an expert writes first when a query is its own, followed by the answer (SEE's positive
    indicator). Decisions compare its log-likelihood with reject_marker's. Pick tokens the base model already
    emits (on the tiny arithmetic model: digits, + - * = ; and the tags): a token never produced as an output
    starts ~15 nats below and takes many more steps to learn."""
    reject_marker: str = "-"
    """The indicator an expert writes (and nothing else) for a query that is not its own (SEE's negative
    indicator)."""
    rehearsal_per_task: int = Field(32, ge=0)
    """Training queries drawn from each earlier task for the new expert, labelled with reject_marker (SEE's
    rehearsal sample: what teaches an expert which queries are not its own)."""
    general_negatives: int = Field(32, ge=0)
    """Queries from the `general` tasks added to every expert's data, labelled with reject_marker (the first expert
    has no earlier task to learn rejection from without them)."""
    reject_share: float | None = Field(0.5, gt=0, lt=1)
    """Share of every training batch drawn from the reject-labelled examples (re-drawn as often as needed), the rest
    from the own task; empty = one shuffled pool (the small rehearsal sample is then rarely seen)."""
    order: Literal["newest_first", "oldest_first"] = "newest_first"
    """The order experts are asked in: newest_first (each expert learned to reject every earlier task, so asking the
    newest first never needs an expert to reject a task it has not seen) or oldest_first."""
    use_chat_template: bool = True
    """Format each problem with the tokenizer's chat template (as the reasoning trainer does); false = the raw text."""


class TrainConfig(Section):
    steps_per_task: int = Field(80, ge=1)
    """Optimizer steps of each new expert (one task = one stage)."""
    batch_size: int = Field(16, ge=1)
    """Examples per optimizer step."""
    learning_rate: float = Field(5e-3, gt=0)
    """Peak AdamW learning rate of each expert's LoRA."""
    lr_warmup_steps: int = Field(5, ge=0)
    """Linear warm-up steps, then cosine decay to 0 over steps_per_task."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay (only the new expert's parameters are in the optimizer)."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient-norm clip of each step."""


class EvalConfig(Section):
    max_new_tokens: int = Field(48, ge=1)
    """Longest answer generated (greedy) after an accepting indicator, or by the general model."""
    batch_size: int = Field(64, ge=1)
    """Queries per forward / generate call (memory knob; results do not depend on it)."""


class LoggingConfig(Section):
    log_every: int = Field(10, ge=1)
    """Print (and write to metrics.jsonl) the training loss every N optimizer steps; TensorBoard gets every step."""


class SEEConfig(Section):
    trainer: Literal["see"] = "see"
    """Which `drl reason train` trainer runs this file (reasoning_rl.registry): SEE's continual expert ensemble."""
    seed: int = 0
    """Seed of the data draws, batch order and LoRA initialisation."""
    output_dir: str = "runs/see_continual"
    """Run directory: config.yaml, experts/ (one peft adapter per task), checkpoints/, tensorboard/, see.json."""
    model: ModelConfig = ModelConfig()
    tasks: list[TaskConfig] = [
        TaskConfig(name="add", family="add", answer_format="{answer}"),
        TaskConfig(name="sub", family="sub", answer_format="={answer}"),
        TaskConfig(name="mul", family="mul", answer_format="*{answer}"),
    ]
    """The task sequence, in training order: one new LoRA expert per task."""
    general: list[TaskConfig] = [TaskConfig(name="general", family="mixed", steps=[3, 4], train_size=128, eval_size=1)]
    """General-data queries every expert learns to reject (see.general_negatives of them); never a task."""
    ood: list[TaskConfig] = [TaskConfig(name="mixed2", family="mixed", steps=[2], train_size=1, eval_size=64)]
    """Out-of-distribution evaluation queries (their eval split): the OOD detection rate is the share that every
    expert rejects (so the general model answers)."""
    see: SEESection = SEESection()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    logging: LoggingConfig = LoggingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    """checkpoint.every counts tasks (stages): a checkpoint after every N-th expert and after the last."""


def format_problems(t: TaskConfig, where: str) -> list[str]:
    problems = []
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(t.answer_format) if f is not None}
    except ValueError as err:
        return [f"{where}.answer_format: {t.answer_format!r} is not a format string ({err}); write e.g. '#{{answer}}'"]
    if not fields <= FORMAT_FIELDS or "answer" not in fields:
        problems.append(f"{where}.answer_format: {t.answer_format!r} must contain {{answer}} and only the fields "
                        f"{sorted(FORMAT_FIELDS)}; e.g. '#{{answer}}' or '{{answer}} {{items}}'")
    return problems


def cross_field_problems(cfg: SEEConfig) -> list[str]:
    problems: list[str] = []
    if not cfg.tasks:
        problems.append("tasks: the sequence is empty; give at least one task (e.g. {name: add, family: add})")
    groups = {"tasks": cfg.tasks, "general": cfg.general, "ood": cfg.ood}
    names = [t.name for t in cfg.tasks + cfg.general + cfg.ood]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(f"tasks / general / ood: the names {dupes} are used twice; give every task a unique name")
    for group, tasks in groups.items():
        for i, t in enumerate(tasks):
            where = f"{group}[{i}] ({t.name})"
            if t.source == "world":
                problems += format_problems(t, where)
                if not t.steps or min(t.steps) < 1:
                    problems.append(f"{where}.steps: {t.steps} must be a non-empty list of step counts >= 1")
                elif t.family == "mixed" and max(t.steps) < 2:
                    problems.append(f"{where}: family mixed needs at least 2 steps (an addition and a subtraction); "
                                    f"set steps to e.g. [2, 3], got {t.steps}")
            else:
                if not t.train_path:
                    problems.append(f"{where}: source jsonl needs train_path (a JSONL file of problems)")
                for key in ("train_path", "eval_path"):
                    value = getattr(t, key)
                    if value and not Path(value).is_file():
                        problems.append(f"{where}.{key}: {value!r} does not exist; pass a JSONL file")
    s = cfg.see
    if not s.accept_marker or not s.reject_marker or s.accept_marker == s.reject_marker:
        problems.append(f"see.accept_marker ({s.accept_marker!r}) and see.reject_marker ({s.reject_marker!r}) must be "
                        "two different non-empty strings, e.g. '+' and '-'")
    if s.general_negatives and not cfg.general:
        problems.append(f"see.general_negatives={s.general_negatives} needs a `general` task list to draw them from; "
                        "add one or set see.general_negatives: 0")
    if cfg.train.lr_warmup_steps > cfg.train.steps_per_task:
        problems.append(f"train.lr_warmup_steps ({cfg.train.lr_warmup_steps}) exceeds train.steps_per_task "
                        f"({cfg.train.steps_per_task}); lower it")
    return problems


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> SEEConfig:
    """A SEE YAML (or the defaults) with `--set` overrides, validated; every problem in one ConfigError."""
    return core_config.load(SEEConfig, path, list(overrides), rules=cross_field_problems)


def dump_config(cfg: SEEConfig) -> str:
    return core_config.dump(cfg)
