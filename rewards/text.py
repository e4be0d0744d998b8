"""Rule-based rewards for text completions: answer extraction, exact match and the think/answer format.

Samples are completion strings (a chat-format completion, a list of ``{"content": ...}`` messages as in
TRL's conversational datasets, is read as the concatenation of its message contents). ``metadata`` is
one dict per sample holding the dataset columns, e.g. ``{"answer": "42"}``.

* ``extract_boxed(text)``: the content of the last complete ``\\boxed{...}`` (balanced braces, ``\\{`` and
  ``\\}`` do not count), or None.
* ``extract_tag(text, "answer")``: the content of the last ``<answer>...</answer>``, stripped, or None.
* ``extract_answer(text, sources)``: the first source in ``sources`` that finds something:
  ``"answer"`` (the answer tag), ``"boxed"`` or ``"full"`` (the whole completion, stripped).
* ``exact_match``: 1.0 when the extracted answer equals ``metadata[i][answer_key]`` after normalisation
  (case folding and whitespace collapsing, each optional), else 0.0; NaN when the ground truth is
  missing. A list/tuple ground truth means "any of these".
* ``think_answer_format``: 1.0 when the whole completion is ``<think>...</think>`` then
  ``<answer>...</answer>`` (whitespace allowed around and between the blocks, no other text, each tag
  exactly once, a non-empty answer), else 0.0. ``prefilled_think=True`` for prompts that end with the
  opening ``<think>`` tag (the completion then starts inside the think block).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from rewards.base import RewardError, RewardFn

SOURCES = ("answer", "boxed", "full")

_BOXED = re.compile(r"\\boxed\s*\{")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` whose braces balance (nested braces kept), else None.

    A ``\\boxed{`` left open (a completion cut off mid-answer) is skipped in favour of the last complete
    one before it. Escaped braces ``\\{`` / ``\\}`` (LaTeX set braces) do not count.
    """
    found = None
    for m in _BOXED.finditer(text):
        start = m.end()
        depth, i = 1, start
        while i < len(text):
            c = text[i]
            if c == "\\":
                i += 2  # skip the escaped character (\{, \}, \\)
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    found = text[start:i]
                    break
            i += 1
    return found


def extract_tag(text: str, tag: str = "answer") -> str | None:
    """Content (stripped) of the last complete ``<tag>...</tag>``, else None."""
    close = f"</{tag}>"
    end = text.rfind(close)
    if end < 0:
        return None
    start = text.rfind(f"<{tag}>", 0, end)
    if start < 0:
        return None
    return text[start + len(tag) + 2 : end].strip()


def check_sources(sources: Sequence[str] | str, option: str = "extract") -> tuple[str, ...]:
    """Validate an ordered extraction-source list (a single name is accepted)."""
    if isinstance(sources, str):
        sources = (sources,)
    sources = tuple(sources)
    bad = [s for s in sources if s not in SOURCES]
    if not sources or bad:
        raise ValueError(f"{option} must be a non-empty list of {list(SOURCES)}, got {list(sources)!r}")
    return sources


def extract_answer(text: str, sources: Sequence[str] = ("answer", "boxed"), tag: str = "answer") -> tuple[str, str] | None:
    """``(source, answer)`` from the first source that finds one, or None.

    Sources: ``"answer"`` (last ``<tag>...</tag>``), ``"boxed"`` (last complete ``\\boxed{}``), ``"full"``
    (the whole text, stripped). An empty extraction counts as not found.
    """
    for source in sources:
        if source == "answer":
            found = extract_tag(text, tag)
        elif source == "boxed":
            found = extract_boxed(text)
        elif source == "full":
            found = text.strip()
        else:
            raise ValueError(f"unknown answer source {source!r}; expected one of {list(SOURCES)}")
        if found is not None and found.strip():
            return source, found
    return None


