"""The diffusion trainer's TensorBoard side: image grids, the labelled before/after figure, and the credit
profiles, on top of the shared scalar / hparams / text writer (`diffusion_rl.core.tb`)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from diffusion_rl.core import tb as core_tb

CAPTION_LINE_PX = 11  # PIL's default bitmap font: 11 px per line, about 6 px per character


def image_grid(images: torch.Tensor, nrow: int | None = None) -> Image.Image:
    """[B, 3, H, W] floats in [0, 1] -> one PIL image."""
    nrow = nrow or max(1, int(len(images) ** 0.5))
    grid = make_grid(images.float().cpu(), nrow=nrow, padding=1, pad_value=1.0)
    return Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def grid_cells(grid: Image.Image, n: int, nrow: int, padding: int = 1) -> torch.Tensor:
    """The first `n` images [n, 3, H, W] in [0, 1] back out of an `image_grid(..., nrow)` picture."""
    pixels = torch.from_numpy(np.asarray(grid.convert("RGB")).copy()).permute(2, 0, 1).float() / 255  # [3, GH, GW]
    rows = -(-n // nrow)
    h = (pixels.shape[1] - padding) // rows - padding
    w = (pixels.shape[2] - padding) // min(n, nrow) - padding
    cells = []
    for i in range(n):
        y, x = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        cells.append(pixels[:, y : y + h, x : x + w])
    return torch.stack(cells)


def labelled_grid(
    images: torch.Tensor, labels: list[str], ncol: int = 8, scale: int = 3, caption_lines: int = 3, gap: int = 4
) -> tuple[Image.Image, list[tuple[int, int]]]:
    """Each image [3, H, W] upscaled `scale`x (nearest, so tiny samples stay crisp) with its label wrapped
    underneath; returns the figure and the top-left corner of every image in it."""
    h, w = images.shape[-2] * scale, images.shape[-1] * scale
    cell_h = h + caption_lines * CAPTION_LINE_PX + gap
    nrow = -(-len(images) // ncol)
    canvas = Image.new("RGB", (ncol * (w + gap) - gap, nrow * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    chars = max(4, w // 6)
    corners = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        x, y = (i % ncol) * (w + gap), (i // ncol) * cell_h
        pixels = (image.float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        canvas.paste(Image.fromarray(pixels).resize((w, h), Image.NEAREST), (x, y))
        lines = textwrap.wrap(label, chars)[:caption_lines]
        for j, line in enumerate(lines):
            draw.text((x, y + h + 1 + j * CAPTION_LINE_PX), line, fill="black")
        corners.append((x, y))
    return canvas, corners


def side_by_side(panels: list[tuple[str, Image.Image]], header: int = 18, gap: int = 12) -> Image.Image:
    """Lay the panels out left to right, each under its one-line title."""
    width = sum(im.width for _, im in panels) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (width, header + max(im.height for _, im in panels)), "white")
    draw, x = ImageDraw.Draw(canvas), 0
    for title, im in panels:
        draw.text((x + 2, 3), title, fill="black")
        canvas.paste(im.convert("RGB"), (x, header))
        x += im.width + gap
    return canvas


class Writer(core_tb.Writer):
    """The shared writer plus credit profiles and sample grids."""

    def credit(self, credit_result, similarities: torch.Tensor, step: int) -> None:
        """Per-step profiles (k = 0 is pure noise): mean contribution and |advantage| per step, and the
        similarity curve s_0..s_T of sample 0."""
        self.profile("credit/contribution_by_step", credit_result.contributions.mean(0), step)
        self.profile("credit/abs_advantage_by_step", credit_result.step_advantages.abs().mean(0), step)
        self.profile("credit/similarity_curve_sample0", similarities[0], step)

    def images(self, images: torch.Tensor, prompts: list[str], out_dir: Path, step: int) -> Path | None:
        if not self.enabled:
            return None
        grid = image_grid(images)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"epoch_{step:04d}.png"
        grid.save(path)
        self.w.add_image("samples/grid", np.asarray(grid), step, dataformats="HWC")
        self.w.add_text("samples/prompts", "\n\n".join(prompts[: len(images)]), step)
        return path
