"""Length-efficiency rewards for reasoning RL: Kimi k1.5 group length reward, L1 exact / max, DAPO soft overlong
punishment and the cosine-scaled length reward. L is a completion's length **in tokens of the policy's
tokenizer**, c = 1[correct] (the correctness reward's score >= ``correct_threshold``).

* ``kimi_length`` (Kimi k1.5, arXiv 2501.12599 §2.3.3; open-r1 ``len_reward``, which counts characters and takes
  the min/max over the whole batch): within each prompt group (the G completions of one problem),
  λ_i = 0.5 − (L_i − L_min)/(L_max − L_min); term_i = λ_i if correct, min(0, λ_i) if wrong; all lengths equal
  → 0. ``R = c + w·term`` (``add_correctness=True``, "added to correctness") or ``w·term``; w = ``length_weight``.
* ``l1_exact`` (L1 / LCPO, arXiv 2503.04697, cmu-l3/l1): ``R = c − α·|n_gold − L|``, α = 0.0003.
* ``l1_max`` (L1-Max, paper): ``R = c·clip(α·(n_gold − L) + δ, 0, 1)``, α = 0.0003, δ = 0.5. ``form="code"``
  (the released code's max branch): ``R = c·(clip(α·(n_gold − L), −1, 1) + 1)/2``.
  n_gold: ``metadata[target_key]`` (default ``"num_tokens"``) or else the "Think for N tokens." /
  "Think for maximum N tokens." instruction in the prompt (``l1_prompt`` writes such prompts,
  ``parse_token_budget`` reads them); neither → NaN.
* ``dapo_overlong`` (DAPO, arXiv 2503.14476 Eq. 13): ``diffusion_rl.core.grpo.soft_overlong_penalty``:
  0 if L ≤ L_max − L_cache; ((L_max − L_cache) − L)/L_cache up to L_max; −1 beyond; times ``factor``.
  DAPO: L_max 20480, L_cache 4096. With ``correctness`` set: ``R = C + penalty`` (C the raw correctness
  score), else the penalty alone. (The reasoning trainer's ``advantage.overlong_buffer`` applies the same
  penalty on the sampled token counts; use one or the other, not both.)
* ``cosine_length`` (Demystifying Long CoT, arXiv 2502.03373 App. C.1; TRL ``get_cosine_scaled_reward``):
  ``R = v_min + ½(v_max − v_min)(1 + cos(π·min(L/L_max, 1)))`` with (v_min, v_max) = (0.5, 1.0) when correct
  (shorter is better) and (−0.5, −1.0) when wrong (a longer wrong answer is penalised less); L clamped at
  L_max as in TRL; ``exceed_value`` (the paper's r_exceed) instead gives that value to completions longer
  than L_max.

Lengths: ``tokenizer`` is required — a transformers tokenizer or processor (its ``.tokenizer``), a
``tokenizers.Tokenizer``, a hub id / local path loaded once with ``AutoTokenizer.from_pretrained``, or a callable
``text -> token ids | count``. Characters are never counted silently (pass ``tokenizer=len`` to count them on
purpose). The completion text is re-tokenized without special tokens, so L can differ from the sampled ids by
the end-of-sequence token and by tokenizations that do not round-trip.

Correctness (all but ``dapo_overlong`` need it): ``correctness`` is a registered reward name (default
``"math_answer"``, built with ``correctness_options``) or a reward object; its NaN (no ground truth) makes the
sample NaN. ``info["components"]`` holds ``correctness`` and ``length`` (tokens) per sample.

Groups (``kimi_length``): the reasoning trainer passes each problem's G completions with the same prompt
string (``Rollouts.prompts``), so by default a group is the set of samples with equal prompts; ``group_key``
names a metadata column to group by instead.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from rewards._correctness import load_correctness
from rewards.base import RewardError, RewardFn
from rewards.text import TextRewardFn

L1_ALPHA = 0.0003
L1_DELTA = 0.5
L1_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
_BUDGET = re.compile(r"think\s+for\s+(?P<max>maximum\s+)?(?P<n>\d+)\s+tokens", re.IGNORECASE)


# ------------------------------------------------------------------------------------------------
# token lengths
# ------------------------------------------------------------------------------------------------


class TokenCounter:
    """Counts completion tokens with the policy's tokenizer (see the module docstring for what is accepted)."""

    def __init__(self, tokenizer: Any, name: str = "length"):
        if tokenizer is None:
            raise RewardError(
                f"{name}: tokenizer is required (lengths are in tokens of the policy's tokenizer): pass the "
                f"policy's hub id or local path (e.g. tokenizer='Qwen/Qwen2.5-0.5B-Instruct'), a tokenizer object, "
                f"or a callable text -> ids; tokenizer=len counts characters on purpose"
            )
        if isinstance(tokenizer, str):
            try:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(tokenizer)
            except Exception as exc:
                raise RewardError(
                    f"{name}: could not load the tokenizer {tokenizer!r} ({type(exc).__name__}: {exc}); give a "
                    f"local directory or a cached hub id of the policy's tokenizer"
                ) from exc
        inner = getattr(tokenizer, "tokenizer", None)  # a processor (VLM): its text tokenizer
        if inner is not None and hasattr(inner, "encode"):
            tokenizer = inner
        if not (hasattr(tokenizer, "encode") or callable(tokenizer)):
            raise RewardError(f"{name}: tokenizer must be a tokenizer, a hub id/path or a callable, got {tokenizer!r}")
        self.tokenizer = tokenizer

    def __call__(self, texts: Sequence[str]) -> list[int]:
        tok = self.tokenizer
        if hasattr(tok, "batch_encode_plus") or (hasattr(tok, "encode") and hasattr(tok, "convert_tokens_to_ids")):
            ids = tok(list(texts), add_special_tokens=False)["input_ids"]  # transformers tokenizer, batched
            return [len(x) for x in ids]
        out = []
        for t in texts:
            if hasattr(tok, "encode"):
                try:
                    r = tok.encode(t, add_special_tokens=False)
                except TypeError:
                    r = tok.encode(t)
            else:
                r = tok(t)
            r = getattr(r, "ids", r)  # tokenizers.Encoding
            if isinstance(r, bool):
                raise RewardError(f"tokenizer returned {r!r} for a text; expected token ids or a count")
            if isinstance(r, (int, float)):
                if r < 0 or not float(r).is_integer():
                    raise RewardError(f"tokenizer returned the count {r!r}; expected a non-negative integer")
                out.append(int(r))
            else:
                out.append(len(r))
        return out


