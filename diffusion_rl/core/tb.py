"""TensorBoard writer shared by both trainers: scalars grouped by prefix (reward/, loss/, credit/, reason/,
perf/, eval/), the hyperparameters, text and per-index profiles, in one event file per run.

A context manager; on processes other than the main one (`enabled=False`) every call does nothing, so
trainers call it unconditionally. Image helpers live with the diffusion trainer (`diffusion_rl.tb`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dict -> {"a.b": scalar or str}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


class Writer:
    def __init__(self, logdir: Path, enabled: bool = True):
        self.w = SummaryWriter(str(logdir)) if enabled else None

    @property
    def enabled(self) -> bool:
        return self.w is not None

    def hparams(self, cfg, derived: dict, metric: str = "reward/mean") -> None:
        """Hyperparameters (the flattened config plus derived numbers) in the HParams plugin and as a table."""
        if not self.enabled:
            return
        flat = flatten(cfg.model_dump(mode="json"))
        flat.update({f"derived.{k}": v for k, v in derived.items()})
        exp, ssi, sei = hparams_summary(flat, {metric: 0.0})
        for summary in (exp, ssi, sei):
            self.w.file_writer.add_summary(summary)
        table = "| key | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in flat.items())
        self.w.add_text("hparams", table, 0)

    def epoch(self, record: dict, step: int) -> None:
        """Every numeric `group/name` entry of an epoch record as a scalar."""
        if not self.enabled:
            return
        for key, value in record.items():
            if "/" in key and isinstance(value, (int, float)):
                self.w.add_scalar(key, value, step)

    def scalars(self, group: str, values: dict, step: int) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            self.w.add_scalar(f"{group}/{key}", value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled:
            self.w.add_text(tag, text, step)

    def profile(self, tag: str, values: torch.Tensor, step: int) -> None:
        """A per-index profile (per step, per token position) as a histogram whose buckets are the indices."""
        if not self.enabled:
            return
        v = values.detach().float().cpu().numpy()
        n = len(v)
        self.w.add_histogram_raw(
            tag, min=0, max=n - 1, num=n, sum=float(np.arange(n) @ v), sum_squares=float((np.arange(n) ** 2) @ v),
            bucket_limits=list(np.arange(n) + 0.5), bucket_counts=list(v), global_step=step,
        )

    def close(self) -> None:
        if self.w is not None:
            self.w.close()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
