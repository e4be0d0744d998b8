"""GRPO core: advantages and the clipped policy-gradient loss, on tensors only.

This module knows nothing about diffusion, tokens, models or accelerate. A "sequence" is one
trajectory of T decisions: T denoising steps of a diffusion sampler (DDPO, Black et al. 2023,
arXiv 2305.13301) or T generated tokens (GRPO, Shao et al. 2024, DeepSeekMath arXiv 2402.03300).
Everything takes and returns plain tensors, so the same code serves the diffusion trainer and an
LLM reasoning trainer.

Notation (one sequence i of a batch of B, step/token t of T):

    A_i            advantage of sequence i (or A_{i,t} per step)
    r_{i,t}        = exp(log pi_theta - log pi_old)                       (importance ratio)
    l_{i,t}        = max(-A * r, -A * clip(r, 1 - eps_low, 1 + eps_high))  (PPO-clip, Schulman 2017)
    m_{i,t}        mask, 1 = the element counts

Advantages:

    per-prompt tracker (ddpo-pytorch ``stat_tracking.py``)   A = (R - mu_p) / (sigma_p + eps)
    stateless groups (GRPO)                                  A = (R - mu_g) / (sigma_g + eps)
    Dr.GRPO (Liu et al. 2025, arXiv 2503.20783)              A = R - mu      (``scale_std=False``)

All standard deviations are population standard deviations (ddof = 0, numpy's ``np.std`` as in
ddpo-pytorch); ``group_advantages(..., unbiased=True)`` gives TRL's ``torch.std`` convention.
Unscorable samples carry a NaN reward: they never enter a statistic and get advantage exactly 0
(TRL's convention; a ``nansum`` would otherwise count them as reward 0 and bias the baseline).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "ADV_EPS",
    "BATCH_ADV_EPS",
    "LOG_RATIO_CLAMP",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "PerPromptStatTracker",
    "batch_advantages",
    "group_advantages",
    "clip_advantages",
    "kl_penalty",
    "aggregate",
    "policy_loss",
    "frac_zero_std_groups",
]

# Added to the standard deviation before dividing: A = (R - mu) / (sigma + ADV_EPS). ddpo-pytorch
# and CoCA use 1e-6 in the per-prompt tracker; it keeps a group of identical rewards at A = 0.
ADV_EPS = 1e-6
# ddpo-pytorch's epsilon when per-prompt tracking is off: (R - mean) / (std + 1e-8).
BATCH_ADV_EPS = 1e-8
# |log pi_theta - log pi_old| and |log pi_ref - log pi_theta| are clamped to this before exp()
# (verl / OpenRLHF use 20): a garbage log-prob at a padded or diverged position cannot overflow to
# inf and poison the batch with NaN. exp(20) ~ 5e8 is far outside any clip range, so the clipped
# objective is unchanged wherever the clamp is active.
LOG_RATIO_CLAMP = 20.0

AGGREGATIONS = ("token_mean", "seq_mean", "constant")
KL_ESTIMATORS = ("k1", "k2", "k3")


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


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    scale_std: bool = True,
    eps: float = ADV_EPS,
    unbiased: bool = False,
) -> Tensor:
    """Stateless per-group standardisation (GRPO): A_i = (R_i - mu_g) / (sigma_g + eps).

    ``group_ids`` [N] integer labels (e.g. prompt index; groups need not be contiguous). mu_g and
    sigma_g use only the group's finite rewards; NaN rewards -> A = 0. ``unbiased=True`` uses the
    (n - 1) std of TRL / DeepSeekMath instead of the population std; a group with a single finite
    reward then has sigma = 0 (not NaN). A singleton group always gets A = 0 (R equals its mean).
    Returns float32 [N].
    """
    _check_rewards(rewards)
    if group_ids.shape != rewards.shape:
        raise ValueError(
            f"group_ids shape {tuple(group_ids.shape)} != rewards shape {tuple(rewards.shape)}; "
            "pass one integer group label per reward."
        )
    if group_ids.is_floating_point() or group_ids.is_complex():
        raise ValueError(
            f"group_ids must be an integer tensor, got {group_ids.dtype}; pass group_ids.long()."
        )
    r = rewards.detach().to(torch.float64)  # [N]
    finite = torch.isfinite(r)
    r0 = torch.where(finite, r, torch.zeros_like(r))  # NaN -> 0 so sums ignore them
    _, inverse = torch.unique(group_ids.to(r.device), return_inverse=True)  # [N] -> 0..G-1
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    w = finite.to(torch.float64)
    count = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, inverse, w)  # [G]
    total = torch.zeros_like(count).index_add_(0, inverse, r0)  # [G]
    mu = total / count.clamp(min=1.0)  # [G]
    dev = torch.where(finite, r0 - mu[inverse], torch.zeros_like(r0))  # [N]
    sq = torch.zeros_like(count).index_add_(0, inverse, dev**2)  # [G]
    dof = (count - 1.0) if unbiased else count
    sigma = (sq / dof.clamp(min=1.0)).sqrt()  # [G]
    adv = dev / (sigma[inverse] + eps) if scale_std else dev
    return torch.where(finite, adv, torch.zeros_like(adv)).to(torch.float32)


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
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {estimator!r}; choose one of {KL_ESTIMATORS}.")
    x = (logp_ref - logp_new).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if estimator == "k1":
        return -x
    if estimator == "k2":
        return 0.5 * x**2
    return torch.exp(x) - 1.0 - x


def aggregate(
    values: Tensor,
    mask: Tensor,
    aggregation: str = "token_mean",
    constant_divisor: float | None = None,
) -> Tensor:
    """Reduce per-element values [B, T] with weights ``mask`` [B, T] to a scalar.

    - ``token_mean`` (DAPO / verl token-mean): sum_{i,t} m v / sum_{i,t} m.
    - ``seq_mean``   (GRPO as in TRL <= 0.16): (1/B) sum_i [ sum_t m v / sum_t m ]; a sequence with an
      empty mask contributes 0 but still counts in B.
    - ``constant``   (Dr.GRPO): sum_{i,t} m v / constant_divisor (e.g. B * T_max), independent of the
      number of valid elements, so no length bias and no micro-batch dependence.

    Masked-out elements are excluded with ``where`` (a NaN there cannot leak through 0 * NaN).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}.")
    weighted = torch.where(mask != 0, values, torch.zeros_like(values)) * mask  # [B, T]
    if aggregation == "token_mean":
        return weighted.sum() / mask.sum().clamp(min=1.0)
    if aggregation == "seq_mean":
        return (weighted.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)).mean()
    if constant_divisor is None or not constant_divisor > 0:
        raise ValueError(
            f"aggregation='constant' needs constant_divisor > 0, got {constant_divisor!r}; "
            "pass e.g. constant_divisor=B * T_max (Dr.GRPO)."
        )
    return weighted.sum() / constant_divisor


