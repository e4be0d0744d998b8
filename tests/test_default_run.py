"""A short version of the out-of-the-box run: `drl train` with the default config, two epochs."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusion_rl.models import load_pipeline

REPO = Path(__file__).parents[1]


def test_default_training_runs_evaluates_and_says_where_things_are(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "diffusion_rl.cli", "train", "--output-dir", str(tmp_path),
         "--set", "num_epochs=2", "--set", "sample.num_batches_per_epoch=1", "--set", "sample.batch_size=8",
         "--set", "train.batch_size=8", "--set", "eval.every=0", "--set", "eval.images_per_prompt=1"],
        capture_output=True, text=True, cwd=REPO, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = proc.stdout
    before = float(re.search(r"eval before training: shapes_alignment = ([0-9.]+)", out).group(1))
    after = float(re.search(r"eval after training: shapes_alignment = ([0-9.]+)", out).group(1))
    assert 0.2 < before < 0.9 and 0.0 <= after <= 1.0  # the shipped model is clearly above an empty image
    assert f"run directory: {tmp_path}" in out and "TensorBoard: tensorboard --logdir" in out
    images = tmp_path / "images"
    assert {p.name for p in images.iterdir()} >= {"eval_before.png", "eval_after.png", "eval_before_after.png"}
    # the side-by-side figure holds the two grids pixel for pixel (2x nearest upscale) under an 18 px caption row
    grids = [np.asarray(Image.open(images / f"eval_{t}.png").convert("RGB")) for t in ("before", "after")]
    both = np.asarray(Image.open(images / "eval_before_after.png").convert("RGB"))
    h, w = (2 * n for n in grids[0].shape[:2])
    assert both.shape == (18 + h, 2 * w + 12, 3)
    for i, grid in enumerate(grids):
        x = i * (w + 12)
        assert np.array_equal(both[18:, x : x + w], grid.repeat(2, 0).repeat(2, 1))
    assert any((tmp_path / "tensorboard").iterdir())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0.0 <= r["reward/mean"] <= 1.0 for r in rows)
    # the default's LoRA covers the convolutions too, and plain diffusers loads it onto the shipped model
    lora = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    assert any(".resnets.0.conv1.lora_A." in k for k in lora) and any(".attn1.to_q.lora_A." in k for k in lora)
    pipe = load_pipeline("builtin:tiny-shapes")
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, output_type="pt")
    before = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(tmp_path / "lora")
    after = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    assert not torch.allclose(before, after, atol=1e-6)
