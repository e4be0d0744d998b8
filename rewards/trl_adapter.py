"""Use TRL-style reward functions unchanged: ``rewards.from_trl(fn)`` wraps one as a ``RewardFn``.

TRL's ``GRPOTrainer`` calls a custom reward function as

    fn(prompts=..., completions=..., completion_ids=..., trainer_state=..., log_extra=..., log_metric=...,
       **{column: [value per sample] for every other dataset column})

and reads a list with one float or None per completion (None: "not applicable", becomes NaN). The
dataset columns ``prompt``, ``completion`` and ``completion_ids`` are not passed as columns (TRL
``_calculate_rewards``, v1.x). ``async def`` reward functions are awaited.

The adapter passes what drl has, the same way:

* ``prompts``: the B prompt strings; ``completions``: the B completions (samples) as given;
* every ``metadata`` key as a list keyword (None where a sample's dict lacks it), except ``prompt``
  and ``completion``; a ``completion_ids`` metadata column is passed as the ``completion_ids`` keyword,
  otherwise that keyword is not passed;
* ``trainer_state``: the object given to ``from_trl`` (default None: drl has no TRL ``TrainerState``);
* ``log_extra(column, values)`` and ``log_metric(name, value)``: collected into the returned ``info``
  (``info["extra"][column]``, ``info["metrics"][name]``).

``conversational=True`` wraps each completion as ``[{"role": "assistant", "content": text}]`` and each
prompt as ``[{"role": "user", "content": prompt}]`` (TRL's conversational format) for functions that
read ``completion[0]["content"]``.

A function without ``**kwargs`` gets only the keywords it names (TRL would fail on it), and one that
requires a keyword drl cannot supply (a column missing from the metadata) raises ``RewardError`` naming
it and the columns there are. Returned values are validated by ``check_scores`` (one per sample,
None -> NaN, no inf).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import threading
from collections.abc import Callable, Sequence
from typing import Any

from rewards.base import RewardError, RewardFn

EXCLUDED_COLUMNS = ("prompt", "completion", "completion_ids")  # TRL does not pass these as columns
RESERVED = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")


def metadata_columns(name: str, metadata: Sequence[Any] | None, n: int) -> dict[str, list[Any]]:
    """``{key: [metadata[i].get(key) for i]}`` over the union of keys, in first-seen order."""
    if metadata is None:
        return {}
    if isinstance(metadata, dict):
        raise RewardError(f"reward {name!r}: metadata must be a list of {n} dicts (one per sample), got one dict")
    metadata = list(metadata)
    if len(metadata) != n:
        raise RewardError(
            f"reward {name!r} (batch size {n}) got {len(metadata)} metadata entries for {n} samples; "
            f"pass one dict per sample"
        )
    keys: dict[str, None] = {}
    for m in metadata:
        if m is not None and not isinstance(m, dict):
            raise RewardError(f"reward {name!r}: metadata entries must be dicts, got {type(m).__name__}")
        for k in m or {}:
            keys.setdefault(k, None)
    return {k: [(m or {}).get(k) for m in metadata] for k in keys}


def _run_coroutine(coro: Any) -> Any:
    """Run ``coro`` to completion from synchronous code (in a fresh thread when a loop already runs here)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target():
        try:
            box["out"] = asyncio.run(coro)
        except BaseException as exc:  # re-raised in the caller's thread
            box["exc"] = exc

    t = threading.Thread(target=target, name="trl-reward-async")
    t.start()
    t.join()
    if "exc" in box:
        raise box["exc"]
    return box["out"]