def l1_prompt(question: str, num_tokens: int, mode: str = "exact", instruction: str | None = L1_INSTRUCTION) -> str:
    """An L1 prompt: ``question``, L1's instruction, then "Think for N tokens." (``mode="exact"``) or
    "Think for maximum N tokens." (``mode="max"``), as cmu-l3/l1's data scripts write them."""
    if mode not in ("exact", "max"):
        raise ValueError(f"mode must be 'exact' or 'max', got {mode!r}")
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens <= 0:
        raise ValueError(f"num_tokens must be a positive integer, got {num_tokens!r}")
    budget = f"Think for maximum {num_tokens} tokens." if mode == "max" else f"Think for {num_tokens} tokens."
    head = f"{question}\n\n{instruction}" if instruction else question
    return f"{head} {budget}"


def parse_token_budget(prompt: str) -> int | None:
    """N of the last "Think for [maximum] N tokens" in ``prompt`` (case-insensitive), or None."""
    found = list(_BUDGET.finditer(prompt or ""))
    return int(found[-1]["n"]) if found else None


# ------------------------------------------------------------------------------------------------
# shared base
# ------------------------------------------------------------------------------------------------


class _LengthReward(TextRewardFn):
    """Token lengths + (optional) binary correctness; subclasses implement ``_combine``."""

    name = "length"
    needs_correctness = True

    def __init__(self, tokenizer: Any, correctness: Any, correctness_options: Mapping[str, Any] | None,
                 correct_threshold: float = 0.5):
        self.count = TokenCounter(tokenizer, self.name)
        if self.needs_correctness and correctness is None:
            raise RewardError(f"{self.name}: needs a correctness reward (e.g. correctness='math_answer' or "
                              f"'exact_match'), got None")
        self.correctness: RewardFn | None = load_correctness(self.name, correctness, correctness_options)
        self.correct_threshold = _number(correct_threshold, "correct_threshold", self.name)

    def close(self) -> None:
        close = getattr(self.correctness, "close", None)
        if callable(close):
            close()

    def _score_texts(self, texts, prompts, metadata):
        lengths = torch.tensor(self.count(texts), dtype=torch.float64)  # [B] tokens
        info: dict[str, Any] = {}
        if self.correctness is not None:
            raw, c_info = self.correctness(texts, prompts, metadata)
            raw = raw.double()
            if c_info:
                info["correctness_info"] = c_info
        else:
            raw = torch.full_like(lengths, math.nan)
        scores = self._combine(lengths, raw, texts, prompts, metadata, info)
        comps = {"correctness": raw.float()} if self.correctness is not None else {}
        info["components"] = {**comps, "length": lengths.float(), **info.get("components", {})}
        info["mean_length"] = float(lengths.mean()) if len(lengths) else math.nan
        info["unscorable"] = int(torch.isnan(scores).sum())
        return scores.float(), info

    def correct(self, raw: torch.Tensor) -> torch.Tensor:
        """c in {0, 1} (float64), NaN where the correctness score is NaN."""
        c = (raw >= self.correct_threshold).double()
        return torch.where(torch.isnan(raw), math.nan, c)

    def _combine(self, lengths, raw, texts, prompts, metadata, info) -> torch.Tensor:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------
