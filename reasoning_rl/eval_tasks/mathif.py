"""`drl reason eval MODEL --task mathif`: MathIF-style instruction following on math problems.

MathIF (Fu et al., arXiv 2505.14810, TingchenFu/MathIF) composes 1, 2 or 3 IFEval-derived constraints with a
math problem and reports, next to answer correctness, hard accuracy (HAcc: every constraint satisfied) and soft
accuracy (SAcc: the fraction satisfied) — the tension between reasoning and obedience, measurable before and after
RL. This task builds that benchmark on the arithmetic text world (`reasoning_rl.world.text`, eval split) or reads
one in MathIF's released format, and scores with `rewards.mathif` (IFEval's own checkers, strict, on the response
after the reasoning: after ``</think>``, inside ``<answer>`` if present; an empty response fails everything).

Data (`--data FILE.jsonl`, MathIF's columns): ``question`` (the problem), ``answer`` (the reference answer),
``constraint_desc`` (the constraint text appended to the question), ``constraint_name`` (a list of IFEval ids) and
``constraint_args`` (a list of keyword dicts, one per id; JSON strings accepted); ``source`` and ``id`` are kept
when present. The prompt is ``question + "\\n" + constraint_desc`` (the question alone when the description is
empty). Correctness: ``math_answer`` (math-verify on the ``<answer>`` tag or a ``\\boxed{}``) for a data file,
``exact_match`` on the ``<answer>`` tag for the arithmetic world.

Procedural problems (no `--data`): ``--limit`` problems (default 60), a third each with 1, 2 and 3 constraints,
deterministic in ``--seed``. Constraints are drawn without repetition from the 15 checkers
(`rewards.mathif.CHECKERS`), never two that IFEval declares conflicting (``INSTRUCTION_CONFLICTS``, e.g. all
capitals with all lowercase); their arguments are drawn from small sets that suit a short arithmetic answer
(below); their text is IFEval's own ``build_description``. ``--task mathif:K`` keeps only problems with K
constraints (world or data).

Per constraint count (``constraints_1`` .. ``constraints_3``) and ``overall``, for the greedy completion of each
problem and for its ``--num`` sampled completions: ``hard_accuracy``, ``soft_accuracy``, ``correctness`` (of the
answer, with the constraints in the prompt), ``hard_and_correct``, ``mean_length`` (tokens of the policy's
tokenizer, eos excluded), ``samples``, ``unscorable`` (samples the checkers could not score, e.g. an unknown id in
a data file; left out of the means); ``by_constraint`` gives each constraint id's satisfaction rate (greedy);
``without_constraints`` the greedy correctness and mean length on the bare questions (MathIF's "w/o const."
column: the cost of obedience in accuracy).
"""

from __future__ import annotations

import json
import random
from typing import Any

from diffusion_rl.core.prompts import PromptError, PromptSet
from reasoning_rl.eval_tasks import common

CONSTRAINT_COUNTS = (1, 2, 3)
DEFAULT_PROBLEMS = 60
DEFAULT_MAX_NEW_TOKENS = 96
KEYWORDS = ("total", "answer", "now", "left")
FORBIDDEN = ("maybe", "guess", "approximately", "about")
END_PHRASES = ("Any other questions?", "Is there anything else I can help with?", "That is my answer.")
SECTION_SPLITTERS = ("Section", "SECTION", "Part")
RELATIONS = ("less than", "at least")


def draw_kwargs(rng: random.Random, iid: str, question: str) -> dict[str, Any]:
    """The arguments of constraint `iid` for one problem (the sets above; word counts 3-20, bullets 1-3,
    highlights 1-2, sections 2-3, frequencies 1-3; the repeated prompt is the question)."""
    if iid == "keywords:existence":
        return {"keywords": rng.sample(KEYWORDS, rng.randint(1, 2))}
    if iid == "keywords:frequency":
        return {"keyword": rng.choice(KEYWORDS), "frequency": rng.randint(1, 3), "relation": rng.choice(RELATIONS)}
    if iid == "keywords:forbidden_words":
        return {"forbidden_words": rng.sample(FORBIDDEN, rng.randint(1, 2))}
    if iid == "language:response_language":
        return {"language": "en"}
    if iid == "length_constraints:number_words":
        return {"num_words": rng.randint(3, 20), "relation": rng.choice(RELATIONS)}
    if iid == "detectable_format:number_bullet_lists":
        return {"num_bullets": rng.randint(1, 3)}
    if iid == "detectable_format:number_highlighted_sections":
        return {"num_highlights": rng.randint(1, 2)}
    if iid == "detectable_format:multiple_sections":
        return {"section_spliter": rng.choice(SECTION_SPLITTERS), "num_sections": rng.randint(2, 3)}
    if iid == "combination:repeat_prompt":
        return {"prompt_to_repeat": question}
    if iid == "startend:end_checker":
        return {"end_phrase": rng.choice(END_PHRASES)}
    if iid == "change_case:capital_word_frequency":
        return {"capital_frequency": rng.randint(1, 3), "capital_relation": rng.choice(RELATIONS)}
    return {}  # startend:quotation, change_case:english_capital / english_lowercase, punctuation:no_comma


