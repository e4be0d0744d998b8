"""The command-line conventions `drl` and `drl reason` share: a mistake the user can fix (a bad config, a
missing model, a corrupt checkpoint, an unusable reward) prints one `drl: error: ...` message naming the value
and the fix, and exits with code 2, never with a traceback."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, NoReturn

import typer

USER_ERROR_EXIT_CODE = 2

OutputDirOpt = Annotated[Path | None, typer.Option(help="Run directory (overrides output_dir).")]
ResumeOpt = Annotated[
    str | None, typer.Option(help="'auto' = newest complete checkpoint of the run, or a checkpoint directory.")
]
DocOpt = Annotated[bool, typer.Option(help="List every field with its documentation instead.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config value, e.g. --set train.learning_rate=1e-4 (repeatable)."),
]


def core_user_errors() -> tuple[type[BaseException], ...]:
    """The core's own user errors; each trainer's CLI adds its own (model loading, prompts, rewards). Imported
    on use, so `--help` does not pay for torch."""
    from diffusion_rl.core.checkpoint import CheckpointError
    from diffusion_rl.core.config import ConfigError
    from diffusion_rl.core.run import NonFiniteTrainingError, ResumeError

    return ConfigError, CheckpointError, ResumeError, NonFiniteTrainingError


def fail(err: BaseException | str) -> NoReturn:
    typer.echo(f"drl: error: {err}", err=True)
    raise typer.Exit(USER_ERROR_EXIT_CODE)


@contextlib.contextmanager
def user_errors(kinds: tuple[type[BaseException], ...]) -> Iterator[None]:
    """Inside this block, an exception of one of `kinds` becomes `fail(err)`."""
    try:
        yield
    except kinds as err:
        fail(err)


def show_config(cfg, doc: bool) -> None:
    """`config show`: the resolved config as YAML, or (with --doc) every field of its model with its docstring."""
    from diffusion_rl.core.config import documented_fields, dump

    if doc:
        for path, text in documented_fields(type(cfg)):
            typer.echo(f"{path}: {' '.join(text.split())}")
        return
    typer.echo(dump(cfg), nl=False)
