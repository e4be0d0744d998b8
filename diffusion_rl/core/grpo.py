"""GRPO core: advantages, importance ratios, clipped surrogates, KL, aggregation, on tensors only.

This module knows nothing about diffusion, tokens, models or accelerate. A "sequence" is one
trajectory of T decisions: T denoising steps of a diffusion sampler (DDPO, Black et al. 2023,
arXiv 2305.13301) or T generated tokens (GRPO, Shao et al. 2024, DeepSeekMath arXiv 2402.03300).
Everything takes and returns plain tensors, so the same code serves the diffusion trainer and an
LLM reasoning trainer.

Notation (one sequence i of a batch of B, step/token t of T):

    A_i            advantage of sequence i (or A_{i,t} per step)
    m_{i,t}        mask, 1 = the element counts;  L_i = sum_t m_{i,t}
    r_{i,t}        = exp(log pi_theta - log pi_old)                       (token importance ratio)
    s_i            = exp((1/L_i) sum_t m_{i,t} (log pi_theta - log pi_old)) (GSPO sequence ratio)
    l_{i,t}        = max(-A * r, -A * clip(r, 1 - eps_low, 1 + eps_high))  (PPO-clip, Schulman 2017)

Two loss entry points share every piece (masked log-ratio, ratio, surrogate, KL, reduction):

    grpo_loss      the LLM trainer's: ratio token / sequence (GSPO) / sequence_token (GSPO-token),
                   eps_low / eps_high, dual clip, KL k1/k2/k3 with beta, entropy bonus, aggregation
                   grpo / bnpo / dapo / dr_grpo
    policy_loss    the diffusion trainer's (DDPO) interface, a thin case of grpo_loss: token ratio,
                   advantages clamped to +-adv_clip, and the aggregation names
                   token_mean = bnpo,  seq_mean = grpo,  constant(d) = dapo(num_items_in_batch=d)
                   (= dr_grpo when d = B * L_max); bit-identical to the implementation it replaces

Advantages:

    per-prompt tracker (ddpo-pytorch ``stat_tracking.py``)   A = (R - mu_p) / (sigma_p + eps)
    stateless groups (GRPO)                                  A = (R - mu_g) / (sigma_g + eps)
    Lite-PPO (arXiv 2508.08221, TRL scale_rewards="batch")   A = (R - mu_g) / (sigma_batch + eps)
    Dr.GRPO (Liu et al. 2025, arXiv 2503.20783)              A = R - mu_g    (``scale="none"``)
    RLOO (Ahmadian et al. 2024, arXiv 2402.14740)            A = R - mean of the other G - 1
    multi-reward: sum_then_normalize (TRL) / normalize_then_sum (GDPO)  (``multi_reward_advantages``)

The diffusion functions use population standard deviations (ddof = 0, numpy's ``np.std`` as in
ddpo-pytorch); every LLM framework uses the unbiased one (Bessel, n - 1): pass ``unbiased=True``
(``multi_reward_advantages`` defaults to it). The epsilon differs per framework (TRL 1e-4, verl
1e-6, OpenRLHF 1e-9) and is always an explicit argument. Unscorable samples carry a NaN reward: they
never enter a statistic and get advantage exactly 0 (TRL's convention; a ``nansum`` would otherwise
count them as reward 0 and bias the baseline). Nothing is clamped unless asked (``clip_advantages``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "ADV_EPS",
    "BATCH_ADV_EPS",
    "TRL_ADV_EPS",
    "LOG_RATIO_CLAMP",
    "AGGREGATIONS",
    "LOSS_AGGREGATIONS",
    "AGGREGATION_ALIASES",
    "KL_ESTIMATORS",
    "ADVANTAGE_SCALES",
    "ADVANTAGE_BASELINES",
    "SINGLETON_MODES",
    "MULTI_REWARD_MODES",
    "RATIO_LEVELS",
    "PerPromptStatTracker",
    "batch_advantages",
    "group_advantages",
    "multi_reward_advantages",
    "clip_advantages",
    "frac_reward_zero_std",
    "kl_penalty",
    "aggregate",
    "importance_ratio",
    "clipped_surrogate",
    "grpo_loss",
    "policy_loss",
    "frac_zero_std_groups",
    "mask_truncated_completions",
    "soft_overlong_penalty",
    "completion_length_metrics",
]

# Added to the standard deviation before dividing: A = (R - mu) / (sigma + ADV_EPS). ddpo-pytorch
# and CoCA use 1e-6 in the per-prompt tracker; it keeps a group of identical rewards at A = 0.
ADV_EPS = 1e-6
# ddpo-pytorch's epsilon when per-prompt tracking is off: (R - mean) / (std + 1e-8).
BATCH_ADV_EPS = 1e-8
# TRL GRPOTrainer's epsilon: (R - mu) / (std + 1e-4) (grpo_trainer.py, _generate_and_score_completions).
TRL_ADV_EPS = 1e-4
# |log pi_theta - log pi_old| and |log pi_ref - log pi_theta| are clamped to this before exp()
# (verl / OpenRLHF use 20): a garbage log-prob at a padded or diverged position cannot overflow to
# inf and poison the batch with NaN. exp(20) ~ 5e8 is far outside any clip range, so the clipped
# objective is unchanged wherever the clamp is active.
LOG_RATIO_CLAMP = 20.0

# policy_loss's (the diffusion trainer's) aggregation names, and grpo_loss's (TRL's loss_type names).
AGGREGATIONS = ("token_mean", "seq_mean", "constant")
LOSS_AGGREGATIONS = ("grpo", "bnpo", "dapo", "dr_grpo")
# Each diffusion name is one of the LLM reductions (same code path): constant_divisor plays the role
# of num_items_in_batch.
AGGREGATION_ALIASES = {"token_mean": "bnpo", "seq_mean": "grpo", "constant": "dapo"}
KL_ESTIMATORS = ("k1", "k2", "k3")
ADVANTAGE_SCALES = ("group", "batch", "none")
ADVANTAGE_BASELINES = ("mean", "rloo")
SINGLETON_MODES = ("zero", "raw")
MULTI_REWARD_MODES = ("sum_then_normalize", "normalize_then_sum")
RATIO_LEVELS = ("token", "sequence", "sequence_token")

# Which reduction each aggregation name runs: a token mean, a mean of sequence means, or a sum over a
# divisor given by the caller (constant_divisor, num_items_in_batch or B * max_completion_length).
_REDUCTION = {
    "token_mean": "token_mean",
    "bnpo": "token_mean",
    "seq_mean": "seq_mean",
    "grpo": "seq_mean",
    "constant": "sum",
    "dapo": "sum",
    "dr_grpo": "sum",
}


def _choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {tuple(choices)}.")


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------


def _check_rewards(rewards: Tensor, name: str = "rewards") -> None:
    if rewards.dim() != 1:
        raise ValueError(
            f"{name} must be a 1-D tensor [N], got shape {tuple(rewards.shape)}; "
            f"flatten it (e.g. {name}.reshape(-1)) with one reward per sample."
        )
    if not rewards.is_floating_point():
        raise ValueError(
            f"{name} must be floating point (NaN marks unscorable samples), got {rewards.dtype}; "
            f"pass {name}.float()."
        )


def _finite_mean_std(values: Tensor) -> tuple[float, float]:
    """Mean and population std (ddof = 0) of the finite entries of a 1-D float64 tensor.

    Returns (0.0, 0.0) when there is no finite entry (all advantages are then 0 anyway).
    """
    v = values[torch.isfinite(values)]
    if v.numel() == 0:
        return 0.0, 0.0
    mu = v.mean()
    sigma = ((v - mu) ** 2).mean().sqrt()
    return float(mu), float(sigma)


class PerPromptStatTracker:
    """Per-prompt reward standardisation with a bounded buffer (ddpo-pytorch ``stat_tracking.py``).

    Each prompt string owns a ``deque(maxlen=buffer_size)`` of its past rewards; it persists across
    epochs and is training state (checkpoint it with :meth:`state_dict`). For every unique prompt p
    in a batch, in this order:

    1. extend p's buffer with this batch's *finite* rewards of p;
    2. if ``len(buffer_p) < min_count``: mu, sigma = mean/std of the whole current batch (finite
       values, all prompts); else mu, sigma = mean/std of ``buffer_p``;
    3. A = (R - mu) / (sigma + eps), or A = R - mu when ``scale_std=False`` (Dr.GRPO).

    NaN rewards (unscorable) get A = 0 exactly and never enter a buffer or a statistic. Statistics
    are population std (``np.std``), computed in float64; advantages are returned as float32.
    Defaults: ddpo-pytorch base 16/16; CoCA and the aesthetic preset 32/16.
    """

    def __init__(
        self,
        buffer_size: int = 32,
        min_count: int = 16,
        scale_std: bool = True,
        eps: float = ADV_EPS,
    ) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}; use e.g. 32 (ddpo-pytorch).")
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}; use e.g. 16 (ddpo-pytorch).")
        if min_count > buffer_size:
            raise ValueError(
                f"min_count ({min_count}) > buffer_size ({buffer_size}): the buffer could never hold "
                f"enough rewards and batch statistics would be used forever; set min_count <= buffer_size."
            )
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}.")
        self.buffer_size = int(buffer_size)
        self.min_count = int(min_count)
        self.scale_std = bool(scale_std)
        self.eps = float(eps)
        self.buffers: dict[str, deque[float]] = {}
        # Fraction of the last update's prompts that were standardised with batch statistics.
        self._last_frac_batch_stats = 0.0

    def update(self, prompts: Sequence[str], rewards: Tensor) -> Tensor:
        """Standardise ``rewards`` [N] per prompt; returns float32 advantages [N] on rewards' device."""
        _check_rewards(rewards)
        if len(prompts) != rewards.shape[0]:
            raise ValueError(
                f"got {len(prompts)} prompts for {rewards.shape[0]} rewards; pass one prompt string per reward."
            )
        r = rewards.detach().to(device="cpu", dtype=torch.float64)  # [N]
        finite = torch.isfinite(r)  # [N]
        batch_mu, batch_sigma = _finite_mean_std(r)
        adv = torch.zeros_like(r)  # [N]; NaN rewards stay exactly 0

        # One pass to group row indices by prompt, keeping first-seen order (deterministic).
        rows_of: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            rows_of.setdefault(p, []).append(i)

        n_batch_stats = 0
        for prompt, rows in rows_of.items():
            idx = torch.tensor(rows, dtype=torch.long)
            idx = idx[finite[idx]]  # unscorable rows neither enter the buffer nor get an advantage
            buf = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(r[idx].tolist())
            if len(buf) < self.min_count:
                mu, sigma = batch_mu, batch_sigma
                n_batch_stats += 1
            else:
                mu, sigma = _finite_mean_std(torch.tensor(list(buf), dtype=torch.float64))
            centred = r[idx] - mu
            adv[idx] = centred / (sigma + self.eps) if self.scale_std else centred
        self._last_frac_batch_stats = n_batch_stats / max(len(rows_of), 1)
        return adv.to(device=rewards.device, dtype=torch.float32)

    def stats(self) -> dict[str, float]:
        """Scalars for logging: prompts tracked, buffer fill, and how the last update standardised."""
        lengths = [len(b) for b in self.buffers.values()]
        return {
            "num_prompts": float(len(lengths)),
            "mean_buffer_len": float(sum(lengths) / len(lengths)) if lengths else 0.0,
            "min_buffer_len": float(min(lengths)) if lengths else 0.0,
            "max_buffer_len": float(max(lengths)) if lengths else 0.0,
            "frac_prompts_batch_stats": float(self._last_frac_batch_stats),
        }

    def state_dict(self) -> dict:
        """JSON-serialisable state: the configuration and every prompt's buffer as a list of floats."""
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "scale_std": self.scale_std,
            "eps": self.eps,
            "buffers": {p: list(b) for p, b in self.buffers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the buffers saved by :meth:`state_dict`.

        ``buffer_size`` must match (the buffers' contents depend on it); ``min_count``,
        ``scale_std`` and ``eps`` are taken from this tracker's constructor (the config wins).
        """
        if "buffers" not in state:
            raise ValueError(
                f"stat-tracker state has no 'buffers' key (keys: {sorted(state)}); "
                "pass the dict returned by PerPromptStatTracker.state_dict()."
            )
        saved_size = int(state.get("buffer_size", self.buffer_size))
        if saved_size != self.buffer_size:
            raise ValueError(
                f"stat-tracker state was saved with buffer_size={saved_size}, this tracker has "
                f"buffer_size={self.buffer_size}; construct the tracker with buffer_size={saved_size} to resume."
            )
        self.buffers = {
            str(p): deque((float(x) for x in values), maxlen=self.buffer_size)
            for p, values in state["buffers"].items()
        }


def batch_advantages(rewards: Tensor, scale_std: bool = True, eps: float = BATCH_ADV_EPS) -> Tensor:
    """Whole-batch standardisation (ddpo-pytorch with per-prompt tracking off).

    A = (R - mean(R)) / (std(R) + eps), or R - mean(R) when ``scale_std=False``; mean and std over
    the finite rewards (population std). NaN rewards -> A = 0. Returns float32 [N].
    """
    _check_rewards(rewards)
    r = rewards.detach().to(torch.float64)
    finite = torch.isfinite(r)
    mu, sigma = _finite_mean_std(r.cpu())
    adv = r - mu
    if scale_std:
        adv = adv / (sigma + eps)
    return torch.where(finite, adv, torch.zeros_like(adv)).to(torch.float32)


def _group_index(group_ids: Tensor, n: int, device: torch.device) -> tuple[Tensor, int]:
    """Validate ``group_ids`` [N] and map its labels onto 0..G-1: returns (inverse [N], G)."""
    if group_ids.shape != (n,):
        raise ValueError(
            f"group_ids shape {tuple(group_ids.shape)} != rewards shape ({n},); "
            "pass one integer group label per reward."
        )
    if group_ids.is_floating_point() or group_ids.is_complex():
        raise ValueError(
            f"group_ids must be an integer tensor, got {group_ids.dtype}; pass group_ids.long()."
        )
    _, inverse = torch.unique(group_ids.to(device), return_inverse=True)  # [N] -> 0..G-1
    return inverse, (int(inverse.max()) + 1 if inverse.numel() else 0)


def _group_stats(
    r0: Tensor, finite: Tensor, inverse: Tensor, n_groups: int, unbiased: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-group statistics of the finite rewards, in the rewards' dtype (float64 here).

    ``r0`` [N] rewards with NaN replaced by 0, ``finite`` [N] bool, ``inverse`` [N] in 0..G-1.
    Returns count [G] (finite rewards per group), total [G] (their sum), dev [N] = R - mu_g (0 where
    not finite) and sigma [G] = sqrt(sum dev^2 / dof), dof = count - 1 if ``unbiased`` else count,
    floored at 1 so that a group with one finite reward has sigma 0 (not NaN).
    """
    w = finite.to(r0.dtype)
    count = torch.zeros(n_groups, dtype=r0.dtype, device=r0.device).index_add_(0, inverse, w)  # [G]
    total = torch.zeros_like(count).index_add_(0, inverse, r0)  # [G]
    mu = total / count.clamp(min=1.0)  # [G]
    dev = torch.where(finite, r0 - mu[inverse], torch.zeros_like(r0))  # [N]
    sq = torch.zeros_like(count).index_add_(0, inverse, dev**2)  # [G]
    dof = (count - 1.0) if unbiased else count
    sigma = (sq / dof.clamp(min=1.0)).sqrt()  # [G]
    return count, total, dev, sigma


def _resolve_scale(scale: str | None, scale_std: bool) -> str:
    if scale is None:
        return "group" if scale_std else "none"
    _choice("scale", scale, ADVANTAGE_SCALES)
    if not scale_std and scale != "none":
        raise ValueError(
            f"scale_std=False (no std division) contradicts scale={scale!r}; pass only scale= "
            "('none' is Dr.GRPO's R - mu)."
        )
    return scale


def _group_advantages64(
    rewards: Tensor,
    group_ids: Tensor,
    scale: str,
    eps: float,
    unbiased: bool,
    baseline: str,
    singleton: str,
) -> Tensor:
    """The body of :func:`group_advantages` on validated arguments; float64 [N], NaN rewards -> 0."""
    _choice("baseline", baseline, ADVANTAGE_BASELINES)
    _choice("singleton", singleton, SINGLETON_MODES)
    if scale != "none" and not eps > 0:
        raise ValueError(
            f"eps must be > 0 when dividing by a std, got {eps}: a group of equal rewards has std 0 (or ~1e-17 "
            "after rounding) and eps keeps its advantages at 0; TRL uses 1e-4, verl 1e-6, OpenRLHF 1e-9."
        )
    r = rewards.detach().to(torch.float64)  # [N]
    inverse, n_groups = _group_index(group_ids, r.shape[0], r.device)
    finite = torch.isfinite(r)
    r0 = torch.where(finite, r, torch.zeros_like(r))  # NaN -> 0 so sums ignore them
    count, total, dev, sigma = _group_stats(r0, finite, inverse, n_groups, unbiased)
    n_i = count[inverse]  # [N] finite rewards in sample i's group
    zero = torch.zeros_like(r0)
    if baseline == "rloo":  # b_i = (sum_g - R_i) / (n_g - 1)
        loo = (total[inverse] - r0) / (n_i - 1.0).clamp(min=1.0)
        dev = torch.where(finite, r0 - loo, zero)
    single = finite & (n_i == 1)  # the only finite reward of its group: no baseline exists
    sigma_i = sigma[inverse]  # [N]
    if singleton == "raw":  # verl: mean 0, std 1
        dev = torch.where(single, r0, dev)
        sigma_i = torch.where(single, torch.ones_like(sigma_i), sigma_i)
    else:  # TRL: A = 0 (R minus its own mean)
        dev = torch.where(single, zero, dev)
    if scale == "group":
        adv = dev / (sigma_i + eps)
    elif scale == "batch":
        sigma_b = _group_stats(r0, finite, torch.zeros_like(inverse), 1, unbiased)[3]  # [1]
        adv = dev / (sigma_b + eps)
    else:
        adv = dev
    return torch.where(finite, adv, zero)


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    scale_std: bool = True,
    eps: float = ADV_EPS,
    unbiased: bool = False,
    *,
    scale: str | None = None,
    baseline: str = "mean",
    singleton: str = "zero",
) -> Tensor:
    """Stateless per-group advantages (GRPO and its variants); NaN-aware, float32 [N].

    ``rewards`` [N] float (NaN = unscorable), ``group_ids`` [N] integer labels (e.g. the prompt
    index; groups need not be contiguous). With mu_g, sigma_g the mean and std of group g's finite
    rewards (n_g of them), b_i the baseline and s_i the scale:

        baseline="mean"  b_i = mu_g                                   (GRPO, DeepSeekMath 2402.03300)
        baseline="rloo"  b_i = (sum_g R - R_i) / (n_g - 1)            (RLOO, arXiv 2402.14740)
                         = R_i - n_g / (n_g - 1) * (R_i - mu_g)
        scale="group"    A_i = (R_i - b_i) / (sigma_g + eps)          (GRPO; TRL scale_rewards="group")
        scale="batch"    A_i = (R_i - b_i) / (sigma_batch + eps)      (Lite-PPO 2508.08221; TRL "batch")
        scale="none"     A_i =  R_i - b_i                             (Dr.GRPO 2503.20783; TRL "none")

    sigma_batch is the std of every finite reward of the batch (TRL: ``nanstd(rewards)``). The std
    is the population one by default (ddof 0, this function's original convention, kept); every
    LLM framework uses ``unbiased=True`` (n - 1). ``eps`` is explicit: TRL 1e-4 (``TRL_ADV_EPS``),
    verl 1e-6, OpenRLHF 1e-9. ``scale=None`` keeps the original switch: ``scale_std=True`` is
    "group", ``scale_std=False`` is "none".

    NaN rewards get A = 0 and enter no statistic. A *singleton* is a sample whose group has exactly
    one finite reward (no baseline exists); ``singleton="zero"`` (default; TRL with one generation,
    and this function's original behaviour) gives it A = 0, ``singleton="raw"`` uses verl's mean 0,
    std 1 for its group (A = R / (1 + eps) under "group", R under "none", R / (sigma_batch + eps)
    under "batch"). Nothing is clamped: use :func:`clip_advantages` to ask for it.
    Statistics in float64; returns float32 [N].
    """
    _check_rewards(rewards)
    scale = _resolve_scale(scale, scale_std)
    return _group_advantages64(rewards, group_ids, scale, eps, unbiased, baseline, singleton).to(
        torch.float32
    )


def multi_reward_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    weights: Tensor | Sequence[float] | None = None,
    *,
    mode: str = "sum_then_normalize",
    eps: float,
    unbiased: bool = True,
    scale: str | None = None,
    baseline: str = "mean",
    singleton: str = "zero",
) -> Tensor:
    """Advantages from K reward functions per sample; float32 [N].

    ``rewards`` [N, K] float, NaN where reward function k could not score sample i; ``weights``
    [K] (default all 1). A sample whose K rewards are all NaN is unscorable: A = 0.

    - ``sum_then_normalize`` (TRL's default): R_i = nansum_k w_k R_{i,k}, then
      :func:`group_advantages` with ``scale`` (default "group"), ``baseline``, ``singleton``.
    - ``normalize_then_sum`` (GDPO, arXiv 2601.05242; TRL ``multi_objective_aggregation``): per
      reward, per group Z_{i,k} = (R_{i,k} - mu_{g,k}) / (sigma_{g,k} + eps) (0 where R_{i,k} is
      NaN); R_i = sum_k w_k Z_{i,k}; then one batch standardisation A_i = (R_i - mean_batch R) /
      (std_batch R + eps). ``scale`` and ``baseline`` do not apply (passing them is an error).

    ``eps`` must be given (TRL 1e-4 = ``TRL_ADV_EPS``); the std is unbiased by default, as in TRL.
    """
    if rewards.dim() != 2:
        raise ValueError(
            f"rewards must be [N, K] (one column per reward function), got shape {tuple(rewards.shape)}; "
            "for a single reward use group_advantages or rewards[:, None]."
        )
    if rewards.shape[1] == 0:
        raise ValueError("rewards has no columns (K = 0); pass at least one reward function's scores.")
    _check_rewards(rewards[:, 0])  # floating point, NaN = unscorable
    _choice("mode", mode, MULTI_REWARD_MODES)
    n, k = rewards.shape
    w = (
        torch.ones(k, dtype=torch.float64)
        if weights is None
        else torch.as_tensor(weights, dtype=torch.float64)
    )
    if w.shape != (k,):
        raise ValueError(
            f"weights has shape {tuple(w.shape)}; expected [K] = ({k},), one weight per reward column."
        )
    r = rewards.detach().to(torch.float64)  # [N, K]
    w = w.to(r.device)
    unscorable = torch.isnan(r).all(dim=1)  # [N]
    if mode == "sum_then_normalize":
        summed = torch.nansum(r * w, dim=1)  # [N]
        summed = torch.where(unscorable, torch.full_like(summed, float("nan")), summed)
        scale = _resolve_scale(scale, True)
        return _group_advantages64(summed, group_ids, scale, eps, unbiased, baseline, singleton).to(
            torch.float32
        )
    if scale is not None or baseline != "mean":
        raise ValueError(
            f"mode='normalize_then_sum' standardises each reward per group and then the sum over the batch; "
            f"scale={scale!r} and baseline={baseline!r} do not apply, leave them at their defaults."
        )
    z = torch.stack(
        [
            _group_advantages64(r[:, j], group_ids, "group", eps, unbiased, "mean", singleton)
            for j in range(k)
        ],
        dim=1,
    )  # [N, K]; NaN entries are 0
    summed = (z * w).sum(dim=1)  # [N]
    summed = torch.where(unscorable, torch.full_like(summed, float("nan")), summed)
    whole = torch.zeros(n, dtype=torch.long, device=r.device)
    return _group_advantages64(summed, whole, "group", eps, unbiased, "mean", "zero").to(torch.float32)


