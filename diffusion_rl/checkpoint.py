"""Moved: checkpoints live in `diffusion_rl.core.checkpoint` (the core both trainers share). This name keeps
existing `from diffusion_rl.checkpoint import ...` imports working."""

from diffusion_rl.core.checkpoint import (  # noqa: F401
    CHECKPOINT_RE,
    MANIFEST,
    TRAINER_STATE,
    TRAINER_TENSORS,
    CheckpointError,
    complete_checkpoints,
    find_checkpoint,
    load_trainer_state,
    save,
    verify,
    write_manifest,
)
