"""Problems for the reasoning trainer: from the config's list, a JSONL file or a `datasets` dataset, with
configurable columns; and the chat-template formatting of a problem into the prompt the policy sees."""

from __future__ import annotations

import json
from pathlib import Path

import reasoning_rl.world  # noqa: F401  (registers the reasoning_gym reward)
from diffusion_rl.core.prompts import PromptError, PromptSet
from reasoning_rl.config import PromptsConfig


def load_problems(cfg: PromptsConfig) -> PromptSet:
    """PromptSet whose prompts are the problem texts and whose metadata rows are the other columns, with the
    reference answer under `answer` and the reference solution under `solution` (what rewards read)."""
    if cfg.source == "list":
        rows, where = list(cfg.problems), "prompts.problems"
    elif cfg.source == "jsonl":
        rows, where = _read_jsonl(Path(cfg.path)), cfg.path
    elif cfg.source in ("world", "reasoning_gym"):
        rows, where = generated_rows(cfg), generated_source_name(cfg)
    else:
        rows, where = _read_dataset(cfg.dataset, cfg.split), f"dataset {cfg.dataset!r} split {cfg.split!r}"
    base = Path(cfg.path).parent if cfg.source == "jsonl" else Path(".")
    return rows_to_problems(rows, cfg, where, base)


def held_out_problems(cfg) -> PromptSet | None:
    """A run's held-out problems (a ReasonConfig): `eval.prompts` loaded as a source, else the `eval.problems` list
    read with the training prompts' columns; None when neither is set."""
    if cfg.eval.prompts is not None:
        return load_problems(cfg.eval.prompts)
    if cfg.eval.problems:
        return rows_to_problems(cfg.eval.problems, cfg.prompts, "eval.problems")
    return None


def rows_to_problems(rows: list[dict], cfg: PromptsConfig, where: str, image_dir: Path = Path(".")) -> PromptSet:
    """Rows (mappings of columns) -> PromptSet, checking the configured columns exist."""
    if not rows:
        raise PromptError(f"{where} holds no problems")
    columns = {cfg.problem_column: "problem", cfg.answer_column: "answer", cfg.solution_column: "solution",
               cfg.image_column: "image", cfg.off_policy_column: "off_policy"}
    for key, what in columns.items():
        if key and key not in rows[0]:
            raise PromptError(
                f"{where} has no column {key!r} (the {what}; columns: {sorted(rows[0])}); set prompts."
                f"{what}_column to one of them" + ("" if what == "problem" else " or to null")
            )
    prompts, metadata = [], []
    for row in rows:
        meta = {k: v for k, v in row.items() if k != cfg.problem_column}
        if cfg.answer_column:
            meta["answer"] = row[cfg.answer_column]
        if cfg.solution_column:
            meta["solution"] = row[cfg.solution_column]
        if cfg.off_policy_column:
            meta["off_policy"] = str(row[cfg.off_policy_column])
        if cfg.image_column:
            meta["image"] = load_image(row[cfg.image_column], image_dir, f"{where} row {len(prompts)}")
        prompts.append(str(row[cfg.problem_column]))
        metadata.append(meta)
    return PromptSet(prompts, metadata)


def generated_source_name(cfg: PromptsConfig) -> str:
    if cfg.source == "world":
        return f"world {cfg.world!r} split {cfg.split!r}"
    return f"reasoning-gym tasks {list(cfg.tasks)} split {cfg.split!r}"


def generated_rows(cfg: PromptsConfig) -> list[dict]:
    """The rows of a generated source: an embedded world (`reasoning_rl.world.text` / `.visual`) or reasoning-gym
    tasks (`reasoning_rl.world.gym`), `cfg.size` problems of `cfg.split` from `cfg.generator_seed`."""
    try:
        if cfg.source == "reasoning_gym":
            from reasoning_rl.world.gym import gym_rows

            return gym_rows(cfg.tasks, cfg.size, cfg.generator_seed, cfg.split, cfg.task_options)
        if cfg.world == "arithmetic":
            from reasoning_rl.world.text import generate_problems

            return [p.row() for p in generate_problems(cfg.size, cfg.split, cfg.steps, cfg.generator_seed)]
        from reasoning_rl.world.visual import visual_rows

        return visual_rows(cfg.size, cfg.split, cfg.question_types, cfg.generator_seed, cfg.image_scale)
    except (ValueError, ImportError) as err:
        raise PromptError(f"{generated_source_name(cfg)}: {err}") from None


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise PromptError(f"prompts.path {str(path)!r} does not exist; pass a JSONL file with one problem per line")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise PromptError(f"{path}:{n}: not valid JSON ({err.msg})") from None
    return rows


def _read_dataset(name: str, split: str) -> list[dict]:
    import datasets

    try:
        if Path(name).is_dir():
            loaded = datasets.load_from_disk(name)
            ds = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        elif Path(name).is_file():
            kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(Path(name).suffix)
            if kind is None:
                raise PromptError(f"prompts.dataset {name!r}: use a .jsonl, .json, .csv or .parquet file")
            ds = datasets.load_dataset(kind, data_files=name, split="train")
        else:
            ds = datasets.load_dataset(name, split=split)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise PromptError(f"could not load prompts.dataset {name!r} split {split!r}: {err}") from None
    return [dict(row) for row in ds]


def load_image(value, base: Path, where: str):
    """A problem's image as an RGB PIL image: a PIL image, a `datasets` Image dict ({"bytes"} or {"path"}), raw
    bytes, or a path (relative paths are tried beside the data file)."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, bytes):
            return Image.open(io.BytesIO(value)).convert("RGB")
        path = Path(str(value))
        if not path.is_absolute() and not path.exists() and (base / path).exists():
            path = base / path
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, TypeError) as err:
        raise PromptError(
            f"{where}: cannot read the image {str(value)[:120]!r} ({type(err).__name__}: {err}); give a readable image "
            "file path (relative to the JSONL file's folder or absolute) or image bytes in prompts.image_column"
        ) from None


def format_prompt(processor, problem: str, system_prompt: str | None, use_chat_template: bool,
                  with_image: bool = False) -> str:
    """The text the policy continues: the chat template with the generation prompt (and the system message);
    with an image, the user turn holds an image part before the text (the processor expands its tokens)."""
    if not use_chat_template:
        if with_image:
            raise PromptError("problems with images need the chat template (it places the image tokens); set "
                              "prompts.use_chat_template=true")
        return problem
    owner = processor if getattr(processor, "chat_template", None) else getattr(processor, "tokenizer", processor)
    if not getattr(owner, "chat_template", None):
        raise PromptError(
            f"the tokenizer of this model has no chat template ({type(processor).__name__}); set "
            "prompts.use_chat_template=false to feed the raw problem text, or use an instruct/chat model"
        )
    content = [{"type": "image"}, {"type": "text", "text": problem}] if with_image else problem
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": content}
    ]
    return owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