class TRLReward(RewardFn):
    """A TRL-style ``fn(completions, **kwargs) -> list[float | None]`` as a ``RewardFn``."""

    differentiable = False

    def __init__(
        self,
        fn: Callable[..., Any],
        name: str | None = None,
        *,
        conversational: bool = False,
        trainer_state: Any = None,
    ):
        if not callable(fn):
            raise RewardError(f"from_trl expects a callable reward function, got {type(fn).__name__}")
        self._fn = fn
        self.name = name or getattr(fn, "__name__", None) or type(fn).__name__
        self.conversational = bool(conversational)
        self.trainer_state = trainer_state
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):  # builtins without a signature: pass everything
            self._accepts_all, self._named, self._required = True, set(), set()
            return
        params = list(sig.parameters.values())
        positional_only = [p.name for p in params if p.kind is p.POSITIONAL_ONLY and p.default is p.empty]
        if positional_only:
            raise RewardError(
                f"TRL reward function {self.name!r} has positional-only parameters {positional_only}; TRL "
                f"passes everything by keyword (prompts=, completions=, one keyword per dataset column)"
            )
        self._accepts_all = any(p.kind is p.VAR_KEYWORD for p in params)
        kw = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        self._named = {p.name for p in kw}
        self._required = {p.name for p in kw if p.default is p.empty}

    def _score(self, samples, prompts, metadata):
        n = len(prompts)
        completions = list(samples)
        prompt_arg: list[Any] = list(prompts)
        if self.conversational:
            completions = [c if isinstance(c, list) else [{"role": "assistant", "content": c}] for c in completions]
            prompt_arg = [[{"role": "user", "content": p}] for p in prompt_arg]
        columns = metadata_columns(self.name, metadata, n)
        clash = sorted(set(columns) & (set(RESERVED) - {"completion_ids"}))
        if clash:
            raise RewardError(
                f"reward {self.name!r}: metadata columns {clash} clash with the keywords a TRL reward function "
                f"receives ({', '.join(RESERVED)}); rename them"
            )
        extra: dict[str, list[Any]] = {}
        metrics: dict[str, float] = {}

        def log_extra(column: str, values: list[Any]) -> None:
            extra[str(column)] = list(values)

        def log_metric(name: str, value: float) -> None:
            metrics[str(name)] = float(value)

        kwargs: dict[str, Any] = {k: v for k, v in columns.items() if k not in EXCLUDED_COLUMNS}
        if "completion_ids" in columns:
            kwargs["completion_ids"] = columns["completion_ids"]
        kwargs.update(
            prompts=prompt_arg, completions=completions, trainer_state=self.trainer_state,
            log_extra=log_extra, log_metric=log_metric,
        )
        missing = sorted(self._required - set(kwargs))
        if missing:
            raise RewardError(
                f"TRL reward function {self.name!r} needs keyword(s) {missing}, which drl passes from metadata "
                f"columns; the metadata has columns {sorted(columns)}"
            )
        if not self._accepts_all:
            kwargs = {k: v for k, v in kwargs.items() if k in self._named}
        out = self._fn(**kwargs)
        if inspect.isawaitable(out):
            out = _run_coroutine(out)
        if out is None:
            raise RewardError(
                f"TRL reward function {self.name!r} returned None; return a list with one float (or None) per "
                f"completion"
            )
        if not isinstance(out, (list, tuple, str, bytes)) and not hasattr(out, "shape") and hasattr(out, "__iter__"):
            out = list(out)  # a generator or other iterable: TRL iterates over it too
        info: dict[str, Any] = {}
        if extra:
            info["extra"] = extra
        if metrics:
            info["metrics"] = metrics
        return out, info


def from_trl(
    fn: Callable[..., Any], name: str | None = None, *, conversational: bool = False, trainer_state: Any = None
) -> TRLReward:
    """Wrap a TRL ``GRPOTrainer`` reward function (``fn(completions, **kwargs) -> list[float | None]``)."""
    return TRLReward(fn, name, conversational=conversational, trainer_state=trainer_state)


def _import_function(path: str) -> Callable[..., Any]:
    if not isinstance(path, str) or not path:
        raise ValueError(f"function must be an import path such as 'my_pkg.rewards:accuracy', got {path!r}")
    module, sep, attr = path.partition(":")
    if not sep:
        module, _, attr = path.rpartition(".")
    if not module or not attr:
        raise ValueError(f"function must be an import path such as 'my_pkg.rewards:accuracy', got {path!r}")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def make_trl_function_reward(function: str, conversational: bool = False) -> TRLReward:
    """A TRL-style reward function named by import path (``'pkg.module:function'``), for YAML configs."""
    fn = _import_function(function)
    return TRLReward(fn, getattr(fn, "__name__", None) or function, conversational=conversational)
