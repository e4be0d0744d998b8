"""math-verify judging, in-process or in a helper process (``rewards.math_answer`` starts it).

Stand-alone on purpose: it imports only the standard library and ``math_verify`` (never ``rewards`` or
torch), so the helper process starts in about a second. ``rewards.math_answer`` runs this file with
``python -c "runpy.run_path(...)"`` and talks to it over stdin/stdout, one JSON object per line:

    -> {"gold": ["\\frac{1}{2}"], "pred": "0.5", "raw": false}   (pred null: only the gold is parsed)
    <- {"gold_ok": true, "pred_ok": true, "correct": true, "timeout": false}

math-verify's own timeouts use ``signal.alarm``, which only works in the main thread; they are always
disabled here (``parsing_timeout=None``, ``timeout_seconds=None``). Inside the helper process, whose
main thread does the work, each request instead runs under one ``signal.setitimer`` deadline of
``timeout_s`` seconds raising ``_Deadline`` (a ``BaseException``, so math-verify's ``except Exception``
blocks cannot swallow it). Work that never returns to the interpreter (a huge integer power in C) is
not interrupted by a signal; the parent process kills the helper for that (see ``rewards.math_answer``).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from typing import Any

_DELIMITERS = ("$", "\\boxed", "\\(", "\\[")


class _Deadline(BaseException):
    """Raised by the SIGALRM handler when a request runs past its deadline."""


def parse_answer(text: str, mv: Any) -> list:
    """math-verify parse of an answer string; [] when nothing parses.

    Text with LaTeX delimiters (``$``, ``\\boxed``, ``\\(``, ``\\[``) is parsed as is; bare text (the usual
    dataset answer ``2\\sqrt{3}``, or the content of ``\\boxed{}`` / ``<answer>``) is parsed as ``$text$``
    (bare ``2\\sqrt{3}`` would otherwise read as ``2``), falling back to the text as is. Only mathematical
    objects count: text that math-verify cannot turn into a sympy expression (``???``) gives [].
    """
    if any(d in text for d in _DELIMITERS):
        return _parse(text, mv)
    return _parse(f"${text}$", mv) or _parse(text, mv)


def _parse(text: str, mv: Any) -> list:
    """Sympy objects only (``no_fallback``: math-verify would otherwise add the raw string, which would make
    any text "parseable"); math-verify's signal timeout off."""
    return mv.parse(text, fallback_mode="no_fallback", parsing_timeout=None)


class Judge:
    """Parses golds (cached per gold tuple) and predictions, and compares them with ``math_verify.verify``."""

    def __init__(self, cache_size: int = 4096):
        import math_verify

        self.mv = math_verify
        self.cache: dict[tuple[str, ...], list] = {}
        self.cache_size = cache_size

    def gold(self, golds: list[str]) -> list:
        key = tuple(golds)
        if key not in self.cache:
            parsed: list = []
            for g in golds:
                parsed.extend(parse_answer(g, self.mv))
            if len(self.cache) >= self.cache_size:
                self.cache.pop(next(iter(self.cache)))
            self.cache[key] = parsed
        return self.cache[key]

    def __call__(self, golds: list[str], pred: str | None, raw: bool = False) -> dict[str, bool]:
        """Verdict on ``pred`` against any of ``golds``; ``raw`` parses ``pred`` with math-verify's own
        extraction as is (a whole completion) instead of as an answer string."""
        out = {"gold_ok": False, "pred_ok": False, "correct": False, "timeout": False}
        gold = self.gold(golds)
        out["gold_ok"] = bool(gold)
        if not gold or pred is None:
            return out
        target = _parse(pred, self.mv) if raw else parse_answer(pred, self.mv)
        out["pred_ok"] = bool(target)
        if target:
            out["correct"] = bool(self.mv.verify(gold, target, timeout_seconds=None))
        return out


def _on_alarm(signum, frame):
    raise _Deadline()


def judge_with_deadline(
    judge: Judge, golds: list[str], pred: str | None, timeout_s: float | None, raw: bool = False
) -> dict[str, bool]:
    """``judge(golds, pred, raw)`` under a SIGALRM deadline (main thread only); a timeout reports
    ``timeout: true`` with ``gold_ok`` true when the gold had already parsed (its parse is cached)."""
    if not timeout_s:
        return judge(golds, pred, raw)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return judge(golds, pred, raw)
    except _Deadline:
        gold_ok = bool(judge.cache.get(tuple(golds)))
        return {"gold_ok": gold_ok, "pred_ok": False, "correct": False, "timeout": True}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def main(timeout_s: float | None) -> None:
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.ERROR)
    has_timer = hasattr(signal, "setitimer")
    if has_timer:
        signal.signal(signal.SIGALRM, _on_alarm)
    out = sys.stdout
    try:
        judge = Judge()
    except Exception as exc:  # math_verify missing or broken: tell the parent, then exit
        out.write(json.dumps({"ready": False, "error": f"{type(exc).__name__}: {exc}"}) + "\n")
        out.flush()
        return
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        try:
            res = judge_with_deadline(
                judge, req["gold"], req["pred"], timeout_s if has_timer else None, raw=bool(req.get("raw"))
            )
        except _Deadline:  # the alarm fired just as the request finished
            gold_ok = bool(judge.cache.get(tuple(req["gold"])))
            res = {"gold_ok": gold_ok, "pred_ok": False, "correct": False, "timeout": True}
        except Exception as exc:  # a bug, not a verdict: report it
            res = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(res) + "\n")
        out.flush()


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] != "none" else None)