def _conflicts(a: str, b: str, table: dict) -> bool:
    return a == b or b in table.get(a, ()) or a in table.get(b, ())


def draw_constraints(rng: random.Random, k: int, question: str) -> tuple[list[str], list[dict], str]:
    """(ids, kwargs, description) of `k` mutually compatible constraints for `question`."""
    from rewards.mathif import CHECKERS, _checker_registry

    registry = _checker_registry()
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_CONFLICTS

    ids: list[str] = []
    for _ in range(k):
        choices = [i for i in CHECKERS if not any(_conflicts(i, j, INSTRUCTION_CONFLICTS) for j in ids)]
        ids.append(rng.choice(choices))
    kwargs = [draw_kwargs(rng, i, question) for i in ids]
    desc = " ".join(registry[i](i).build_description(**kw).strip() for i, kw in zip(ids, kwargs, strict=True))
    return ids, kwargs, desc


def world_rows(n: int, seed: int, counts: tuple[int, ...] = CONSTRAINT_COUNTS) -> list[dict]:
    """`n` arithmetic-world eval problems in MathIF's columns, constraint counts in turn over `counts`."""
    from reasoning_rl.world.text import generate_problems

    problems = generate_problems(n, "eval", seed=seed)
    rows = []
    for i, p in enumerate(problems):
        k = counts[i % len(counts)]
        rng = random.Random(f"mathif-{seed}-{i}-{k}")
        ids, kwargs, desc = draw_constraints(rng, k, p.prompt)
        rows.append({"source": "arithmetic", "id": f"arithmetic-{seed}-{i}", "question": p.prompt,
                     "answer": str(p.answer), "constraint_desc": desc, "constraint_name": ids,
                     "constraint_args": kwargs, "steps": p.steps})
    return rows


def prompt_of(row: dict) -> str:
    desc = str(row.get("constraint_desc") or "").strip()
    return f"{row['question']}\n{desc}" if desc else str(row["question"])


def check_rows(rows: list[dict], where: str) -> list[dict]:
    """MathIF rows with their constraint lists parsed (JSON strings) and checked; a clear error otherwise."""
    from rewards.mathif import constraints_of

    out = []
    for n, row in enumerate(rows):
        missing = [c for c in ("question", "answer", "constraint_name") if c not in row]
        if missing:
            raise PromptError(f"{where} record {n}: no column(s) {missing} (columns: {sorted(row)}); MathIF's "
                              "format has question, answer, constraint_desc, constraint_name, constraint_args")
        found = constraints_of(row, "constraint_name", "constraint_args")
        if found is None:
            raise PromptError(f"{where} record {n}: constraint_name / constraint_args must be lists of the same "
                              f"length (ids and keyword dicts), got {row.get('constraint_name')!r} / "
                              f"{row.get('constraint_args')!r}")
        out.append({**row, "constraint_name": found[0], "constraint_args": found[1]})
    return out


def make_reward(correctness: str):
    """The soft MathIF reward over MathIF's columns, with the correctness reward beside it."""
    from rewards.mathif import MathIFReward

    options = {"extract": ["answer"]} if correctness == "exact_match" else None
    return MathIFReward("soft", ids_key="constraint_name", kwargs_key="constraint_args", correctness=correctness,
                        correctness_options=options)


