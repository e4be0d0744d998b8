"""`drl reason eval RUN_DIR --task env:NAME`: a trained GLIDER (or flat) agent's success rate, mean steps and
invalid-action rate on the seen and unseen tasks of an environment (`rooms`, `rooms-moved`, `rooms-rewired`,
`scienceworld`; default: the run's own).

RUN_DIR is a `drl reason train configs/glider_text.yaml` output directory: its config.yaml, backbone/ (built-in
backbone) and final/ (the adapters, or the full model) are loaded; greedy decoding, one episode per task in order.
"""

from __future__ import annotations

from pathlib import Path

from reasoning_rl import registry
from reasoning_rl.agents.agent import outcome, run_episodes
from reasoning_rl.agents.env import ENVIRONMENTS, make_env


def evaluate_agent(model, tokenizer, cfg, env_name: str, episodes: int, seed: int) -> dict:
    """{'env', 'seen': {success, mean_steps, invalid_rate, episodes}, 'unseen': {...}} with greedy decoding; at most
    `episodes` tasks per split, evenly spread over it, one episode each."""
    e = cfg.env

    def factory():
        return make_env(env_name, e.max_steps, e.split_seed, e.scienceworld_tasks, e.scienceworld_simplifications)

    env = factory()
    results: dict = {"env": env_name, "hierarchical": cfg.agent.hierarchical}
    for split in ("seen", "unseen"):
        tasks = env.tasks(split)
        n = min(episodes, len(tasks))
        jobs = [(tasks[(i * len(tasks)) // n], seed + i) for i in range(n)]  # spread over the split's tasks
        records = run_episodes(model, tokenizer, factory, jobs, cfg.agent.hierarchical, cfg.data.subtask_steps,
                               0.0, 0.0, seed, cfg.model.max_new_tokens) if jobs else []
        results[split] = outcome(records)
    return results


def load_agent(run_dir: str | Path):
    """(model, tokenizer, config) of a finished GLIDER run directory."""
    from reasoning_rl.agents.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "final").is_dir():
        raise FileNotFoundError(f"{run_dir} is not a finished GLIDER run (no config.yaml or final/); pass the "
                                "output_dir of `drl reason train configs/glider_text.yaml`")
    cfg = load_config(run_dir / "config.yaml")
    if cfg.model.pretrained == "builtin:rooms-word-lm":
        from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

        base = LlamaForCausalLM.from_pretrained(run_dir / "backbone")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(run_dir / "backbone")
    else:
        from reasoning_rl.models import load_policy

        base, tokenizer = load_policy(cfg.model.pretrained, seed=cfg.seed)
    if cfg.model.use_lora:
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, run_dir / "final" / "lora")
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(run_dir / "final" / "model")
    return model.eval(), tokenizer, cfg


def run(model_or_run: str, arg: str | None, options: registry.EvalOptions) -> dict:
    from diffusion_rl.core.config import ConfigError

    if arg is not None and arg not in ENVIRONMENTS:
        raise ConfigError([f"--task env:{arg}: unknown environment; choose one of {', '.join(ENVIRONMENTS)}"])
    try:
        model, tokenizer, cfg = load_agent(model_or_run)
    except FileNotFoundError as err:
        raise ConfigError([str(err)]) from None
    env_name = arg or cfg.env.name
    if env_name == "scienceworld":
        from reasoning_rl.agents.scienceworld_env import available

        if available():
            raise ConfigError([f"--task env:scienceworld: {available()}"])
    if options.max_new_tokens:
        cfg.model.max_new_tokens = options.max_new_tokens
    return evaluate_agent(model, tokenizer, cfg, env_name, options.limit or cfg.eval.episodes, options.seed)
