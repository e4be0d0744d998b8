"""MathIF constraint-following rewards: the 15 IFEval-derived checkers of MathIF, soft (fraction satisfied) or
hard (all satisfied), optionally combined with answer correctness.

Source: MathIF (Fu et al., arXiv 2505.14810, TingchenFu/MathIF): 420 math problems with 1, 2 or 3 composed
constraints checked by 15 IFEval (Zhou et al. 2023) checkers; HAcc = all constraints satisfied, SAcc = the
fraction satisfied; the response is what follows the reasoning (after ``</think>``, inside
``<answer>…</answer>`` if present), checked strictly (IFEval's strict mode), and an empty response fails
every constraint. The checkers are IFEval's own, as packaged by ``if-verifiable`` (Apache-2.0, module
``if_verifiable.ifeval``, a copy of google-research ``instruction_following_eval``), used unchanged.

Per sample, with constraint checks s_k in {0, 1} (k = 1..K) on the stripped response a:

    soft = (1/K) Σ_k s_k          hard = Π_k s_k
    combine="add":       R = constraint_weight·IF + correctness_weight·C     (IF = soft or hard)
    combine="multiply":  R = IF·C
    no correctness:      R = IF

where C is the score of the correctness reward (``correctness``: a registered name such as ``"math_answer"`` or
``"exact_match"``, or a reward object), computed on the whole completion. MathIF suggests adding the constraint
reward to correctness.

Stripping (``strip_reasoning``): the text after the last ``</think>``; a ``<think>`` never closed leaves nothing
(the reasoning ran out); without think tags the whole completion. Then the content of the last complete
``<answer>…</answer>`` when there is one; stripped of surrounding whitespace.

Constraints come from the metadata in IFEval's format: ``metadata[ids_key]`` (default ``instruction_id_list``)
a list of instruction ids and ``metadata[kwargs_key]`` (default ``kwargs``) a list of keyword dicts, one per
id (``None`` values are dropped, as IFEval's harness does; JSON strings are accepted; a single id and dict
too). MathIF's released JSONL names these columns ``constraint_name`` / ``constraint_args``: pass
``ids_key="constraint_name", kwargs_key="constraint_args"``. The 15 ids and their required keyword arguments:

    keywords:existence (keywords)            keywords:frequency (keyword, frequency, relation)
    keywords:forbidden_words (forbidden_words)  language:response_language (language)
    length_constraints:number_words (num_words, relation)   [also spelled length_constraint_checkers:...]
    detectable_format:number_bullet_lists (num_bullets)
    detectable_format:number_highlighted_sections (num_highlights)
    detectable_format:multiple_sections (section_spliter, num_sections)
    combination:repeat_prompt (prompt_to_repeat; default: the sample's prompt)
    startend:end_checker (end_phrase)        startend:quotation ()
    change_case:capital_word_frequency (capital_frequency, capital_relation)
    change_case:english_capital ()   change_case:english_lowercase ()   punctuation:no_comma ()

``relation`` / ``capital_relation`` is ``"less than"`` or ``"at least"``. A missing required argument is never
filled in at random (IFEval's checkers would draw one): the sample is unscorable (NaN), as is a sample with no
constraints, an unknown id, or arguments a checker rejects; ``info`` counts each case (``unknown_ids`` lists
the ids).

Offline: ``change_case:capital_word_frequency`` calls ``nltk.word_tokenize``, which needs NLTK's Punkt model;
``rewards._nltk_punkt.ensure_punkt_tab`` provides it without a download (``if_verifiable.ifbench``, whose
import calls ``nltk.download``, is never imported). Language detection (``langdetect``) is made deterministic
with ``DetectorFactory.seed = 0``; text it cannot classify counts as following the constraint (IFEval).

Dependencies: ``if-verifiable`` (pulls ``langdetect``, ``nltk``, ``immutabledict``); ``pip install if-verifiable``.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch

from rewards._correctness import load_correctness
from rewards.base import RewardError, RewardFn
from rewards.text import TextRewardFn, check_tag, extract_tag

# MathIF's 15 checkers: IFEval id -> the keyword arguments it needs (all required here).
CHECKERS: dict[str, tuple[str, ...]] = {
    "keywords:existence": ("keywords",),
    "keywords:frequency": ("keyword", "frequency", "relation"),
    "keywords:forbidden_words": ("forbidden_words",),
    "language:response_language": ("language",),
    "length_constraints:number_words": ("num_words", "relation"),
    "detectable_format:number_bullet_lists": ("num_bullets",),
    "detectable_format:number_highlighted_sections": ("num_highlights",),
    "detectable_format:multiple_sections": ("section_spliter", "num_sections"),
    "combination:repeat_prompt": ("prompt_to_repeat",),
    "startend:end_checker": ("end_phrase",),
    "startend:quotation": (),
    "change_case:capital_word_frequency": ("capital_frequency", "capital_relation"),
    "change_case:english_capital": (),
    "change_case:english_lowercase": (),
    "punctuation:no_comma": (),
}
ALIASES = {"length_constraint_checkers:number_words": "length_constraints:number_words"}
_INT_ARGS = {"frequency", "num_words", "num_bullets", "num_highlights", "num_sections", "capital_frequency"}
MODES = ("soft", "hard")
COMBINE = ("add", "multiply")

_INSTALL_HINT = "the mathif rewards need if-verifiable (IFEval's checkers): pip install if-verifiable"
_registry: dict[str, Any] | None = None
_registry_lock = threading.Lock()


def _checker_registry() -> dict[str, Any]:
    """IFEval's instruction classes from if-verifiable, loaded once, with the offline NLTK/langdetect setup."""
    global _registry
    with _registry_lock:
        if _registry is None:
            try:
                import langdetect
                from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
            except ImportError as exc:
                raise RewardError(f"{_INSTALL_HINT} ({exc})") from exc
            from rewards._nltk_punkt import ensure_punkt_tab

            ensure_punkt_tab()
            langdetect.DetectorFactory.seed = 0  # langdetect samples; seed 0 makes detect() deterministic
            missing = sorted(set(CHECKERS) - set(INSTRUCTION_DICT))
            if missing:
                raise RewardError(f"if-verifiable lacks the IFEval checkers {missing}; upgrade it ({_INSTALL_HINT})")
            _registry = {k: INSTRUCTION_DICT[k] for k in CHECKERS}
        return _registry


