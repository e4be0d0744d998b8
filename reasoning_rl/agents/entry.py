"""GLIDER as a `drl reason train` entry (reasoning_rl.registry): its config loader and loop."""

from reasoning_rl.agents.config import load_config  # noqa: F401
from reasoning_rl.agents.trainer import train  # noqa: F401