def completion_text(sample: Any) -> str:
    """A completion as a string: a str, or a chat-format list of message dicts (contents concatenated)."""
    if isinstance(sample, str):
        return sample
    if isinstance(sample, dict) and "content" in sample:
        return str(sample["content"])
    if isinstance(sample, Sequence) and not isinstance(sample, bytes) and all(
        isinstance(m, dict) and "content" in m for m in sample
    ):
        return "".join(str(m["content"]) for m in sample)
    raise TypeError(
        f"a text completion must be a str (or a list of {{'role', 'content'}} messages), got {type(sample).__name__}"
    )


def ground_truths(name: str, metadata: Sequence[Any] | None, n: int, key: str) -> list[Any]:
    """``metadata[i][key]`` for every sample; None where the metadata, the dict or the key is missing,
    or the value is None, NaN or an empty string (all mean "no ground truth": the sample is unscorable)."""
    if metadata is None:
        return [None] * n
    if isinstance(metadata, dict):
        raise RewardError(f"reward {name!r}: metadata must be a list of {n} dicts (one per sample), got one dict")
    metadata = list(metadata)
    if len(metadata) != n:
        raise RewardError(
            f"reward {name!r} (batch size {n}) got {len(metadata)} metadata entries for {n} samples; "
            f"pass one dict per sample"
        )
    out = []
    for m in metadata:
        v = m.get(key) if isinstance(m, dict) else None
        out.append(None if _missing(v) else v)
    return out


def _missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    if isinstance(v, str) and not v.strip():
        return True
    if isinstance(v, (list, tuple)):
        return all(_missing(x) for x in v)
    return False


def gold_list(v: Any) -> list[str]:
    """A ground truth as a list of acceptable answer strings (a list/tuple means "any of these")."""
    items = v if isinstance(v, (list, tuple)) else [v]
    return [str(x) for x in items if not _missing(x)]


class TextRewardFn(RewardFn):
    """Base of rewards that score text completions: ``_score_texts(texts, prompts, metadata)``."""

    differentiable = False

    def _score(self, samples, prompts, metadata):
        texts = [completion_text(s) for s in samples]
        return self._score_texts(texts, prompts, metadata)

    def _score_texts(self, texts: list[str], prompts: list[str], metadata) -> tuple[Any, dict[str, Any]]:
        raise NotImplementedError


def normalize_text(s: str, *, case_sensitive: bool = False, normalize_whitespace: bool = True) -> str:
    """Strip; collapse whitespace runs to one space (``normalize_whitespace``); casefold unless ``case_sensitive``."""
    s = s.strip()
    if normalize_whitespace:
        s = " ".join(s.split())
    if not case_sensitive:
        s = s.casefold()
    return s


class ExactMatchReward(TextRewardFn):
    """1.0 when the extracted answer equals the ground truth after normalisation, 0.0 otherwise, NaN without a
    ground truth. ``info``: ``extracted``, ``correct``, ``unscorable`` counts."""

    name = "exact_match"

    def __init__(
        self,
        answer_key: str = "answer",
        extract: Sequence[str] | str = ("answer", "boxed", "full"),
        case_sensitive: bool = False,
        normalize_whitespace: bool = True,
        answer_tag: str = "answer",
    ):
        self.answer_key = check_key(answer_key)
        self.extract = check_sources(extract)
        self.case_sensitive = bool(case_sensitive)
        self.normalize_whitespace = bool(normalize_whitespace)
        self.answer_tag = check_tag(answer_tag, "answer_tag")

    def _norm(self, s: str) -> str:
        return normalize_text(s, case_sensitive=self.case_sensitive, normalize_whitespace=self.normalize_whitespace)

    def _score_texts(self, texts, prompts, metadata):
        golds = ground_truths(self.name, metadata, len(texts), self.answer_key)
        scores: list[float] = []
        extracted = correct = unscorable = 0
        for text, gold in zip(texts, golds, strict=True):
            found = extract_answer(text, self.extract, self.answer_tag)
            extracted += found is not None
            if gold is None:
                unscorable += 1
                scores.append(math.nan)
                continue
            ok = found is not None and self._norm(found[1]) in {self._norm(g) for g in gold_list(gold)}
            correct += ok
            scores.append(1.0 if ok else 0.0)
        return scores, {"extracted": extracted, "correct": correct, "unscorable": unscorable}


