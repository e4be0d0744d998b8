"""TensorBoard logging: scalars grouped by prefix (reward/, loss/, credit/, perf/, eval/), image grids,
credit profiles and the hyperparameters, all in one event file per run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary
from torchvision.utils import make_grid


def image_grid(images: torch.Tensor, nrow: int | None = None) -> Image.Image:
    """[B, 3, H, W] floats in [0, 1] -> one PIL image."""
    nrow = nrow or max(1, int(len(images) ** 0.5))
    grid = make_grid(images.float().cpu(), nrow=nrow, padding=1, pad_value=1.0)
    return Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def side_by_side(panels: list[tuple[str, Image.Image]], scale: int = 2) -> Image.Image:
    """Label each image above it and lay them out left to right, upscaled `scale`x with nearest-neighbour (so
    tiny 32x32 samples stay crisp): the before/after comparison of a run."""
    panels = [(label, im.convert("RGB").resize((im.width * scale, im.height * scale), Image.NEAREST))
              for label, im in panels]
    header, gap = 18, 12
    width = sum(im.width for _, im in panels) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (width, header + max(im.height for _, im in panels)), "white")
    draw, x = ImageDraw.Draw(canvas), 0
    for label, im in panels:
        draw.text((x + 2, 3), label, fill="black")
        canvas.paste(im, (x, header))
        x += im.width + gap
    return canvas


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


class Writer:
    def __init__(self, logdir: Path):
        self.w = SummaryWriter(str(logdir))

    def hparams(self, cfg, geometry: dict) -> None:
        """Hyperparameters (flattened config) in the HParams plugin and as a Markdown table."""
        flat = _flat(cfg.model_dump(mode="json"))
        flat.update({f"derived.{k}": v for k, v in geometry.items()})
        exp, ssi, sei = hparams_summary(flat, {"reward/mean": 0.0})
        for summary in (exp, ssi, sei):
            self.w.file_writer.add_summary(summary)
        table = "| key | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in flat.items())
        self.w.add_text("hparams", table, 0)

    def epoch(self, record: dict, step: int) -> None:
        for key, value in record.items():
            if "/" in key and isinstance(value, (int, float)):
                self.w.add_scalar(key, value, step)

    def scalars(self, group: str, values: dict, step: int) -> None:
        for key, value in values.items():
            self.w.add_scalar(f"{group}/{key}", value, step)

    def credit(self, cres, similarities: torch.Tensor, step: int) -> None:
        """Per-step profiles as histograms whose buckets are the step indices (k = 0 is pure noise):
        mean contribution and |advantage| per step, and the similarity curve s_0..s_T of sample 0."""
        self._profile("credit/contribution_by_step", cres.contributions.mean(0), step)
        self._profile("credit/abs_advantage_by_step", cres.step_advantages.abs().mean(0), step)
        self._profile("credit/similarity_curve_sample0", similarities[0], step)

    def _profile(self, tag: str, values: torch.Tensor, step: int) -> None:
        v = values.detach().float().cpu().numpy()
        n = len(v)
        self.w.add_histogram_raw(
            tag, min=0, max=n - 1, num=n, sum=float(np.arange(n) @ v), sum_squares=float((np.arange(n) ** 2) @ v),
            bucket_limits=list(np.arange(n) + 0.5), bucket_counts=list(v), global_step=step,
        )

    def images(self, images: torch.Tensor, prompts: list[str], out_dir: Path, step: int) -> Path:
        grid = image_grid(images)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"epoch_{step:04d}.png"
        grid.save(path)
        self.w.add_image("samples/grid", np.asarray(grid), step, dataformats="HWC")
        self.w.add_text("samples/prompts", "\n\n".join(prompts[: len(images)]), step)
        return path

    def close(self) -> None:
        self.w.close()