# ------------------------------------------------------------------------------------------------
# stripping and checking (plain functions, also used by evaluations)
# ------------------------------------------------------------------------------------------------


def strip_reasoning(text: str, think_tag: str = "think", answer_tag: str = "answer") -> str:
    """The response MathIF checks: after the last ``</think>`` (``""`` if ``<think>`` is never closed), inside the
    last ``<answer>…</answer>`` if any, stripped."""
    close = f"</{think_tag}>"
    if close in text:
        text = text.rsplit(close, 1)[1]
    elif f"<{think_tag}>" in text:
        return ""
    answer = extract_tag(text, answer_tag)
    return (answer if answer is not None else text).strip()


def canonical_id(instruction_id: str) -> str:
    return ALIASES.get(instruction_id, instruction_id)


def check_constraint(response: str, instruction_id: str, kwargs: Mapping[str, Any] | None = None,
                     prompt: str = "") -> bool:
    """Strict IFEval check of one constraint on an already stripped response (empty fails).

    Raises ``KeyError`` for an id outside the 15, ``ValueError`` for missing or invalid arguments."""
    iid = canonical_id(instruction_id)
    if iid not in CHECKERS:
        raise KeyError(f"unknown MathIF constraint id {instruction_id!r}; supported: {sorted(CHECKERS)}")
    args = _build_args(iid, kwargs or {}, prompt)
    checker = _checker_registry()[iid](iid)
    checker.build_description(**args)
    if not response.strip():
        return False
    return bool(checker.check_following(response))


def _build_args(iid: str, kwargs: Mapping[str, Any], prompt: str) -> dict[str, Any]:
    needed = CHECKERS[iid]
    args = {k: kwargs[k] for k in needed if kwargs.get(k) is not None}
    if iid == "combination:repeat_prompt" and not args.get("prompt_to_repeat") and prompt:
        args["prompt_to_repeat"] = prompt
    missing = [k for k in needed if k not in args or (isinstance(args[k], (str, list, tuple)) and not args[k])]
    if missing:
        raise ValueError(f"constraint {iid!r} needs the argument(s) {missing}; got {dict(kwargs)!r}")
    for k in needed:
        if k in _INT_ARGS:
            v = args[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v).is_integer() or v < 0:
                raise ValueError(f"constraint {iid!r}: {k} must be a non-negative integer, got {v!r}")
            args[k] = int(v)
    for k in ("keywords", "forbidden_words"):
        if k in args:
            v = args[k]
            if isinstance(v, str):
                v = [v]
            if not all(isinstance(x, str) and x for x in v):
                raise ValueError(f"constraint {iid!r}: {k} must be a list of non-empty strings, got {v!r}")
            args[k] = list(v)
    return args


