"""drl: reinforcement-learning fine-tuning of text-to-image diffusion models.

    from diffusion_rl import load_config, train
    result = train(load_config("configs/tiny.yaml"), reward_fn=my_reward, credit_fn=my_credit)

Heavy imports (torch, diffusers) happen on first use, so `drl --help` stays fast.
"""

__version__ = "0.1.0"

_LAZY = {
    "load_config": ("diffusion_rl.config", "load_config"),
    "RunConfig": ("diffusion_rl.config", "RunConfig"),
    "ConfigError": ("diffusion_rl.config", "ConfigError"),
    "train": ("diffusion_rl.trainer", "train"),
    "TrainResult": ("diffusion_rl.trainer", "TrainResult"),
    "CreditContext": ("diffusion_rl.credit", "CreditContext"),
    "CreditResult": ("diffusion_rl.credit", "CreditResult"),
    "make_credit": ("diffusion_rl.credit", "make_credit"),
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'diffusion_rl' has no attribute {name!r}")