def frac_reward_zero_std(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """TRL's ``frac_reward_zero_std``: the share of samples whose group's rewards all agree.

    Counted per sample (so for equal group sizes it is the share of groups), over groups with at
    least two finite rewards whose std is <= 1e-8 (``torch.isclose(std, 0)`` as TRL). A group with
    fewer than two finite rewards is not counted (TRL's ``nanstd`` is NaN there). Such groups give
    every sample A = 0: no learning signal (DAPO's dynamic sampling drops them). Detached float32
    0-dim tensor. ``frac_zero_std_groups`` (per prompt string, per group) is the diffusion trainer's.
    """
    _check_rewards(rewards)
    r = rewards.detach().to(torch.float64)
    inverse, n_groups = _group_index(group_ids, r.shape[0], r.device)
    finite = torch.isfinite(r)
    count, _, _, sigma = _group_stats(
        torch.where(finite, r, torch.zeros_like(r)), finite, inverse, n_groups, True
    )
    zero_std = (count >= 2) & (sigma <= 1e-8)  # [G]
    return zero_std[inverse].to(torch.float32).mean() if r.numel() else torch.zeros((), dtype=torch.float32)


def clip_advantages(adv: Tensor, max_abs: float) -> Tensor:
    """Clamp advantages to [-max_abs, max_abs] (DDPO/CoCA use 5)."""
    if not max_abs > 0:
        raise ValueError(f"max_abs must be > 0, got {max_abs}; use e.g. 5.0 (DDPO).")
    return adv.clamp(-max_abs, max_abs)


# --------------------------------------------------------------------------------------------
# KL estimators and aggregation
# --------------------------------------------------------------------------------------------


def kl_penalty(logp_new: Tensor, logp_ref: Tensor, estimator: str = "k3") -> Tensor:
    """Per-element estimators of KL(pi_theta || pi_ref) from samples of pi_theta (Schulman 2020).

    With x = log pi_ref - log pi_theta (clamped to +-LOG_RATIO_CLAMP):

        k1 = -x                = log pi_theta - log pi_ref   (unbiased, can be negative)
        k2 = x^2 / 2                                         (biased, >= 0)
        k3 = exp(x) - 1 - x                                  (unbiased, >= 0; GRPO's choice)
    """
    _choice("kl_estimator", estimator, KL_ESTIMATORS)
    x = (logp_ref - logp_new).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if estimator == "k1":
        return -x
    if estimator == "k2":
        return 0.5 * x**2
    return torch.exp(x) - 1.0 - x


def _constant_divisor_error(constant_divisor: object) -> ValueError:
    return ValueError(
        f"aggregation='constant' needs constant_divisor > 0, got {constant_divisor!r}; "
        "pass e.g. constant_divisor=B * T_max (Dr.GRPO)."
    )


def _divisor(
    aggregation: str,
    shape: torch.Size,
    constant_divisor: float | None,
    num_items_in_batch: float | Tensor | None,
    max_completion_length: int | None,
) -> float | Tensor | None:
    """The divisor of a ``sum`` reduction (None for the two means), validated with fix-it messages."""
    if aggregation == "constant":
        if constant_divisor is None or not constant_divisor > 0:
            raise _constant_divisor_error(constant_divisor)
        return constant_divisor
    if aggregation == "dapo":
        if isinstance(num_items_in_batch, Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(
                    f"num_items_in_batch must be one number, got shape {tuple(num_items_in_batch.shape)}; "
                    "pass the total count, e.g. mask.sum() summed over micro-batches and ranks."
                )
            return num_items_in_batch.detach().reshape(()).clamp(min=1.0)  # as TRL: a count of 0 -> 1
        if num_items_in_batch is None or not num_items_in_batch > 0:
            raise ValueError(
                f"aggregation='dapo' needs num_items_in_batch > 0, got {num_items_in_batch!r}: the number of "
                "valid tokens over the whole optimizer step (all gradient-accumulation micro-batches and ranks; "
                "divide by the world size when DDP averages gradients). For one micro-batch on one rank "
                "pass mask.sum(), which is aggregation='bnpo'."
            )
        return num_items_in_batch
    if aggregation == "dr_grpo":
        if max_completion_length is None or not max_completion_length > 0:
            raise ValueError(
                f"aggregation='dr_grpo' needs max_completion_length > 0, got {max_completion_length!r}; pass the "
                "generation cap L_max (the loss is sum / (B * L_max))."
            )
        if shape[-1] > max_completion_length:
            raise ValueError(
                f"max_completion_length ({max_completion_length}) < T ({shape[-1]}): dr_grpo divides by B * L_max with "
                "L_max the longest possible completion; pass the generation cap, not a smaller number."
            )
        return float(shape[0] * max_completion_length)
    return None


def _reduce(values: Tensor, mask: Tensor, reduction: str, divisor: float | Tensor | None) -> Tensor:
    """Masked reduction of ``values`` [B, T] with weights ``mask`` [B, T]; see :func:`aggregate`."""
    weighted = torch.where(mask != 0, values, torch.zeros_like(values)) * mask  # [B, T]
    if reduction == "token_mean":
        return weighted.sum() / mask.sum().clamp(min=1.0)
    if reduction == "seq_mean":
        return (weighted.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)).mean()
    if isinstance(divisor, Tensor):
        divisor = divisor.to(device=weighted.device, dtype=weighted.dtype)
    return weighted.sum() / divisor


def aggregate(
    values: Tensor,
    mask: Tensor,
    aggregation: str = "token_mean",
    constant_divisor: float | None = None,
    *,
    num_items_in_batch: float | Tensor | None = None,
    max_completion_length: int | None = None,
) -> Tensor:
    """Reduce per-element values [B, T] with weights ``mask`` [B, T] to a scalar.

    With l = values, m = mask, L_i = sum_t m_{i,t} (TRL ``GRPOTrainer._compute_loss`` loss_type; verl loss_agg_mode):

    - ``grpo`` = ``seq_mean`` (GRPO as in TRL <= 0.16): (1/B) sum_i [ sum_t m l / L_i ]; a sequence
      with an empty mask contributes 0 but still counts in B. Per-token weight 1 / (B L_i): a short
      sequence's tokens weigh more (the length bias Dr.GRPO and DAPO point out).
    - ``bnpo`` = ``token_mean`` (verl token-mean on one micro-batch): sum m l / sum m. Weight 1 / N_local,
      which depends on the micro-batch composition.
    - ``dapo`` (DAPO, arXiv 2503.14476; TRL's default): sum m l / ``num_items_in_batch``, the token
      count over the whole optimizer step (micro-batches and ranks), computed by the trainer, as TRL
      passes it. Weight 1 / N_global: every token of the step counts the same. A tensor count is
      clamped to >= 1 as in TRL.
    - ``dr_grpo`` (Dr.GRPO, arXiv 2503.20783): sum m l / (B * ``max_completion_length``). Weight
      1 / (B L_max): no length bias and no dependence on the other sequences.
    - ``constant`` (the diffusion trainer's name): sum m l / ``constant_divisor``, i.e. ``dapo`` with
      num_items_in_batch = constant_divisor, and ``dr_grpo`` when constant_divisor = B * L_max.

    Arguments a reduction does not use are ignored. Masked-out elements are excluded with ``where``
    (a NaN there cannot leak through 0 * NaN).
    """
    _choice("aggregation", aggregation, AGGREGATIONS + LOSS_AGGREGATIONS)
    divisor = _divisor(aggregation, values.shape, constant_divisor, num_items_in_batch, max_completion_length)
    return _reduce(values, mask, _REDUCTION[aggregation], divisor)


# --------------------------------------------------------------------------------------------
# Importance ratios and surrogates
# --------------------------------------------------------------------------------------------


def _as_2d(name: str, x: Tensor, shape: torch.Size) -> None:
    if x.shape != shape:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)} but logp_new has shape {tuple(shape)}; "
            f"pass {name} as [B, T] aligned with logp_new."
        )