# the rewards
# ------------------------------------------------------------------------------------------------


class KimiLengthReward(_LengthReward):
    name = "kimi_length"

    def __init__(self, tokenizer, correctness="math_answer", correctness_options=None, length_weight=1.0,
                 add_correctness=True, group_key=None, correct_threshold=0.5):
        super().__init__(tokenizer, correctness, correctness_options, correct_threshold)
        self.length_weight = _number(length_weight, "length_weight", self.name)
        self.add_correctness = bool(add_correctness)
        if group_key is not None and (not isinstance(group_key, str) or not group_key):
            raise RewardError(f"{self.name}: group_key must be a metadata column name or None (group by prompt), "
                              f"got {group_key!r}")
        self.group_key = group_key

    def groups(self, prompts: list[str], metadata) -> list[Any]:
        if self.group_key is None:
            return list(prompts)
        if metadata is None:
            raise RewardError(f"{self.name}: group_key={self.group_key!r} but no metadata was passed")
        keys = []
        for i, m in enumerate(metadata):
            if not isinstance(m, Mapping) or self.group_key not in m:
                raise RewardError(f"{self.name}: metadata[{i}] has no group column {self.group_key!r}; add it or "
                                  f"set group_key=None to group by prompt")
            v = m[self.group_key]
            keys.append(v if isinstance(v, (str, int, float, tuple)) else repr(v))
        return keys

    def _combine(self, lengths, raw, texts, prompts, metadata, info):
        c = self.correct(raw)
        term = kimi_length_term(lengths, c, self.groups(prompts, metadata))
        info["components"] = {"length_term": term.float()}
        return (c if self.add_correctness else 0.0) + self.length_weight * term


def kimi_length_term(lengths: torch.Tensor, correct: torch.Tensor, groups: Sequence[Any]) -> torch.Tensor:
    """Kimi k1.5's length term per sample (float64 [B]): λ = 0.5 − (L − L_min)/(L_max − L_min) over the sample's
    group; λ if correct, min(0, λ) if wrong; 0 when the group's lengths are all equal; NaN where ``correct`` is."""
    lengths = lengths.double()
    out = torch.zeros_like(lengths)
    index: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        index.setdefault(g, []).append(i)
    for rows in index.values():
        L = lengths[rows]
        lo, hi = float(L.min()), float(L.max())
        if hi == lo:
            continue
        lam = 0.5 - (L - lo) / (hi - lo)
        ok = correct[rows]
        out[rows] = torch.where(ok > 0.5, lam, torch.clamp(lam, max=0.0))
    return torch.where(torch.isnan(correct), math.nan, out)