def constraints_of(meta: Any, ids_key: str, kwargs_key: str) -> tuple[list[str], list[dict]] | None:
    """(ids, kwargs list) from one metadata dict, or None when absent/malformed (length mismatch, bad JSON)."""
    if not isinstance(meta, Mapping):
        return None
    ids, kw = meta.get(ids_key), meta.get(kwargs_key)
    ids, kw = _maybe_json(_as_list(ids)), _maybe_json(_as_list(kw))
    if isinstance(ids, str):
        ids = [ids]
    if not isinstance(ids, (list, tuple)) or not ids or not all(isinstance(i, str) for i in ids):
        return None
    if kw is None:
        kw = [{} for _ in ids]
    elif isinstance(kw, Mapping):
        kw = [kw]
    if not isinstance(kw, (list, tuple)) or len(kw) != len(ids):
        return None
    kw = [_maybe_json(k) if k is not None else {} for k in kw]
    if not all(isinstance(k, Mapping) for k in kw):
        return None
    return list(ids), [dict(k) for k in kw]


def _as_list(v: Any) -> Any:
    """A numpy array (a pandas column) as a list."""
    return v.tolist() if hasattr(v, "tolist") and not isinstance(v, (str, bytes)) else v


def _maybe_json(v: Any) -> Any:
    if isinstance(v, str) and v.strip()[:1] in ("[", "{"):
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


# ------------------------------------------------------------------------------------------------
# the reward
# ------------------------------------------------------------------------------------------------