def _check_clip(clip_low: float, clip_high: float, dual_clip: float | None = None) -> None:
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(
            f"clip_low must be in [0, 1), got {clip_low}; the ratio is clipped to [1 - clip_low, ...]."
        )
    if not clip_high >= 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}.")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(
            f"dual_clip must be > 1 or None (off), got {dual_clip}; it bounds the loss of A < 0 by -dual_clip * A "
            "(verl and EasyR1 use 3.0)."
        )


def _upcast(
    logp_new: Tensor, logp_old: Tensor | None, mask: Tensor | None
) -> tuple[torch.dtype, Tensor, Tensor, Tensor, Tensor]:
    """Validate shapes and upcast: (dtype, lp_new, lp_old (detached), m, keep), all [B, T]."""
    if logp_new.dim() != 2:
        raise ValueError(
            f"logp_new must be [B, T], got shape {tuple(logp_new.shape)}; "
            "for one log-prob per sequence use logp_new.unsqueeze(-1) (T = 1)."
        )
    shape = logp_new.shape
    if logp_old is not None:
        _as_2d("logp_old", logp_old, shape)
    if mask is not None:
        _as_2d("mask", mask, shape)
    dtype = torch.promote_types(logp_new.dtype, torch.float32)  # all math in (at least) fp32
    lp_new = logp_new.to(dtype)  # [B, T]
    lp_old = lp_new.detach() if logp_old is None else logp_old.detach().to(dtype)  # [B, T]
    m = torch.ones(shape, dtype=dtype, device=lp_new.device) if mask is None else mask.to(dtype)  # [B, T]
    return dtype, lp_new, lp_old, m, m != 0