class _L1Reward(_LengthReward):
    def __init__(self, tokenizer, correctness="math_answer", correctness_options=None, alpha=L1_ALPHA,
                 target_key="num_tokens", correct_threshold=0.5):
        super().__init__(tokenizer, correctness, correctness_options, correct_threshold)
        self.alpha = _number(alpha, "alpha", self.name, positive=True)
        if target_key is not None and (not isinstance(target_key, str) or not target_key):
            raise RewardError(f"{self.name}: target_key must be a metadata column name or None (prompt only), "
                              f"got {target_key!r}")
        self.target_key = target_key

    def targets(self, prompts: list[str], metadata) -> torch.Tensor:
        """n_gold per sample (float64 [B]): metadata[target_key], else the prompt's "Think for N tokens"; NaN if neither."""
        out = []
        for i, p in enumerate(prompts):
            m = metadata[i] if metadata is not None and i < len(metadata) else None
            v = m.get(self.target_key) if self.target_key and isinstance(m, Mapping) else None
            if isinstance(v, str) and v.strip().lstrip("-").isdigit():
                v = int(v)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out.append(abs(float(v)))  # L1's data marks max-mode budgets with a negative num_tokens
                continue
            n = parse_token_budget(p)
            out.append(math.nan if n is None else float(n))
        return torch.tensor(out, dtype=torch.float64)


class L1ExactReward(_L1Reward):
    name = "l1_exact"

    def _combine(self, lengths, raw, texts, prompts, metadata, info):
        gold = self.targets(prompts, metadata)
        info["components"] = {"target": gold.float()}
        return self.correct(raw) - self.alpha * (gold - lengths).abs()


class L1MaxReward(_L1Reward):
    name = "l1_max"

    def __init__(self, tokenizer, correctness="math_answer", correctness_options=None, alpha=L1_ALPHA,
                 delta=L1_DELTA, form="paper", target_key="num_tokens", correct_threshold=0.5):
        super().__init__(tokenizer, correctness, correctness_options, alpha, target_key, correct_threshold)
        self.delta = _number(delta, "delta", self.name)
        if form not in ("paper", "code"):
            raise RewardError(f"{self.name}: form must be 'paper' (c*clip(a*(n-L)+delta, 0, 1)) or 'code' "
                              f"(c*(clip(a*(n-L), -1, 1)+1)/2), got {form!r}")
        self.form = form

    def _combine(self, lengths, raw, texts, prompts, metadata, info):
        gold = self.targets(prompts, metadata)
        info["components"] = {"target": gold.float()}
        if self.form == "paper":
            factor = torch.clamp(self.alpha * (gold - lengths) + self.delta, 0.0, 1.0)
        else:
            factor = (torch.clamp(self.alpha * (gold - lengths), -1.0, 1.0) + 1.0) / 2.0
        return self.correct(raw) * factor