class MathIFReward(TextRewardFn):
    """MathIF soft or hard constraint satisfaction, optionally combined with a correctness reward."""

    def __init__(
        self,
        mode: str = "soft",
        ids_key: str = "instruction_id_list",
        kwargs_key: str = "kwargs",
        correctness: str | RewardFn | Callable | None = None,
        correctness_options: Mapping[str, Any] | None = None,
        combine: str = "add",
        constraint_weight: float = 1.0,
        correctness_weight: float = 1.0,
        think_tag: str = "think",
        answer_tag: str = "answer",
    ):
        if mode not in MODES:
            raise RewardError(f"mathif: mode must be one of {list(MODES)}, got {mode!r}")
        self.mode = mode
        self.name = f"mathif_{mode}"
        for option, key in (("ids_key", ids_key), ("kwargs_key", kwargs_key)):
            if not isinstance(key, str) or not key:
                raise RewardError(f"{self.name}: {option} must be a non-empty metadata column name, got {key!r} "
                                  f"(IFEval: instruction_id_list / kwargs; MathIF: constraint_name / constraint_args)")
        self.ids_key, self.kwargs_key = ids_key, kwargs_key
        if combine not in COMBINE:
            raise RewardError(f"{self.name}: combine must be one of {list(COMBINE)}, got {combine!r} "
                              f"(add: w_if*IF + w_c*C; multiply: IF*C)")
        self.combine = combine
        self.constraint_weight = _finite(constraint_weight, "constraint_weight", self.name)
        self.correctness_weight = _finite(correctness_weight, "correctness_weight", self.name)
        try:
            self.think_tag = check_tag(think_tag, "think_tag")
            self.answer_tag = check_tag(answer_tag, "answer_tag")
        except ValueError as exc:
            raise RewardError(f"{self.name}: {exc}") from exc
        self.correctness = load_correctness(self.name, correctness, correctness_options)
        _checker_registry()  # fail now (not at the first batch) when if-verifiable is missing

    def close(self) -> None:
        """Stop the correctness reward's helper process, if it has one."""
        close = getattr(self.correctness, "close", None)
        if callable(close):
            close()

    def check(self, text: str, meta: Any, prompt: str = "") -> tuple[str, list[tuple[str, bool | None]], str | None]:
        """(stripped response, [(id, satisfied or None = unscorable)], why unscorable or None) for one sample."""
        response = strip_reasoning(text, self.think_tag, self.answer_tag)
        found = constraints_of(meta, self.ids_key, self.kwargs_key)
        if found is None:
            return response, [], "no_constraints"
        results: list[tuple[str, bool | None]] = []
        why = None
        for iid, kw in zip(*found, strict=True):
            if canonical_id(iid) not in CHECKERS:
                results.append((iid, None))
                why = why or "unknown_id"
                continue
            try:
                results.append((iid, check_constraint(response, iid, kw, prompt)))
            except RewardError:
                raise
            except Exception:  # noqa: BLE001 - bad arguments (or a checker failing on them): unscorable
                results.append((iid, None))
                why = why or "invalid_kwargs"
        return response, results, why

    def _score_texts(self, texts, prompts, metadata):
        n = len(texts)
        if metadata is None:
            metas: list[Any] = [None] * n
        else:
            if isinstance(metadata, Mapping) or len(metadata) != n:
                raise RewardError(f"reward {self.name!r} (batch size {n}): metadata must be a list of {n} dicts")
            metas = list(metadata)
        constraint, soft, hard = [], [], []
        counts = {"no_constraints": 0, "unknown_id": 0, "invalid_kwargs": 0, "empty_response": 0}
        unknown: set[str] = set()
        results = []
        for text, meta, prompt in zip(texts, metas, prompts, strict=True):
            response, res, why = self.check(text, meta, prompt)
            results.append(res)
            counts["empty_response"] += not response
            if why is not None:
                counts[why] += 1
                unknown.update(i for i, ok in res if ok is None and canonical_id(i) not in CHECKERS)
                soft.append(math.nan)
                hard.append(math.nan)
            else:
                oks = [bool(ok) for _, ok in res]
                soft.append(sum(oks) / len(oks))
                hard.append(1.0 if all(oks) else 0.0)
            constraint.append(soft[-1] if self.mode == "soft" else hard[-1])
        if_scores = torch.tensor(constraint, dtype=torch.float64)
        comps = {"constraints": if_scores.float()}
        if self.correctness is not None:
            c, c_info = self.correctness(texts, prompts, metadata)
            c = c.double()
            comps["correctness"] = c.float()
            if self.combine == "add":
                total = self.constraint_weight * if_scores + self.correctness_weight * c
            else:
                total = if_scores * c
        else:
            c_info = None
            total = if_scores
        finite = [i for i, v in enumerate(soft) if not math.isnan(v)]
        info: dict[str, Any] = {
            "components": comps,
            "soft_accuracy": sum(soft[i] for i in finite) / len(finite) if finite else math.nan,
            "hard_accuracy": sum(hard[i] for i in finite) / len(finite) if finite else math.nan,
            "results": results,
            "unscorable": int(torch.isnan(total).sum()),
            **counts,
        }
        if unknown:
            info["unknown_ids"] = sorted(unknown)
        if c_info:
            info["correctness_info"] = c_info
        return total.float(), info


def _finite(v: Any, option: str, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RewardError(f"{name}: {option} must be a finite number, got {v!r} (default 1.0)")
    return float(v)


def make_mathif_soft_reward(
    ids_key: str = "instruction_id_list",
    kwargs_key: str = "kwargs",
    correctness: str | RewardFn | Callable | None = None,
    correctness_options: Mapping[str, Any] | None = None,
    combine: str = "add",
    constraint_weight: float = 1.0,
    correctness_weight: float = 1.0,
    think_tag: str = "think",
    answer_tag: str = "answer",
) -> MathIFReward:
    """MathIF soft accuracy: the fraction of the sample's constraints satisfied (see ``rewards.mathif``)."""
    return MathIFReward("soft", ids_key, kwargs_key, correctness, correctness_options, combine,
                        constraint_weight, correctness_weight, think_tag, answer_tag)


def make_mathif_hard_reward(
    ids_key: str = "instruction_id_list",
    kwargs_key: str = "kwargs",
    correctness: str | RewardFn | Callable | None = None,
    correctness_options: Mapping[str, Any] | None = None,
    combine: str = "add",
    constraint_weight: float = 1.0,
    correctness_weight: float = 1.0,
    think_tag: str = "think",
    answer_tag: str = "answer",
) -> MathIFReward:
    """MathIF hard accuracy: 1 when all the sample's constraints are satisfied (see ``rewards.mathif``)."""
    return MathIFReward("hard", ids_key, kwargs_key, correctness, correctness_options, combine,
                        constraint_weight, correctness_weight, think_tag, answer_tag)
