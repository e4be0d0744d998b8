"""Run helpers both trainers use: seeds, resume rules, the optimizer-step guard, the trainer state saved
and restored side by side, trainer callbacks, and an EMA of the trainable weights.

Nothing here knows what is trained: the accelerator, optimizer and schedulers are duck-typed, and the
stateful parts of a trainer (stat trackers, credit buffers, prompt samplers, the EMA) are anything with
`state_dict()` / `load_state_dict()`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


class NonFiniteTrainingError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class ResumeError(RuntimeError):
    """The checkpoint does not fit the current configuration."""


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (FNV-1a style): independent streams per (seed, epoch, rank, batch, sample)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFF)) * 1099511628211) & ((1 << 63) - 1)
    return h


def versions(*distributions: str) -> dict[str, str]:
    """Installed versions by distribution name, read from package metadata (nothing is imported)."""
    out = {}
    for name in distributions:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


# ------------------------------------------------------------------------------------------------
# callbacks: the public seam for timing and observing a run
# ------------------------------------------------------------------------------------------------


class TrainerCallback:
    """Called by a trainer around each epoch; subclass and override what you need. `on_epoch_start` runs before
    the epoch's clock starts, `on_epoch_end` once its record (the metrics logged for it) is written, before the
    epoch's checkpoint."""

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def on_epoch_end(self, epoch: int, record: dict) -> None:
        pass


class MetricAccumulator:
    """Reduces per-micro-batch metrics over an epoch: the mean, except `*_min` / `*_max` keys, which keep the
    true extreme (a mean of per-micro-batch minima is not the epoch's minimum)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.extremes: dict[str, float] = {}
        self.count = 0

    def add(self, metrics: Mapping[str, Any]) -> None:
        for key, value in metrics.items():
            value = float(value)
            if key.endswith("_min"):
                self.extremes[key] = min(self.extremes.get(key, value), value)
            elif key.endswith("_max"):
                self.extremes[key] = max(self.extremes.get(key, value), value)
            else:
                self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def result(self) -> dict[str, float]:
        return {**{k: v / max(self.count, 1) for k, v in self.sums.items()}, **self.extremes}


# ------------------------------------------------------------------------------------------------
# resume
# ------------------------------------------------------------------------------------------------


def check_resume_config(saved: Mapping, current: Mapping, free: Iterable[str], fixed: Iterable[str]) -> list[str]:
    """Top-level config sections that differ from the checkpoint's. A section in `fixed` (the model: the saved
    weights would not fit) is an error; sections in `free` may change silently; the rest are returned so the
    trainer can warn."""
    free, fixed = set(free), set(fixed)
    changed = [k for k in current if k not in free and current[k] != saved.get(k)]
    for key in changed:
        if key in fixed:
            raise ResumeError(
                f"{key} settings differ from the checkpoint's ({saved.get(key)} vs {current[key]}); "
                f"the saved weights do not fit. Resume with the checkpoint's {key} settings."
            )
    return changed


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainerState:
    """What a checkpoint holds beside accelerate's state. `components` are the trainer's stateful parts by name;
    `to_dict` and `restore` below are the only writer and reader of this layout."""

    epochs_done: int = 0
    global_step: int = 0
    nonfinite_skipped: int = 0
    overflow_skipped: int = 0
    world_size: int = 1
    config: dict = field(default_factory=dict)
    config_hash: str = ""
    versions: dict = field(default_factory=dict)

    def to_dict(self, components: Mapping[str, Stateful | None]) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON-serialisable state, tensors): a component's tensor values (a tensor or a list of tensors at the top
        level of its state dict, e.g. EMA weights) go to the tensor file, named `component.key.index`."""
        states, tensors = {}, {}
        for name, c in components.items():
            if c is not None:
                states[name] = _split_tensors(c.state_dict(), name, tensors)
        return {
            "epochs_done": self.epochs_done,
            "global_step": self.global_step,
            "nonfinite_skipped": self.nonfinite_skipped,
            "overflow_skipped": self.overflow_skipped,
            "world_size": self.world_size,
            "config": self.config,
            "config_hash": self.config_hash,
            "versions": self.versions,
            "components": states,
        }, tensors

    @classmethod
    def restore(
        cls, saved: dict, tensors: Mapping[str, torch.Tensor], components: Mapping[str, Stateful | None],
        world_size: int, where: str,
    ) -> TrainerState:
        """Load every component's state from `saved` and `tensors` (what `to_dict` wrote); return the counters."""
        if saved["world_size"] != world_size:
            raise ResumeError(
                f"checkpoint {where} was written by {saved['world_size']} process(es), this run has {world_size}; "
                "resume with the same number of processes (the batch geometry depends on it)"
            )
        states = saved["components"]
        for name, component in components.items():
            if component is None:
                continue
            if name not in states:
                raise ResumeError(
                    f"checkpoint {where} holds no state for {name!r} (it has {sorted(states)}); it was written with "
                    "different settings (e.g. train.ema switched on since): resume with the checkpoint's settings"
                )
            component.load_state_dict(_join_tensors(states[name], tensors))
        return cls(**{k: saved[k] for k in cls.__dataclass_fields__ if k in saved})


