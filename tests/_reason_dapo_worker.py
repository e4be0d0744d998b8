"""Run by test_reason_trainer.py with 1 process or under `accelerate launch --num_processes 2`: one training pass
of the reasoning trainer on fixed synthetic completions (the same 8 on every launch; each of W ranks trains its
8 / W), writing the pass's pre-clip gradient norm (of the all-reduced gradient) to grad_norm_<rank>.json."""

import json
import sys
from pathlib import Path

import torch

from reasoning_rl.config import load_config
from reasoning_rl.rollout import Rollouts
from reasoning_rl.trainer import setup, train_step

out, aggregation = Path(sys.argv[1]), sys.argv[2]
cfg = load_config(Path(__file__).parents[1] / "configs" / "reason_tiny.yaml",
                  [f"output_dir={out}", f"train.loss_aggregation={aggregation}", "train.micro_batch_size=8",
                   "eval.problems=[]"])
run = setup(cfg, reward_fn=lambda c, p, m: (torch.zeros(len(c)), {}))
g = torch.Generator().manual_seed(0)
B, P, C = 8, 5, 7
prompt_ids = torch.randint(10, 90, (B, P), generator=g)
completion_ids = torch.randint(10, 90, (B, C), generator=g)
lengths = torch.tensor([7, 7, 6, 7, 1, 2, 1, 1])  # the ranks hold 27 and 5 tokens: where bnpo and dapo differ
mask = (torch.arange(C)[None] < lengths[:, None]).long()
advantages = torch.randn(B, generator=g)
rows = torch.arange(B).chunk(run.world)[run.rank]
rollouts = Rollouts(prompt_ids=prompt_ids[rows], prompt_mask=torch.ones_like(prompt_ids[rows]),
                    completion_ids=completion_ids[rows], completion_mask=mask[rows],
                    stopped=torch.ones(len(rows), dtype=torch.bool), completions=[""] * len(rows),
                    prompts=["p"] * len(rows), metadata=[{}] * len(rows), pad_id=0)
losses = train_step(run, rollouts, advantages[rows], step=0)
(out / f"grad_norm_{run.rank}.json").write_text(json.dumps({"grad_norm": losses["grad_norm"], "world": run.world}))
