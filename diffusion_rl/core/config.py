"""Config machinery shared by both trainers: strict typed sections, `--set a.b=c` overrides, YAML reading,
one error listing every problem, field documentation, and the sections both trainers share.

A trainer defines its root model (a `Section` subclass) and its cross-field rules, and passes both in:

    cfg = load(RunConfig, "configs/default.yaml", ["train.learning_rate=1e-4"], rules=cross_field_problems)

Unknown keys are rejected with a suggestion, every field carries a docstring (`documented_fields`), and
field errors and cross-field errors come back together in one `ConfigError` (path: what is wrong, the value,
the fix). Nothing here knows what is being trained.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "ConfigError",
    "Section",
    "MixedPrecision",
    "RewardComponent",
    "RewardConfig",
    "AdvantageConfig",
    "CheckpointConfig",
    "reward_problems",
    "advantage_problems",
    "parse_override",
    "apply_overrides",
    "read_yaml",
    "build",
    "load",
    "dump",
    "config_hash",
    "documented_fields",
]

Root = TypeVar("Root", bound=BaseModel)
Rules = Callable[[Any], list[str]]


class ConfigError(ValueError):
    """A configuration problem; `problems` lists every one found (path: what is wrong, the value, the fix)."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")


class Section(BaseModel):
    """A strict config section: unknown keys are errors, attribute docstrings are the field docs."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


def _no_is_false(value: Any) -> Any:
    # YAML 1.1 reads a bare `no` (accelerate's own spelling of "no mixed precision") as the boolean false.
    return "no" if value is False else value


MixedPrecision = Annotated[Literal["no", "fp16", "bf16"], BeforeValidator(_no_is_false)]


# ------------------------------------------------------------------------------------------------
# sections both trainers share
# ------------------------------------------------------------------------------------------------


class RewardComponent(Section):
    name: str
    """Registered reward name (see `drl reward list`)."""
    weight: float = 1.0
    """Weight of this component in the combination."""
    label: str | None = None
    """Unique label when the same reward appears twice."""
    options: dict[str, Any] = {}
    """Keyword options passed to the reward factory (model_path, dtype, device, ...)."""


class RewardConfig(Section):
    """A reward: one registered name with options, or a weighted list of components. A bare string is read as
    the name (`eval.reward: jpeg_compressibility` = `eval.reward: {name: jpeg_compressibility}`)."""

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    name: str | None = None
    """Registered reward name (`drl reward list`); leave empty when `components` is given."""
    options: dict[str, Any] = {}
    """Keyword options for the reward factory."""
    components: list[RewardComponent] = []
    """Weighted list of rewards (multi-reward); replaces `name`."""
    combine: Literal["sum", "advantage"] = "sum"
    """Multi-reward combination: weighted sum of raw rewards, or weighted sum of per-prompt normalised advantages."""
    nonfinite: Literal["error", "mask"] = "mask"
    """What to do with NaN/unscorable rewards: stop with an error naming the reward, or mask the sample (zero advantage)."""
    max_unscorable_fraction: float = Field(0.25, ge=0, le=1)
    """With nonfinite = mask, stop when more than this fraction of an epoch's samples is unscorable."""
    overlap: bool = True
    """Score batch i in a worker thread while batch i+1 is generated."""

    def build(self):
        """The configured reward from the `rewards` registry: one reward, or the weighted multi-reward."""
        import rewards

        if self.components:
            specs = [{"name": c.name, "weight": c.weight, **({"label": c.label} if c.label else {}), **c.options}
                     for c in self.components]
            return rewards.load_multi(specs, mode=self.combine)
        return rewards.load(self.name, **self.options)


class AdvantageConfig(Section):
    per_prompt_stat_tracking: bool = True
    """Standardise rewards per prompt with a bounded buffer (DDPO); false uses whole-batch statistics."""
    buffer_size: int = Field(32, ge=1)
    """Rewards kept per prompt."""
    min_count: int = Field(16, ge=1)
    """Below this many buffered rewards a prompt uses the whole batch's statistics; at most buffer_size."""
    scale_std: bool = True
    """Divide by the standard deviation (false = Dr.GRPO: centre only)."""
    clip: float = Field(5.0, gt=0)
    """Clamp advantages to [-clip, clip]."""


class CheckpointConfig(Section):
    every: int = Field(1, ge=0)
    """Save a checkpoint every N epochs (0 = only at the end)."""
    keep_last: int = Field(2, ge=1)
    """Complete checkpoints kept; older ones are pruned only after a new one is whole."""


def reward_problems(r: RewardConfig) -> list[str]:
    problems = []
    if r.components and r.name:
        problems.append("reward: give either reward.name or reward.components, not both (set reward.name: null)")
    if not r.components and not r.name:
        problems.append("reward: set reward.name (see `drl reward list`) or a list of reward.components")
    if r.combine == "advantage" and not r.components:
        problems.append("reward.combine=advantage needs reward.components (a weighted list of rewards)")
    return problems