class ThinkAnswerFormatReward(TextRewardFn):
    """1.0 when the completion is exactly ``<think>...</think><answer>...</answer>`` (whitespace around and
    between the blocks allowed), else 0.0. ``info``: ``matched`` count."""

    name = "think_answer_format"

    def __init__(
        self,
        think_tag: str = "think",
        answer_tag: str = "answer",
        allow_surrounding_whitespace: bool = True,
        require_answer: bool = True,
        prefilled_think: bool = False,
    ):
        self.think_tag = check_tag(think_tag, "think_tag")
        self.answer_tag = check_tag(answer_tag, "answer_tag")
        if self.think_tag == self.answer_tag:
            raise ValueError(f"think_tag and answer_tag must differ, both are {think_tag!r}")
        self.allow_surrounding_whitespace = bool(allow_surrounding_whitespace)
        self.require_answer = bool(require_answer)
        self.prefilled_think = bool(prefilled_think)
        t, a = re.escape(self.think_tag), re.escape(self.answer_tag)
        ws = r"\s*" if self.allow_surrounding_whitespace else ""
        open_think = "" if self.prefilled_think else f"<{t}>"
        self._pattern = re.compile(
            rf"{ws}{open_think}(?P<think>.*?)</{t}>\s*<{a}>(?P<answer>.*?)</{a}>{ws}", re.DOTALL
        )
        self._tags = tuple(f"<{x}>" for x in (self.think_tag, self.answer_tag)) + tuple(
            f"</{x}>" for x in (self.think_tag, self.answer_tag)
        )

    def matches(self, text: str) -> bool:
        m = self._pattern.fullmatch(text)
        if m is None:
            return False
        if any(tag in m["think"] or tag in m["answer"] for tag in self._tags):
            return False  # each tag exactly once
        return not (self.require_answer and not m["answer"].strip())

    def _score_texts(self, texts, prompts, metadata):
        ok = [self.matches(t) for t in texts]
        return [1.0 if x else 0.0 for x in ok], {"matched": sum(ok)}


def check_key(key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"answer_key must be a non-empty string (a metadata column name), got {key!r}")
    return key


def check_tag(tag: Any, option: str) -> str:
    if not isinstance(tag, str) or not re.fullmatch(r"[A-Za-z_][\w.:-]*", tag):
        raise ValueError(f"{option} must be a tag name such as 'answer' (no angle brackets), got {tag!r}")
    return tag


def make_exact_match_reward(
    answer_key: str = "answer",
    extract: Sequence[str] | str = ("answer", "boxed", "full"),
    case_sensitive: bool = False,
    normalize_whitespace: bool = True,
    answer_tag: str = "answer",
) -> ExactMatchReward:
    """Exact match of the extracted answer with ``metadata[i][answer_key]``."""
    return ExactMatchReward(
        answer_key=answer_key,
        extract=extract,
        case_sensitive=case_sensitive,
        normalize_whitespace=normalize_whitespace,
        answer_tag=answer_tag,
    )


def make_think_answer_format_reward(
    think_tag: str = "think",
    answer_tag: str = "answer",
    allow_surrounding_whitespace: bool = True,
    require_answer: bool = True,
    prefilled_think: bool = False,
) -> ThinkAnswerFormatReward:
    """Strict ``<think>...</think><answer>...</answer>`` format check."""
    return ThinkAnswerFormatReward(
        think_tag=think_tag,
        answer_tag=answer_tag,
        allow_surrounding_whitespace=allow_surrounding_whitespace,
        require_answer=require_answer,
        prefilled_think=prefilled_think,
    )
