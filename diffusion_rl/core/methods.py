"""Method add-ons to the GRPO core, on tensors only: LUFFY, PAD, DAPO dynamic sampling, entropy schedules.

Like :mod:`diffusion_rl.core.grpo` (whose pieces this module reuses and never re-implements), this
module knows nothing about models, tokenizers, diffusion or accelerate: every function takes and
returns plain tensors (or Python numbers), all math is done in at least fp32, NaN marks an
unscorable value and is never counted. Shapes follow grpo's contract: ``logp_new`` / ``logp_old`` /
``mask`` [B, T], ``advantages`` [B] or [B, T], ``rewards`` / ``group_ids`` [B].

    luffy_loss, replace_with_off_policy    LUFFY mixed-policy GRPO (Yan et al. 2025, arXiv 2504.14945;
                                           ElliottYan/LUFFY luffy/verl/verl/mix_src/mix_core_alg.py)
    pad_sequence_scores, pad_probabilities, pad_select
                                           ReVisual-R1 Prioritized Advantage Distillation (arXiv 2506.04207;
                                           CSfufu/Revisual-R1 verl/trainer/ray_trainer.py)
    group_reward_spread, degenerate_groups, keep_groups, DynamicSampler
                                           DAPO dynamic sampling (arXiv 2503.14476; verl recipe/dapo
                                           ``filter_groups``, ``max_num_gen_batches``)
    ConstantEntropyCoef, ExponentialEntropyCoef, AdaptiveEntropyCoef, make_entropy_schedule
                                           entropy-bonus coefficient schedules (ReVisual-R1 dp_actor.py;
                                           Skywork-OR1, arXiv 2505.22312, or1_scripts/train/7b_8k.sh)

Where a paper and its released code disagree the choice is an argument, and each docstring says
which value is which.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion_rl.core.grpo import (
    LOSS_AGGREGATIONS,
    RATIO_LEVELS,
    _check_rewards,
    _choice,
    _group_index,
    _upcast,
    aggregate,
    clipped_surrogate,
    grpo_loss,
    importance_ratio,
)

__all__ = [
    "LUFFY_GAMMA",
    "PAD_PRIORITIES",
    "PAD_ROUNDINGS",
    "ENTROPY_SCHEDULES",
    "policy_shaping",
    "luffy_loss",
    "replace_with_off_policy",
    "pad_sequence_scores",
    "pad_probabilities",
    "pad_select",
    "group_reward_spread",
    "degenerate_groups",
    "keep_groups",
    "DynamicSampler",
    "ConstantEntropyCoef",
    "ExponentialEntropyCoef",
    "AdaptiveEntropyCoef",
    "make_entropy_schedule",
]

# LUFFY's policy-shaping constant: f(x) = x / (x + 0.1) (paper Eq. 6; code off_policy_reshape="p_div_p_0.1").
LUFFY_GAMMA = 0.1
# PAD priorities: "power" = |A|^alpha normalised (released code), "softmax" = softmax(|A| / tau) (paper).
PAD_PRIORITIES = ("power", "softmax")
# How PAD turns ratio * N into a count: "round" half up, "floor" (released code: int()), "ceil" (paper).
PAD_ROUNDINGS = ("round", "floor", "ceil")
# The released PAD code adds this to |A| before the power, so a zero score still has a (tiny) weight.
_PAD_POWER_EPS = 1e-8
# Slack for ratio * N landing a hair off an integer in floating point (0.7 * 10 = 7.000000000000001).
_COUNT_SLACK = 1e-9
ENTROPY_SCHEDULES = ("constant", "exponential", "adaptive")


# --------------------------------------------------------------------------------------------
# LUFFY: off-policy traces inside the GRPO group
# --------------------------------------------------------------------------------------------


def policy_shaping(logp: Tensor, gamma: float = LUFFY_GAMMA) -> Tensor:
    """LUFFY's policy shaping f(pi) = pi / (pi + gamma), from log-probs, elementwise.

        f(pi)        = pi / (pi + gamma) = sigmoid(log pi - log gamma)
        d f / d logp = gamma pi / (pi + gamma)^2          (= f (1 - f))

    so d(-A f)/d theta = -A gamma / (pi + gamma)^2 * pi * d log pi / d theta: compared with the plain
    off-policy objective -A pi, a token of low probability gets its gradient multiplied by
    gamma / (pi + gamma)^2 (up to 1 / gamma = 10 at pi -> 0), a confident one is damped.
    Yan et al. 2025 (arXiv 2504.14945) Eq. 6-7, gamma = 0.1; ElliottYan/LUFFY ``mix_core_alg.py``
    ``off_policy_reshape="p_div_p_0.1"``. Computed as a sigmoid, so a log-density above 0 (pi > 1,
    possible for a diffusion step) neither overflows nor gives NaN. Returns ``logp``'s dtype (>= fp32).
    """
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}; LUFFY uses gamma = 0.1 (f(x) = x / (x + 0.1)).")
    lp = logp.to(torch.promote_types(logp.dtype, torch.float32))
    return torch.sigmoid(lp - math.log(gamma))


def _off_policy_tokens(off_policy: Tensor, shape: torch.Size, device: torch.device) -> Tensor:
    """Validate ``off_policy`` ([B] or [B, T] bool) and broadcast it to [B, T]."""
    if off_policy.dtype != torch.bool or off_policy.shape not in (shape, shape[:1]):
        raise ValueError(
            f"off_policy must be a bool tensor [B] = {tuple(shape[:1])} (True = the sequence is an off-policy "
            f"trace) or [B, T] = {tuple(shape)} (True = the token is a trace-prefix token), got shape "
            f"{tuple(off_policy.shape)} and dtype {off_policy.dtype}; e.g. pass flags.bool()."
        )
    off = off_policy.to(device)
    return (off[:, None] if off.dim() == 1 else off).expand(shape)


def luffy_loss(
    logp_new: Tensor,
    logp_old: Tensor | None,
    advantages: Tensor,
    mask: Tensor | None,
    off_policy: Tensor,
    *,
    gamma: float | None = LUFFY_GAMMA,
    ratio_level: str = "token",
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    aggregation: str = "dapo",
    num_items_in_batch: float | Tensor | None = None,
    max_completion_length: int | None = None,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """LUFFY mixed-policy GRPO loss (Yan et al. 2025, arXiv 2504.14945, Eq. 6-8).

    A group holds G samples of one prompt, m of them off-policy traces (e.g. DeepSeek-R1's solution;
    LUFFY: G = 8, m = 1); ``advantages`` come from the *mixed* group (the caller runs
    :func:`grpo.group_advantages` over all G rewards). ``off_policy`` [B] marks trace sequences
    (or [B, T] trace-prefix tokens, as LUFFY's ``prefix_mask``). With pi = exp(logp_new):

        on-policy token   l = grpo's clipped surrogate max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))
                          (r = importance_ratio(logp_new, logp_old) at ``ratio_level``; dual clip optional)
        off-policy token  l = -A f(pi),  f(pi) = pi / (pi + gamma)   (:func:`policy_shaping`; no ratio
                          and no clip: the traces' behaviour policy is unknown, LUFFY takes it as 1)
                          gamma=None: no shaping, f(pi) = pi (LUFFY's ``off_policy_reshape="no_reshape"``
                          ablation: the importance ratio pi / 1)
        loss              = agg(l) - entropy_coef * H̄          (agg = grpo.aggregate: grpo / bnpo / dapo /
                                                               dr_grpo, one reduction over all tokens)

    Under ``bnpo`` this is LUFFY's l = p l̄_off + (1 - p) l̄_on with p the off-policy token share.
    ``logp_old`` is read only at on-policy tokens (None = on policy, ratio 1); ``logp_new``'s value
    and gradient at off-policy tokens come through f. With no off-policy token the loss, its
    gradient and the clip metrics are exactly :func:`grpo.grpo_loss`'s (without KL).

    Released-code notes (ElliottYan/LUFFY ``mix_core_alg.compute_token_on_off_policy_loss`` and
    ``exp_scripts/train.sh``): the default script also turns the on-policy clip off
    (``loss_remove_clip``, the plain -A r; ``clip_low=0.999999, clip_high=1e9`` equals it wherever
    1e-6 <= r <= 1e9) and divides by the padded length T only (``loss_remove_token_mean``: sum / T, i.e. B times
    ``dr_grpo``'s sum / (B T) with T = max_completion_length); its std-free advantages are
    ``group_advantages(scale="none")``; it computes the on-policy clip fraction over all tokens
    (here: on-policy tokens only). No KL (beta 0); entropy 1e-3.

    Returns ``(loss, metrics)``, detached fp32 scalars: ``policy_loss`` (agg(l)), ``on_policy_loss``
    and ``off_policy_loss`` (their additive parts: on + off = policy_loss), ``on_policy_token_loss``
    / ``off_policy_token_loss`` (plain token means, LUFFY's on_pg_loss / off_pg_loss),
    ``on_policy_tokens`` / ``off_policy_tokens`` (mask sums), ``off_policy_fraction`` (p),
    ``off_policy_prob`` (mean pi), ``off_policy_shaped`` (mean f(pi)), ``on_policy_prob`` (mean pi_old),
    ``entropy`` (with ``entropy``), and over on-policy tokens only grpo_loss's ``clip_ratio_*``,
    ``clipfrac*``, ``ratio_mean/min/max``, ``approx_kl``.
    """
    _choice("aggregation", aggregation, LOSS_AGGREGATIONS)
    _choice("ratio_level", ratio_level, RATIO_LEVELS)
    dtype, lp_new, lp_old, m, keep = _upcast(logp_new, logp_old, mask)
    shape, device = lp_new.shape, lp_new.device
    if advantages.shape not in (shape, shape[:1]):
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}; expected [B] = {tuple(shape[:1])} "
            f"(broadcast over T) or [B, T] = {tuple(shape)}, computed over the mixed group."
        )
    if entropy is None and entropy_coef != 0.0:
        raise ValueError(
            f"entropy_coef={entropy_coef} but entropy is None; pass per-token entropies [B, T] or set entropy_coef=0."
        )
    if entropy is not None and entropy.shape != shape:
        raise ValueError(f"entropy has shape {tuple(entropy.shape)}; pass it as [B, T] = {tuple(shape)}.")
    off = _off_policy_tokens(off_policy, shape, device)  # [B, T]
    off_tok, on_tok = keep & off, keep & ~off  # [B, T]
    m_on = torch.where(on_tok, m, torch.zeros_like(m))  # on-policy weights; off-policy and padding 0
    zero = torch.zeros((), dtype=dtype, device=device)

    adv = advantages.detach().to(device=device, dtype=dtype)
    adv = (adv[:, None] if adv.dim() == 1 else adv).expand(shape)
    adv = torch.where(keep, adv, zero)  # a NaN advantage at a padded position cannot reach a gradient

    # On-policy: grpo's ratio and clipped surrogate, the ratio masked to on-policy tokens so a
    # missing (NaN) logp_old at a trace token never enters exp().
    ratio = importance_ratio(lp_new, lp_old, m_on, ratio_level)  # [B, T]
    l_on = clipped_surrogate(ratio, adv, clip_low, clip_low if clip_high is None else clip_high, dual_clip)
    # Off-policy: -A f(pi), logp_new masked to trace tokens before the sigmoid.
    off_logp = torch.where(off_tok, lp_new, zero)
    shaped = off_logp.exp() if gamma is None else policy_shaping(off_logp, gamma)  # [B, T]
    per_elem = torch.where(off_tok, -adv * shaped, l_on)  # [B, T]

    def agg(values: Tensor) -> Tensor:
        return aggregate(
            values,
            m,
            aggregation,
            num_items_in_batch=num_items_in_batch,
            max_completion_length=max_completion_length,
        )

    pg = agg(per_elem)
    loss = pg
    metrics: dict[str, Tensor] = {"policy_loss": pg}
    if entropy is not None:
        ent = aggregate(entropy.to(dtype), m, "bnpo")  # H̄, the token mean whatever the aggregation (as grpo)
        loss = loss - entropy_coef * ent
        metrics["entropy"] = ent

    with torch.no_grad():
        m_off = torch.where(off_tok, m, torch.zeros_like(m))
        n_on, n_off = m_on.sum(), m_off.sum()
        pe = per_elem.detach()
        metrics["on_policy_loss"] = agg(torch.where(on_tok, pe, zero))
        metrics["off_policy_loss"] = agg(torch.where(off_tok, pe, zero))
        metrics["off_policy_token_loss"] = aggregate(pe, m_off, "bnpo")
        metrics["on_policy_tokens"] = n_on
        metrics["off_policy_tokens"] = n_off
        metrics["off_policy_fraction"] = n_off / (n_on + n_off).clamp(min=1.0)
        metrics["off_policy_prob"] = aggregate(torch.exp(torch.where(off_tok, lp_new, zero)), m_off, "bnpo")
        metrics["off_policy_shaped"] = aggregate(shaped.detach(), m_off, "bnpo")
        metrics["on_policy_prob"] = aggregate(torch.exp(torch.where(on_tok, lp_old, zero)), m_on, "bnpo")
        # grpo_loss over the on-policy tokens alone gives the clip / ratio diagnostics (its
        # policy_loss under bnpo is the on-policy token mean).
        _, on_metrics = grpo_loss(
            lp_new.detach(),
            lp_old,
            advantages.detach(),  # [B] as given: at a sequence ratio level the metrics are per sequence
            m_on,
            ratio_level=ratio_level,
            clip_low=clip_low,
            clip_high=clip_high,
            dual_clip=dual_clip,
            aggregation="bnpo",
        )
        metrics["on_policy_token_loss"] = on_metrics.pop("policy_loss")
        metrics.update(on_metrics)
    return loss, {k: v.detach().to(torch.float32) for k, v in metrics.items()}


def replace_with_off_policy(group_ids: Tensor, m: int, generator: torch.Generator | None = None) -> Tensor:
    """Which slots of each group take an off-policy trace: bool [B], exactly m True per group.

    The trainer generates G - m on-policy samples per prompt and puts the traces in the slots this
    marks (or overwrites them). ``generator=None`` takes the first m slots of each group in batch
    order, LUFFY's layout (``mix_vllm_rollout.py``: ``n_prefix`` trace slots, then n - n_prefix
    on-policy ones; LUFFY uses n = 8, n_prefix = 1). With a CPU ``torch.Generator`` the m slots are
    drawn uniformly without replacement within each group, deterministic given the generator state
    (one ``torch.rand(B)`` key per sample; the m smallest keys of a group win).
    ``group_ids`` [B] integer labels (groups need not be contiguous); m = 0 gives all False.
    """
    n = group_ids.shape[0] if group_ids.dim() == 1 else -1  # -1: _group_index reports the bad shape
    inverse, n_groups = _group_index(group_ids, n, torch.device("cpu"))
    if not isinstance(m, int) or isinstance(m, bool) or m < 0:
        raise ValueError(
            f"m must be an int >= 0 (off-policy traces per group), got {m!r}; LUFFY uses 1 of 8."
        )
    b = inverse.shape[0]
    counts = torch.bincount(inverse, minlength=n_groups)  # [G]
    if b and m > int(counts.min()):
        raise ValueError(
            f"m = {m} off-policy traces per group, but the smallest group has {int(counts.min())} samples; "
            "every group needs at least m slots (make G >= m, e.g. generate G - m on-policy samples plus m slots)."
        )
    if generator is None:
        keys = torch.arange(b, dtype=torch.float64)
    else:
        if generator.device.type != "cpu":
            raise ValueError(
                f"generator is on {generator.device}; pass a CPU torch.Generator (the draw is made on the CPU, "
                "so it is the same whatever device the batch lives on)."
            )
        keys = torch.rand(b, generator=generator, dtype=torch.float64)
    order = torch.argsort(keys, stable=True)
    order = order[torch.argsort(inverse[order], stable=True)]  # by group, then key
    starts = torch.cumsum(counts, 0) - counts  # [G]
    rank = torch.empty(b, dtype=torch.long)
    rank[order] = torch.arange(b) - starts[inverse[order]]  # rank of each sample's key within its group
    return (rank < m).to(group_ids.device)


# --------------------------------------------------------------------------------------------
# PAD: Prioritized Advantage Distillation (ReVisual-R1)
# --------------------------------------------------------------------------------------------


def pad_sequence_scores(
    advantages: Tensor, mask: Tensor | None = None, normalize_by_length: bool = True
) -> Tensor:
    """PAD's per-sequence score |Â_i|, float32 [B] (NaN stays NaN).

        advantages [B]       |Â_i| = |A_i|
        advantages [B, T]    |Â_i| = |sum_t m A_{i,t} / L_i|   (``normalize_by_length``; released default)
                             |Â_i| = |sum_t m A_{i,t}|          (otherwise)

    The absolute value is taken after the aggregation, as in CSfufu/Revisual-R1 ``ray_trainer.py``
    (``pad_normalize_by_length``); L_i = sum_t m_{i,t} floored at 1 (the code adds 1e-8). With
    outcome advantages broadcast over T both forms of the first are |A_i|. ``mask`` [B, T] is used
    only with [B, T] advantages; masked positions are ignored even if NaN.
    """
    if advantages.dim() == 1:
        return advantages.detach().to(torch.float32).abs()
    if advantages.dim() != 2:
        raise ValueError(
            f"advantages must be [B] or [B, T], got shape {tuple(advantages.shape)}; pass one advantage per "
            "sequence or per token."
        )
    if mask is not None and mask.shape != advantages.shape:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but the per-token advantages have {tuple(advantages.shape)}; "
            "pass the completion mask [B, T] aligned with them."
        )
    _, adv, _, m, keep = _upcast(advantages.detach(), None, mask)
    total = torch.where(keep, adv, torch.zeros_like(adv)).mul(m).sum(dim=-1)  # [B]
    if normalize_by_length:
        total = total / m.sum(dim=-1).clamp(min=1.0)
    return total.abs().to(torch.float32)


def pad_probabilities(
    scores: Tensor, priority: str = "power", alpha: float = 1.5, temperature: float | None = None
) -> Tensor:
    """PAD's sampling distribution over the in-band sequences, float64 [K] summing to 1.

        priority="power"    p_i = (|Â_i| + 1e-8)^alpha / sum_j (|Â_j| + 1e-8)^alpha
                            (released code, ``pad_alpha``: 1.0 in the dataclass, 1.5 in examples/main.sh)
        priority="softmax"  p_i = exp(|Â_i| / tau) / sum_j exp(|Â_j| / tau)
                            (paper, arXiv 2506.04207 Sec. 3.3; tau annealed 1.0 -> 0.3 by the trainer)

    ``scores`` [K] are the finite |Â| of the effective set (:func:`pad_select` filters them). Larger
    alpha or smaller tau concentrate the draw on the largest |Â|; alpha = 0 or tau -> inf is uniform.
    """
    _choice("priority", priority, PAD_PRIORITIES)
    s = scores.detach().to(device="cpu", dtype=torch.float64)
    if s.dim() != 1 or not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError(
            "scores must be a 1-D tensor of finite |advantages| >= 0; filter NaN out first "
            "(pad_select does) or pass pad_sequence_scores(...)."
        )
    if priority == "power":
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}; the released ReVisual-R1 script uses 1.5.")
        if s.numel() == 0:
            return s
        w = (s + _PAD_POWER_EPS) / (s.max() + _PAD_POWER_EPS)  # in (0, 1]: a large alpha cannot overflow
        w = w**alpha
        return w / w.sum()
    if temperature is None or not temperature > 0:
        raise ValueError(
            f"priority='softmax' needs temperature > 0, got {temperature!r}; the paper anneals tau from 1.0 to 0.3 "
            "(the schedule is the trainer's: pass the current tau)."
        )
    return torch.softmax(s / temperature, dim=0)


def _pad_count(ratio: float, n: int, rounding: str) -> int:
    x = ratio * n
    if rounding == "floor":
        return math.floor(x + _COUNT_SLACK)
    if rounding == "ceil":
        return math.ceil(x - _COUNT_SLACK)
    return math.floor(x + 0.5 + _COUNT_SLACK)  # half up, not Python's round-half-even


def pad_select(
    advantages: Tensor,
    mask: Tensor | None = None,
    *,
    ratio: float = 1.5,
    t_low: float = 0.03,
    t_high: float | None = 0.97,
    priority: str = "power",
    alpha: float = 1.5,
    temperature: float | None = None,
    replacement: bool = True,
    normalize_by_length: bool = True,
    inclusive: bool = True,
    rounding: str = "round",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """ReVisual-R1 Prioritized Advantage Distillation: resample the batch by |advantage| (arXiv 2506.04207).

    After the advantages, with N = B sequences and |Â_i| = :func:`pad_sequence_scores`:

        E    = {i : T_low <= |Â_i| <= T_high, |Â_i| finite}      (``inclusive``; strict < < otherwise)
        k    = rounding(ratio * N)                                 (half up by default; see below)
        k'   = min(k, |E|) without replacement,  k with replacement
        idx  = k' draws from E with probabilities pad_probabilities(|Â_E|, priority, alpha, temperature)

    and the trainer trains on ``batch[idx]`` (a sample drawn twice counts twice). Returns
    ``(idx, metrics)``: ``idx`` long [k'] into the batch, on ``advantages``' device, in draw order.
    Deterministic given ``generator`` (a CPU ``torch.Generator``; the draw is ``torch.multinomial`` on
    the CPU in float64, so it does not depend on the batch's device); None uses torch's global RNG.

    Edge cases, never an error: an empty band (all |Â| outside it, all NaN, or B = 0) or k = 0 returns
    an empty ``idx`` with ``metrics["empty"] = 1``; the trainer skips the update or falls back to the
    full batch. Without replacement k > |E| is capped to |E|: each in-band sample exactly once, in a
    priority-weighted order (``num_requested`` keeps k).

    Paper vs released code (CSfufu/Revisual-R1 ``verl/trainer/ray_trainer.py``, ``examples/main.sh``):
    priority softmax(|Â| / tau) vs ``"power"`` (|Â| + 1e-8)^1.5; band <= <= vs strict (``inclusive``);
    k' = min(ceil(ratio N), |E|) vs int(ratio N) with replacement (``rounding="ceil"`` / ``"floor"``);
    released values ratio 1.5, T_low 0.03, T_high 0.97 (the defaults here; the config dataclass has
    1.0 / 0.05 / 0.95, alpha 1.0). T_high applies to std-normalised advantages, whose |A| often
    exceeds 1, so 0.97 drops the strongest samples; pass ``t_high=None`` for no upper bound. (The
    released main.sh spells the switch ``algorrithm.use_pad=true``.)

    Metrics (detached fp32 scalars): ``num_samples`` N, ``num_kept`` |E|, ``kept_fraction`` |E| / N,
    ``num_requested`` k, ``num_selected`` k', ``empty``, ``unique_fraction`` (distinct / k'),
    ``mean_abs_adv_before`` (over the finite |Â| of the batch), ``mean_abs_adv_after`` (over idx,
    with multiplicity; 0 when empty).
    """
    _choice("priority", priority, PAD_PRIORITIES)
    _choice("rounding", rounding, PAD_ROUNDINGS)
    if not ratio > 0:
        raise ValueError(
            f"ratio must be > 0, got {ratio}; the released ReVisual-R1 script uses 1.5 (k = 1.5 N)."
        )
    if not t_low >= 0 or (t_high is not None and not t_high >= t_low):
        raise ValueError(
            f"need 0 <= t_low <= t_high, got t_low={t_low}, t_high={t_high}; ReVisual-R1 uses 0.03 / 0.97 "
            "(t_high=None: no upper bound)."
        )
    if priority == "softmax" and (temperature is None or not temperature > 0):
        raise ValueError(
            f"priority='softmax' needs temperature > 0, got {temperature!r}; the paper uses 1.0 -> 0.3."
        )
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            f"generator is on {generator.device}; pass a CPU torch.Generator (PAD draws on the CPU)."
        )
    device = advantages.device
    scores = pad_sequence_scores(advantages, mask, normalize_by_length).cpu()  # [N]
    n = scores.shape[0]
    finite = torch.isfinite(scores)
    high = math.inf if t_high is None else t_high
    band = (scores >= t_low) & (scores <= high) if inclusive else (scores > t_low) & (scores < high)
    effective = torch.nonzero(band & finite).flatten()  # [|E|]
    k = _pad_count(ratio, n, rounding)
    k_sel = k if replacement else min(k, effective.numel())
    if effective.numel() == 0 or k_sel == 0:
        idx = torch.zeros(0, dtype=torch.long)
    else:
        probs = pad_probabilities(scores[effective], priority, alpha, temperature)
        if not replacement:  # a softmax weight that underflowed to 0 is drawn last, not refused
            probs = probs.clamp(min=torch.finfo(torch.float64).tiny)
        draw = torch.multinomial(probs, k_sel, replacement=replacement, generator=generator)
        idx = effective[draw]

    def f32(x: float) -> Tensor:
        return torch.tensor(float(x), dtype=torch.float32)

    before = scores[finite]
    metrics = {
        "num_samples": f32(n),
        "num_kept": f32(effective.numel()),
        "kept_fraction": f32(effective.numel() / max(n, 1)),
        "num_requested": f32(k),
        "num_selected": f32(idx.numel()),
        "empty": f32(idx.numel() == 0),
        "unique_fraction": f32(torch.unique(idx).numel() / idx.numel() if idx.numel() else 0.0),
        "mean_abs_adv_before": f32(before.mean() if before.numel() else 0.0),
        "mean_abs_adv_after": f32(scores[idx].mean() if idx.numel() else 0.0),
    }
    return idx.to(device), metrics


# --------------------------------------------------------------------------------------------
# DAPO dynamic sampling: drop groups without reward spread, refill
# --------------------------------------------------------------------------------------------


def group_reward_spread(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per group: (labels [G], spread [G] float64, finite_count [G] long), NaN-aware.

        spread_g = max_i R_i - min_i R_i over group g's finite rewards   (NaN when it has none)

    ``labels`` are the sorted unique ``group_ids`` (``torch.unique``), on ``rewards``' device. A
    spread of 0 means every finite reward of the group agrees: all advantages are 0 and the group
    carries no gradient (DAPO, arXiv 2503.14476 Eq. 11: keep 0 < #correct < G).
    """
    _check_rewards(rewards)
    r = rewards.detach().to(torch.float64)
    inverse, n_groups = _group_index(group_ids, r.shape[0], r.device)
    labels = torch.unique(group_ids.to(r.device))
    finite = torch.isfinite(r)
    inf = torch.full((n_groups,), math.inf, dtype=torch.float64, device=r.device)
    lo = inf.scatter_reduce(0, inverse, torch.where(finite, r, math.inf), "amin")
    hi = (-inf).scatter_reduce(0, inverse, torch.where(finite, r, -math.inf), "amax")
    count = torch.zeros(n_groups, dtype=torch.long, device=r.device).index_add_(0, inverse, finite.long())
    spread = torch.where(count > 0, hi - lo, torch.full_like(lo, math.nan))
    return labels, spread, count


def degenerate_groups(
    rewards: Tensor, group_ids: Tensor, *, atol: float = 0.0, keep_singletons: bool = False
) -> tuple[Tensor, Tensor]:
    """Groups without reward spread: (labels [G], degenerate bool [G]).

    A group is degenerate when its finite rewards have spread <= ``atol`` (all equal: DAPO's all-0 /
    all-1 accuracy), or it has no finite reward, or exactly one (no baseline: grpo gives A = 0)
    unless ``keep_singletons`` (verl's ``filter_groups`` keeps one-sample groups, for n = 1).
    NaN rewards (unscorable) are ignored, so [1, NaN, 1] is degenerate and [0, NaN, 1] is not.
    ``atol`` = 0 compares exactly (verl: std > 0); raise it for continuous rewards.
    """
    if not atol >= 0:
        raise ValueError(f"atol must be >= 0, got {atol}; 0 = exact equality (DAPO's 0/1 accuracy).")
    labels, spread, count = group_reward_spread(rewards, group_ids)
    flat = (count >= 2) & (spread <= atol)
    lonely = (count == 0) | ((count == 1) & (not keep_singletons))
    return labels, flat | lonely


def keep_groups(
    rewards: Tensor, group_ids: Tensor, *, atol: float = 0.0, keep_singletons: bool = False
) -> Tensor:
    """DAPO's dynamic-sampling filter per sample: bool [B], True = its group has reward spread.

    ``rewards[keep]`` keeps whole groups; see :func:`degenerate_groups` for the rule. DAPO
    (arXiv 2503.14476 Eq. 11, "0 < |{o_i : is_equivalent(a, o_i)}| < G"); verl ``filter_groups``
    (metric std > 0). EasyR1's ``online_filtering`` (group mean accuracy in [0.01, 0.99]) is the same
    for 0/1 rewards.
    """
    _, degenerate = degenerate_groups(rewards, group_ids, atol=atol, keep_singletons=keep_singletons)
    inverse, _ = _group_index(group_ids, rewards.shape[0], rewards.device)
    return ~degenerate[inverse]


class DynamicSampler:
    """DAPO dynamic sampling across generation rounds: oversample, drop degenerate groups, refill.

    A trainer calls, round by round, after scoring each generated batch::

        sampler = DynamicSampler(target_groups=512, max_rounds=3)
        while True:
            batch = generate(); rewards = score(batch)
            buffer.append(batch)
            if sampler.add(None, rewards, group_ids):   # -> done?
                break
        train_on(buffer[sampler.selected()])          # indices into the rounds' concatenation

    Each round, whole groups with reward spread (:func:`keep_groups`) are kept in the order of their
    first sample in the batch; ``add`` returns True once ``target_groups`` groups are kept
    (``reached_target``) or ``max_rounds`` rounds were added (None = no cap, verl
    ``max_num_gen_batches = 0``). ``selected()`` returns the batch indices of the first
    ``target_groups`` kept groups, in arrival order (verl truncates the surplus the same way); when
    the cap is hit first it returns what was kept (verl raises then; check ``reached_target``).
    Group labels are per round: round 2 may reuse round 1's labels. ``batch_indices`` [B] (unique
    over all rounds) name the samples for ``selected``; None means positions in the concatenation
    of all rounds' batches (round r's sample j is sum of earlier batch sizes + j).
    DAPO (arXiv 2503.14476 Sec. 3.2, Alg. 1); verl ``recipe/dapo`` ``filter_groups``.
    """

    def __init__(
        self,
        target_groups: int,
        max_rounds: int | None = None,
        *,
        atol: float = 0.0,
        keep_singletons: bool = False,
    ) -> None:
        if not isinstance(target_groups, int) or target_groups < 1:
            raise ValueError(
                f"target_groups must be an int >= 1 (prompts per training batch), got {target_groups!r}."
            )
        if max_rounds is not None and (not isinstance(max_rounds, int) or max_rounds < 1):
            raise ValueError(
                f"max_rounds must be an int >= 1 or None (no cap), got {max_rounds!r}; verl's max_num_gen_batches "
                "<= 0 means None here."
            )
        self.target_groups = target_groups
        self.max_rounds = max_rounds
        self.atol = float(atol)
        self.keep_singletons = bool(keep_singletons)
        self.reset()

    def reset(self) -> None:
        """Forget every round (call at the start of each training step)."""
        self._groups: list[Tensor] = []  # kept groups' batch indices, arrival order
        self._seen: list[Tensor] = []
        self._offset = 0
        self.rounds = 0
        self.groups_seen = 0

    @property
    def num_groups(self) -> int:
        """Kept groups so far (may exceed ``target_groups`` before ``selected`` truncates)."""
        return len(self._groups)

    @property
    def reached_target(self) -> bool:
        return self.num_groups >= self.target_groups

    @property
    def done(self) -> bool:
        return self.reached_target or (self.max_rounds is not None and self.rounds >= self.max_rounds)

    def add(self, batch_indices: Tensor | None, rewards: Tensor, group_ids: Tensor) -> bool:
        """Add one scored round; returns ``done``. ``rewards``, ``group_ids``, ``batch_indices`` [B]."""
        if self.done:
            raise RuntimeError(
                f"DynamicSampler is done ({self.num_groups} groups kept, {self.rounds} rounds); read selected() "
                "and call reset() before the next training step."
            )
        b = rewards.shape[0] if rewards.dim() == 1 else -1
        keep = keep_groups(rewards, group_ids, atol=self.atol, keep_singletons=self.keep_singletons).cpu()
        if batch_indices is None:
            idx = torch.arange(self._offset, self._offset + b, dtype=torch.long)
        else:
            idx = batch_indices.detach().cpu()
            if idx.shape != (b,) or idx.is_floating_point() or idx.dtype == torch.bool:
                raise ValueError(
                    f"batch_indices must be an integer tensor [B] = ({b},), got shape {tuple(idx.shape)} and dtype "
                    f"{idx.dtype}; or pass None for positions in the concatenation of all rounds."
                )
            idx = idx.long()
        seen = torch.cat([idx.new_zeros(0), *self._seen])
        if torch.unique(idx).numel() != b or bool(torch.isin(idx, seen).any()):
            raise ValueError(
                "batch_indices repeat an index (within this round or from an earlier one); they must name each "
                "sample once over all rounds: pass None in every round (offsets into the concatenated rounds) "
                "or your own unique ids in every round, not a mix."
            )
        self._seen.append(idx)
        self._offset += b
        inverse, n_groups = _group_index(group_ids, b, torch.device("cpu"))
        first = torch.full((n_groups,), b, dtype=torch.long).scatter_reduce(
            0, inverse, torch.arange(b), "amin"
        )
        for g in torch.argsort(first).tolist():  # groups in order of their first sample
            members = inverse == g
            if bool(keep[members].all()):
                self._groups.append(idx[members])
        self.rounds += 1
        self.groups_seen += n_groups
        return self.done

    def selected(self) -> Tensor:
        """Batch indices (long, CPU) of the first ``target_groups`` kept groups, arrival order."""
        chosen = self._groups[: self.target_groups]
        return torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long)

    def metrics(self) -> dict[str, float]:
        """``rounds``, ``groups_seen``, ``groups_kept``, ``kept_fraction`` (kept / seen), ``reached_target``."""
        return {
            "rounds": float(self.rounds),
            "groups_seen": float(self.groups_seen),
            "groups_kept": float(self.num_groups),
            "kept_fraction": self.num_groups / max(self.groups_seen, 1),
            "reached_target": float(self.reached_target),
        }


# --------------------------------------------------------------------------------------------
# Entropy-bonus coefficient schedules (the loss is ... - c * H̄)
# --------------------------------------------------------------------------------------------


def _entropy_value(entropy: float | Tensor | None, kind: str) -> float:
    if entropy is None:
        raise ValueError(
            f"the {kind} entropy schedule needs the step's entropy; pass the token-mean entropy "
            "(e.g. grpo_loss(...)[1]['entropy'])."
        )
    e = float(entropy.detach().reshape(()).item()) if isinstance(entropy, Tensor) else float(entropy)
    if not math.isfinite(e):
        raise ValueError(
            f"entropy must be finite, got {e}; pass the token-mean entropy over counted tokens (grpo_loss's "
            "metrics['entropy'] is 0, not NaN, on an empty batch)."
        )
    return e


class _EntropySchedule:
    """Shared step counter and state handling; subclasses define ``kind``, ``value``, ``_advance``."""

    kind = ""

    def __init__(self) -> None:
        self.steps = 0  # optimizer steps taken (calls to step)

    def value(self, entropy: float | Tensor | None = None) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self, entropy: float | Tensor | None = None) -> None:
        """Advance after an optimizer step (``entropy``: that step's token-mean entropy)."""
        self._advance(entropy)
        self.steps += 1

    def _advance(self, entropy: float | Tensor | None) -> None:
        pass

    def _config(self) -> dict:
        return {}

    def _state(self) -> dict:
        return {}

    def _load(self, state: dict) -> None:
        pass

    def state_dict(self) -> dict:
        """JSON-serialisable: ``kind``, ``steps``, the state, and the config (informative)."""
        return {"kind": self.kind, "steps": self.steps, **self._state(), "config": self._config()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output; the config is this object's (the constructor wins)."""
        if state.get("kind") != self.kind or "steps" not in state:
            raise ValueError(
                f"entropy-schedule state has kind {state.get('kind')!r} (keys {sorted(state)}); this schedule is "
                f"{self.kind!r}: construct the matching schedule (make_entropy_schedule(state['kind'], ...))."
            )
        self.steps = int(state["steps"])
        self._load(state)


class ConstantEntropyCoef(_EntropySchedule):
    """c_k = c for every step (TRL / verl ``entropy_coeff``; LUFFY 1e-3)."""

    kind = "constant"

    def __init__(self, coef: float = 0.0) -> None:
        super().__init__()
        if not math.isfinite(coef):
            raise ValueError(f"coef must be finite, got {coef}.")
        self.coef = float(coef)

    def value(self, entropy: float | Tensor | None = None) -> float:
        """The coefficient of this step's entropy bonus (``entropy`` unused)."""
        return self.coef

    def _config(self) -> dict:
        return {"coef": self.coef}


class ExponentialEntropyCoef(_EntropySchedule):
    """ReVisual-R1's decaying entropy bonus: 0 during warm-up, then init * decay^n floored at c_min.

        c_k = 0                                               k < W
        c_k = max(c_min, init * decay^(k - W))                k >= W      (k = optimizer steps taken)

    ReVisual-R1 (arXiv 2506.04207; CSfufu/Revisual-R1 ``dp_actor._anneal_entropy_coef``,
    ``examples/main.sh``): init 0.02, decay 0.985, c_min 0, warm-up 20 (config) / 140 (paper).
    The released code sets init on the update after the warm-up's last, so its coefficient is 0
    for updates 0..W and init * decay^(k - W - 1) after: ``warmup_steps = W + 1`` here reproduces
    it exactly. Its entropy is the sampled-token estimate -mean(log pi), not the full-vocabulary H.
    """

    kind = "exponential"

    def __init__(
        self, init: float = 0.02, decay: float = 0.985, minimum: float = 0.0, warmup_steps: int = 0
    ) -> None:
        super().__init__()
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}; ReVisual-R1 uses 0.985 per step.")
        if not 0 <= minimum <= init:
            raise ValueError(
                f"need 0 <= minimum <= init, got minimum={minimum}, init={init}; ReVisual-R1: 0 and 0.02."
            )
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}.")
        self.init, self.decay, self.minimum, self.warmup_steps = (
            float(init),
            float(decay),
            float(minimum),
            warmup_steps,
        )

    def value(self, entropy: float | Tensor | None = None) -> float:
        """The coefficient of this step's entropy bonus (``entropy`` unused)."""
        if self.steps < self.warmup_steps:
            return 0.0
        return max(self.minimum, self.init * self.decay ** (self.steps - self.warmup_steps))

    def _config(self) -> dict:
        return {
            "init": self.init,
            "decay": self.decay,
            "minimum": self.minimum,
            "warmup_steps": self.warmup_steps,
        }


class AdaptiveEntropyCoef(_EntropySchedule):
    """Skywork-OR1 adaptive entropy control: move c toward the entropy target by +-delta, clamped.

        c_{k+1} = clamp(c_k + delta, c_min, c_max)   if e_k < target
                  clamp(c_k - delta, c_min, c_max)   if e_k > target   (unchanged if e_k = target)
        alpha_k = c_k * 1{e_k <= target}              (``gate``: the bonus is on only below the target)

    e_k is step k's token-mean entropy; ``value(e_k)`` is the coefficient for step k's loss and
    ``step(e_k)`` the update after it. Skywork-OR1 (He et al. 2025, arXiv 2505.22312, Sec. 3.2
    "adaptive entropy control"); defaults from SkyworkAI/Skywork-OR1 ``or1_scripts/train/7b_8k.sh``:
    target 0.2, c_0 0, delta 1e-4, c_min 0, c_max 0.005. ``gate=False`` uses c_k itself.
    """

    kind = "adaptive"

    def __init__(
        self,
        target: float = 0.2,
        init: float = 0.0,
        delta: float = 1e-4,
        c_min: float = 0.0,
        c_max: float = 0.005,
        gate: bool = True,
    ) -> None:
        super().__init__()
        if not (math.isfinite(target) and delta > 0 and 0 <= c_min <= c_max and c_min <= init <= c_max):
            raise ValueError(
                f"need a finite target, delta > 0 and 0 <= c_min <= init <= c_max, got target={target}, delta={delta}, "
                f"c_min={c_min}, init={init}, c_max={c_max}; Skywork-OR1 uses 0.2, 1e-4, 0, 0, 0.005."
            )
        self.target, self.delta, self.c_min, self.c_max = (
            float(target),
            float(delta),
            float(c_min),
            float(c_max),
        )
        self.init, self.gate = float(init), bool(gate)
        self.coef = self.init

    def value(self, entropy: float | Tensor | None = None) -> float:
        """alpha_k for this step's loss; with ``gate`` it needs this step's entropy e_k."""
        if not self.gate:
            return self.coef
        return self.coef if _entropy_value(entropy, self.kind) <= self.target else 0.0

    def _advance(self, entropy: float | Tensor | None) -> None:
        e = _entropy_value(entropy, self.kind)
        if e != self.target:
            c = self.coef + (self.delta if e < self.target else -self.delta)
            self.coef = min(self.c_max, max(self.c_min, c))

    def _config(self) -> dict:
        return {
            "target": self.target,
            "init": self.init,
            "delta": self.delta,
            "c_min": self.c_min,
            "c_max": self.c_max,
            "gate": self.gate,
        }

    def _state(self) -> dict:
        return {"coef": self.coef}

    def _load(self, state: dict) -> None:
        if "coef" not in state:
            raise ValueError(
                "adaptive entropy-schedule state has no 'coef'; pass AdaptiveEntropyCoef.state_dict()."
            )
        self.coef = min(self.c_max, max(self.c_min, float(state["coef"])))


_SCHEDULE_CLASSES = {
    "constant": ConstantEntropyCoef,
    "exponential": ExponentialEntropyCoef,
    "adaptive": AdaptiveEntropyCoef,
}


def make_entropy_schedule(kind: str, **kwargs: float | int | bool) -> _EntropySchedule:
    """Build a schedule from a config name: ``constant`` (coef), ``exponential`` (init, decay, minimum,
    warmup_steps) or ``adaptive`` (target, init, delta, c_min, c_max, gate)."""
    _choice("entropy schedule", kind, ENTROPY_SCHEDULES)
    try:
        return _SCHEDULE_CLASSES[kind](**kwargs)
    except TypeError as err:
        raise ValueError(
            f"bad arguments for the {kind!r} entropy schedule: {err}; see its docstring."
        ) from None
