"""drl's shared core: what both trainers (diffusion_rl, reasoning_rl) use, and nothing of any modality.

This package knows nothing of diffusion, images, tokens or models. It imports torch, pydantic, yaml,
typer and tensorboard, never diffusers (a test imports every module here in a fresh interpreter and
checks). A "sample" is whatever a trainer generates (a denoising trajectory, a completion); a
"step" is one decision of it (a denoising step, a token).

    grpo.py        advantages, importance ratios, clipped surrogate, KL estimators, aggregation
    checkpoint.py  atomic, verified checkpoints (accelerate state + trainer state + manifest)
    config.py      strict typed sections, `--set` overrides, YAML, all-problems-at-once errors, field docs
    tb.py          TensorBoard scalars / hparams / text / per-index profiles
    run.py         seeding, resume rules, the optimizer-step guard, trainer state saved and restored
                   side by side, trainer callbacks, EMA of the trainable weights
    prompts.py     prompt sets and the per-epoch, per-rank prompt sampler (checkpointed)
    cli.py         the CLI error convention shared by `drl` and `drl reason` (one message, exit 2)
"""