class DapoOverlongReward(_LengthReward):
    name = "dapo_overlong"
    needs_correctness = False

    def __init__(self, tokenizer, max_length=20480, cache_length=4096, factor=1.0, correctness=None,
                 correctness_options=None):
        super().__init__(tokenizer, correctness, correctness_options)
        for option, v in (("max_length", max_length), ("cache_length", cache_length)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise RewardError(f"{self.name}: {option} must be a non-negative integer number of tokens, got "
                                  f"{v!r} (DAPO: max_length 20480, cache_length 4096)")
        if max_length <= 0 or cache_length > max_length:
            raise RewardError(f"{self.name}: need 0 <= cache_length <= max_length and max_length > 0, got "
                              f"max_length={max_length}, cache_length={cache_length} (DAPO: 20480 and 4096)")
        self.max_length, self.cache_length = max_length, cache_length
        self.factor = _number(factor, "factor", self.name)

    def _combine(self, lengths, raw, texts, prompts, metadata, info):
        from diffusion_rl.core.grpo import soft_overlong_penalty

        penalty = soft_overlong_penalty(lengths, self.max_length, self.cache_length, self.factor).double()
        info["components"] = {"penalty": penalty.float()}
        return penalty if self.correctness is None else raw + penalty


class CosineLengthReward(_LengthReward):
    name = "cosine_length"

    def __init__(self, tokenizer, max_len, correctness="math_answer", correctness_options=None,
                 min_value_wrong=-1.0, max_value_wrong=-0.5, min_value_correct=0.5, max_value_correct=1.0,
                 exceed_value=None, correct_threshold=0.5):
        super().__init__(tokenizer, correctness, correctness_options, correct_threshold)
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len <= 0:
            raise RewardError(f"{self.name}: max_len must be a positive integer number of tokens (L_max), got "
                              f"{max_len!r}; e.g. the rollout's max_new_tokens")
        self.max_len = max_len
        self.values = {k: _number(v, k, self.name) for k, v in (
            ("min_value_wrong", min_value_wrong), ("max_value_wrong", max_value_wrong),
            ("min_value_correct", min_value_correct), ("max_value_correct", max_value_correct))}
        self.exceed_value = None if exceed_value is None else _number(exceed_value, "exceed_value", self.name)

    def _combine(self, lengths, raw, texts, prompts, metadata, info):
        v, c = self.values, self.correct(raw)
        progress = torch.clamp(lengths / self.max_len, max=1.0)
        cosine = torch.cos(progress * math.pi)
        lo = torch.where(c > 0.5, v["min_value_correct"], v["max_value_wrong"])
        hi = torch.where(c > 0.5, v["max_value_correct"], v["min_value_wrong"])
        r = lo + 0.5 * (hi - lo) * (1.0 + cosine)
        if self.exceed_value is not None:
            r = torch.where(lengths > self.max_len, self.exceed_value, r)
        return torch.where(torch.isnan(c), math.nan, r)


def _number(v: Any, option: str, name: str, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
        kind = "a positive finite number" if positive else "a finite number"
        raise RewardError(f"{name}: {option} must be {kind}, got {v!r}")
    return float(v)


# ------------------------------------------------------------------------------------------------
# factories
# ------------------------------------------------------------------------------------------------


def make_kimi_length_reward(
    tokenizer: Any = None,
    correctness: str | RewardFn | Callable | None = "math_answer",
    correctness_options: Mapping[str, Any] | None = None,
    length_weight: float = 1.0,
    add_correctness: bool = True,
    group_key: str | None = None,
    correct_threshold: float = 0.5,
) -> KimiLengthReward:
    """Kimi k1.5 group min-max length reward, correctness-gated (see ``rewards.length``)."""
    return KimiLengthReward(tokenizer, correctness, correctness_options, length_weight, add_correctness, group_key,
                            correct_threshold)


def make_l1_exact_reward(
    tokenizer: Any = None,
    correctness: str | RewardFn | Callable | None = "math_answer",
    correctness_options: Mapping[str, Any] | None = None,
    alpha: float = L1_ALPHA,
    target_key: str | None = "num_tokens",
    correct_threshold: float = 0.5,
) -> L1ExactReward:
    """L1-Exact: c − α|n_gold − L| (see ``rewards.length``)."""
    return L1ExactReward(tokenizer, correctness, correctness_options, alpha, target_key, correct_threshold)


def make_l1_max_reward(
    tokenizer: Any = None,
    correctness: str | RewardFn | Callable | None = "math_answer",
    correctness_options: Mapping[str, Any] | None = None,
    alpha: float = L1_ALPHA,
    delta: float = L1_DELTA,
    form: str = "paper",
    target_key: str | None = "num_tokens",
    correct_threshold: float = 0.5,
) -> L1MaxReward:
    """L1-Max: c·clip(α(n_gold − L) + δ, 0, 1) (see ``rewards.length``)."""
    return L1MaxReward(tokenizer, correctness, correctness_options, alpha, delta, form, target_key, correct_threshold)


def make_dapo_overlong_reward(
    tokenizer: Any = None,
    max_length: int = 20480,
    cache_length: int = 4096,
    factor: float = 1.0,
    correctness: str | RewardFn | Callable | None = None,
    correctness_options: Mapping[str, Any] | None = None,
) -> DapoOverlongReward:
    """DAPO soft overlong punishment on token lengths, optionally added to a correctness reward (``rewards.length``)."""
    return DapoOverlongReward(tokenizer, max_length, cache_length, factor, correctness, correctness_options)


def make_cosine_length_reward(
    tokenizer: Any = None,
    max_len: int | None = None,
    correctness: str | RewardFn | Callable | None = "math_answer",
    correctness_options: Mapping[str, Any] | None = None,
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
    exceed_value: float | None = None,
    correct_threshold: float = 0.5,
) -> CosineLengthReward:
    """Cosine-scaled length reward (Demystifying Long CoT; TRL ``get_cosine_scaled_reward``), see ``rewards.length``."""
    return CosineLengthReward(tokenizer, max_len, correctness, correctness_options, min_value_wrong,
                              max_value_wrong, min_value_correct, max_value_correct, exceed_value, correct_threshold)
