"""`drl` command line: train, sample, config show, credit inspect, reward (list/score).

Errors the user can fix (bad config, missing model, corrupt checkpoint, bad reward) print one clear
message and exit with code 2, without a traceback.
"""

from __future__ import annotations

import importlib.resources
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from diffusion_rl.core.cli import (
    DocOpt,
    OutputDirOpt,
    ResumeOpt,
    SetOpt,
    core_user_errors,
    fail,
    show_config,
    user_errors,
)

app = typer.Typer(
    help="drl: reinforcement-learning fine-tuning of text-to-image diffusion models (DDPO/GRPO, dense credit).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect configurations.", no_args_is_help=True)
credit_app = typer.Typer(help="Inspect step-level credit of a run.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(credit_app, name="credit")


def _mount_reward_cli() -> None:
    from rewards.cli import app as reward_app

    app.add_typer(reward_app, name="reward", help="List reward models and score images.")


def _user_errors() -> tuple[type[BaseException], ...]:
    """The core's user errors plus the diffusion side's (model loading, prompts, rewards)."""
    import rewards
    from diffusion_rl.models import ModelLoadError
    from diffusion_rl.prompts import PromptError

    return (*core_user_errors(), ModelLoadError, PromptError, rewards.RewardError)


ConfigArg = Annotated[
    Path | None, typer.Argument(help="YAML config (default: the embedded CPU default, configs/default.yaml).")
]


def shipped_config(name: str) -> Path:
    """A config shipped inside the package (the repository's configs/, installed as package data)."""
    return Path(str(importlib.resources.files("diffusion_rl") / "configs" / name))


DEFAULT_CONFIG = shipped_config("default.yaml")


def _load(config: Path | None, overrides: list[str] | None, output_dir: Path | None = None):
    """CONFIG, or the shipped configs/default.yaml (the embedded CPU default) when none is given."""
    from diffusion_rl.config import ConfigError, load_config

    if config is None:
        if not DEFAULT_CONFIG.is_file():
            raise ConfigError([f"no CONFIG given and the default {DEFAULT_CONFIG} is missing from the installed "
                               "package; reinstall drl or pass a YAML config"])
        config = DEFAULT_CONFIG
    overrides = list(overrides or [])
    if output_dir is not None:
        overrides.append(f"output_dir={output_dir}")
    return load_config(config, overrides)


@app.command()
def train(
    config: ConfigArg = None,
    set_: SetOpt = None,
    output_dir: OutputDirOpt = None,
    resume: ResumeOpt = None,
) -> None:
    """Fine-tune a diffusion model with RL. With no arguments runs the embedded CPU default in minutes."""
    with user_errors(_user_errors()):
        cfg = _load(config, set_, output_dir)
        from diffusion_rl.trainer import train as run_training

        run_training(cfg, resume=resume)


@app.command()
def sample(
    model_or_run: Annotated[str, typer.Argument(help="A model (hub id, directory, builtin:...) or a drl run directory.")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt (repeatable).")],
    num: Annotated[int, typer.Option("--num", "-n", help="Images per prompt.")] = 4,
    out: Annotated[Path, typer.Option(help="Output directory for the PNGs and grid.png.")] = Path("samples"),
    seed: Annotated[int, typer.Option(help="Noise seed.")] = 0,
    steps: Annotated[int | None, typer.Option(help="DDIM steps (default: the run's, else 20).")] = None,
    guidance_scale: Annotated[float | None, typer.Option(help="CFG weight (default: the run's, else 5).")] = None,
) -> None:
    """Sample images (and a grid PNG) from a model or from a trained run (its LoRA or UNet applied)."""
    with user_errors(_user_errors()):
        from diffusion_rl.inference import load_for_inference, sample_images

        pipe, defaults = load_for_inference(model_or_run)
        paths = sample_images(
            pipe, prompt, num, out, seed,
            steps or defaults.get("num_steps", 20), guidance_scale or defaults.get("guidance_scale", 5.0),
            defaults.get("negative_prompt", ""), family=defaults["family"],
        )
        typer.echo(f"wrote {len(paths) - 1} images and {paths[-1]}")


@app.command("eval")
def eval_(
    model_or_run: Annotated[str, typer.Argument(help="A model (hub id, directory, builtin:...) or a drl run directory.")],
    reward: Annotated[
        list[str] | None, typer.Option("--reward", "-r", help="Reward name (repeatable; default: the run's reward).")
    ] = None,
    prompts: Annotated[
        str | None, typer.Option(help="world:eval, world:train, or a .txt/.jsonl file (default: the run's eval prompts).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Evaluation noise seed.")] = 1234,
    num: Annotated[int, typer.Option("--num", "-n", help="Images per prompt.")] = 1,
    steps: Annotated[int | None, typer.Option(help="DDIM steps (default: the run's, else 20).")] = None,
    guidance_scale: Annotated[float | None, typer.Option(help="CFG weight (default: the run's, else 5).")] = None,
    out: Annotated[Path | None, typer.Option(help="Write grid.png (and results.json) here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Fixed-seed evaluation on held-out prompts: mean and std per reward, and an image grid."""
    with user_errors(_user_errors()):
        import rewards
        from diffusion_rl.evaluation import eval_prompts_from, evaluate
        from diffusion_rl.inference import load_for_inference
        from diffusion_rl.tb import image_grid

        pipe, defaults = load_for_inference(model_or_run)
        run_cfg = defaults.get("config")
        source = prompts or (run_cfg.eval.prompts if run_cfg is not None and run_cfg.eval.prompts else None)
        if not source:
            raise rewards.RewardError("no evaluation prompts: pass --prompts world:eval or a prompt file")
        prompt_list = source if isinstance(source, list) else eval_prompts_from(source)
        if reward:
            fns = [rewards.load(n) for n in reward]
        elif run_cfg is not None:
            fns = [(run_cfg.eval.reward or run_cfg.reward).build()]  # what the trainer's evaluation reports
        else:
            raise rewards.RewardError("no reward to evaluate: pass --reward NAME (see `drl reward list`)")
        family = defaults["family"]
        results, images, _ = evaluate(
            pipe, family.denoiser(pipe), prompt_list, fns, seed, num, steps or defaults.get("num_steps", 20),
            guidance_scale or defaults.get("guidance_scale", 5.0), defaults.get("eta", 1.0),
            negative_prompt=defaults.get("negative_prompt", ""),  # what the trainer's evaluation uses
            family=family, rule=defaults["rule"],
        )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        image_grid(images[:64], nrow=8).save(out / "grid.png")
        (out / "results.json").write_text(json.dumps(results, indent=1))
    if as_json:
        typer.echo(json.dumps({"prompts": len(prompt_list), "images": len(images), "seed": seed, "results": results}))
        return
    typer.echo(f"{len(images)} images, {len(prompt_list)} prompts, seed {seed}")
    typer.echo(f"{'reward':<24} {'mean':>10} {'std':>10}")
    for name, row in results.items():
        typer.echo(f"{name:<24} {row['mean']:>10.4f} {row['std']:>10.4f}")


@config_app.command("show")
def config_show(
    config: ConfigArg = None,
    set_: SetOpt = None,
    doc: DocOpt = False,
) -> None:
    """Print the resolved configuration (YAML) after defaults and overrides, or validate and document it."""
    with user_errors(_user_errors()):
        cfg = _load(config, set_)
    show_config(cfg, doc)


@credit_app.command("inspect")
def credit_inspect(
    run_dir: Annotated[Path, typer.Argument(help="A drl run directory.")],
    epoch: Annotated[int | None, typer.Option(help="Epoch to show (default: the latest).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print the per-step credit profile of the latest (or a given) epoch as a small table."""
    path = run_dir / "credit_profile.jsonl"
    if not path.is_file():
        fail(FileNotFoundError(f"{path} not found; is {run_dir} a drl run directory with a finished epoch?"))
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    chosen = rows[-1] if epoch is None else next((r for r in rows if r["epoch"] == epoch), None)
    if chosen is None:
        fail(ValueError(f"epoch {epoch} not in {path}; epochs: {[r['epoch'] for r in rows]}"))
    if as_json:
        typer.echo(json.dumps(chosen))
        return
    contrib, adv = chosen["mean_contribution"], chosen["mean_abs_step_advantage"]
    peak = max(contrib) or 1.0
    typer.echo(f"credit profile, epoch {chosen['epoch']} ({chosen['info']})")
    typer.echo(f"{'step':>4}  {'contribution':>12}  {'|advantage|':>11}")
    for k, (c, a) in enumerate(zip(contrib, adv, strict=True)):
        typer.echo(f"{k:>4}  {c:>12.4f}  {a:>11.4f}  {'#' * int(round(20 * max(c, 0) / peak))}")


def _mount_reason_cli() -> None:
    from reasoning_rl.cli import app as reason_app

    app.add_typer(reason_app, name="reason", help="GRPO for language models (drl reason train / eval / sample / config show).")


def main() -> None:
    _mount_reward_cli()
    _mount_reason_cli()
    app(prog_name="drl")


if __name__ == "__main__":
    sys.exit(main())