def _masked_log_ratio(lp_new: Tensor, lp_old: Tensor, keep: Tensor) -> Tensor:
    """log pi_theta - log pi_old [B, T], 0 where masked, clamped to +-LOG_RATIO_CLAMP.

    Masked-out elements get log-ratio 0 *before* exp: a NaN/inf log-prob at a padded position then
    yields neither a NaN loss nor a NaN gradient (``where`` routes zero gradient to it).
    """
    log_ratio = torch.where(keep, lp_new - lp_old, torch.zeros((), dtype=lp_new.dtype, device=lp_new.device))
    return log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _ratio_from_log(log_ratio: Tensor, m: Tensor, level: str) -> Tensor:
    """Importance ratio [B, T] from the masked log-ratio [B, T]; see :func:`importance_ratio`."""
    if level == "token":
        return torch.exp(log_ratio)
    seq = (log_ratio * m).sum(dim=-1, keepdim=True) / m.sum(dim=-1, keepdim=True).clamp(min=1.0)  # [B, 1]
    if level == "sequence":
        return torch.exp(seq).expand_as(log_ratio)
    # sequence_token: value sg[log s_i] (log_ratio - sg[log_ratio] is exactly 0), gradient d/d logp_t = 1
    return torch.exp(seq.detach() + (log_ratio - log_ratio.detach()))


