"""Moved: the GRPO math lives in `diffusion_rl.core.grpo` (the core both trainers share). This name keeps
existing `from diffusion_rl.grpo import ...` imports working."""

from diffusion_rl.core.grpo import *  # noqa: F403
from diffusion_rl.core.grpo import __all__  # noqa: F401
