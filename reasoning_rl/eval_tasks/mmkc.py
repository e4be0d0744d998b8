"""`drl reason eval MODEL --task mmkc`: MMKC-Bench-style knowledge conflicts (behaviour analysis and detection).

MMKC-Bench (MLLMKCBENCH/MLLMKC, "Benchmarking Multimodal Knowledge Conflict for Large Multimodal Models") asks a
model a question once without evidence (its "original" answer: what it knows or sees, the *memory*) and again
with external evidence that contradicts it, in two scenarios:

* ``context_memory`` (the benchmark's "ie", internal-external): one piece of evidence (A) contradicts the memory;
* ``inter_context`` (its "ee", external-external): two pieces (A and B) that disagree with each other and with
  the memory.

**Behaviour analysis** (its evaluation_*.py): items whose original answer already equals an evidence answer are
filtered out (``filtered``), as are items without an original answer (``no_memory``: nothing could be read from
it); on the rest (``compared``), the share (%) of answers that follow ``memory`` (the original answer, the
benchmark's "knowledge retention"), ``context_a`` / ``context_b`` (the evidence, "misled") or ``other``; they sum to
100. Reported per conflict type and ``overall`` and, where the true answer is
known, ``accuracy`` (%, answers equal to it) and ``memory_accuracy`` (the original answers'). **Conflict
detection**: *coarse* — the benchmark's prompt "Read the following document carefully and answer No if it does
not agree with what you remember, and Yes if it does." on a contradicting piece (expected No) and on a consistent
one (expected Yes): ``accuracy``, ``conflicting`` and ``consistent`` (accuracy on each kind), ``answered`` (a
yes/no was found); *fine* — two labelled pieces, one consistent and one contradicting (order drawn per item):
"which piece conflicts, A or B?", ``accuracy`` against the contradicting label (chance 50 %).

Answers are greedy (one per prompt, as the benchmark; ``--num`` is not used), read from the ``<answer>`` tag when
present, else the whole completion; compared case-folded and whitespace-collapsed (multiple choice: the first
standalone capital A-D; yes / no: the first of those words).

Procedural versions (no ``--data``; ``--limit`` items, default 24, deterministic in ``--seed``):

* ``visual`` (default for a vision-language model; ``--task mmkc:visual``): visual-world eval scenes
  (`reasoning_rl.world.visual`); the image is the memory; conflict types are the question types (count, colour,
  shape, position, in turn); evidence A / B state other values of the same kind ("One source says the answer to the
  question is green.", "Another source says ...").
* ``text`` (default for a text-only model; ``--task mmkc:text``): arithmetic-world eval problems of 1-2 steps
  (`reasoning_rl.world.text`); the model's own arithmetic is the memory, against a stated "fact" (the true answer
  plus or minus 1-10); one conflict type, ``arithmetic``. The question is the bare problem (no answer instruction:
  the world's models answer in ``<think>…</think><answer>…</answer>`` already).

The released format (``--data FILE.json`` or a directory of them; needs a vision-language model). Written from
the benchmark's inference and evaluation scripts (MLLMKCBENCH/MLLMKC ``inference.py``, ``inference1.py``,
``inference_d.py``, ``evaluation/evaluation_er.py``, ``evaluation_kc.py``); its data files themselves
(starjyf/MLLMKC-datasets) could not be inspected offline, so the reader covers the fields those scripts read:
each file is a JSON list of items with ``ID`` (or ``instance``), ``image_path`` (the question image first;
relative to the file's folder), ``mcq_query`` and either

* ``mis_description`` {``incorrect_description_1``, ``incorrect_description_2``} with ``description`` (the
  consistent text) and ``mcq_disanswer1`` / ``mcq_disanswer2`` (the options the two misleading pieces point to)
  — ER.json, IS.json; or
* ``mis_knowledge`` {``<Kind>_error``: {``mis_knowledge1``, ``mis_knowledge2``}} with ``knowledge`` and per kind
  ``mcq_query_<kind>`` and ``mcq_disanswer_<kind>_1`` / ``_2`` (kind matched case-insensitively) —
  people_knowledge.json, logo_knowledge.json; one item per kind.

Items with neither (ED.json: its conflicts are counterfactual images, several per prompt; this rollout path shows
one image per prompt) are counted in ``skipped``. The evidence images of ie / ee are not shown, only their texts
(the same limit). The conflict type of a released item is its file's name (with ``/<kind>`` for the knowledge
files); ``accuracy`` is reported when an item carries ``mcq_answer`` or ``mcq_ground_truth``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusion_rl.core.prompts import PromptError, PromptSet
from reasoning_rl.eval_tasks import common

SCENARIOS = ("context_memory", "inter_context")
SOURCES = ("memory", "context_a", "context_b", "other")
DEFAULT_ITEMS = 24
DEFAULT_MAX_NEW_TOKENS = 48
PREFIX = "The following information is provided externally:"  # MMKC-Bench's wording
COARSE_INSTRUCTION = ("Read the following document carefully and answer No if it does not agree with what you "
                      "remember, and Yes if it does.")  # MMKC-Bench's coarse-detection prompt
ANSWER_INSTRUCTION = "Answer inside <answer></answer>."
MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly based on the context and the image."


@dataclass
class Item:
    """One conflict item: a question with its memory source, two misleading pieces and a consistent one."""

    id: str
    conflict_type: str
    question: str
    evidence_a: str  # contradicts the memory; points to answer_a
    evidence_b: str  # contradicts the memory and evidence_a; points to answer_b
    answer_a: str
    answer_b: str
    support: str | None  # a piece consistent with the truth (detection control); None: not available
    truth: str | None  # the true answer, when known
    image: Any = None
    mcq: bool = False
    reference: str = "the image"  # what the evidence may conflict with, in the fine-detection question
    instruction: str = ANSWER_INSTRUCTION  # after the question ("": the model's own format, e.g. the text world's)
    fine_order: str = "AB"  # "AB": (A) support, (B) misleading; "BA": (A) misleading, (B) support
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# procedural items
# ------------------------------------------------------------------------------------------------


def _statement(value: str, another: bool = False) -> str:
    """A piece of evidence: "One source says the answer to the question is V." ("Another source" for B; no labels,
    so the fine-detection prompt's (A) / (B) are the only ones)."""
    return f"{'Another' if another else 'One'} source says the answer to the question is {value}."


def _other_values(rng: random.Random, truth: str, pool: list[str]) -> tuple[str, str]:
    a, b = rng.sample([v for v in pool if v != truth], 2)
    return a, b


def visual_items(n: int, seed: int) -> list[Item]:
    """`n` visual-world eval scenes (question types in turn); the image is the memory."""
    from diffusion_rl.world import shapes
    from reasoning_rl.world.visual import QUESTION_TYPES, RELATIONS, visual_rows

    pools = {"colour": sorted(shapes.COLOURS), "shape": list(shapes.SHAPES), "count": ["1", "2", "3", "4"],
             "position": list(RELATIONS)}
    items = []
    for i, row in enumerate(visual_rows(n, "eval", QUESTION_TYPES, seed)):
        rng = random.Random(f"mmkc-visual-{seed}-{i}")
        kind, truth = row["question_type"], row["answer"]
        a, b = _other_values(rng, truth, pools[kind])
        items.append(Item(f"visual-{seed}-{i}", kind, row["prompt"], _statement(a), _statement(b, another=True), a, b,
                          _statement(truth), truth, image=row["image"], fine_order=rng.choice(("AB", "BA"))))
    return items


def text_items(n: int, seed: int) -> list[Item]:
    """`n` arithmetic-world eval problems (1-2 steps); the model's own arithmetic is the memory."""
    from reasoning_rl.world.text import MAX_VALUE, generate_problems

    items = []
    for i, p in enumerate(generate_problems(n, "eval", steps=(1, 2), seed=seed)):
        rng = random.Random(f"mmkc-text-{seed}-{i}")
        pool = [str(v) for v in range(max(0, p.answer - 10), min(MAX_VALUE, p.answer + 10) + 1)]
        a, b = _other_values(rng, str(p.answer), pool)
        items.append(Item(f"text-{seed}-{i}", "arithmetic", p.prompt, _statement(a), _statement(b, another=True), a, b,
                          _statement(str(p.answer)), str(p.answer), reference="the problem",
                          fine_order=rng.choice(("AB", "BA")), instruction=""))
    return items


# ------------------------------------------------------------------------------------------------
# the released MMKC-Bench format
# ------------------------------------------------------------------------------------------------


def _find(item: dict, key: str) -> Any:
    """item[key], the key matched case-insensitively (the benchmark writes Temporal_error / open_query_temporal)."""
    if key in item:
        return item[key]
    low = {k.lower(): k for k in item}
    return item.get(low.get(key.lower(), key))


def released_items(path: Path, seed: int) -> tuple[list[Item], int]:
    """(items, skipped) from a released MMKC-Bench JSON file, or every *.json file of a directory."""
    from reasoning_rl.data import load_image

    path = Path(path)
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise PromptError(f"--data {path}: no .json files (MMKC-Bench's ER.json, IS.json, people_knowledge.json, "
                          "logo_knowledge.json)")
    items, skipped = [], 0
    for file in files:
        for n, raw in enumerate(common.read_records(file, "MMKC-Bench JSON")):
            where = f"--data {file} item {n}"
            image_paths = raw.get("image_path")
            if not isinstance(image_paths, list) or not image_paths:
                raise PromptError(f"{where}: no image_path list (the question image first); keys: {sorted(raw)}")
            iid = str(raw.get("ID", raw.get("instance", n)))
            truth = raw.get("mcq_answer", raw.get("mcq_ground_truth"))
            cases = []  # (conflict type, query, (mis 1, mis 2), (dis 1, dis 2), support)
            if isinstance(raw.get("mis_description"), dict):
                mis = raw["mis_description"]
                cases.append((file.stem, raw.get("mcq_query"), (mis.get("incorrect_description_1"),
                              mis.get("incorrect_description_2")), (raw.get("mcq_disanswer1"),
                              raw.get("mcq_disanswer2")), raw.get("description")))
            elif isinstance(raw.get("mis_knowledge"), dict):
                for key, mis in raw["mis_knowledge"].items():
                    if not key.endswith("_error") or not isinstance(mis, dict):
                        continue
                    kind = key[: -len("_error")]
                    cases.append((f"{file.stem}/{kind}", _find(raw, f"mcq_query_{kind}"),
                                  (mis.get("mis_knowledge1"), mis.get("mis_knowledge2")),
                                  (_find(raw, f"mcq_disanswer_{kind}_1"), _find(raw, f"mcq_disanswer_{kind}_2")),
                                  raw.get("knowledge")))
            else:
                skipped += 1
                continue
            image = load_image(image_paths[0], file.parent, where)
            for ctype, query, mis, dis, support in cases:
                missing = [name for name, v in (("mcq_query", query), ("misleading texts", mis[0] and mis[1]),
                                                ("mcq_disanswer 1/2", dis[0] and dis[1])) if not v]
                if missing:
                    raise PromptError(f"{where} ({ctype}): missing {missing}; see reasoning_rl.eval_tasks.mmkc for "
                                      "the fields read")
                rng = random.Random(f"mmkc-released-{seed}-{iid}-{ctype}")
                items.append(Item(f"{iid}/{ctype}", ctype, str(query), str(mis[0]), str(mis[1]),
                                  str(dis[0]).strip().upper(), str(dis[1]).strip().upper(),
                                  str(support) if support else None,
                                  str(truth).strip().upper() if truth is not None else None, image=image, mcq=True,
                                  reference="the image or what you remember", fine_order=rng.choice(("AB", "BA")),
                                  instruction=MCQ_INSTRUCTION))
    return items, skipped


# ------------------------------------------------------------------------------------------------
# prompts and answers
# ------------------------------------------------------------------------------------------------


def prompts_of(item: Item) -> dict[str, str]:
    """The item's prompts: memory (no evidence), the two scenarios, coarse detection on the contradicting and the
    consistent piece, fine detection."""
    join = lambda *parts: "\n".join(p for p in parts if p)  # noqa: E731
    out = {
        "memory": join(item.question, item.instruction),
        "context_memory": join(f"{PREFIX} {item.evidence_a}", item.question, item.instruction),
        "inter_context": join(f"{PREFIX} {item.evidence_a} {item.evidence_b}", item.question, item.instruction),
        "coarse_conflicting": join(item.question, COARSE_INSTRUCTION, f"{PREFIX} {item.evidence_a}"),
    }
    if item.support is not None:
        out["coarse_consistent"] = f"{item.question}\n{COARSE_INSTRUCTION}\n{PREFIX} {item.support}"
        first, second = (item.support, item.evidence_a) if item.fine_order == "AB" else (item.evidence_a, item.support)
        out["fine"] = (f"{item.question}\n{PREFIX} (A) {first} (B) {second}\nOne of the two pieces of information "
                       f"conflicts with {item.reference}. Which one? Answer A or B inside <answer></answer>.")
    return out


def fine_label(item: Item) -> str:
    """The label of the contradicting piece in the fine-detection prompt."""
    return "B" if item.fine_order == "AB" else "A"


def _response(text: str) -> str:
    from rewards.text import extract_tag

    tagged = extract_tag(text, "answer")
    return tagged if tagged is not None else text


def extract_answer(text: str, mcq: bool) -> str | None:
    """The answer of a completion: the <answer> tag (else the text), case-folded and whitespace-collapsed; for
    multiple choice the first standalone capital A-D. None: nothing to compare."""
    response = _response(text)
    if mcq:
        m = re.search(r"\b([A-D])\b", response)
        return m.group(1) if m else None
    norm = " ".join(response.split()).casefold().rstrip(".")
    return norm or None


def extract_yes_no(text: str) -> str | None:
    m = re.search(r"\b(yes|no)\b", _response(text), re.IGNORECASE)
    return m.group(1).lower() if m else None


def extract_label(text: str) -> str | None:
    m = re.search(r"\b([AB])\b", _response(text))
    return m.group(1) if m else None


def _norm(value: str | None, mcq: bool) -> str | None:
    if value is None:
        return None
    return value.strip().upper() if mcq else " ".join(value.split()).casefold()


def classify(answer: str | None, memory: str | None, item: Item, scenario: str) -> str | None:
    """Which source `answer` follows in `scenario`: memory / context_a / context_b / other; None when the item is
    filtered (no original answer, or it already equals an evidence answer, as MMKC-Bench filters)."""
    a, b = _norm(item.answer_a, item.mcq), _norm(item.answer_b, item.mcq)
    evidence = (a,) if scenario == "context_memory" else (a, b)
    if memory is None or memory in evidence:
        return None
    if answer == memory:
        return "memory"
    if answer == a:
        return "context_a"
    if scenario == "inter_context" and answer == b:
        return "context_b"
    return "other"


# ------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------


def score(items: list[Item], completions: dict[str, list[str | None]]) -> dict[str, Any]:
    """The task's numbers from each item's completions by prompt kind (`prompts_of` keys; None where an item has
    no such prompt)."""
    memories = [extract_answer(t, it.mcq) for it, t in zip(items, completions["memory"], strict=True)]
    types = sorted({it.conflict_type for it in items})

    def behaviour(which: list[int]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for scenario in SCENARIOS:
            labels, correct = [], []
            for i in which:
                answer = extract_answer(completions[scenario][i], items[i].mcq)
                label = classify(answer, memories[i], items[i], scenario)
                if label is not None:
                    labels.append(label)
                if items[i].truth is not None:
                    correct.append(answer == _norm(items[i].truth, items[i].mcq))
            no_memory = sum(memories[i] is None for i in which)
            block: dict[str, Any] = {"compared": len(labels), "filtered": len(which) - len(labels) - no_memory,
                                     "no_memory": no_memory}
            block.update({src: common.percent(labels.count(src), len(labels)) for src in SOURCES})
            block["accuracy"] = common.percent(sum(correct), len(correct)) if correct else None
            out[scenario] = block
        known = [i for i in which if items[i].truth is not None]
        out["memory_accuracy"] = (common.percent(sum(memories[i] == _norm(items[i].truth, items[i].mcq) for i in known),
                                                 len(known)) if known else None)
        return out

    by_type = {"overall": behaviour(list(range(len(items))))}
    if len(types) > 1:
        by_type.update({t: behaviour([i for i, it in enumerate(items) if it.conflict_type == t]) for t in types})

    said = {kind: [extract_yes_no(t) if t is not None else None for t in completions[kind]]
            for kind in ("coarse_conflicting", "coarse_consistent")}
    conflicting = [s == "no" for s in said["coarse_conflicting"]]
    consistent = [s == "yes" for s, it in zip(said["coarse_consistent"], items, strict=True) if it.support is not None]
    answered = [s is not None for s in said["coarse_conflicting"]] + [
        s is not None for s, it in zip(said["coarse_consistent"], items, strict=True) if it.support is not None]
    fine = [(extract_label(t), fine_label(it)) for t, it in zip(completions["fine"], items, strict=True)
            if it.support is not None]
    return {
        "behaviour": by_type,
        "detection": {
            "coarse": {"probes": len(answered), "accuracy": common.percent(sum(conflicting) + sum(consistent), len(answered)),
                       "conflicting": common.percent(sum(conflicting), len(conflicting)),
                       "consistent": common.percent(sum(consistent), len(consistent)),
                       "answered": common.percent(sum(answered), len(answered))},
            "fine": {"probes": len(fine), "accuracy": common.percent(sum(p == e for p, e in fine), len(fine)),
                     "answered": common.percent(sum(p is not None for p, _ in fine), len(fine)), "chance": 50.0},
        },
    }


def run(model_or_run: str, arg: str | None, options) -> dict[str, Any]:
    """`--task mmkc` (visual for a vision-language model, else text), `mmkc:visual`, `mmkc:text`, or `--data` with
    the released format; see the module docstring."""
    from reasoning_rl.models import ModelLoadError

    if arg not in (None, "visual", "text"):
        raise PromptError(f"--task mmkc:{arg}: the argument is the procedural world, 'visual' or 'text' (or pass "
                          "--data with the released MMKC-Bench files)")
    loaded = common.load(model_or_run)
    skipped = 0
    if options.data is not None:
        if not loaded.vision:
            raise ModelLoadError(f"the released MMKC-Bench questions are about images; {model_or_run!r} is a "
                                 "text-only model. Pass a vision-language model, or drop --data for --task mmkc:text")
        items, skipped = released_items(options.data, options.seed)
        items, source = common.take(items, options.limit), f"MMKC-Bench files {options.data}"
    else:
        world = arg or ("visual" if loaded.vision else "text")
        if world == "visual" and not loaded.vision:
            raise ModelLoadError(f"--task mmkc:visual shows images; {model_or_run!r} is a text-only model. Use "
                                 "--task mmkc:text or a vision-language model")
        n = options.limit or DEFAULT_ITEMS
        items = visual_items(n, options.seed) if world == "visual" else text_items(n, options.seed)
        source = f"{world} world (eval split, procedural conflicts)"
    if not items:
        raise PromptError(f"no MMKC items in {source} (skipped {skipped} image-only items)")
    s = common.sampling(loaded, options, DEFAULT_MAX_NEW_TOKENS)
    keys, prompts, metas = [], [], []
    for i, item in enumerate(items):
        for kind, text in prompts_of(item).items():
            keys.append((kind, i))
            prompts.append(text)
            metas.append({"image": item.image} if item.image is not None else {})
    out = common.complete(loaded, PromptSet(prompts, metas), options, s, sampled=False)
    completions: dict[str, list[str | None]] = {k: [None] * len(items) for k in
                                                ("memory", *SCENARIOS, "coarse_conflicting", "coarse_consistent", "fine")}
    for (kind, i), text in zip(keys, out.greedy, strict=True):
        completions[kind][i] = text
    return {"source": source, "items": len(items), "skipped": skipped, "max_new_tokens": s.max_new_tokens,
            **score(items, completions)}