def _split_tensors(state: dict, name: str, tensors: dict[str, torch.Tensor]) -> dict:
    out = {}
    for key, value in state.items():
        items = value if isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value) else None
        if isinstance(value, torch.Tensor):
            items = [value]
        if items is None:
            out[key] = value
            continue
        names = [f"{name}.{key}.{i}" for i in range(len(items))]
        tensors.update({n: t.detach().cpu().contiguous() for n, t in zip(names, items, strict=True)})
        out[key] = {"__tensors__": names, "single": isinstance(value, torch.Tensor)}
    return out


def _join_tensors(state: dict, tensors: Mapping[str, torch.Tensor]) -> dict:
    out = {}
    for key, value in state.items():
        if isinstance(value, dict) and "__tensors__" in value:
            items = [tensors[n] for n in value["__tensors__"]]
            out[key] = items[0] if value["single"] else items
        else:
            out[key] = value
    return out


class ProcessInfo:
    """Mixin for a trainer's run object holding an `accelerator`: which process this is."""

    accelerator: Any

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes


def restore_checkpoint(
    accelerator, checkpoint_dir, config: dict, components: Mapping[str, Stateful | None], guard: OptimizerStepGuard,
    lr_scheduler, free: Iterable[str], fixed: Iterable[str] = ("model",),
) -> TrainerState:
    """Everything a checkpoint holds, back in place: accelerate's state (weights, optimizer, RNG) on every rank,
    each component's state, the guard's counters, and the lr schedule fast-forwarded to the global step."""
    from diffusion_rl.core import checkpoint

    saved, tensors = checkpoint.load_trainer_state(checkpoint_dir)
    changed = check_resume_config(saved["config"], config, free, fixed)
    if changed and accelerator.is_main_process:
        print(f"[drl] warning: resuming with changed settings in {changed}; the config file value is used")
    accelerator.load_state(str(checkpoint_dir))
    state = TrainerState.restore(saved, tensors, components, accelerator.num_processes, str(checkpoint_dir))
    guard.global_step = state.global_step
    guard.nonfinite_skipped, guard.overflow_skipped = state.nonfinite_skipped, state.overflow_skipped
    fast_forward(lr_scheduler, state.global_step)
    return state


def save_checkpoint(
    accelerator, root, done: int, cfg, components: Mapping[str, Stateful | None], guard: OptimizerStepGuard,
    keep_last: int, versions: dict,
) -> None:
    """Collective: accelerate's state on every rank, the trainer state (`TrainerState`) beside it, atomically."""
    from diffusion_rl.core import checkpoint, config

    state = TrainerState(
        epochs_done=done, global_step=guard.global_step, nonfinite_skipped=guard.nonfinite_skipped,
        overflow_skipped=guard.overflow_skipped, world_size=accelerator.num_processes,
        config=cfg.model_dump(mode="json"), config_hash=config.config_hash(cfg), versions=versions,
    )
    state_dict, tensors = state.to_dict(components)
    checkpoint.save(accelerator, root, done, state_dict, config.dump(cfg), keep_last, tensors)