def importance_ratio(
    logp_new: Tensor, logp_old: Tensor | None, mask: Tensor | None = None, level: str = "token"
) -> Tensor:
    """Importance ratio [B, T] (fp32) at token or sequence level.

    With d_{i,t} = clamp(log pi_theta - log pi_old, +-LOG_RATIO_CLAMP), 0 where m = 0:

        token           r_{i,t} = exp(d_{i,t})                                      (PPO / GRPO)
        sequence        s_i = exp(sum_t m d / sum_t m), broadcast over t            (GSPO, arXiv 2507.18071;
                        gradient d s_i / d logp_{i,t} = s_i m_{i,t} / L_i            TRL importance_sampling_level)
        sequence_token  log s_{i,t} = sg[log s_i] + log pi_theta(o_t) - sg[log pi_theta(o_t)]   (GSPO-token)
                        value s_i, gradient d s_{i,t} / d logp_{i,t} = s_i (own token only)

    ``logp_old=None`` means on policy (pi_old = sg[pi_theta], ratio 1 in value, as TRL with one
    update per generation). Gradients flow into ``logp_new`` only.
    """
    _choice("ratio_level", level, RATIO_LEVELS)
    _, lp_new, lp_old, m, keep = _upcast(logp_new, logp_old, mask)
    return _ratio_from_log(_masked_log_ratio(lp_new, lp_old, keep), m, level)


