"""drl's reasoning half: GRPO for language and vision-language models on the shared core (`diffusion_rl.core`).

    from reasoning_rl import load_config, train
    result = train(load_config("configs/reason_tiny.yaml"), reward_fn=my_reward, advantage_fn=my_advantages)

Never imports diffusers. Heavy imports (torch, transformers) happen on first use.
"""

def _announce_rewards() -> None:
    """The reasoning half's rewards (reasoning_gym, tool_answer) register when these modules are imported; the
    rewards package imports them when it lists or loads rewards (no torch is imported here)."""
    from rewards import registry

    for module in ("reasoning_rl.world", "reasoning_rl.tools"):
        if module not in registry.PLUGIN_MODULES:
            registry.PLUGIN_MODULES.append(module)


_announce_rewards()

_LAZY = {
    "load_config": ("reasoning_rl.config", "load_config"),
    "ReasonConfig": ("reasoning_rl.config", "ReasonConfig"),
    "train": ("reasoning_rl.trainer", "train"),
    "TrainResult": ("reasoning_rl.trainer", "TrainResult"),
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'reasoning_rl' has no attribute {name!r}")
