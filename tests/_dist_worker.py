"""Run by test_distributed.py under `accelerate launch --num_processes 2 --cpu`; writes rank_<i>.json."""

import hashlib
import json
import sys
from pathlib import Path

import rewards
from diffusion_rl.config import load_config
from diffusion_rl.families import family_of
from diffusion_rl.models import trainable_state_dict
from diffusion_rl.trainer import train

out = Path(sys.argv[1])
# optional: another built-in model and extra overrides (the flow family: an SDE window and a KL to the reference)
extra = sys.argv[2:]
seen = {"prompts": [], "image_hashes": []}
jpeg = rewards.load("jpeg_compressibility")


def recording_reward(images, prompts, metadata):
    """The JPEG reward, recording what this rank sampled."""
    seen["prompts"] += list(prompts)
    seen["image_hashes"] += [hashlib.sha256(img.numpy().tobytes()).hexdigest() for img in images]
    return jpeg(images, prompts, metadata)


cfg = load_config(
    Path(__file__).parents[1] / "configs" / "tiny.yaml",
    [f"output_dir={out}", "num_epochs=2", "checkpoint.every=0", "logging.image_every=0", *extra],
)
result = train(cfg, reward_fn=recording_reward)
state = trainable_state_dict(family_of(result.pipeline).denoiser(result.pipeline), use_lora=True)
digest = hashlib.sha256(b"".join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest()
# the text encoder's adapter (model.text_encoder_lora_rank), whose grads the trainer averages itself
text_encoder = [p.detach() for p in result.pipeline.text_encoder.parameters() if p.requires_grad]
(out / f"rank_{result.process_index}.json").write_text(
    json.dumps({"params_sha256": digest, "lora_abs_sum": float(sum(v.abs().sum() for v in state.values())),
                "text_encoder_sha256": hashlib.sha256(b"".join(p.numpy().tobytes() for p in text_encoder)).hexdigest(),
                "text_encoder_abs_sum": float(sum(p.abs().sum() for p in text_encoder)),
                "best_epoch": result.best_epoch, **seen})
)
