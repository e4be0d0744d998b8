"""`drl reason eval MODEL --task satori`: SATORI-style staged VQA on the visual world.

SATORI-R1 (justairr/SATORI-R1) has a vision-language model answer in three stages,
``<caption>…</caption><bbox>[[x1,y1,x2,y2],…]</bbox><answer>…</answer>``, and rewards each. This task asks the
visual world's eval-split questions (`reasoning_rl.world.visual`: count / colour / shape / position, exact
answers, the boxes of the objects a question is about, a caption of every object) in that format and reports,
with `rewards.satori`'s own components:

* ``accuracy``      the ``<answer>`` is the reference answer (case-folded, whitespace-collapsed:
  ``normalize_answer=True``);
* ``caption``       ½(BLEU-4 with smoothing method1 + ROUGE-L F1 with stemming) against the scene caption (no
  caption tag: 0);
* ``bbox``          union IoU of the predicted and reference box sets (malformed or absent: 0), the predicted
  boxes rescaled from the image the model saw to the original one (Qwen2-VL ``smart_resize`` with the model's
  own processor settings: patch size x merge size, shortest / longest edge in pixels; a processor without
  them: no rescaling);
* ``format_rate``   the three parts in order (SATORI's pattern); ``malformed_bbox_rate`` the share without a
  readable box list; ``reward`` SATORI's equal-weight sum of the four (0-4).

Each is reported ``overall`` and per question type, for the greedy completion of every problem and for its
``--num`` sampled completions; ``mean_length`` is in tokens (eos excluded). Problems: ``--limit`` (default 32)
eval-split scenes from ``--seed``, question types in turn; ``--task satori:TYPE`` keeps one type. ``--data``
reads a JSONL of the same columns (``prompt``, ``answer``, ``caption``, ``boxes`` in pixels of the image,
``image``: a path relative to the file or absolute; ``question_type`` optional).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusion_rl.core.prompts import PromptError, PromptSet
from reasoning_rl.eval_tasks import common

DEFAULT_PROBLEMS = 32
DEFAULT_MAX_NEW_TOKENS = 128
INSTRUCTION = ("First describe the image inside <caption></caption>, then give the boxes of the objects the question "
               "is about as <bbox>[[x1, y1, x2, y2]]</bbox> in pixels, then the answer inside <answer></answer>.")


def prompt_of(question: str) -> str:
    return f"{question}\n{INSTRUCTION}"


def world_rows(n: int, seed: int, question_types: tuple[str, ...] | None = None, scale: int = 1) -> list[dict]:
    from reasoning_rl.world.visual import QUESTION_TYPES, visual_rows

    return visual_rows(n, "eval", question_types or QUESTION_TYPES, seed, scale)


def data_rows(path: Path) -> list[dict]:
    from reasoning_rl.data import load_image

    rows = common.read_records(path, "SATORI-style JSONL")
    out = []
    for n, row in enumerate(rows):
        missing = [c for c in ("prompt", "answer", "caption", "boxes", "image") if c not in row]
        if missing:
            raise PromptError(f"--data {path} record {n}: no column(s) {missing} (columns: {sorted(row)}); the format "
                              "is the visual world's: prompt, answer, caption, boxes, image")
        out.append({**row, "image": load_image(row["image"], Path(path).parent, f"--data {path} record {n}"),
                    "question_type": row.get("question_type", "all")})
    return out


def rescale_options(processor) -> dict[str, Any]:
    """`rewards.satori` box-rescaling options for the model's own image processor (Qwen2-VL smart_resize), or
    none when the processor does not resize that way."""
    ip = getattr(processor, "image_processor", None)
    size = getattr(ip, "size", None)
    patch, merge = getattr(ip, "patch_size", None), getattr(ip, "merge_size", None)
    lo = getattr(size, "shortest_edge", None) if size is not None else None
    hi = getattr(size, "longest_edge", None) if size is not None else None
    if isinstance(size, dict):
        lo, hi = size.get("shortest_edge"), size.get("longest_edge")
    if not all(isinstance(v, int) and v > 0 for v in (patch, merge, lo, hi)):
        return {"bbox_rescale": "none"}
    return {"bbox_rescale": "smart_resize", "factor": patch * merge, "min_pixels": lo, "max_pixels": hi}


def make_reward(rescale: dict[str, Any]):
    from rewards.satori import SatoriReward

    return SatoriReward(normalize_answer=True, **rescale)


def score(texts: list[str], metas: list[dict], lengths: list[int], reward) -> list[dict]:
    """One record per completion: type, format, caption, bbox, answer (0/1 or [0, 1]), malformed, length."""
    _, info = reward(texts, None, metas)
    comps = {k: v.tolist() for k, v in info["components"].items()}
    from rewards.satori import parse_boxes

    return [{"type": m.get("question_type", "all"), "format": comps["format"][i], "caption": comps["caption"][i],
             "bbox": comps["bbox"][i], "answer": comps["answer"][i], "malformed": parse_boxes(t) is None,
             "length": lengths[i]} for i, (t, m) in enumerate(zip(texts, metas, strict=True))]


def summarise(records: list[dict]) -> dict[str, Any]:
    def block(rs: list[dict]) -> dict[str, Any]:
        return {
            "samples": len(rs),
            "accuracy": common.mean(r["answer"] for r in rs),
            "caption": common.mean(r["caption"] for r in rs),
            "bbox": common.mean(r["bbox"] for r in rs),
            "format_rate": common.mean(r["format"] for r in rs),
            "malformed_bbox_rate": common.mean(float(r["malformed"]) for r in rs),
            "reward": common.mean(r["format"] + r["caption"] + r["bbox"] + r["answer"] for r in rs),
            "mean_length": common.mean(r["length"] for r in rs),
        }

    out = {"overall": block(records)}
    for t in sorted({r["type"] for r in records}):
        out[t] = block([r for r in records if r["type"] == t])
    return out


def run(model_or_run: str, arg: str | None, options) -> dict[str, Any]:
    """`--task satori` or `--task satori:TYPE` (count, colour, shape, position); see the module docstring."""
    from reasoning_rl.models import ModelLoadError
    from reasoning_rl.world.visual import QUESTION_TYPES

    if arg is not None and arg not in QUESTION_TYPES:
        raise PromptError(f"--task satori:{arg}: the argument is a question type, one of {list(QUESTION_TYPES)}")
    loaded = common.load(model_or_run)
    if not loaded.vision:
        raise ModelLoadError(f"--task satori asks questions about images; {model_or_run!r} is a text-only model. Pass "
                             "a vision-language model (e.g. builtin:tiny-random-vlm, a Qwen2-VL directory) or run")
    if options.data is not None:
        rows = data_rows(options.data)
        rows = common.take([r for r in rows if arg is None or r["question_type"] == arg], options.limit)
        source = str(options.data)
    else:
        cfg = loaded.run_config
        scale = cfg.prompts.image_scale if cfg is not None else 1
        rows = world_rows(options.limit or DEFAULT_PROBLEMS, options.seed, (arg,) if arg else None, scale)
        source = "visual world (eval split)"
    if not rows:
        raise PromptError(f"no problems of question type {arg!r} in {source}")
    s = common.sampling(loaded, options, DEFAULT_MAX_NEW_TOKENS)
    metas = [{**{k: v for k, v in r.items() if k != "prompt"}, "width": r["image"].width, "height": r["image"].height}
             for r in rows]
    out = common.complete(loaded, PromptSet([prompt_of(r["prompt"]) for r in rows], metas), options, s)
    rescale = rescale_options(loaded.processor)
    reward = make_reward(rescale)
    greedy = score(out.greedy, metas, common.token_lengths(loaded, out.greedy), reward)
    sampled = score(out.sampled, [m for m in metas for _ in range(out.num)], common.token_lengths(loaded, out.sampled),
                    reward)
    return {"source": source, "problems": len(rows), "num": out.num, "bbox_rescale": rescale["bbox_rescale"],
            "max_new_tokens": s.max_new_tokens, "temperature": s.temperature,
            "greedy": summarise(greedy), "sampled": summarise(sampled)}
