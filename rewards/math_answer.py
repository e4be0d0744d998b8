"""Math answer correctness: the completion's final answer against ``metadata[i][answer_key]``, judged by
math-verify (``math_verify.parse`` / ``math_verify.verify``: symbolic and numeric equality, so
``\\frac{1}{2}`` equals ``0.5`` and ``2/4``).

Score per sample:

* 1.0: an answer was extracted and math-verify finds it equal to the ground truth;
* 0.0: no answer extracted (see ``rewards.text.extract_answer``; default order: the last
  ``<answer>...</answer>``, then the last complete ``\\boxed{...}``), an answer that does not parse, a wrong
  answer, or a judgement that ran past ``timeout_s``;
* NaN (unscorable): the ground truth is missing (no metadata, no ``answer_key``, None, NaN, "") or does
  not parse. A list/tuple ground truth means "any of these".

``info``: counts ``extracted``, ``parsed``, ``correct``, ``unscorable`` and ``timeouts``.

Timeouts and threads. math-verify bounds its own work with ``signal.alarm``, which works only in the main
thread: from any other thread (``rewards.AsyncScorer`` scores in a worker thread) ``parse``/``verify``
with their default timeouts raise ``ValueError``. With ``parsing_timeout``/``timeout_seconds`` set to None
they run anywhere but unbounded, and a completion such as ``\\boxed{9^{9^{9^{9}}}}`` then never returns
(sympy evaluates the power), which would stall training. So this reward always calls math-verify with
its timeouts disabled (None) and:

* ``timeout_s`` > 0 (default 5 s): judges in a helper process (``rewards._math_verify_worker``, started on
  first use, one per reward object, shared by all threads under a lock). In the helper's main thread
  each sample runs under a ``signal.setitimer`` deadline of ``timeout_s``; if the helper does not answer
  within ``timeout_s + max(2, timeout_s)`` (work inside C that a signal cannot interrupt) it is killed
  and restarted. A timed-out prediction scores 0.0, a timed-out ground truth NaN. Same scores from any
  thread, the main one included. ``close()`` stops the helper (also done at garbage collection/exit).
* ``timeout_s=None``: judges in the calling thread with no time limit at all (no helper process). Only
  for trusted inputs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import queue
import subprocess
import sys
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rewards.base import RewardError
from rewards.text import (
    TextRewardFn,
    check_key,
    check_sources,
    check_tag,
    extract_answer,
    gold_list,
    ground_truths,
)

_WORKER = Path(__file__).with_name("_math_verify_worker.py")
_INSTALL_HINT = "the math_answer reward needs math-verify: pip install math-verify"


def _require_math_verify() -> None:
    if importlib.util.find_spec("math_verify") is None:
        raise RewardError(f"math-verify is not installed; {_INSTALL_HINT}")


def _reader(stream, q: queue.Queue) -> None:
    """Forward the helper's stdout lines (parsed JSON) to ``q``; None at EOF."""
    try:
        for line in stream:
            try:
                q.put(json.loads(line))
            except ValueError:
                q.put({"error": f"unreadable reply {line[:200]!r}"})
    except (OSError, ValueError):
        pass
    q.put(None)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    for s in (proc.stdin, proc.stdout):
        try:
            if s is not None:
                s.close()
        except OSError:
            pass


