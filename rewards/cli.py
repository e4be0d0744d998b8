"""``drl reward`` command line: list the registered rewards and score image files.

    drl reward list [--json]
    drl reward score --reward NAME [--model-path DIR] [--option key=value ...] --prompt TEXT IMG...

Errors print one clean line to stderr and exit with code 2.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from rewards.base import RewardError
from rewards.registry import INFO, available, load

app = typer.Typer(
    help="Reward models: list them and score image files.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


@app.command("list", help="List registered rewards: weights id, output range, licence, differentiable.")
def list_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table.")] = False,
) -> None:
    entries = []
    for name in available():
        info = INFO.get(name)
        entries.append(
            {
                "name": name,
                "weights": info.weights if info else "-",
                "output_range": info.output_range if info else "-",
                "licence": info.licence if info else "-",
                "differentiable": bool(info.differentiable) if info else False,
                "description": info.description if info else "-",
            }
        )
    if as_json:
        typer.echo(json.dumps(entries, indent=2))
        return
    headers = ["name", "weights", "output range", "licence", "differentiable"]
    rows = [
        [e["name"], e["weights"], e["output_range"], e["licence"], "yes" if e["differentiable"] else "no"]
        for e in entries
    ]
    typer.echo(_table(headers, rows))


def _parse_options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            _fail(f"--option {pair!r} is not key=value (e.g. --option batch_size=8)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        options[key] = value
    return options


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x


@app.command("score", help="Score image files with one reward and print one row per image.")
def score_cmd(
    images: Annotated[list[Path], typer.Argument(help="Image files (PNG, JPEG, ...) to score.")],
    reward: Annotated[str, typer.Option("--reward", "-r", help="Reward name (see `list`).")],
    prompt: Annotated[
        list[str],
        typer.Option("--prompt", "-p", help="Prompt: once for all images, or once per image in order."),
    ] = None,  # type: ignore[assignment]
    model_path: Annotated[
        str | None, typer.Option("--model-path", help="Local weights file/dir or hub id (model rewards).")
    ] = None,
    option: Annotated[
        list[str],
        typer.Option("--option", "-o", help="Extra reward option key=value (YAML-parsed), repeatable."),
    ] = None,  # type: ignore[assignment]
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    prompts = list(prompt or [])
    if not prompts:
        prompts = [""]
    if len(prompts) not in (1, len(images)):
        _fail(f"got {len(prompts)} --prompt values for {len(images)} images; give one or one per image")
    if len(prompts) == 1:
        prompts = prompts * len(images)
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        _fail(f"image file(s) not found: {', '.join(missing)}")
    options = _parse_options(list(option or []))
    if model_path is not None:
        options["model_path"] = model_path
    try:
        fn = load(reward, **options)
        scores, info = fn([str(p) for p in images], prompts, None)
    except RewardError as exc:
        _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - the CLI reports every failure as one line
        _fail(f"{type(exc).__name__}: {exc}")
    components = info.get("components", {})
    rows = []
    for i, path in enumerate(images):
        row: dict[str, Any] = {"image": str(path), "prompt": prompts[i], "score": _num(float(scores[i]))}
        if components:
            row["components"] = {k: _num(float(v[i])) for k, v in components.items()}
        rows.append(row)
    if as_json:
        typer.echo(json.dumps({"reward": fn.name, "results": rows}, indent=2))
        return
    headers = ["image", "prompt", fn.name, *components]
    table_rows = [
        [
            r["image"],
            r["prompt"],
            "nan" if r["score"] is None else f"{r['score']:.6g}",
            *("nan" if v is None else f"{v:.6g}" for v in r.get("components", {}).values()),
        ]
        for r in rows
    ]
    typer.echo(_table(headers, table_rows))


if __name__ == "__main__":
    app()
