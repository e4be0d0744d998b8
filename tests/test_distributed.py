"""A real 2-process gloo run: ranks sample different prompts and noise yet hold identical weights."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FLOW = ["model.pretrained=builtin:tiny-random-sd3", "sample.sde_window_size=2", "sample.sde_window_range=[0,4]",
        "train.kl_coef=0.1"]


# best-of-run selection on every rank (the worker's recording reward sees training samples only: the validation
# scores with eval.reward, a separately loaded JPEG reward), with a LoRA on the text encoder, which is not
# accelerate-prepared (the trainer averages its grads)
VALIDATION = ['validation.prompts=["a red circle", "a green triangle"]', "validation.every=1",
              "eval.reward=jpeg_compressibility", "model.text_encoder_lora_rank=4"]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [VALIDATION, FLOW], ids=["sd-ddim-best-of-run-text-encoder-lora", "sd3-flow-window-kl"])
def test_two_cpu_processes_share_weights_but_not_samples(tmp_path, extra):
    worker = Path(__file__).parent / "_dist_worker.py"
    # `accelerate launch --multi_gpu` starts the ranks with torch's elastic launcher; without CUDA the
    # trainer's Accelerator runs them on the CPU with the gloo backend. (`accelerate launch --cpu` only
    # starts several processes through mpirun.)
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(worker), str(tmp_path), *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r0, r1 = (json.loads((tmp_path / f"rank_{i}.json").read_text()) for i in (0, 1))
    # different data per rank: disjoint prompt draws in each epoch, different noise -> different images
    assert len(r0["prompts"]) == len(r1["prompts"]) == 2 * 4
    assert r0["prompts"][:4] != r1["prompts"][:4]
    assert not set(r0["image_hashes"]) & set(r1["image_hashes"])
    # ... yet DDP all-reduced the LoRA gradients: identical trainable weights after 2 epochs of updates
    assert r0["params_sha256"] == r1["params_sha256"]
    assert r0["lora_abs_sum"] == r1["lora_abs_sum"] > 0
    assert r0["text_encoder_sha256"] == r1["text_encoder_sha256"]
    assert r0["text_encoder_abs_sum"] == r1["text_encoder_abs_sum"] and (r0["text_encoder_abs_sum"] > 0) == (extra is VALIDATION)
    # every rank ends with the same best-of-run weights (the main process's validation score decides)
    assert r0["best_epoch"] == r1["best_epoch"] and r0["best_epoch"] in ((1, 2) if extra is VALIDATION else (None,))
    assert (f"best-of-run: the weights after epoch {r0['best_epoch']}" in proc.stdout) == (extra is VALIDATION)
    # the main process wrote one run: derived numbers count both processes
    assert "2 process(es) | samples/epoch 8" in proc.stdout
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1] and metrics[-1]["global_step"] == 4