class _Helper:
    """The helper process: one JSON request, one JSON reply; killed and restarted on a hard timeout or crash."""

    def __init__(self, timeout_s: float, start_timeout_s: float = 120.0):
        self.timeout_s = float(timeout_s)
        self.hard_timeout_s = self.timeout_s + max(2.0, self.timeout_s)
        self.start_timeout_s = start_timeout_s
        self.restarts = 0
        self._proc: subprocess.Popen | None = None
        self._q: queue.Queue | None = None

    def start(self) -> None:
        code = f"import runpy; runpy.run_path({str(_WORKER)!r}, run_name='__main__')"
        env = dict(os.environ, PYTHONIOENCODING="utf-8")
        proc = subprocess.Popen(
            [sys.executable, "-u", "-c", code, repr(self.timeout_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding="utf-8", bufsize=1, env=env,
        )
        weakref.finalize(self, _stop, proc)
        q: queue.Queue = queue.Queue()
        threading.Thread(target=_reader, args=(proc.stdout, q), daemon=True, name="math-verify-reader").start()
        try:
            hello = q.get(timeout=self.start_timeout_s)
        except queue.Empty:
            hello = {"ready": False, "error": f"no answer within {self.start_timeout_s:g} s"}
        if not hello or not hello.get("ready"):
            _stop(proc)
            why = (hello or {}).get("error", "it exited")
            raise RewardError(f"math_answer: the math-verify helper process did not start ({why}); {_INSTALL_HINT}")
        self._proc, self._q = proc, q

    def close(self) -> None:
        if self._proc is not None:
            _stop(self._proc)
        self._proc = self._q = None

    def _ask(self, req: dict[str, Any]) -> dict[str, Any] | None:
        """The reply, or None when the helper ran past the hard timeout or died (it is then stopped)."""
        if self._proc is None or self._proc.poll() is not None:
            if self._proc is not None:
                self.close()
                self.restarts += 1
            self.start()
        try:
            self._proc.stdin.write(json.dumps(req) + "\n")
            self._proc.stdin.flush()
            reply = self._q.get(timeout=self.hard_timeout_s)
        except (OSError, ValueError, queue.Empty):
            reply = None
        if reply is None:
            self.close()
            self.restarts += 1
            return None
        if "error" in reply:
            raise RewardError(f"math_answer: math-verify helper failed: {reply['error']}")
        return reply

    def __call__(self, golds: list[str], pred: str | None, raw: bool) -> dict[str, bool]:
        reply = self._ask({"gold": golds, "pred": pred, "raw": raw})
        if reply is not None:
            return reply
        # Hard timeout or crash: was it the gold or the prediction? Ask for the gold alone.
        gold_reply = self._ask({"gold": golds, "pred": None, "raw": False})
        gold_ok = bool(gold_reply and gold_reply["gold_ok"] and not gold_reply["timeout"])
        return {"gold_ok": gold_ok, "pred_ok": False, "correct": False, "timeout": True}


class MathAnswerReward(TextRewardFn):
    """1.0 correct, 0.0 wrong/missing/unparseable answer, NaN without a parseable ground truth."""

    name = "math_answer"

    def __init__(
        self,
        answer_key: str = "answer",
        extract: Sequence[str] | str = ("answer", "boxed"),
        answer_tag: str = "answer",
        timeout_s: float | None = 5.0,
    ):
        self.answer_key = check_key(answer_key)
        self.extract = check_sources(extract)
        self.answer_tag = check_tag(answer_tag, "answer_tag")
        if timeout_s is not None and (
            isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf
        ):
            raise ValueError(f"timeout_s must be a positive number of seconds or None (no limit), got {timeout_s!r}")
        _require_math_verify()
        self.timeout_s = None if timeout_s is None else float(timeout_s)
        self._lock = threading.Lock()
        if self.timeout_s is None:
            from rewards._math_verify_worker import Judge

            self._judge: Any = Judge()
        else:
            self._judge = _Helper(self.timeout_s)

    def close(self) -> None:
        """Stop the helper process (a later call starts a new one)."""
        if isinstance(self._judge, _Helper):
            with self._lock:
                self._judge.close()

    def _score_texts(self, texts, prompts, metadata):
        golds = ground_truths(self.name, metadata, len(texts), self.answer_key)
        scores: list[float] = []
        counts = dict.fromkeys(("extracted", "parsed", "correct", "unscorable", "timeouts"), 0)
        with self._lock:
            for text, gold in zip(texts, golds, strict=True):
                found = extract_answer(text, self.extract, self.answer_tag)
                counts["extracted"] += found is not None
                if gold is None:
                    counts["unscorable"] += 1
                    scores.append(math.nan)
                    continue
                pred, raw = (found[1], found[0] == "full") if found is not None else (None, False)
                res = self._judge(gold_list(gold), pred, raw)
                counts["timeouts"] += bool(res["timeout"])
                if not res["gold_ok"]:
                    counts["unscorable"] += 1
                    scores.append(math.nan)
                    continue
                counts["parsed"] += bool(res["pred_ok"])
                counts["correct"] += bool(res["correct"])
                scores.append(1.0 if res["correct"] else 0.0)
        return scores, counts


def make_math_answer_reward(
    answer_key: str = "answer",
    extract: Sequence[str] | str = ("answer", "boxed"),
    answer_tag: str = "answer",
    timeout_s: float | None = 5.0,
) -> MathAnswerReward:
    """Math answer correctness with math-verify (see the module docstring)."""
    return MathAnswerReward(answer_key=answer_key, extract=extract, answer_tag=answer_tag, timeout_s=timeout_s)