def advantage_problems(a: AdvantageConfig) -> list[str]:
    if a.per_prompt_stat_tracking and a.min_count > a.buffer_size:
        return [
            f"advantage.min_count ({a.min_count}) exceeds advantage.buffer_size ({a.buffer_size}): a prompt's buffer "
            f"could never hold enough rewards and batch statistics would be used forever; set advantage.min_count "
            f"<= {a.buffer_size} or raise advantage.buffer_size to {a.min_count}"
        ]
    return []


# ------------------------------------------------------------------------------------------------
# reading, overriding, validating
# ------------------------------------------------------------------------------------------------


def _section_of(root: type[BaseModel], loc: Sequence[str]) -> type[BaseModel] | None:
    """The model class at `loc` below `root` (None where the path leaves the sections)."""
    section: Any = root
    for key in loc:
        field = section.model_fields.get(key) if isinstance(section, type) else None
        ann = getattr(field, "annotation", None)
        section = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if section is None:
            return None
    return section


def _format_validation_error(err: ValidationError, root: type[BaseModel]) -> list[str]:
    problems = []
    for e in err.errors():
        loc = [str(x) for x in e["loc"]]
        path = ".".join(loc)
        if e["type"] == "extra_forbidden":
            section = _section_of(root, loc[:-1])
            known = list(section.model_fields) if section is not None else []
            close = difflib.get_close_matches(loc[-1].replace("-", "_"), known, n=1)
            hint = f"; did you mean '{'.'.join(loc[:-1] + close)}'?" if close else ""
            problems.append(f"{path}: unknown key{hint}" + (f" (known: {', '.join(known)})" if not close and known else ""))
        else:
            problems.append(f"{path}: {e['msg']} (got {e.get('input')!r})")
    return problems


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError([f"--set {item!r}: expected key.path=value, e.g. --set train.learning_rate=1e-4"])
    key, value = item.split("=", 1)
    parsed = yaml.safe_load(value) if value != "" else ""
    return key.strip().split("."), parsed


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for key in path[:-1]:
            nxt = node.get(key)
            if not isinstance(nxt, dict):
                nxt = node[key] = {} if nxt is None else nxt
            if not isinstance(nxt, dict):
                raise ConfigError([f"--set {item!r}: '{key}' is not a section"])
            node = nxt
        node[path[-1]] = value
    return raw


def _without(raw: dict, locs: list[tuple]) -> dict:
    """A deep copy of `raw` with the offending leaves removed (they fall back to defaults)."""
    out = copy.deepcopy(raw)
    for loc in locs:
        node = out
        for key in loc[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict):
            node.pop(loc[-1], None)
    return out


def build(root: type[Root], raw: dict, source: str = "config", rules: Rules | None = None) -> Root:
    """Validate `raw` as `root`; field errors and the cross-field `rules` are reported together."""
    try:
        cfg = root.model_validate(raw)
        field_problems: list[str] = []
    except ValidationError as err:
        field_problems = _format_validation_error(err, root)
        try:  # check the cross-field rules on what is valid, so every problem is reported at once
            cfg = root.model_validate(_without(raw, [e["loc"] for e in err.errors()]))
        except ValidationError:
            raise ConfigError(field_problems, source) from None
    problems = field_problems + (rules(cfg) if rules else [])
    if problems:
        raise ConfigError(problems, source)
    return cfg


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {str(path)!r} does not exist; pass a YAML file such as configs/default.yaml"])
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError([f"{path}: not valid YAML: {err}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}"])
    return raw


def load(
    root: type[Root], path: str | Path | None = None, overrides: Sequence[str] = (), rules: Rules | None = None,
    paths_beside_file: Sequence[str] = (),
) -> Root:
    """A YAML file (or the root's defaults when `path` is None) with `--set` overrides applied, validated.
    Each dotted field in `paths_beside_file` (e.g. "prompts.path") holding a relative path that does not exist
    from the working directory but does beside the YAML file is rewritten to the latter (configs/prompts/...)."""
    raw = read_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, list(overrides))
    cfg = build(root, raw, str(path) if path else "the default config", rules)
    for dotted in paths_beside_file if path is not None else ():
        *parents, leaf = dotted.split(".")
        section = cfg
        for name in parents:
            section = getattr(section, name)
        value = getattr(section, leaf)
        if value and not Path(value).is_absolute() and not Path(value).exists():
            beside = Path(path).parent / value
            if beside.exists():
                setattr(section, leaf, str(beside))
    return cfg


def dump(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def config_hash(cfg: BaseModel) -> str:
    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def documented_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str]]:
    """(dotted path, docstring) for every leaf field; used by `config show --doc` and the 'every field
    documented' tests."""
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += documented_fields(ann, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", field.description or ""))
    return out