def fast_forward(lr_scheduler, steps: int) -> None:
    """Advance a step-wise lr scheduler to `steps` (on resume: the lr is a function of the global step)."""
    with warnings.catch_warnings():  # torch warns of a scheduler step before any optimizer step
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            lr_scheduler.step()


# ------------------------------------------------------------------------------------------------
# the optimizer-step guard
# ------------------------------------------------------------------------------------------------


class OptimizerStepGuard:
    """Takes an accumulated optimizer step only when the loss and the gradient are finite on every rank.

    `step(loss)`: clip the gradient norm (which unscales fp16 gradients), decide on all ranks together, then
    either step the optimizer and the lr scheduler, or skip. A skipped step under an fp16 gradient scaler still
    updates the scaler: it has recorded the overflow while unscaling, so its scale backs off and the next step
    can unscale again (without the update the next step raises "unscale_() has already been called"). An
    overflow with a finite loss is what a scaler expects early in training: it is counted in
    `overflow_skipped` and only counts towards `max_consecutive` once the scale has fallen below 1 (then the
    gradient is non-finite at any scale). Any other non-finite step counts in `nonfinite_skipped`; after
    `max_consecutive` in a row training stops with `NonFiniteTrainingError`.
    """

    def __init__(self, accelerator, params: list[torch.nn.Parameter], optimizer, lr_scheduler,
                 max_grad_norm: float, max_consecutive: int, hint: str = "lower train.learning_rate"):
        self.accelerator, self.params, self.optimizer, self.lr_scheduler = accelerator, params, optimizer, lr_scheduler
        self.max_grad_norm, self.max_consecutive, self.hint = max_grad_norm, max_consecutive, hint
        self.global_step = 0
        self.nonfinite_skipped = 0
        self.overflow_skipped = 0
        self.consecutive_bad = 0

    def step(self, loss: torch.Tensor, where: str = "") -> float | None:
        """Returns the (pre-clip) gradient norm of a taken step, or None when the step was skipped."""
        acc = self.accelerator
        grad_norm = float(acc.clip_grad_norm_(self.params, self.max_grad_norm))
        flags = torch.tensor([float(not math.isfinite(loss.item())), float(not math.isfinite(grad_norm))],
                             device=acc.device)
        loss_bad, grad_bad = (bool(v > 0) for v in acc.reduce(flags, reduction="sum").tolist())
        stepped = not (loss_bad or grad_bad)
        if stepped:
            self.optimizer.step()
            if not all(torch.isfinite(p).all() for p in self.params):
                raise NonFiniteTrainingError(
                    f"trainable parameters became non-finite at global step {self.global_step} {where}; {self.hint}"
                )
            self.lr_scheduler.step()
            self.global_step += 1
            self.consecutive_bad = 0
        else:
            scaler = getattr(acc, "scaler", None)
            if scaler is not None and scaler.is_enabled():
                scaler.update()  # the overflow was recorded by unscale_: back the scale off, reset its state
            if scaler is not None and scaler.is_enabled() and not loss_bad and scaler.get_scale() >= 1.0:
                self.overflow_skipped += 1
            else:
                self.nonfinite_skipped += 1
                self.consecutive_bad += 1
                if self.consecutive_bad >= self.max_consecutive:
                    raise NonFiniteTrainingError(
                        f"{self.consecutive_bad} optimizer steps in a row had a non-finite loss or gradient "
                        f"{where} (global step {self.global_step}); {self.hint} or train.max_grad_norm, or check the "
                        "reward for inf values"
                    )
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm if stepped else None


