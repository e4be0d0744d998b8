"""`drl reason` commands: train, config show. Mounted into `drl` by diffusion_rl.cli; the same conventions
(one `drl: error:` message and exit 2 for a mistake the user can fix, `--set` overrides)."""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Annotated

import typer

from diffusion_rl.core.cli import DocOpt, SetOpt, core_user_errors, show_config, user_errors

app = typer.Typer(help="GRPO for language models on the shared core (train, config show).", no_args_is_help=True)
config_app = typer.Typer(help="Inspect reasoning configurations.", no_args_is_help=True)
app.add_typer(config_app, name="config")

ConfigArg = Annotated[
    Path | None, typer.Argument(help="YAML config (default: the shipped configs/reason_tiny.yaml).")
]


def _user_errors() -> tuple[type[BaseException], ...]:
    import rewards
    from diffusion_rl.core.prompts import PromptError
    from reasoning_rl.models import ModelLoadError

    return (*core_user_errors(), ModelLoadError, PromptError, rewards.RewardError)


def default_config() -> Path:
    return Path(str(importlib.resources.files("diffusion_rl") / "configs" / "reason_tiny.yaml"))


def _load(config: Path | None, overrides: list[str] | None, output_dir: Path | None = None):
    from reasoning_rl.config import load_config

    overrides = list(overrides or [])
    if output_dir is not None:
        overrides.append(f"output_dir={output_dir}")
    return load_config(config if config is not None else default_config(), overrides)


@app.command()
def train(
    config: ConfigArg = None,
    set_: SetOpt = None,
    output_dir: Annotated[Path | None, typer.Option(help="Run directory (overrides output_dir).")] = None,
    resume: Annotated[
        str | None, typer.Option(help="'auto' = newest complete checkpoint of the run, or a checkpoint directory.")
    ] = None,
) -> None:
    """Fine-tune a language model with GRPO."""
    with user_errors(_user_errors()):
        cfg = _load(config, set_, output_dir)
        from reasoning_rl.trainer import train as run_training

        run_training(cfg, resume=resume)


@config_app.command("show")
def config_show(
    config: ConfigArg = None,
    set_: SetOpt = None,
    doc: DocOpt = False,
) -> None:
    """Print the resolved reasoning configuration (YAML) after defaults and overrides, or document every field."""
    with user_errors(_user_errors()):
        cfg = _load(config, set_)
    show_config(cfg, doc)