def _surrogate(
    ratio: Tensor, adv: Tensor, clip_low: float, clip_high: float, dual_clip: float | None
) -> Tensor:
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_elem = torch.maximum(-adv * ratio, -adv * clipped)
    if dual_clip is not None:
        per_elem = torch.where(adv < 0, torch.minimum(per_elem, -adv * dual_clip), per_elem)
    return per_elem


def clipped_surrogate(
    ratio: Tensor, advantages: Tensor, clip_low: float, clip_high: float, dual_clip: float | None = None
) -> Tensor:
    """Per-element PPO-clip loss (to minimise), broadcasting ``ratio`` and ``advantages``.

        l = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))    (PPO, arXiv 1707.06347; DAPO
                                                                   clip-higher: clip_low 0.2, clip_high 0.28)
        dual clip c (A < 0 only):  l = min(l, -c A)               (Dual-clip PPO, arXiv 1912.09729;
                                                                   verl clip_ratio_c = 3, OpenRLHF)

    The dual clip bounds a negative-advantage element's loss by c |A| when r has run far above 1;
    its gradient there is 0. A >= 0 elements are unchanged.
    """
    _check_clip(clip_low, clip_high, dual_clip)
    return _surrogate(ratio, advantages, clip_low, clip_high, dual_clip)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def grpo_loss(
    logp_new: Tensor,
    logp_old: Tensor | None,
    advantages: Tensor,
    mask: Tensor | None = None,
    *,
    ratio_level: str = "token",
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    aggregation: str = "dapo",
    num_items_in_batch: float | Tensor | None = None,
    max_completion_length: int | None = None,
    logp_ref: Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO-family loss of an LLM trainer (TRL ``GRPOTrainer._compute_loss``, verl, DAPO, GSPO).

    Shapes: ``logp_new``, ``logp_old`` (None = on policy), ``logp_ref``, ``entropy``, ``mask``
    [B, T]; ``advantages`` [B] (broadcast over T) or [B, T]. All math in (at least) fp32.

        rho      = importance_ratio(logp_new, logp_old, mask, ratio_level)         token | GSPO | GSPO-token
        l        = clipped_surrogate(rho, A, clip_low, clip_high, dual_clip)       eps_high = eps_low if None
        loss     = agg(l) + beta * agg(k(logp_new, logp_ref)) - entropy_coef * H̄
        H̄        = sum m H / sum m       (the token mean whatever the aggregation, as TRL)

    ``agg`` is :func:`aggregate` with ``aggregation`` in grpo / bnpo / dapo (needs
    ``num_items_in_batch``) / dr_grpo (needs ``max_completion_length``). Per-token weights:
    grpo 1/(B L_i), bnpo 1/N_local, dapo 1/N_global, dr_grpo 1/(B L_max). The KL term
    (k3 with beta in the per-token loss, as GRPO / DeepSeekMath; TRL's default beta is 0) uses the same
    aggregation, which by linearity equals TRL's per_token_loss + beta * kl. The entropy schedule
    and any gradient-accumulation scaling are the trainer's. Defaults follow TRL: clip 0.2, dapo.
    Advantages are used as given (no clamp); they must be finite at counted elements.

    Returns ``(loss, metrics)``. Metrics are detached fp32 scalars over the counted elements:
    ``policy_loss`` (agg(l), no KL / entropy); ``clip_ratio_low`` = mean(rho < 1 - clip_low and
    A < 0), ``clip_ratio_high`` = mean(rho > 1 + clip_high and A > 0), ``clip_ratio_region`` (either),
    TRL's ``clip_ratio/{low,high,region}_mean``: where the clip zeroes the gradient;
    ``clip_ratio_dual`` (with ``dual_clip``) = mean(A < 0 and the cap active); ``clipfrac``,
    ``clipfrac_low``, ``clipfrac_high`` (rho outside the range, any A); ``ratio_mean/min/max``;
    ``approx_kl`` = 0.5 mean(d^2) over tokens; with ``logp_ref``: ``kl`` (token mean, TRL's) and
    ``kl_loss`` (the aggregated term beta multiplies); with ``entropy``: ``entropy`` (H̄). At a
    sequence ratio level with advantages [B] the ratio and clip metrics are per-sequence means
    (over sequences with a counted token), as TRL's.
    """
    _choice("ratio_level", ratio_level, RATIO_LEVELS)
    _choice("aggregation", aggregation, LOSS_AGGREGATIONS)
    _choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    clip_high = clip_low if clip_high is None else clip_high
    _check_clip(clip_low, clip_high, dual_clip)
    dtype, lp_new, lp_old, m, keep = _upcast(logp_new, logp_old, mask)
    shape = lp_new.shape
    for name, x in (("logp_ref", logp_ref), ("entropy", entropy)):
        if x is not None:
            _as_2d(name, x, shape)
    if logp_ref is None and beta != 0.0:
        raise ValueError(f"beta={beta} but logp_ref is None; pass reference log-probs or set beta=0.")
    if entropy is None and entropy_coef != 0.0:
        raise ValueError(
            f"entropy_coef={entropy_coef} but entropy is None; pass per-token entropies [B, T] or set entropy_coef=0."
        )
    if advantages.shape not in (shape, shape[:1]):
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}; expected [B] = {tuple(shape[:1])} "
            f"(broadcast over T) or [B, T] = {tuple(shape)}."
        )
    divisor = _divisor(aggregation, shape, None, num_items_in_batch, max_completion_length)
    reduction = _REDUCTION[aggregation]

    adv = advantages.detach().to(dtype)
    per_sequence = ratio_level != "token" and adv.dim() == 1  # one ratio and one A per sequence
    if adv.dim() == 1:
        adv = adv[:, None]  # [B, 1] -> broadcasts over T
    adv = adv.expand(shape)  # [B, T]

    log_ratio = _masked_log_ratio(lp_new, lp_old, keep)  # [B, T]
    ratio = _ratio_from_log(log_ratio, m, ratio_level)  # [B, T]
    per_elem = _surrogate(ratio, adv, clip_low, clip_high, dual_clip)  # [B, T]
    pg = _reduce(per_elem, m, reduction, divisor)
    loss = pg
    metrics: dict[str, Tensor] = {"policy_loss": pg}
    zero = torch.zeros((), dtype=dtype, device=lp_new.device)
    if logp_ref is not None:
        lp_ref = torch.where(keep, logp_ref.detach().to(dtype), zero)  # masked: x = 0, finite
        kl_elem = kl_penalty(torch.where(keep, lp_new, zero), lp_ref, kl_estimator)  # [B, T]
        kl = _reduce(kl_elem, m, reduction, divisor)
        loss = loss + beta * kl
        metrics["kl_loss"] = kl
        metrics["kl"] = _reduce(kl_elem.detach(), m, "token_mean", None)
    if entropy is not None:
        ent = _reduce(entropy.to(dtype), m, "token_mean", None)  # H̄ [], gradient into entropy
        loss = loss - entropy_coef * ent
        metrics["entropy"] = ent

    # ---- diagnostics (masked means, detached) ----
    with torch.no_grad():

        def masked_mean(x: Tensor, where: Tensor) -> Tensor:
            n = where.sum().clamp(min=1).to(dtype)
            return torch.where(where, x.to(dtype), zero).sum() / n

        if per_sequence:  # value and A are constant along t: take t = 0 of each counted sequence
            sel, view = keep.any(dim=-1), (lambda x: x[:, 0])
        else:
            sel, view = keep, (lambda x: x)
        r = view(ratio)
        low, high = r < 1.0 - clip_low, r > 1.0 + clip_high
        neg, pos = view(adv) < 0, view(adv) > 0
        metrics["approx_kl"] = 0.5 * masked_mean(log_ratio**2, keep)
        metrics["clipfrac"] = masked_mean(low | high, sel)
        metrics["clipfrac_low"] = masked_mean(low, sel)
        metrics["clipfrac_high"] = masked_mean(high, sel)
        metrics["clip_ratio_low"] = masked_mean(low & neg, sel)
        metrics["clip_ratio_high"] = masked_mean(high & pos, sel)
        metrics["clip_ratio_region"] = masked_mean((low & neg) | (high & pos), sel)
        if dual_clip is not None:
            capped = torch.maximum(r, r.clamp(1.0 - clip_low, 1.0 + clip_high)) > dual_clip
            metrics["clip_ratio_dual"] = masked_mean(capped & neg, sel)
        metrics["ratio_mean"] = masked_mean(r, sel)
        if bool(sel.any()):
            metrics["ratio_min"] = r[sel].min()
            metrics["ratio_max"] = r[sel].max()
        else:  # nothing counts: report the on-policy value
            metrics["ratio_min"] = torch.ones((), dtype=dtype, device=ratio.device)
            metrics["ratio_max"] = torch.ones((), dtype=dtype, device=ratio.device)
    metrics = {k: v.detach() for k, v in metrics.items()}
    return loss, metrics


# The metrics policy_loss has always returned, after ``policy_loss`` and ``kl`` (grpo_loss's ``kl_loss``).
_POLICY_LOSS_METRICS = (
    "approx_kl",
    "clipfrac",
    "clipfrac_low",
    "clipfrac_high",
    "ratio_mean",
    "ratio_min",
    "ratio_max",
)


def policy_loss(
    logp_new: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor | None = None,
    clip_low: float = 1e-4,
    clip_high: float = 1e-4,
    adv_clip: float | None = 5.0,
    aggregation: str = "token_mean",
    constant_divisor: float | None = None,
    logp_ref: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate loss of PPO (Schulman et al. 2017) as used by DDPO and GRPO.

    Shapes: ``logp_new``, ``logp_old`` [B, T] (T steps or tokens, T may be 1); ``advantages`` [B]
    (broadcast over T) or [B, T]; ``mask`` [B, T] bool/float, 1 = counts (float masks are weights);
    ``logp_ref`` [B, T] or None.

        r      = exp(clamp(logp_new - logp_old, +-LOG_RATIO_CLAMP))
        A      = clamp(A, -adv_clip, adv_clip)                               (skipped if None)
        l      = max(-A * r, -A * clip(r, 1 - clip_low, 1 + clip_high))       (asymmetric: DAPO)
        loss   = aggregate(l) + kl_coef * aggregate(k(logp_new, logp_ref))    (see ``aggregate``,
                                                                               ``kl_penalty``)

    This is :func:`grpo_loss` at ``ratio_level="token"`` with ``beta=kl_coef`` and the aggregation
    renamed (``AGGREGATION_ALIASES``): token_mean -> bnpo, seq_mean -> grpo, constant -> dapo with
    ``num_items_in_batch=constant_divisor``.

    DDPO uses clip_low = clip_high = 1e-4 (5e-5 for aesthetic) with log-probs averaged over latent
    dimensions; LLM GRPO uses 0.2 (DAPO clip-higher 0.2 / 0.28). All math is done in (at least)
    float32 whatever the input dtype. Gradients flow into ``logp_new`` only.

    Returns ``(loss, metrics)``; metrics are detached scalar tensors, averaged over masked elements
    (independent of ``aggregation``): ``policy_loss`` (the aggregated surrogate, without KL),
    ``kl`` (aggregated KL estimate, only with ``logp_ref``), ``approx_kl`` = 0.5 * mean((logp_new -
    logp_old)^2) (DDPO's diagnostic), ``clipfrac`` = mean(r < 1 - clip_low or r > 1 + clip_high),
    ``clipfrac_low``, ``clipfrac_high``, ``ratio_mean``, ``ratio_min``, ``ratio_max``.
    """
    _choice("aggregation", aggregation, AGGREGATIONS)
    _choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    if aggregation == "constant" and (constant_divisor is None or not constant_divisor > 0):
        raise _constant_divisor_error(constant_divisor)
    _check_clip(clip_low, clip_high)
    if adv_clip is not None and not adv_clip > 0:
        raise ValueError(f"adv_clip must be > 0 or None (no clamp), got {adv_clip}.")
    if logp_ref is None and kl_coef != 0.0:
        raise ValueError(
            f"kl_coef={kl_coef} but logp_ref is None; pass reference log-probs or set kl_coef=0."
        )
    if adv_clip is not None:
        dtype = torch.promote_types(logp_new.dtype, torch.float32)
        advantages = advantages.detach().to(dtype).clamp(-adv_clip, adv_clip)
    loss, metrics = grpo_loss(
        logp_new,
        logp_old,
        advantages,
        mask,
        ratio_level="token",
        clip_low=clip_low,
        clip_high=clip_high,
        aggregation=AGGREGATION_ALIASES[aggregation],
        num_items_in_batch=constant_divisor,
        logp_ref=logp_ref,
        beta=kl_coef,
        kl_estimator=kl_estimator,
    )
    out = {"policy_loss": metrics["policy_loss"]}
    if "kl_loss" in metrics:
        out["kl"] = metrics["kl_loss"]
    out.update((k, metrics[k]) for k in _POLICY_LOSS_METRICS)
    return loss, out


def frac_zero_std_groups(prompts: Sequence[str], rewards: Tensor) -> float:
    """Share of prompt groups (more than one sample) whose rewards are all equal: they carry no learning signal."""
    groups: dict[str, list[float]] = {}
    for p, v in zip(prompts, rewards.tolist(), strict=True):
        groups.setdefault(p, []).append(v)
    flat = [g for g in groups.values() if len(g) > 1 and max(g) - min(g) < 1e-12]
    return len(flat) / max(len(groups), 1)


# --------------------------------------------------------------------------------------------
# Completion lengths: truncation mask, DAPO soft overlong punishment, length metrics
# --------------------------------------------------------------------------------------------


def _check_lengths(lengths: Tensor, name: str = "lengths") -> None:
    if lengths.dim() != 1 or lengths.is_complex() or lengths.dtype == torch.bool:
        raise ValueError(
            f"{name} must be a 1-D real tensor [B] of completion lengths, got shape {tuple(lengths.shape)} "
            f"and dtype {lengths.dtype}; e.g. pass mask.sum(-1)."
        )


def _check_truncated(truncated: Tensor, b: int) -> None:
    if truncated.dtype != torch.bool or truncated.shape != (b,):
        raise ValueError(
            f"truncated must be a bool tensor [B] = ({b},), got shape {tuple(truncated.shape)} and dtype "
            f"{truncated.dtype}; True = the completion hit the length cap without an EOS token."
        )


def mask_truncated_completions(mask: Tensor, truncated: Tensor) -> Tensor:
    """Zero the loss mask [B, T] of truncated completions (DAPO overlong filtering).

    ``truncated`` [B] bool: the completion ended without EOS (it hit the generation cap). TRL's
    ``mask_truncated_completions``: completion_mask * (~is_truncated)[:, None]. Returns a tensor of
    ``mask``'s dtype; the sequences still count in B for the ``grpo`` and ``dr_grpo`` reductions.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}.")
    _check_truncated(truncated, mask.shape[0])
    return torch.where(truncated.to(mask.device)[:, None], torch.zeros_like(mask), mask)


def soft_overlong_penalty(
    lengths: Tensor, max_completion_length: int, cache_length: int, factor: float = 1.0
) -> Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476, Eq. 13), a reward term per completion.

        R_len(L) = 0                                     L <= L_max - L_cache
                 = ((L_max - L_cache) - L) / L_cache     L_max - L_cache < L <= L_max   (0 -> -1, linear)
                 = -1                                    L > L_max

    times ``factor`` (verl ``overlong_buffer.penalty_factor``; 1 in DAPO). DAPO uses L_max 20480,
    L_cache 4096. Same as TRL's ``get_soft_overlong_punishment``. ``lengths`` [B]; returns float32 [B],
    to be added to the task reward before the advantages.
    """
    _check_lengths(lengths)
    if not max_completion_length > 0:
        raise ValueError(f"max_completion_length must be > 0, got {max_completion_length}; pass L_max.")
    if not 0 <= cache_length <= max_completion_length:
        raise ValueError(
            f"cache_length must be in [0, max_completion_length = {max_completion_length}], got {cache_length}; "
            "DAPO uses L_cache 4096 with L_max 20480."
        )
    length = lengths.detach().to(torch.float32)  # [B]
    start = float(max_completion_length - cache_length)
    ramp = (start - length) / float(max(cache_length, 1))  # used only where start < L <= L_max (cache > 0)
    penalty = torch.where(length <= start, torch.zeros_like(length), ramp)
    penalty = torch.where(length > max_completion_length, torch.full_like(length, -1.0), penalty)
    return penalty * factor


def completion_length_metrics(lengths: Tensor, truncated: Tensor) -> dict[str, Tensor]:
    """TRL's ``completions/*`` length metrics as detached fp32 scalars.

    ``lengths`` [B] completion lengths (e.g. mask.sum(-1) before truncation masking), ``truncated``
    [B] bool. Returns ``mean_length``, ``min_length``, ``max_length``, ``clipped_ratio`` (share
    truncated) and ``mean/min/max_terminated_length`` over the completions that ended with EOS
    (all 0 when none did, as TRL).
    """
    _check_lengths(lengths)
    _check_truncated(truncated, lengths.shape[0])
    if lengths.numel() == 0:
        raise ValueError("lengths is empty; pass at least one completion.")
    length = lengths.detach().to(torch.float32)  # [B]
    term = length[~truncated.to(length.device)]
    if term.numel() == 0:  # no completion terminated
        term = torch.zeros(1, dtype=torch.float32, device=length.device)
    return {
        "mean_length": length.mean(),
        "min_length": length.min(),
        "max_length": length.max(),
        "clipped_ratio": truncated.to(torch.float32).mean(),
        "mean_terminated_length": term.mean(),
        "min_terminated_length": term.min(),
        "max_terminated_length": term.max(),
    }
