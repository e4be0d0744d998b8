"""`drl reason` commands: train, config show. Mounted into `drl` by diffusion_rl.cli; the same conventions
(one `drl: error:` message and exit 2 for a mistake the user can fix, `--set` overrides)."""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Annotated

import typer

from diffusion_rl.core.cli import (
    DocOpt,
    OutputDirOpt,
    ResumeOpt,
    SetOpt,
    core_user_errors,
    show_config,
    user_errors,
)

app = typer.Typer(help="GRPO for language models on the shared core (train, eval, sample, config show).",
                  no_args_is_help=True)
config_app = typer.Typer(help="Inspect reasoning configurations.", no_args_is_help=True)
app.add_typer(config_app, name="config")

ConfigArg = Annotated[
    Path | None, typer.Argument(help="YAML config (default: the shipped configs/reason_default.yaml, GRPO on the arithmetic world).")
]


def _user_errors() -> tuple[type[BaseException], ...]:
    import rewards
    from diffusion_rl.core.prompts import PromptError
    from reasoning_rl.models import ModelLoadError

    return (*core_user_errors(), ModelLoadError, PromptError, rewards.RewardError)


def default_config() -> Path:
    return Path(str(importlib.resources.files("diffusion_rl") / "configs" / "reason_default.yaml"))


def _load(config: Path | None, overrides: list[str] | None, output_dir: Path | None = None):
    """The config of the trainer the YAML names (`trainer:`, default grpo) and that trainer's module."""
    from reasoning_rl import registry

    overrides = list(overrides or [])
    if output_dir is not None:
        overrides.append(f"output_dir={output_dir}")
    path = config if config is not None else default_config()
    module = registry.trainer_module(registry.trainer_name(path, overrides))
    return module.load_config(path, overrides), module


@app.command()
def train(
    config: ConfigArg = None,
    set_: SetOpt = None,
    output_dir: OutputDirOpt = None,
    resume: ResumeOpt = None,
) -> None:
    """Fine-tune a language model: GRPO by default; the YAML's `trainer:` picks another method (glider, see)."""
    with user_errors(_user_errors()):
        cfg, module = _load(config, set_, output_dir)
        module.train(cfg, resume=resume)


@app.command("eval")
def eval_(
    model_or_run: Annotated[str, typer.Argument(help="A model (hub id, directory, builtin:...) or a drl reasoning run.")],
    prompts: Annotated[
        Path | None, typer.Option(help="JSONL problems (problem / answer columns; default: the run's eval.problems or eval.prompts).")
    ] = None,
    reward: Annotated[str | None, typer.Option("--reward", "-r", help="Reward name (default: the run's reward).")] = None,
    num: Annotated[int, typer.Option("--num", "-n", help="Sampled completions per problem (pass@num).")] = 4,
    max_new_tokens: Annotated[int | None, typer.Option(help="Longest completion (default: the run's, else 64).")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature (default: the run's, else 1).")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 1234,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    task: Annotated[str | None, typer.Option(
        "--task", help="A named evaluation instead of held-out problems: mathif, mmkc, satori, env:NAME, see "
        "(reasoning_rl.registry.EVAL_TASKS).")] = None,
    limit: Annotated[int | None, typer.Option(help="--task: evaluate at most this many problems / episodes.")] = None,
    data: Annotated[Path | None, typer.Option(help="--task: a local copy of the task's released data (else procedural).")] = None,
) -> None:
    """Greedy and sampled reward (the accuracy for a 0/1 reward), pass@num and mean length on held-out problems,
    or (with --task) a named evaluation."""
    import json

    if task is not None:
        _eval_task(task, model_or_run, num, limit, seed, max_new_tokens, temperature, data, as_json)
        return
    with user_errors(_user_errors()):
        import rewards
        from reasoning_rl.config import PromptsConfig, ReasonConfig
        from reasoning_rl.data import held_out_problems, load_problems
        from reasoning_rl.evaluation import evaluate
        from reasoning_rl.inference import load_for_inference

        model, tokenizer, run_cfg = load_for_inference(model_or_run)
        cfg = run_cfg or ReasonConfig()
        if prompts is not None:
            problems = load_problems(PromptsConfig(**{**cfg.prompts.model_dump(), "source": "jsonl", "path": str(prompts)}))
        elif run_cfg is not None and run_cfg.has_eval():
            problems = held_out_problems(run_cfg)
        else:
            raise rewards.RewardError("no evaluation problems: pass --prompts FILE.jsonl (problem / answer columns)")
        run_reward = run_cfg and (run_cfg.eval.reward or run_cfg.reward)  # the run's evaluation reward
        reward_fn = rewards.load(reward) if reward else (run_reward.build() if run_reward else None)
        if reward_fn is None:
            raise rewards.RewardError("no reward to evaluate with: pass --reward NAME (see `drl reward list`)")
        r = cfg.rollout
        results, _ = evaluate(
            model, tokenizer, problems, reward_fn, num_samples=num,
            max_new_tokens=max_new_tokens or (r.max_new_tokens if run_cfg else 64),
            temperature=temperature or r.temperature, top_p=r.top_p, top_k=r.top_k, stop_strings=r.stop_strings,
            system_prompt=cfg.prompts.system_prompt, use_chat_template=cfg.prompts.use_chat_template, seed=seed,
        )
    if as_json:
        typer.echo(json.dumps({"problems": len(problems.prompts), "num": num, "seed": seed, "reward": reward_fn.name,
                               "results": results}))
        return
    typer.echo(f"{len(problems.prompts)} problems, {num} samples each, reward {reward_fn.name}, seed {seed}")
    for key, value in results.items():
        typer.echo(f"{key:<20} {value:>10.4f}")


