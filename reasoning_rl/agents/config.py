"""GLIDER's typed run configuration (`GliderConfig`, `trainer: glider`) on the shared config machinery: unknown keys
rejected with a suggestion, a docstring per field, every problem reported at once (`diffusion_rl.core.config`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from diffusion_rl.core import config as core_config
from diffusion_rl.core.config import CheckpointConfig, ConfigError, Section  # noqa: F401  (re-exported)

ENV_NAMES = ("rooms", "rooms-moved", "rooms-rewired", "scienceworld")


class EnvConfig(Section):
    name: Literal["rooms", "rooms-moved", "rooms-rewired", "scienceworld"] = "rooms"
    """The environment: `rooms` (embedded), its changed variants `rooms-moved` (receptacles in other rooms) and
    `rooms-rewired` (other doors), or `scienceworld` (needs the `scienceworld` package and Java)."""
    max_steps: int = Field(20, ge=1)
    """Primitive steps per episode before it ends unsolved."""
    split_seed: int = 0
    """Seed of the rooms seen/unseen task split."""
    scienceworld_tasks: list[str] = ["boil", "find-living-thing"]
    """scienceworld: the task names played (`reasoning_rl.agents.scienceworld_env.TASKS` lists them)."""
    scienceworld_simplifications: str = "easy"
    """scienceworld: its simplification string (`easy` = teleport, open doors, no electrical actions...)."""


class DataConfig(Section):
    episodes: int = Field(300, ge=1)
    """Offline episodes recorded on the seen tasks (rooms: by the scripted policies; scienceworld: gold sequences)."""
    expert_fraction: float = Field(0.3, ge=0, le=1)
    """rooms: share of episodes played by the expert; the rest by the `medium` policy (a wrong destination)."""
    epsilon: float = Field(0.1, ge=0, le=1)
    """rooms: share of the scripted policies' primitive actions replaced by random valid ones."""
    recover: float = Field(0.3, ge=0, le=1)
    """rooms: probability that the medium policy returns to the expert's plan after its mistake."""
    subtask_steps: int = Field(6, ge=1)
    """k: primitive steps a sub-task runs at most before the high level picks the next one (also when acting)."""


class ModelConfig(Section):
    pretrained: str = "builtin:rooms-word-lm"
    """The backbone: `builtin:rooms-word-lm` (a tiny Llama over the environment's words, domain-pretrained by this
    run on random-policy transcripts: it learns the text and the affordances, not the tasks' solutions), or any
    causal LM `reasoning_rl.models.load_policy` loads (`builtin:tiny-arith-lm`, a hub id, a local directory)."""
    hidden_size: int = Field(64, ge=8)
    """builtin:rooms-word-lm: hidden size."""
    layers: int = Field(2, ge=1)
    """builtin:rooms-word-lm: transformer layers."""
    pretrain_steps: int = Field(300, ge=0)
    """builtin:rooms-word-lm: language-model steps on random-policy transcripts before the adapters go on."""
    pretrain_learning_rate: float = Field(3e-3, gt=0)
    """builtin:rooms-word-lm: learning rate of that pre-training (all weights)."""
    use_lora: bool = True
    """One LoRA backbone (peft) shared by both prompt roles; false trains every weight."""
    lora_rank: int = Field(16, ge=1)
    """LoRA rank r."""
    lora_alpha: float = Field(32.0, gt=0)
    """LoRA alpha (scale = alpha / r)."""
    lora_target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    """Modules that receive LoRA adapters."""
    critic_width: int = Field(128, ge=1)
    """Width of the critic heads' MLPs (Q and V)."""
    max_length: int = Field(256, ge=16)
    """Longest prompt + action in tokens (a longer prompt keeps its end)."""
    max_new_tokens: int = Field(12, ge=1)
    """Longest generated sub-task or action, in tokens."""


class AgentConfig(Section):
    hierarchical: bool = True
    """GLIDER's two prompt roles (high level: sub-task, low level: action); false = the flat baseline (one role,
    task + observation -> action), trained the same way."""


class BCConfig(Section):
    steps: int = Field(300, ge=0)
    """Behaviour-cloning steps of both levels (flat: the one policy) on the offline data."""
    batch_size: int = Field(32, ge=1)
    """Rows per step (hierarchical: half high-level, half low-level)."""
    learning_rate: float = Field(3e-3, gt=0)
    """Adapter learning rate during BC."""