def score(texts: list[str], prompts: list[str], metas: list[dict], lengths: list[int], reward) -> list[dict]:
    """One record per completion: k (constraints), hard, soft (None: unscorable), correct, length, results."""
    _, info = reward(texts, prompts, metas)
    correct = info["components"]["correctness"].tolist()
    out = []
    for res, c, n, meta in zip(info["results"], correct, lengths, metas, strict=True):
        scorable = bool(res) and all(ok is not None for _, ok in res)
        oks = [bool(ok) for _, ok in res]
        out.append({"k": len(meta["constraint_name"]), "hard": float(all(oks)) if scorable else None,
                    "soft": sum(oks) / len(oks) if scorable else None, "correct": c, "length": n,
                    "results": res})
    return out


def summarise(records: list[dict]) -> dict[str, Any]:
    """The task's numbers for a list of `score` records: overall and per constraint count."""

    def block(rs: list[dict]) -> dict[str, Any]:
        scorable = [r for r in rs if r["hard"] is not None]
        return {
            "samples": len(rs),
            "hard_accuracy": common.mean(r["hard"] for r in scorable),
            "soft_accuracy": common.mean(r["soft"] for r in scorable),
            "correctness": common.mean(r["correct"] for r in rs),
            "hard_and_correct": common.mean(r["hard"] * (r["correct"] >= 1.0) for r in scorable),
            "mean_length": common.mean(r["length"] for r in rs),
            "unscorable": len(rs) - len(scorable),
        }

    out = {"overall": block(records)}
    for k in sorted({r["k"] for r in records}):
        out[f"constraints_{k}"] = block([r for r in records if r["k"] == k])
    return out


def by_constraint(records: list[dict]) -> dict[str, float | None]:
    """Each constraint id's satisfaction rate over the records that carry it (unscorable checks left out)."""
    seen: dict[str, list[bool]] = {}
    for r in records:
        for iid, ok in r["results"]:
            if ok is not None:
                seen.setdefault(iid, []).append(bool(ok))
    return {iid: common.mean(oks) for iid, oks in sorted(seen.items())}


def run(model_or_run: str, arg: str | None, options) -> dict[str, Any]:
    """`--task mathif` (all constraint counts) or `--task mathif:K` (only K constraints); see the module docstring."""
    counts = CONSTRAINT_COUNTS
    if arg is not None:
        if arg not in {str(k) for k in CONSTRAINT_COUNTS}:
            raise PromptError(f"--task mathif:{arg}: the argument is a constraint count, one of {list(CONSTRAINT_COUNTS)} "
                              "(or --task mathif for all)")
        counts = (int(arg),)
    if options.data is not None:
        rows = check_rows(common.read_records(options.data, "MathIF JSONL"), f"--data {options.data}")
        rows = common.take([r for r in rows if len(r["constraint_name"]) in counts] if arg else rows, options.limit)
        source, correctness = str(options.data), "math_answer"
    else:
        rows = world_rows(options.limit or DEFAULT_PROBLEMS, options.seed, counts)
        source, correctness = "arithmetic world (eval split, procedural constraints)", "exact_match"
    if not rows:
        raise PromptError(f"no MathIF problems with {counts[0]} constraint(s) in {source}")
    loaded = common.load(model_or_run)
    s = common.sampling(loaded, options, DEFAULT_MAX_NEW_TOKENS)
    prompts = [prompt_of(r) for r in rows]
    metas = [dict(r) for r in rows]
    out = common.complete(loaded, PromptSet(prompts, metas), options, s)
    reward = make_reward(correctness)
    try:
        greedy = score(out.greedy, prompts, metas, common.token_lengths(loaded, out.greedy), reward)
        rep = lambda xs: [x for x in xs for _ in range(out.num)]  # noqa: E731
        sampled = score(out.sampled, rep(prompts), rep(metas), common.token_lengths(loaded, out.sampled), reward)
        bare = common.complete(loaded, PromptSet([str(r["question"]) for r in rows], metas), options, s, sampled=False)
        c, _ = reward.correctness(bare.greedy, [str(r["question"]) for r in rows], metas)
    finally:
        reward.close()
    return {
        "source": source, "problems": len(rows), "num": out.num, "correctness": correctness,
        "max_new_tokens": s.max_new_tokens, "temperature": s.temperature,
        "greedy": summarise(greedy), "sampled": summarise(sampled), "by_constraint": by_constraint(greedy),
        "without_constraints": {"correctness": common.mean(c.tolist()),
                                "mean_length": common.mean(common.token_lengths(loaded, bare.greedy))},
    }


def write_jsonl(rows: list[dict], path) -> None:
    """Write rows (e.g. `world_rows`) as MathIF JSONL, readable back with `--data`."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
