"""The OpenThinkIMG action format (zhaochen0110/OpenThinkIMG): each policy turn is one JSON object

    {"thought": "I need the red objects", "actions": [{"name": "count", "arguments": {"colour": "red"}}]}

with the calls of that turn in ``actions``; the turn ``{"thought": ..., "actions": [{"name": "terminate",
"arguments": {"ans": "3"}}]}`` ends the rollout with the answer (OpenThinkIMG spells it ``Terminate``; the name
is matched without case). Text around the object is allowed (a model may think before it); the first JSON
object of the turn is the action.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from reasoning_rl.tools.base import TERMINATE

_DECODER = json.JSONDecoder()


@dataclass
class Turn:
    """One parsed policy turn: its thought, its calls [(name, arguments)], the terminate answer if any, or the
    parse error (then there are no calls)."""

    thought: str = ""
    calls: list[tuple[Any, Any]] = field(default_factory=list)
    answer: str | None = None  # set when the turn holds a terminate action
    error: str | None = None


def _objects(text: str):
    """Every top-level JSON object in `text`, in order, as (start, end, value)."""
    i = text.find("{")
    while i != -1:
        try:
            value, end = _DECODER.raw_decode(text, i)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
            continue
        yield i, end, value
        i = text.find("{", end)


def parse_turn(text: str) -> Turn:
    """The action of one policy turn, or a Turn whose ``error`` says why there is none (never raises)."""
    obj = next((v for _, _, v in _objects(text) if isinstance(v, dict)), None)
    if obj is None:
        return Turn(error='no JSON action {"thought":..,"actions":[..]}')
    actions = obj.get("actions")
    if not isinstance(actions, list) or not actions:
        return Turn(thought=str(obj.get("thought", "")), error='"actions" must be a non-empty list')
    turn = Turn(thought=str(obj.get("thought", "")))
    for a in actions:
        if not isinstance(a, dict) or not isinstance(a.get("name"), str):
            return Turn(thought=turn.thought, error=f'each action needs a string "name", got {json.dumps(a)[:80]}')
        args = a.get("arguments", {})
        if a["name"].casefold() == TERMINATE:
            ans = args.get("ans") if isinstance(args, dict) else None
            if ans is None or isinstance(ans, (dict, list)):
                return Turn(thought=turn.thought, error='terminate needs "arguments": {"ans": <the answer>}')
            turn.answer = str(ans)
            return turn  # the calls before it run; nothing after a terminate does
        turn.calls.append((a["name"], args))
    return turn


def format_action(thought: str, name: str, arguments: dict) -> str:
    """One turn's text in the compact JSON the expert traces and the prompts use."""
    return json.dumps({"thought": thought, "actions": [{"name": name, "arguments": arguments}]},
                      separators=(",", ":"))


def terminate_answer(transcript: str) -> str | None:
    """The answer of the last terminate action in a whole rollout's text, or None (what `tool_answer` scores)."""
    answer = None
    for _, _, value in _objects(transcript):
        if isinstance(value, dict) and isinstance(value.get("actions"), list):
            for a in value["actions"]:
                if isinstance(a, dict) and str(a.get("name", "")).casefold() == TERMINATE:
                    args = a.get("arguments")
                    if isinstance(args, dict) and args.get("ans") is not None and not isinstance(
                            args["ans"], (dict, list)):
                        answer = str(args["ans"])
    return answer