# ------------------------------------------------------------------------------------------------
# EMA of the trainable weights
# ------------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of parameters, kept in fp32 on their device:
    ema <- decay * ema + (1 - decay) * param after each optimizer step."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}; Flow-GRPO uses 0.9")
        self.params = list(params)
        self.decay = float(decay)
        self.shadow = [p.detach().to(torch.float32).clone() for p in self.params]
        self.num_updates = 0

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params, strict=True):
            s.lerp_(p.detach().to(torch.float32), 1.0 - self.decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for s, p in zip(self.shadow, self.params, strict=True):
            p.copy_(s.to(p.dtype))

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily put the averaged weights into the parameters (evaluation); restored on exit."""
        live = [p.detach().clone() for p in self.params]
        self.copy_to_params()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, live, strict=True):
                    p.copy_(v)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": list(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ResumeError(
                f"EMA state holds {len(state['shadow'])} tensors, the model has {len(self.shadow)} trainable ones; "
                "resume with the checkpoint's model settings"
            )
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.shadow = [v.to(device=s.device, dtype=torch.float32).clone()
                       for v, s in zip(state["shadow"], self.shadow, strict=True)]


class BestWeights:
    """Best-of-run model selection: a copy of the trainable weights that scored highest on a validation score.

    `offer(score, epoch)` after each validation keeps a copy of the current weights when the score beats the best
    so far (ties keep the earlier weights); `copy_to_params()` puts the kept weights back at the end of the run.
    The score must come from prompts the reported evaluation does not use, or the reported number is biased
    upwards by the selection."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = list(params)
        self.weights: list[torch.Tensor] = []  # empty until the first finite score
        self.score = -math.inf
        self.epoch = -1  # epochs done when the kept weights were scored

    @torch.no_grad()
    def offer(self, score: float, epoch: int) -> bool:
        """Keep the current weights if `score` beats the best so far; True when kept. A NaN score never wins."""
        if not math.isfinite(score) or score <= self.score:
            return False
        self.score, self.epoch = float(score), int(epoch)
        self.weights = [p.detach().clone() for p in self.params]
        return True

    @torch.no_grad()
    def copy_to_params(self) -> None:
        if not self.weights:
            raise RuntimeError("BestWeights.copy_to_params before any finite score was offered")
        for w, p in zip(self.weights, self.params, strict=True):
            p.copy_(w)

    def state_dict(self) -> dict[str, Any]:
        # no score yet is None: JSON has no -inf
        return {"score": self.score if self.weights else None, "epoch": self.epoch, "weights": list(self.weights)}

    def load_state_dict(self, state: dict) -> None:
        weights = state["weights"]
        if weights and len(weights) != len(self.params):
            raise ResumeError(
                f"best-of-run state holds {len(weights)} tensors, the model has {len(self.params)} trainable ones; "
                "resume with the checkpoint's model settings"
            )
        self.score = -math.inf if state["score"] is None else float(state["score"])
        self.epoch = int(state["epoch"])
        self.weights = [w.to(device=p.device, dtype=p.dtype).clone()
                        for w, p in zip(weights, self.params if weights else [], strict=True)]


class ParameterValues:
    """Checkpoint component for trainable parameters that accelerate's state does not hold (those of a module that
    was not handed to `accelerator.prepare`, e.g. an adapter on a frozen text encoder): their values, in order."""

    def __init__(self, params: list[torch.nn.Parameter], what: str):
        self.params, self.what = list(params), what

    def state_dict(self) -> dict[str, Any]:
        return {"values": [p.detach().cpu().clone() for p in self.params]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        values = state["values"]
        if len(values) != len(self.params) or any(v.shape != p.shape for v, p in zip(values, self.params)):
            raise ResumeError(
                f"the checkpoint's {self.what} holds {len(values)} tensors that do not match this run's "
                f"{len(self.params)}; resume with the checkpoint's model settings"
            )
        for v, p in zip(values, self.params, strict=True):
            p.copy_(v.to(device=p.device, dtype=p.dtype))