class OfflineRLConfig(Section):
    steps: int = Field(300, ge=0)
    """Offline-RL steps after BC (critic TD + weighted actor + low-level BC); 0 = stop after BC."""
    weighting: Literal["awac", "q_weighted", "none"] = "awac"
    """The high-level actor's weights: `awac` = exp(A / lambda) with A = Q_target(s,g) - V(s) (the paper's
    docstring), `q_weighted` = Q_target(s,g) (the released code's -mean(Q * log pi)), `none` = plain BC (the
    BC-only baseline; no critic is trained)."""
    batch_size: int = Field(32, ge=1)
    """Transitions per critic step and rows per actor step."""
    actor_learning_rate: float = Field(1e-3, gt=0)
    """Adapter learning rate in offline RL and online (the paper: 1e-5 on 7B models)."""
    critic_learning_rate: float = Field(1e-3, gt=0)
    """Critic heads' learning rate (the paper: 1e-4)."""
    gamma: float = Field(0.99, ge=0, le=1)
    """Discount per high-level transition (flat: per primitive step)."""
    tau: float = Field(0.2, gt=0, le=1)
    """Polyak rate of the target critic: target <- (1 - tau) target + tau online, each critic step."""
    awac_lambda: float = Field(0.1, gt=0)
    """lambda of exp(A / lambda) (awac)."""
    max_weight: float = Field(20.0, gt=0)
    """Upper clip of the awac weights."""
    critic_trains_backbone: bool = True
    """The critic's TD loss also trains the shared LoRA through h(s, g) (false: the heads only, on detached
    features; a tiny backbone's BC features barely separate good from bad sub-tasks)."""
    critic_warmup: int = Field(100, ge=0)
    """First offline-RL steps that train the critic only (the actor's weights need a fitted critic)."""


class OnlineConfig(Section):
    rounds: int = Field(0, ge=0)
    """Online fine-tuning rounds after offline RL (0 = none); each plays episodes and then trains on all data."""
    env: Literal["rooms", "rooms-moved", "rooms-rewired", "scienceworld"] | None = None
    """Environment to fine-tune in (None: env.name); a changed variant measures adaptation."""
    episodes_per_round: int = Field(22, ge=1)
    """Episodes played per round (seen tasks, round robin)."""
    updates_per_round: int = Field(50, ge=1)
    """Training updates per round on the offline data plus every online episode so far."""
    epsilon: float = Field(0.2, ge=0, le=1)
    """Exploration: share of primitive actions replaced by random valid ones while playing."""
    temperature: float = Field(0.0, ge=0)
    """Sampling temperature of the sub-tasks and actions while playing (0 = greedy)."""


class EvalConfig(Section):
    episodes: int = Field(22, ge=1)
    """Episodes per split (seen, unseen), tasks taken in order (one seed each)."""
    every: int = Field(0, ge=0)
    """Evaluate every N training steps (0 = only before online fine-tuning and at the end)."""
    seed: int = 1234
    """Episode seed (start rooms) of the evaluation."""


class LoggingConfig(Section):
    log_every: int = Field(25, ge=1)
    """Print and write metrics every N steps."""


class GliderConfig(Section):
    trainer: Literal["glider"] = "glider"
    """Which `drl reason train` loop runs this file (reasoning_rl.registry)."""
    seed: int = 0
    """Seed of the data, the weights, the batches and the exploration."""
    output_dir: str = "runs/glider"
    """Run directory: metrics.jsonl, TensorBoard events, checkpoints/, data/, backbone/, final/."""
    env: EnvConfig = EnvConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    agent: AgentConfig = AgentConfig()
    bc: BCConfig = BCConfig()
    offline_rl: OfflineRLConfig = OfflineRLConfig()
    online: OnlineConfig = OnlineConfig()
    eval: EvalConfig = EvalConfig()
    logging: LoggingConfig = LoggingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig(every=200)
    """Checkpoint every N training steps (BC, offline-RL and online rounds count one each)."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient-norm clip of the actor and the critic."""

    def total_steps(self) -> int:
        return self.bc.steps + self.offline_rl.steps + self.online.rounds


def cross_field_problems(cfg: GliderConfig) -> list[str]:
    problems = []
    if cfg.total_steps() == 0:
        problems.append("bc.steps, offline_rl.steps and online.rounds are all 0: nothing to train; set bc.steps > 0")
    if cfg.offline_rl.weighting != "none" and cfg.offline_rl.steps and cfg.offline_rl.critic_warmup >= cfg.offline_rl.steps:
        problems.append(f"offline_rl.critic_warmup ({cfg.offline_rl.critic_warmup}) >= offline_rl.steps "
                        f"({cfg.offline_rl.steps}): the actor would never be trained by the critic; lower "
                        "offline_rl.critic_warmup or raise offline_rl.steps")
    if cfg.env.name == "scienceworld" and cfg.model.pretrained == "builtin:rooms-word-lm" and cfg.model.pretrain_steps == 0:
        problems.append("env.name=scienceworld with builtin:rooms-word-lm needs model.pretrain_steps > 0 (or a "
                        "pretrained model.pretrained)")
    if (cfg.online.env or cfg.env.name).startswith("rooms") != cfg.env.name.startswith("rooms"):
        problems.append(f"online.env={cfg.online.env!r} and env.name={cfg.env.name!r} are different environment "
                        "families; fine-tune in a rooms variant after rooms, or scienceworld after scienceworld")
    return problems


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> GliderConfig:
    return core_config.load(GliderConfig, path, list(overrides), rules=cross_field_problems)


def dump_config(cfg: GliderConfig) -> str:
    return core_config.dump(cfg)
