"""SEE as a `drl reason train` entry (reasoning_rl.registry): its config loader and loop."""

from reasoning_rl.continual.config import load_config  # noqa: F401
from reasoning_rl.continual.trainer import train  # noqa: F401
