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
         "--set", "train.batch_size=8", "--set", "eval.every=0", "--set", "eval.images_per_prompt=1",
         "--set", "train.lr_warmup_steps=1"],  # 2 epochs x 1 update here: a warm-up of 4 would be a config error
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
    # the side-by-side figure: under an 18 px title row, each panel holds every eval image pixel for pixel (3x
    # nearest upscale; 8 per row, 4 px apart) with its prompt written in the 3 caption lines (33 px) under it
    grids = [np.asarray(Image.open(images / f"eval_{t}.png").convert("RGB")) for t in ("before", "after")]
    both = np.asarray(Image.open(images / "eval_before_after.png").convert("RGB"))
    side = 32  # tiny-shapes images are 32 x 32; the eval grids have a 1 px white border around each
    n = 64  # the figure shows the first 64 eval images (here the 64 held-out prompts x 1)
    cell_w, cell_h = 3 * side + 4, 3 * side + 33 + 4
    panel_w = 8 * cell_w - 4
    assert both.shape == (18 + (n // 8) * cell_h, 2 * panel_w + 12, 3)
    captions = []
    for p, grid in enumerate(grids):
        for i in (0, 1, n - 1):
            r, c = divmod(i, 8)
            image = grid[1 + r * (side + 1) : 1 + r * (side + 1) + side, 1 + c * (side + 1) : 1 + c * (side + 1) + side]
            x, y = p * (panel_w + 12) + c * cell_w, 18 + r * cell_h
            assert np.array_equal(both[y : y + 3 * side, x : x + 3 * side], image.repeat(3, 0).repeat(3, 1))
            caption = both[y + 3 * side : y + 3 * side + 33, x : x + 3 * side]
            assert (caption < 128).any()  # the prompt is written there
            captions.append(caption)
    assert not np.array_equal(captions[0], captions[1])  # different prompts, different captions
    assert np.array_equal(captions[0], captions[3])  # the same prompt in both panels
    assert any((tmp_path / "tensorboard").iterdir())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0.0 <= r["reward/mean"] <= 1.0 for r in rows)
    # the default's LoRA covers the convolutions too, and plain diffusers loads it onto the shipped model
    lora = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    assert any(".resnets.0.conv1.lora_A." in k for k in lora) and any(".attn1.to_q.lora_A." in k for k in lora)
    assert any(k.startswith("text_encoder.") and ".self_attn.q_proj.lora_B." in k for k in lora)  # and the encoder's
    pipe = load_pipeline("builtin:tiny-shapes")
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, output_type="pt")
    before = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(tmp_path / "lora")
    after = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    assert not torch.allclose(before, after, atol=1e-6)


def test_flow_default_runs_and_its_lora_loads_in_the_plain_sd3_pipeline(tmp_path):
    """configs/flow_default.yaml, shortened: the shipped rectified-flow model, Flow-GRPO with CoCA credit."""
    proc = subprocess.run(
        [sys.executable, "-m", "diffusion_rl.cli", "train", str(REPO / "configs" / "flow_default.yaml"),
         "--output-dir", str(tmp_path), "--set", "num_epochs=2", "--set", "sample.num_batches_per_epoch=1",
         "--set", "sample.batch_size=8", "--set", "train.batch_size=8", "--set", "eval.every=0",
         "--set", "eval.images_per_prompt=1", "--set", "train.lr_warmup_steps=1"],
        capture_output=True, text=True, cwd=REPO, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert "(sd3, flow MDP)" in out
    before = float(re.search(r"eval before training: shapes_alignment = ([0-9.]+)", out).group(1))
    assert 0.3 < before < 0.6  # the shipped flow model: clearly above an empty image, room left for RL
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0.0 <= r["reward/mean"] <= 1.0 for r in rows)
    assert all(r["credit/steps_trained_per_trajectory"] == 3 for r in rows)
    pipe = load_pipeline("builtin:tiny-shapes-flow")
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.text_encoder_3 is None
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, output_type="pt", max_sequence_length=4)
    before = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(tmp_path / "lora")
    after = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    assert before.shape == (1, 3, 32, 32) and not torch.allclose(before, after, atol=1e-6)
