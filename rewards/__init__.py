"""drl rewards: reward models and rule-based rewards for RL fine-tuning (images and text).

    import rewards
    fn = rewards.load("jpeg_compressibility")
    scores, info = fn(samples, prompts, metadata)  # samples: images today; float32 [B] on CPU, NaN = unscorable

See docs/rewards.md for the reward table, preprocessing and formulas.
"""

from rewards.async_scorer import AsyncScorer
from rewards.base import CallableReward, RewardError, RewardFn, as_reward, check_scores
from rewards.hub import resolve
from rewards.images import ImageBatch, ImageRewardFn, to_float_tensor, to_pil_list, to_uint8_numpy
from rewards.multi import MultiReward, load_multi
from rewards.registry import INFO, REGISTRY, RewardInfo, available, load, register
from rewards.trl_adapter import TRLReward, from_trl

__all__ = [
    "INFO",
    "REGISTRY",
    "AsyncScorer",
    "CallableReward",
    "ImageBatch",
    "ImageRewardFn",
    "MultiReward",
    "RewardError",
    "RewardFn",
    "RewardInfo",
    "TRLReward",
    "as_reward",
    "available",
    "check_scores",
    "from_trl",
    "load",
    "load_multi",
    "register",
    "resolve",
    "to_float_tensor",
    "to_pil_list",
    "to_uint8_numpy",
]