def _eval_task(task, model_or_run, num, limit, seed, max_new_tokens, temperature, data, as_json) -> None:
    import json

    from reasoning_rl import registry

    with user_errors(_user_errors()):
        options = registry.EvalOptions(num=num, limit=limit, seed=seed, max_new_tokens=max_new_tokens,
                                       temperature=temperature, data=data)
        results = registry.run_eval_task(task, model_or_run, options)
    if as_json:
        typer.echo(json.dumps({"task": task, "seed": seed, "results": results}))
        return
    typer.echo(f"task {task}, seed {seed}")
    for key, value in registry.flatten(results):
        typer.echo(f"{key:<40} {value:>10.4f}" if isinstance(value, float) else f"{key:<40} {value!s:>10}")


@app.command()
def sample(
    model_or_run: Annotated[str, typer.Argument(help="A model (hub id, directory, builtin:...) or a drl reasoning run.")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Problem text (repeatable).")],
    num: Annotated[int, typer.Option("--num", "-n", help="Completions per prompt.")] = 1,
    max_new_tokens: Annotated[int, typer.Option(help="Longest completion.")] = 64,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
) -> None:
    """Print sampled completions of problems (chat template and system prompt of the run when given one)."""
    with user_errors(_user_errors()):
        import torch

        from reasoning_rl.config import ReasonConfig
        from reasoning_rl.data import format_prompt
        from reasoning_rl.inference import load_for_inference
        from reasoning_rl.rollout import generate

        model, tokenizer, run_cfg = load_for_inference(model_or_run)
        p = (run_cfg or ReasonConfig()).prompts
        texts = [format_prompt(tokenizer, q, p.system_prompt, p.use_chat_template) for q in prompt]
        torch.manual_seed(seed)
        out = generate(model, tokenizer, texts, list(prompt), [{} for _ in prompt], num, max_new_tokens, temperature,
                       1.0, 0, [], 16)
    for i, completion in enumerate(out.completions):
        typer.echo(f"[{out.prompts[i]}] {completion}")


@config_app.command("show")
def config_show(
    config: ConfigArg = None,
    set_: SetOpt = None,
    doc: DocOpt = False,
) -> None:
    """Print the resolved reasoning configuration (YAML) after defaults and overrides, or document every field."""
    with user_errors(_user_errors()):
        cfg, _ = _load(config, set_)
    show_config(cfg, doc)