# --------------------------------------------------------------------------------------------
# PPO-clip loss
# --------------------------------------------------------------------------------------------


def _as_2d(name: str, x: Tensor, shape: torch.Size) -> None:
    if x.shape != shape:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)} but logp_new has shape {tuple(shape)}; "
            f"pass {name} as [B, T] aligned with logp_new."
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

    DDPO uses clip_low = clip_high = 1e-4 (5e-5 for aesthetic) with log-probs averaged over latent
    dimensions; LLM GRPO uses 0.2 (DAPO clip-higher 0.2 / 0.28). All math is done in (at least)
    float32 whatever the input dtype. Gradients flow into ``logp_new`` only.

    Returns ``(loss, metrics)``; metrics are detached scalar tensors, averaged over masked elements
    (independent of ``aggregation``): ``policy_loss`` (the aggregated surrogate, without KL),
    ``kl`` (aggregated KL estimate, only with ``logp_ref``), ``approx_kl`` = 0.5 * mean((logp_new -
    logp_old)^2) (DDPO's diagnostic), ``clipfrac`` = mean(r < 1 - clip_low or r > 1 + clip_high),
    ``clipfrac_low``, ``clipfrac_high``, ``ratio_mean``, ``ratio_min``, ``ratio_max``.
    """
    # ---- argument checks (fix-it messages) ----
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}.")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {kl_estimator!r}; choose one of {KL_ESTIMATORS}.")
    if aggregation == "constant" and (constant_divisor is None or not constant_divisor > 0):
        raise ValueError(
            f"aggregation='constant' needs constant_divisor > 0, got {constant_divisor!r}; "
            "pass e.g. constant_divisor=B * T_max (Dr.GRPO)."
        )
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(
            f"clip_low must be in [0, 1), got {clip_low}; the ratio is clipped to [1 - clip_low, ...]."
        )
    if not clip_high >= 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}.")
    if adv_clip is not None and not adv_clip > 0:
        raise ValueError(f"adv_clip must be > 0 or None (no clamp), got {adv_clip}.")
    if logp_new.dim() != 2:
        raise ValueError(
            f"logp_new must be [B, T], got shape {tuple(logp_new.shape)}; "
            "for one log-prob per sequence use logp_new.unsqueeze(-1) (T = 1)."
        )
    shape = logp_new.shape
    _as_2d("logp_old", logp_old, shape)
    if mask is not None:
        _as_2d("mask", mask, shape)
    if logp_ref is not None:
        _as_2d("logp_ref", logp_ref, shape)
    elif kl_coef != 0.0:
        raise ValueError(
            f"kl_coef={kl_coef} but logp_ref is None; pass reference log-probs or set kl_coef=0."
        )
    if advantages.shape not in (shape, shape[:1]):
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}; expected [B] = {tuple(shape[:1])} "
            f"(broadcast over T) or [B, T] = {tuple(shape)}."
        )

    # ---- upcast: all math in (at least) fp32 ----
    dtype = torch.promote_types(logp_new.dtype, torch.float32)
    lp_new = logp_new.to(dtype)  # [B, T]
    lp_old = logp_old.detach().to(dtype)  # [B, T]
    adv = advantages.detach().to(dtype)
    if adv.dim() == 1:
        adv = adv[:, None]  # [B, 1] -> broadcasts over T
    if adv_clip is not None:
        adv = adv.clamp(-adv_clip, adv_clip)
    adv = adv.expand(shape)  # [B, T]
    m = torch.ones(shape, dtype=dtype, device=lp_new.device) if mask is None else mask.to(dtype)  # [B, T]
    keep = m != 0  # [B, T] bool

    # ---- clipped surrogate ----
    # Masked-out elements get log-ratio 0 *before* exp: a NaN/inf log-prob at a padded position then
    # yields neither a NaN loss nor a NaN gradient (``where`` routes zero gradient to it).
    log_ratio = torch.where(keep, lp_new - lp_old, torch.zeros((), dtype=dtype, device=lp_new.device))
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B, T]
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_elem = torch.maximum(-adv * ratio, -adv * clipped)  # [B, T]
    pg = aggregate(per_elem, m, aggregation, constant_divisor)
    loss = pg

    metrics: dict[str, Tensor] = {"policy_loss": pg.detach()}
    if logp_ref is not None:
        zero = torch.zeros((), dtype=dtype, device=lp_new.device)
        lp_ref = torch.where(keep, logp_ref.detach().to(dtype), zero)  # masked: x = 0, finite
        lp_for_kl = torch.where(keep, lp_new, zero)
        kl_elem = kl_penalty(lp_for_kl, lp_ref, kl_estimator)  # [B, T]
        kl = aggregate(kl_elem, m, aggregation, constant_divisor)
        loss = loss + kl_coef * kl
        metrics["kl"] = kl.detach()

    # ---- diagnostics (masked element means, detached) ----
    with torch.no_grad():
        n = keep.sum().clamp(min=1).to(dtype)

        def masked_mean(x: Tensor) -> Tensor:
            return torch.where(keep, x.to(dtype), torch.zeros((), dtype=dtype, device=x.device)).sum() / n

        low = ratio < 1.0 - clip_low
        high = ratio > 1.0 + clip_high
        metrics["approx_kl"] = 0.5 * masked_mean(log_ratio**2)
        metrics["clipfrac"] = masked_mean(low | high)
        metrics["clipfrac_low"] = masked_mean(low)
        metrics["clipfrac_high"] = masked_mean(high)
        metrics["ratio_mean"] = masked_mean(ratio)
        if bool(keep.any()):
            metrics["ratio_min"] = ratio[keep].min()
            metrics["ratio_max"] = ratio[keep].max()
        else:  # nothing counts: report the on-policy value
            metrics["ratio_min"] = torch.ones((), dtype=dtype, device=ratio.device)
            metrics["ratio_max"] = torch.ones((), dtype=dtype, device=ratio.device)
    metrics = {k: v.detach() for k, v in metrics.items()}
    return loss, metrics


def frac_zero_std_groups(prompts: Sequence[str], rewards: Tensor) -> float:
    """Share of prompt groups (more than one sample) whose rewards are all equal: they carry no learning signal."""
    groups: dict[str, list[float]] = {}
    for p, v in zip(prompts, rewards.tolist(), strict=True):
        groups.setdefault(p, []).append(v)
    flat = [g for g in groups.values() if len(g) > 1 and max(g) - min(g) < 1e-12]
    return len(flat) / max(len(groups), 1)
