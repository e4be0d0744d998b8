"""The tool interface and the tool registry.

A tool has a ``name``, a ``description``, a JSON-schema ``parameters`` object describing its arguments, and
``run(state, args) -> Observation``. ``state`` is the per-rollout environment (for the visual tools a
`reasoning_rl.tools.visual.VisualState`: the scene's image and objects); ``args`` are the call's arguments,
already validated against ``parameters`` (with ``jsonschema``). An `Observation` carries text and/or an image.

    from reasoning_rl.tools import Observation, register_tool, tool

    @tool(name="area", description="Area of a box [x1, y1, x2, y2].",
          parameters={"type": "object", "properties": {"box": {"type": "array", "items": {"type": "number"},
                      "minItems": 4, "maxItems": 4}}, "required": ["box"]})
    def area(state, box):
        x1, y1, x2, y2 = box
        return Observation(text=str(max(0, x2 - x1) * max(0, y2 - y1)))

    register_tool(area)        # now `rollout.tools: [area]` can use it

`call_tool` runs one parsed call and never raises on the model's mistakes: an unknown tool, arguments that break
the schema, or an exception inside the tool give an error `Observation` (``error`` set), which the rollout
shows the policy and counts (``reason/tool_errors``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jsonschema

TERMINATE = "terminate"  # the OpenThinkIMG action that ends a rollout (arguments {"ans": ...}); never a registered tool


@dataclass
class Observation:
    """What a tool returns: text (shown to every policy) and optionally an image (for a vision-language policy)."""

    text: str = ""
    image: Any = None  # PIL.Image or None
    error: bool = False  # the call failed (unknown tool, bad arguments, the tool raised); counted by the rollout

    def __post_init__(self):
        if not isinstance(self.text, str):
            raise TypeError(f"Observation.text must be a str, got {type(self.text).__name__}")


class Tool:
    """Base class of a tool: set ``name``, ``description``, ``parameters`` (a JSON schema of type object) and
    implement ``run(state, args) -> Observation`` (``args`` a dict, already validated)."""

    name: str = ""
    description: str = ""
    parameters: dict = {"type": "object", "properties": {}}

    def run(self, state: Any, args: dict) -> Observation:
        raise NotImplementedError

    def spec(self) -> dict:
        """The tool as a function spec (OpenAI / chat-template style), e.g. for a system prompt."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    def validate(self, args: Any) -> str | None:
        """None when `args` fits the schema, else the first problem as one line (path and message)."""
        try:
            jsonschema.validate(args, self.parameters)
        except jsonschema.ValidationError as err:
            where = "/".join(str(p) for p in err.absolute_path)
            return f"argument {where}: {err.message}" if where else err.message
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


@dataclass
class FunctionTool(Tool):
    """A tool made from a function ``fn(state, **args) -> Observation | str`` (a str becomes the text)."""

    fn: Callable[..., Any] = None
    name: str = ""
    description: str = ""
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})

    def run(self, state: Any, args: dict) -> Observation:
        out = self.fn(state, **args)
        return out if isinstance(out, Observation) else Observation(text=str(out))


def tool(name: str, description: str, parameters: dict | None = None) -> Callable[[Callable], FunctionTool]:
    """Decorator: a function ``fn(state, **args)`` as a `FunctionTool` (not registered; see `register_tool`)."""
    def wrap(fn: Callable) -> FunctionTool:
        return FunctionTool(fn=fn, name=name, description=description,
                            parameters=parameters or {"type": "object", "properties": {}})
    return wrap


class ToolError(ValueError):
    """A tool could not be registered or looked up; the message names the value and the fix."""


TOOLS: dict[str, Tool] = {}


def register_tool(t: Tool, *, overwrite: bool = False) -> Tool:
    """Add `t` to the registry under ``t.name`` (raises if taken unless ``overwrite``); returns it."""
    if not isinstance(t, Tool):
        raise ToolError(f"register_tool takes a reasoning_rl.tools.Tool, got {type(t).__name__}; wrap a function "
                        "with @reasoning_rl.tools.tool(name=..., description=..., parameters=...)")
    if not t.name or not isinstance(t.name, str) or t.name.casefold() == TERMINATE:
        raise ToolError(f"a tool needs a non-empty name other than {TERMINATE!r}, got {t.name!r}")
    if not isinstance(t.parameters, dict) or t.parameters.get("type") != "object":
        raise ToolError(f"tool {t.name!r}: parameters must be a JSON schema with type 'object', got {t.parameters!r}")
    try:
        jsonschema.validators.validator_for(t.parameters).check_schema(t.parameters)
    except jsonschema.SchemaError as err:
        raise ToolError(f"tool {t.name!r}: its parameters are not a valid JSON schema: {err.message}") from None
    if t.name in TOOLS and not overwrite:
        raise ToolError(f"tool {t.name!r} is already registered; pass overwrite=True to replace it")
    TOOLS[t.name] = t
    return t


def available_tools() -> list[str]:
    """Registered tool names, sorted (the visual-world tools are registered on import of reasoning_rl.tools)."""
    return sorted(TOOLS)


def get_tools(names: list[str]) -> dict[str, Tool]:
    """The registered tools `names` by name, or a ToolError listing the unknown ones and what exists."""
    unknown = [n for n in names if n not in TOOLS]
    if unknown:
        raise ToolError(f"unknown tool(s) {unknown}; registered tools: {available_tools()} (register your own with "
                        "reasoning_rl.tools.register_tool)")
    return {n: TOOLS[n] for n in names}


def call_tool(tools: dict[str, Tool], name: Any, args: Any, state: Any) -> Observation:
    """Run one call; every failure is an error Observation naming what was wrong (never an exception)."""
    if not isinstance(name, str) or name not in tools:
        return Observation(text=f"error: unknown tool {name!r}; available: {sorted(tools)} and {TERMINATE}",
                           error=True)
    t = tools[name]
    problem = t.validate(args)
    if problem is not None:
        return Observation(text=f"error: {name}: {problem}", error=True)
    try:
        out = t.run(state, dict(args))
    except Exception as exc:  # a tool's own failure is the model's observation, not the trainer's crash
        return Observation(text=f"error: {name} failed: {type(exc).__name__}: {exc}", error=True)
    if not isinstance(out, Observation):
        return Observation(text=f"error: {name} returned {type(out).__name__}, not an Observation", error=True)
    return out
