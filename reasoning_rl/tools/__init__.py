"""Tool-calling rollouts (V-ToolRL / OpenThinkIMG): tools, their registry, the action format, the visual-world
tools and token-in / token-out multi-turn rollouts with a tool mask.

* ``reasoning_rl.tools.base``    - `Tool` (name, description, JSON-schema ``parameters``, ``run(state, args) ->
  Observation``), the ``@tool`` decorator, `register_tool` / `get_tools` / `available_tools`, `call_tool`
  (arguments validated with jsonschema; every failure an error observation, never an exception)
* ``reasoning_rl.tools.actions`` - the OpenThinkIMG action JSON ``{"thought", "actions": [{"name", "arguments"}]}``
  and its ``terminate {ans}`` action
* ``reasoning_rl.tools.visual``  - crop / count / locate / draw_box on the visual world, and the crowded counting
  problems of the tool benchmark (`count_rows`)
* ``reasoning_rl.tools.rollout`` - `generate_with_tools` (sampling), `expert_rollouts` (SFT on expert traces),
  `evaluate_with_tools`
* ``reasoning_rl.tools.reward``  - the ``tool_answer`` reward (the terminate answer, exact match)

In a config: ``rollout: {tools: [count, locate, crop, draw_box], max_tool_rounds: 3}`` with ``reward: {name:
tool_answer}`` (see ``configs/reason_tools.yaml``). Importing this package registers the visual tools, the
``visual`` and ``metadata`` tool states and the ``tool_answer`` reward.
"""

from __future__ import annotations

from collections.abc import Callable

from reasoning_rl.tools.actions import Turn, format_action, parse_turn, terminate_answer
from reasoning_rl.tools.base import (
    TERMINATE,
    TOOLS,
    FunctionTool,
    Observation,
    Tool,
    ToolError,
    available_tools,
    call_tool,
    get_tools,
    register_tool,
    tool,
)
from reasoning_rl.tools.visual import VISUAL_TOOLS, VisualState

STATES: dict[str, Callable[[dict], object]] = {}


def register_state(name: str, factory: Callable[[dict], object], *, overwrite: bool = False) -> None:
    """A tool-state factory `factory(metadata row) -> state` under `name` (``rollout.tool_state``)."""
    if name in STATES and not overwrite:
        raise ToolError(f"tool state {name!r} is already registered; pass overwrite=True to replace it")
    STATES[name] = factory


def get_state(name: str) -> Callable[[dict], object]:
    if name not in STATES:
        raise ToolError(f"unknown tool state {name!r}; registered: {sorted(STATES)} (add one with "
                        "reasoning_rl.tools.register_state)")
    return STATES[name]


def _register_builtins() -> None:
    from rewards import registry

    for t in VISUAL_TOOLS:
        if t.name not in TOOLS:
            register_tool(t)
    STATES.setdefault("visual", VisualState.from_metadata)
    STATES.setdefault("metadata", lambda meta: dict(meta))  # the problem's own columns, a fresh copy per rollout
    if "tool_answer" not in registry.REGISTRY:
        registry.register(
            "tool_answer", registry._Lazy("reasoning_rl.tools.reward", "make_tool_answer_reward"),
            registry.RewardInfo("-", "{0, 1} (NaN: no ground truth)", "no weights", False,
                                "text: the terminate action's answer of a tool rollout, exact match"),
        )


_register_builtins()

__all__ = [
    "STATES", "TERMINATE", "TOOLS", "FunctionTool", "Observation", "Tool", "ToolError", "Turn", "VISUAL_TOOLS",
    "VisualState", "available_tools", "call_tool", "format_action", "get_state", "get_tools", "parse_turn",
    "register_state", "register_tool", "terminate_answer", "tool",
]
