"""Run by test_reason_trainer.py under `accelerate launch --multi_gpu --num_processes 2`; writes rank_<i>.json."""

import hashlib
import json
import sys
from pathlib import Path

import torch

from reasoning_rl.config import load_config
from reasoning_rl.trainer import train

out = Path(sys.argv[1])
seen = {"prompts": [], "completions": []}


def recording_digits(completions, prompts, metadata):
    """The digit-share reward, recording what this rank generated."""
    seen["prompts"] += list(prompts)
    seen["completions"] += list(completions)
    return torch.tensor([sum(ch.isdigit() for ch in c[:8]) / 8 for c in completions]), {}


cfg = load_config(Path(__file__).parents[1] / "configs" / "reason_tiny.yaml",
                  [f"output_dir={out}", "num_steps=2", "checkpoint.every=0", "rollout.prompts_per_step=2",
                   "rollout.max_new_tokens=6", "eval.problems=[]"])
result = train(cfg, reward_fn=recording_digits)
trainable = {n: p.detach() for n, p in result.model.named_parameters() if p.requires_grad}
digest = hashlib.sha256(b"".join(trainable[k].numpy().tobytes() for k in sorted(trainable))).hexdigest()
lora_b = float(sum(v.abs().sum() for k, v in trainable.items() if "lora_B" in k))
(out / f"rank_{result.process_index}.json").write_text(json.dumps({"params_sha256": digest, "lora_b_abs": lora_b, **seen}))
