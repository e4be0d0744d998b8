"""Tests for the LLM loss family of diffusion_rl.core.grpo: advantages (group / batch / none, RLOO,
singletons, multi-reward), token / sequence / GSPO-token ratios, clip-higher and dual clip, KL,
entropy, the grpo / bnpo / dapo / dr_grpo aggregations, length helpers, and parity with TRL's
GRPOTrainer loss code.

Expected numbers are worked out by hand in comments and written literally (or as the arithmetic in
the comment). E = 1e-4 is TRL's std epsilon.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from _numeric import NAN, close

from diffusion_rl.core.grpo import (
    AGGREGATION_ALIASES,
    AGGREGATIONS,
    TRL_ADV_EPS,
    aggregate,
    clipped_surrogate,
    completion_length_metrics,
    frac_reward_zero_std,
    group_advantages,
    grpo_loss,
    importance_ratio,
    mask_truncated_completions,
    multi_reward_advantages,
    policy_loss,
    soft_overlong_penalty,
)

E = TRL_ADV_EPS
assert E == 1e-4


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------

# group 0: [1, 2, 6] -> mu 3, dev [-2, -1, 3], sum dev^2 14, unbiased sigma sqrt(7)
# group 5: [0, 0, 3, NaN] -> finite [0, 0, 3]: mu 1, dev [-1, -1, 2], sum dev^2 6, sigma sqrt(3)
# batch (finite): [1, 2, 6, 0, 0, 3] -> mean 2, sum (x - 2)^2 = 1 + 0 + 16 + 4 + 4 + 1 = 26, sigma sqrt(26/5)
R = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0, NAN])
G = torch.tensor([0, 0, 0, 5, 5, 5, 5])
DEV = [-2.0, -1.0, 3.0, -1.0, -1.0, 2.0, 0.0]


def test_group_advantages_scale_group_batch_none_unbiased():
    s0, s5 = math.sqrt(7), math.sqrt(3)
    adv = group_advantages(R, G, eps=E, unbiased=True, scale="group")
    close(adv, [-2 / (s0 + E), -1 / (s0 + E), 3 / (s0 + E), -1 / (s5 + E), -1 / (s5 + E), 2 / (s5 + E), 0.0])
    assert adv[6].item() == 0.0 and adv.dtype == torch.float32

    sb = math.sqrt(26 / 5)  # Lite-PPO / TRL "batch": group mean, batch std of the raw rewards
    close(group_advantages(R, G, eps=E, unbiased=True, scale="batch"), [d / (sb + E) for d in DEV])

    # Dr.GRPO: no std division, eps unused
    close(group_advantages(R, G, eps=E, unbiased=True, scale="none"), DEV, atol=0)

    # population std (the function's original default): sigma sqrt(14/3), sqrt(6/3)
    p0, p5 = math.sqrt(14 / 3), math.sqrt(2)
    close(
        group_advantages(R, G, eps=E, scale="group"),
        [-2 / (p0 + E), -1 / (p0 + E), 3 / (p0 + E), -1 / (p5 + E), -1 / (p5 + E), 2 / (p5 + E), 0.0],
    )


def test_group_advantages_rloo_baseline():
    # group 0: b = [(2+6)/2, (1+6)/2, (1+2)/2] = [4, 3.5, 1.5] -> A = [-3, -1.5, 4.5] = 3/2 * dev
    # group 5 (finite [0, 0, 3]): b = [1.5, 1.5, 0] -> A = [-1.5, -1.5, 3]; the NaN row -> 0
    rloo = [-3.0, -1.5, 4.5, -1.5, -1.5, 3.0, 0.0]
    close(group_advantages(R, G, scale="none", baseline="rloo"), rloo, atol=0)
    s0, s5 = math.sqrt(7), math.sqrt(3)
    close(
        group_advantages(R, G, eps=E, unbiased=True, scale="group", baseline="rloo"),
        [a / (s + E) for a, s in zip(rloo, [s0] * 3 + [s5] * 4, strict=True)],
    )


def test_group_advantages_singleton_conventions():
    # group 0: [5] and group 1: [NaN, 4] each have one finite reward (singletons); group 2: [1, 3]
    # -> mu 2, unbiased sigma sqrt(2).
    r = torch.tensor([5.0, NAN, 4.0, 1.0, 3.0])
    g = torch.tensor([0, 1, 1, 2, 2])
    s2 = math.sqrt(2)
    pair = [-1 / (s2 + E), 1 / (s2 + E)]
    # "zero" (default; TRL): a singleton gets A = 0
    close(group_advantages(r, g, eps=E, unbiased=True), [0.0, 0.0, 0.0, *pair])
    # "raw" (verl: mean 0, std 1): A = R / (1 + eps) under "group", R under "none"
    close(
        group_advantages(r, g, eps=E, unbiased=True, singleton="raw"), [5 / (1 + E), 0.0, 4 / (1 + E), *pair]
    )
    close(group_advantages(r, g, scale="none", singleton="raw"), [5.0, 0.0, 4.0, -1.0, 1.0], atol=0)
    # "raw" under "batch": batch finite [5, 4, 1, 3], mean 3.25, sum dev^2 = 3.0625 + 0.5625 + 5.0625 + 0.0625
    # = 8.75, unbiased sigma sqrt(8.75 / 3)
    sb = math.sqrt(8.75 / 3)
    close(
        group_advantages(r, g, eps=E, unbiased=True, scale="batch", singleton="raw"),
        [5 / (sb + E), 0.0, 4 / (sb + E), -1 / (sb + E), 1 / (sb + E)],
    )
    # RLOO has no leave-one-out baseline for a singleton: "zero" -> 0, "raw" -> R; group 2: b = [3, 1] -> [-2, 2]
    close(group_advantages(r, g, scale="none", baseline="rloo"), [0.0, 0.0, 0.0, -2.0, 2.0], atol=0)
    close(
        group_advantages(r, g, scale="none", baseline="rloo", singleton="raw"),
        [5.0, 0.0, 4.0, -2.0, 2.0],
        atol=0,
    )


def test_group_advantages_original_signature_explicit_eps_and_errors():
    # the positional signature (rewards, group_ids, scale_std, eps, unbiased) still means what it meant
    assert torch.equal(group_advantages(R, G, False), group_advantages(R, G, scale="none"))
    assert torch.equal(
        group_advantages(R, G, True, E, True), group_advantages(R, G, eps=E, unbiased=True, scale="group")
    )
    # a group of equal rewards stays at exactly 0 for any eps > 0
    same = group_advantages(torch.tensor([0.7, 0.7, 0.7]), torch.tensor([1, 1, 1]), eps=1e-9, unbiased=True)
    close(same, [0.0, 0.0, 0.0], atol=1e-7)
    # TRL's pair [0, 1]: unbiased sigma sqrt(1/2) -> A = -+0.5 / (0.707107 + 1e-4) = -+0.707007
    close(
        group_advantages(torch.tensor([0.0, 1.0]), torch.tensor([0, 0]), eps=E, unbiased=True),
        [-0.707007, 0.707007],
    )
    # no silent clamp: a large advantage stays large
    big = group_advantages(
        torch.tensor([0.0] * 99 + [1.0]), torch.zeros(100, dtype=torch.long), eps=E, unbiased=True
    )
    # mu 0.01, sum dev^2 = 99 * 0.01^2 + 0.99^2 = 0.99, sigma sqrt(0.99 / 99) = 0.1 -> A = 0.99 / (0.1 + E), not 5
    close(big[-1], 0.99 / (0.1 + E), atol=1e-5)

    with pytest.raises(ValueError, match=r"scale_std=False .* contradicts scale='group'"):
        group_advantages(R, G, scale_std=False, scale="group")
    with pytest.raises(ValueError, match="unknown scale 'std'"):
        group_advantages(R, G, scale="std")
    with pytest.raises(ValueError, match="unknown baseline 'loo'"):
        group_advantages(R, G, baseline="loo")
    with pytest.raises(ValueError, match="unknown singleton 'one'"):
        group_advantages(R, G, singleton="one")
    with pytest.raises(ValueError, match="eps must be > 0"):
        group_advantages(R, G, eps=0.0)
    group_advantages(R, G, eps=0.0, scale="none")  # no std division: eps unused


def test_multi_reward_sum_then_normalize_and_normalize_then_sum():
    # 5 samples, groups [0, 0, 1, 1, 1], rewards (K = 2), weights [1, 0.5]; the last row is unscorable.
    r = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 4.0], [1.0, 0.0], [NAN, NAN]])
    g = torch.tensor([0, 0, 1, 1, 1])
    w = [1.0, 0.5]
    # sum_then_normalize: R = [1, 1, 3, 1, NaN]; group 0 [1, 1] -> 0, 0; group 1 finite [3, 1] -> mu 2,
    # sigma sqrt(2) -> +-1 / (sqrt(2) + E); the unscorable row -> 0
    c = 1 / (math.sqrt(2) + E)
    close(multi_reward_advantages(r, g, w, eps=E), [0.0, 0.0, c, -c, 0.0])
    # normalize_then_sum (GDPO): per reward and group
    #   Z1: group 0 [1, 0] -> +-0.5 / (sqrt(0.5) + E) = +-a;  group 1 [1, 1] -> 0, 0
    #   Z2: group 0 [0, 2] -> -+1 / (sqrt(2) + E) = -+c;     group 1 [4, 0] -> +-2 / (sqrt(8) + E) = +-d
    #   S = Z1 + 0.5 Z2 = [a - c/2, -a + c/2, d/2, -d/2, NaN]; batch mean 0, unbiased sigma
    #   sqrt((2 (a - c/2)^2 + 2 (d/2)^2) / 3); A = S / (sigma + E)
    a = 0.5 / (math.sqrt(0.5) + E)
    d = 2 / (math.sqrt(8) + E)
    s = [a - c / 2, -a + c / 2, d / 2, -d / 2]
    sig = math.sqrt(sum(v * v for v in s) / 3)
    close(
        multi_reward_advantages(r, g, w, mode="normalize_then_sum", eps=E), [v / (sig + E) for v in s] + [0.0]
    )
    # one NaN column of a row counts 0 in the nansum (TRL): R = [3, 2] -> mu 2.5, sigma sqrt(0.5)
    half = 0.5 / (math.sqrt(0.5) + E)
    close(
        multi_reward_advantages(torch.tensor([[3.0, NAN], [0.0, 2.0]]), torch.tensor([0, 0]), eps=E),
        [half, -half],
    )
    # the Dr.GRPO variant of the sum
    close(multi_reward_advantages(r, g, w, eps=E, scale="none"), [0.0, 0.0, 1.0, -1.0, 0.0], atol=0)

    with pytest.raises(ValueError, match="weights has shape"):
        multi_reward_advantages(r, g, [1.0], eps=E)
    with pytest.raises(ValueError, match="unknown mode"):
        multi_reward_advantages(r, g, mode="gdpo", eps=E)
    with pytest.raises(ValueError, match="do not apply"):
        multi_reward_advantages(r, g, mode="normalize_then_sum", eps=E, scale="none")
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        multi_reward_advantages(r[:, 0], g, eps=E)


def test_frac_reward_zero_std():
    # groups: [1, 1] zero std (2 samples); [1, 2] not; [3, NaN] one finite reward: not counted (TRL) -> 2 / 6
    r = torch.tensor([1.0, 1.0, 1.0, 2.0, 3.0, NAN])
    frac = frac_reward_zero_std(r, torch.tensor([0, 0, 1, 1, 2, 2]))
    close(frac, 2 / 6)
    assert frac.dim() == 0 and frac.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Ratios
# ---------------------------------------------------------------------------------------------


def test_importance_ratio_levels_values_and_gradients():
    # log pi_theta - log pi_old = [[0.1, 0.3, (masked garbage)], [-0.2, 0.0, 0.5]]
    # sequence: row 0 mean (0.1 + 0.3)/2 = 0.2, row 1 (-0.2 + 0 + 0.5)/3 = 0.1
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    old = torch.zeros(2, 3)
    new = torch.tensor([[0.1, 0.3, NAN], [-0.2, 0.0, 0.5]])
    e = math.exp
    expected_value = {
        "token": [[e(0.1), e(0.3), 1.0], [e(-0.2), 1.0, e(0.5)]],
        "sequence": [[e(0.2)] * 3, [e(0.1)] * 3],
        "sequence_token": [[e(0.2)] * 3, [e(0.1)] * 3],
    }
    # gradient of one copy per sequence (t = 0):
    #   token:          d r_{i,0} / d logp_{i,0} = r_{i,0}, other tokens 0
    #   sequence:       d s_i / d logp_{i,t} = s_i / L_i on every counted t
    #   sequence_token: d s_{i,0} / d logp_{i,0} = s_i, other tokens 0
    for level, value in expected_value.items():
        x = new.clone().requires_grad_(True)
        ratio = importance_ratio(x, old, mask, level=level)
        close(ratio, value)
        ratio[:, 0].sum().backward()  # one copy per sequence
        g = x.grad
        if level == "token":
            close(g, [[e(0.1), 0.0, 0.0], [e(-0.2), 0.0, 0.0]])
        elif level == "sequence":
            close(g, [[e(0.2) / 2, e(0.2) / 2, 0.0], [e(0.1) / 3] * 3])
        else:
            close(g, [[e(0.2), 0.0, 0.0], [e(0.1), 0.0, 0.0]])
    # log-ratio clamped to +-20 before exp
    huge = importance_ratio(torch.tensor([[50.0, -50.0]]), torch.zeros(1, 2))
    close(huge * torch.tensor([math.exp(-20.0), math.exp(20.0)]), [[1.0, 1.0]])
    assert torch.isfinite(huge).all()
    # on policy: logp_old None -> ratio 1, gradient flows
    close(importance_ratio(new[1:], None), [[1.0, 1.0, 1.0]], atol=0)
    with pytest.raises(ValueError, match="unknown ratio_level 'seq'"):
        importance_ratio(new, old, level="seq")


# ---------------------------------------------------------------------------------------------
# Surrogates: clip-higher, dual clip
# ---------------------------------------------------------------------------------------------


def _one_row_loss(ratios, adv, **kw):
    """grpo_loss on a single sequence of the given token ratios (logp_old = 0), bnpo (mean over T)."""
    x = torch.tensor([ratios]).log().requires_grad_(True)
    loss, m = grpo_loss(x, torch.zeros_like(x), torch.tensor([adv]), aggregation="bnpo", **kw)
    loss.backward()
    return loss, x.grad[0], m


def test_clip_higher_branches_values_gradients_and_metrics():
    # eps_low 0.2, eps_high 0.28 -> [0.8, 1.28]; ratios [0.7, 0.9, 1.2, 1.35]; d l / d logp = (d l / d r) * r
    r = [0.7, 0.9, 1.2, 1.35]
    # A = +1: l = -min(r, clip r) = -[0.7, 0.9, 1.2, 1.28]; 1.35 is clipped (gradient 0); 0.7 is not
    # (the pessimistic branch is the unclipped one) -> gradient -r / 4
    loss, g, m = _one_row_loss(r, 1.0, clip_low=0.2, clip_high=0.28)
    close(loss, -(0.7 + 0.9 + 1.2 + 1.28) / 4)
    close(g, [-0.7 / 4, -0.9 / 4, -1.2 / 4, 0.0])
    close(m["clip_ratio_high"], 0.25)  # 1.35 with A > 0
    close(m["clip_ratio_low"], 0.0)  # 0.7 is below the range but A > 0: still has a gradient
    close(m["clip_ratio_region"], 0.25)
    close(m["clipfrac"], 0.5)  # outside the range, any A
    # A = -1: l = max(r, clip r) = [0.8, 0.9, 1.2, 1.35]; 0.7 is clipped (gradient 0)
    loss, g, m = _one_row_loss(r, -1.0, clip_low=0.2, clip_high=0.28)
    close(loss, (0.8 + 0.9 + 1.2 + 1.35) / 4)
    close(g, [0.0, 0.9 / 4, 1.2 / 4, 1.35 / 4])
    close(m["clip_ratio_low"], 0.25)
    close(m["clip_ratio_high"], 0.0)
    close(m["clip_ratio_region"], 0.25)
    # clip_high defaults to clip_low: 1.25 is outside [0.8, 1.2]
    _, g, m = _one_row_loss([1.25], 1.0, clip_low=0.2)
    close(g, [0.0])
    close(m["clip_ratio_high"], 1.0)


def test_dual_clip_branch():
    # A = -1, ratios [0.5, 1, 2, 4], eps 0.2, c = 3:
    #   max(-A r, -A clip r) = max(r, clip r) = [0.8, 1.0, 2.0, 4.0] -> min(., -c A = 3) = [0.8, 1.0, 2.0, 3.0]
    #   gradients / 4: r = 0.5 clipped (0), r = 1 -> 1, r = 2 -> 2, r = 4 capped by the dual clip (0)
    r = [0.5, 1.0, 2.0, 4.0]
    loss, g, m = _one_row_loss(r, -1.0, clip_low=0.2, dual_clip=3.0)
    close(loss, (0.8 + 1.0 + 2.0 + 3.0) / 4)
    close(g, [0.0, 1.0 / 4, 2.0 / 4, 0.0])
    close(m["clip_ratio_dual"], 0.25)
    close(m["clip_ratio_low"], 0.25)
    loss_plain, g_plain, m_plain = _one_row_loss(r, -1.0, clip_low=0.2)
    close(loss_plain, (0.8 + 1.0 + 2.0 + 4.0) / 4)
    close(g_plain, [0.0, 1.0 / 4, 2.0 / 4, 4.0 / 4])
    assert "clip_ratio_dual" not in m_plain
    # A > 0 is untouched: -min(r, clip r) = -[0.5, 1.0, 1.2, 1.2]
    loss_pos, _, m_pos = _one_row_loss(r, 1.0, clip_low=0.2, dual_clip=3.0)
    close(loss_pos, -(0.5 + 1.0 + 1.2 + 1.2) / 4)
    close(m_pos["clip_ratio_dual"], 0.0)
    # the bound itself: every element's loss <= -c A, elementwise and broadcast over [B, T] x [B, 1]
    ratio = torch.tensor([[0.5, 10.0], [4.0, 0.1]])
    adv = torch.tensor([[-2.0], [1.0]])
    per = clipped_surrogate(ratio, adv, 0.2, 0.28, dual_clip=3.0)
    close(per, [[2 * 0.8, 2 * 3.0], [-1.28, -0.1]])
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        clipped_surrogate(ratio, adv, 0.2, 0.2, dual_clip=1.0)


# ---------------------------------------------------------------------------------------------
# KL and entropy terms
# ---------------------------------------------------------------------------------------------


def test_kl_term_in_the_loss_with_beta():
    # on policy, A = 0 -> surrogate 0. x = logp_ref - logp_new = [-0.5, 1.0]
    #   k1 = -x = [0.5, -1.0]: mean -0.25;  k2 = x^2/2 = [0.125, 0.5]: mean 0.3125
    #   k3 = e^x - 1 - x = [e^-0.5 - 0.5, e - 2] = [0.106531, 0.718282]: mean 0.412406
    lp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    k3 = (math.exp(-0.5) - 0.5 + math.e - 2) / 2
    for est, value in {"k1": -0.25, "k2": 0.3125, "k3": k3}.items():
        loss, m = grpo_loss(
            lp, None, torch.zeros(1), aggregation="bnpo", logp_ref=ref, beta=0.1, kl_estimator=est
        )
        close(loss, 0.1 * value)
        close(m["kl"], value)
        close(m["kl_loss"], value)
        close(m["policy_loss"], 0.0, atol=0)
    # dapo with a global count of 4: the loss term is sum / 4, the `kl` metric stays the token mean (TRL's)
    loss, m = grpo_loss(lp, None, torch.zeros(1), num_items_in_batch=4, logp_ref=ref, beta=0.1)
    close(m["kl_loss"], 2 * k3 / 4)
    close(m["kl"], k3)
    close(loss, 0.1 * 2 * k3 / 4)
    with pytest.raises(ValueError, match="beta=0.1 but logp_ref is None"):
        grpo_loss(lp, None, torch.zeros(1), aggregation="bnpo", beta=0.1)


def test_entropy_bonus_is_a_token_mean_whatever_the_aggregation():
    # H = [[1, 2, (masked NaN)], [0.5, 0.5, 0.5]] -> H̄ = (1 + 2 + 1.5) / 5 = 0.9; coefficient 0.01
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    lp = torch.zeros(2, 3)
    for agg, kw in [
        ("bnpo", {}),
        ("grpo", {}),
        ("dapo", {"num_items_in_batch": 100}),
        ("dr_grpo", {"max_completion_length": 8}),
    ]:
        h = torch.tensor([[1.0, 2.0, NAN], [0.5, 0.5, 0.5]]).requires_grad_(True)
        loss, m = grpo_loss(
            lp, None, torch.zeros(2), mask, aggregation=agg, entropy=h, entropy_coef=0.01, **kw
        )
        close(loss, -0.01 * 0.9)
        close(m["entropy"], 0.9)
        loss.backward()
        close(h.grad, [[-0.01 / 5, -0.01 / 5, 0.0], [-0.01 / 5] * 3])
    with pytest.raises(ValueError, match="entropy_coef=0.01 but entropy is None"):
        grpo_loss(lp, None, torch.zeros(2), mask, aggregation="bnpo", entropy_coef=0.01)
    with pytest.raises(ValueError, match=r"entropy has shape \(2, 2\)"):
        grpo_loss(lp, None, torch.zeros(2), mask, aggregation="bnpo", entropy=torch.zeros(2, 2))


# ---------------------------------------------------------------------------------------------
# Aggregation: grpo / bnpo / dapo / dr_grpo, and the diffusion names
# ---------------------------------------------------------------------------------------------


def test_length_bias_per_token_weights_dapo_vs_grpo():
    """A short (1 token) and a long (3 tokens) sequence with the same advantage A = 1, on policy.

    l = -A = -1 per token, so d loss / d logp_t = -A * w_t with w_t the per-token weight:
        grpo     1 / (B L_i):      short 1/2, long 1/6 each   (short answers weigh 3x more per token)
        bnpo     1 / N_local = 1/4 each
        dapo     1 / N_global, N_global = 8 (this micro-batch is half the step): 1/8 each
        dr_grpo  1 / (B L_max), L_max = 4: 1/8 each
    """
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([1.0, 1.0])
    cases = {
        "grpo": ({}, -1.0, [[1 / 2, 0, 0], [1 / 6] * 3]),
        "bnpo": ({}, -1.0, [[1 / 4, 0, 0], [1 / 4] * 3]),
        "dapo": ({"num_items_in_batch": 8}, -0.5, [[1 / 8, 0, 0], [1 / 8] * 3]),
        "dr_grpo": ({"max_completion_length": 4}, -0.5, [[1 / 8, 0, 0], [1 / 8] * 3]),
    }
    for agg, (kw, value, weights) in cases.items():
        x = torch.zeros(2, 3, requires_grad=True)
        loss, _ = grpo_loss(x, None, adv, mask, aggregation=agg, **kw)
        close(loss, value)
        loss.backward()
        close(x.grad, [[-w for w in row] for row in weights])


def test_diffusion_aggregation_names_are_the_llm_reductions():
    torch.manual_seed(0)
    v = torch.randn(3, 4)
    m = (torch.rand(3, 4) > 0.3).float()
    assert torch.equal(aggregate(v, m, "token_mean"), aggregate(v, m, "bnpo"))
    assert torch.equal(aggregate(v, m, "seq_mean"), aggregate(v, m, "grpo"))
    assert torch.equal(aggregate(v, m, "constant", 6.0), aggregate(v, m, "dapo", num_items_in_batch=6.0))
    assert torch.equal(aggregate(v, m, "constant", 12.0), aggregate(v, m, "dr_grpo", max_completion_length=4))
    assert torch.equal(
        aggregate(v, m, "dapo", num_items_in_batch=torch.tensor(6)), aggregate(v, m, "constant", 6.0)
    )
    assert AGGREGATION_ALIASES == {"token_mean": "bnpo", "seq_mean": "grpo", "constant": "dapo"}


def test_policy_loss_is_grpo_loss_with_the_aliases():
    torch.manual_seed(1)
    old = torch.randn(4, 5)
    new = old + 0.3 * torch.randn(4, 5)
    ref = old + 0.2 * torch.randn(4, 5)
    adv = torch.randn(4) * 2
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]]).bool()
    for agg in AGGREGATIONS:
        out = []
        for fn in ("policy", "grpo"):
            x = new.clone().requires_grad_(True)
            if fn == "policy":
                loss, m = policy_loss(
                    x,
                    old,
                    adv,
                    mask,
                    0.2,
                    0.28,
                    None,
                    agg,
                    20.0,
                    logp_ref=ref,
                    kl_coef=0.05,
                    kl_estimator="k2",
                )
            else:
                loss, m = grpo_loss(
                    x,
                    old,
                    adv,
                    mask,
                    clip_low=0.2,
                    clip_high=0.28,
                    aggregation=AGGREGATION_ALIASES[agg],
                    num_items_in_batch=20.0,
                    logp_ref=ref,
                    beta=0.05,
                    kl_estimator="k2",
                )
                m = {**m, "kl": m["kl_loss"]}
            loss.backward()
            out.append((loss, x.grad, m))
        (l0, g0, m0), (l1, g1, m1) = out
        assert torch.equal(l0, l1) and torch.equal(g0, g1), agg
        assert all(torch.equal(m0[k], m1[k]) for k in m0), agg


def test_dapo_over_micro_batches_equals_one_token_mean_of_the_step():
    """dapo with the step's token count: summing the micro-batch losses gives the full-batch token mean
    (same loss, same gradient); bnpo per micro-batch does not (it depends on the split)."""
    torch.manual_seed(2)
    old = torch.randn(4, 5)
    new = old + 0.3 * torch.randn(4, 5)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5])
    lengths = torch.tensor([1, 2, 5, 5])
    mask = (torch.arange(5)[None, :] < lengths[:, None]).float()
    n_global = mask.sum()  # 13

    x_full = new.clone().requires_grad_(True)
    full, _ = grpo_loss(x_full, old, adv, mask, aggregation="bnpo", clip_high=0.28)
    full.backward()

    x = new.clone().requires_grad_(True)
    dapo_total, bnpo_mean = 0.0, 0.0
    for rows in (slice(0, 2), slice(2, 4)):
        part, _ = grpo_loss(
            x[rows], old[rows], adv[rows], mask[rows], num_items_in_batch=n_global, clip_high=0.28
        )
        bnpo, _ = grpo_loss(
            x[rows].detach(), old[rows], adv[rows], mask[rows], aggregation="bnpo", clip_high=0.28
        )
        part.backward()
        dapo_total = dapo_total + part.detach()
        bnpo_mean = bnpo_mean + bnpo / 2
    close(dapo_total, full)
    close(x.grad, x_full.grad)
    assert abs(float(bnpo_mean.detach() - full.detach())) > 1e-3  # 3 tokens vs 10 tokens per micro-batch


def test_aggregation_argument_errors():
    lp = torch.zeros(2, 3)
    adv = torch.zeros(2)
    with pytest.raises(ValueError, match="aggregation='dapo' needs num_items_in_batch > 0, got None"):
        grpo_loss(lp, None, adv)
    with pytest.raises(ValueError, match="needs num_items_in_batch > 0, got 0"):
        grpo_loss(lp, None, adv, num_items_in_batch=0)
    with pytest.raises(ValueError, match="num_items_in_batch must be one number"):
        grpo_loss(lp, None, adv, num_items_in_batch=torch.ones(2))
    with pytest.raises(ValueError, match="aggregation='dr_grpo' needs max_completion_length"):
        grpo_loss(lp, None, adv, aggregation="dr_grpo")
    with pytest.raises(ValueError, match=r"max_completion_length \(2\) < T \(3\)"):
        grpo_loss(lp, None, adv, aggregation="dr_grpo", max_completion_length=2)
    with pytest.raises(ValueError, match="unknown aggregation 'token_mean'.*grpo"):
        grpo_loss(lp, None, adv, aggregation="token_mean")
    with pytest.raises(ValueError, match="unknown aggregation 'mean'"):
        aggregate(lp, lp, "mean")
    with pytest.raises(ValueError, match="unknown ratio_level 'seq'"):
        grpo_loss(lp, None, adv, aggregation="bnpo", ratio_level="seq")
    with pytest.raises(ValueError, match="advantages has shape"):
        grpo_loss(lp, None, torch.zeros(3), aggregation="bnpo")
    with pytest.raises(ValueError, match=r"logp_ref has shape \(2, 2\)"):
        grpo_loss(lp, None, adv, aggregation="bnpo", logp_ref=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="clip_low must be in"):
        grpo_loss(lp, None, adv, aggregation="bnpo", clip_low=1.0)
    # a tensor count of 0 is clamped to 1, as in TRL
    loss, _ = grpo_loss(lp, None, torch.ones(2), torch.zeros(2, 3), num_items_in_batch=torch.tensor(0.0))
    close(loss, 0.0, atol=0)


# ---------------------------------------------------------------------------------------------
# GSPO: sequence ratio and GSPO-token gradients
# ---------------------------------------------------------------------------------------------


def _gspo_inputs():
    torch.manual_seed(3)
    old = torch.randn(3, 6)
    new = old + 0.05 * torch.randn(3, 6)
    mask = (torch.arange(6)[None, :] < torch.tensor([6, 2, 4])[:, None]).float()
    adv = torch.tensor([1.5, -0.7, 0.4])
    return old, new, mask, adv


def _grad(level, aggregation, old, new, mask, adv, **kw):
    x = new.clone().requires_grad_(True)
    # clip range wide enough that nothing is clipped
    loss, _ = grpo_loss(
        x, old, adv, mask, ratio_level=level, clip_low=0.9, clip_high=10.0, aggregation=aggregation, **kw
    )
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize(
    ("aggregation", "kw"),
    [
        ("grpo", {}),
        ("bnpo", {}),
        ("dapo", {"num_items_in_batch": 30}),
        ("dr_grpo", {"max_completion_length": 8}),
    ],
)
def test_gspo_token_gradient_is_the_token_gradient_times_s_over_r(aggregation, kw):
    """GSPO-token: d l_{i,t} / d logp_t = -A s_i, token level: -A r_{i,t}; same weights -> ratio s_i / r_{i,t}."""
    old, new, mask, adv = _gspo_inputs()
    _, g_tok = _grad("token", aggregation, old, new, mask, adv, **kw)
    _, g_st = _grad("sequence_token", aggregation, old, new, mask, adv, **kw)
    d = (new - old) * mask
    s = torch.exp(d.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True))  # [B, 1]
    r = torch.exp(new - old)
    close(g_st, g_tok * s / r * mask)
    assert (g_st[mask == 0] == 0).all()


def test_gspo_sequence_and_gspo_token_agree_under_grpo_and_match_the_formula():
    """With one A per sequence and the grpo reduction, GSPO and GSPO-token have the same loss and gradient
    (GSPO paper): d loss / d logp_{i,t} = -A_i s_i / (B L_i)."""
    old, new, mask, adv = _gspo_inputs()
    l_seq, g_seq = _grad("sequence", "grpo", old, new, mask, adv)
    l_st, g_st = _grad("sequence_token", "grpo", old, new, mask, adv)
    close(l_seq, l_st)
    close(g_seq, g_st)
    L = mask.sum(-1, keepdim=True)
    s = torch.exp(((new - old) * mask).sum(-1, keepdim=True) / L)
    close(g_seq, -adv[:, None] * s / (3 * L) * mask)
    close(l_seq, (-adv * s[:, 0]).mean())


def test_gspo_clips_whole_sequences():
    # tokens' log-ratios [0, 0.6]: token ratios 1.0 (inside) and 1.822 (clipped); the sequence ratio
    # e^0.3 = 1.350 > 1.28 clips the whole sequence for A > 0 -> zero gradient on both tokens.
    # Row 1 is on policy (s = 1, unclipped): gradient -A s / (B L) = -1 / (2 * 2) per token.
    old = torch.zeros(2, 2)
    x = torch.tensor([[0.0, 0.6], [0.0, 0.0]]).requires_grad_(True)
    loss, m = grpo_loss(
        x, old, torch.tensor([1.0, 1.0]), ratio_level="sequence", clip_high=0.28, aggregation="grpo"
    )
    loss.backward()
    close(loss, (-1.28 - 1.0) / 2)
    close(x.grad, [[0.0, 0.0], [-0.25, -0.25]])
    close(m["clip_ratio_high"], 0.5)  # per sequence (TRL): 1 of 2 sequences
    close(m["ratio_max"], math.exp(0.3))
    x2 = x.detach().clone().requires_grad_(True)
    loss_tok, m_tok = grpo_loss(x2, old, torch.tensor([1.0, 1.0]), clip_high=0.28, aggregation="grpo")
    loss_tok.backward()
    close(x2.grad[0], [-0.25, 0.0])  # token level clips only the second token
    close(m_tok["clip_ratio_high"], 0.25)  # per token: 1 of 4


# ---------------------------------------------------------------------------------------------
# Robustness: masked garbage, fp16 inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["token", "sequence", "sequence_token"])
def test_grpo_loss_masked_garbage_is_harmless(level):
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    old = torch.tensor([[-1.0, -2.0, NAN], [-0.5, float("inf"), NAN]])
    x = torch.tensor([[-1.1, -1.9, NAN], [-0.4, NAN, -float("inf")]]).requires_grad_(True)
    ref = torch.tensor([[-1.0, -2.1, NAN], [-0.6, NAN, NAN]])
    h = torch.tensor([[0.5, 0.7, NAN], [0.2, NAN, NAN]]).requires_grad_(True)
    loss, m = grpo_loss(
        x, old, torch.tensor([1.0, -1.0]), mask, ratio_level=level, aggregation="grpo",
        logp_ref=ref, beta=0.1, entropy=h, entropy_coef=0.01, dual_clip=3.0,
    )  # fmt: skip
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(h.grad).all()
    assert x.grad[mask == 0].eq(0).all() and h.grad[mask == 0].eq(0).all()
    assert all(torch.isfinite(v) and not v.requires_grad and v.dim() == 0 for v in m.values())


def test_grpo_loss_fp16_inputs_computed_in_fp32():
    torch.manual_seed(4)
    old16 = (torch.randn(3, 5) * 30).half()
    new16 = (old16.float() + torch.randn(3, 5) * 1e-2).half()
    adv = torch.tensor([1.0, -2.0, 0.5]).half()
    for level in ("token", "sequence"):
        l16, m16 = grpo_loss(new16, old16, adv, ratio_level=level, aggregation="grpo", clip_low=1e-3)
        l32, m32 = grpo_loss(
            new16.float(), old16.float(), adv.float(), ratio_level=level, aggregation="grpo", clip_low=1e-3
        )
        assert l16.dtype == torch.float32 and torch.equal(l16, l32)
        assert all(m16[k].dtype == torch.float32 and torch.equal(m16[k], m32[k]) for k in m32)


# ---------------------------------------------------------------------------------------------
# Completion lengths
# ---------------------------------------------------------------------------------------------


def test_mask_truncated_completions():
    truncated = torch.tensor([False, True])
    for mask in (
        torch.tensor([[1, 1, 0], [1, 1, 1]]),
        torch.tensor([[True, True, False], [True, True, True]]),
        torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]),
    ):
        out = mask_truncated_completions(mask, truncated)
        assert out.dtype == mask.dtype
        assert out.tolist() == [[1, 1, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match="truncated must be a bool tensor"):
        mask_truncated_completions(torch.ones(2, 3), torch.tensor([0, 1]))


def test_soft_overlong_penalty_hand_values():
    # L_max 10, L_cache 4 -> free up to 6, then (6 - L) / 4, -1 beyond 10
    lengths = torch.tensor([3, 6, 7, 8, 10, 11])
    expected = [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    close(soft_overlong_penalty(lengths, 10, 4), expected, atol=0)
    close(soft_overlong_penalty(lengths, 10, 4, factor=0.5), [v / 2 for v in expected], atol=0)
    close(soft_overlong_penalty(torch.tensor([10, 11]), 10, 0), [0.0, -1.0], atol=0)  # no cache: a hard cliff
    assert soft_overlong_penalty(lengths, 10, 4).dtype == torch.float32
    with pytest.raises(ValueError, match="cache_length must be in"):
        soft_overlong_penalty(lengths, 10, 11)
    with pytest.raises(ValueError, match="max_completion_length must be > 0"):
        soft_overlong_penalty(lengths, 0, 0)
    with pytest.raises(ValueError, match="1-D real tensor"):
        soft_overlong_penalty(lengths[None], 10, 4)


def test_completion_length_metrics():
    m = completion_length_metrics(torch.tensor([3, 10, 5, 10]), torch.tensor([False, True, False, True]))
    expected = {
        "mean_length": 7.0,
        "min_length": 3.0,
        "max_length": 10.0,
        "clipped_ratio": 0.5,
        "mean_terminated_length": 4.0,
        "min_terminated_length": 3.0,
        "max_terminated_length": 5.0,
    }
    assert set(m) == set(expected)
    for k, v in expected.items():
        close(m[k], v, atol=0)
        assert m[k].dtype == torch.float32 and m[k].dim() == 0
    none_terminated = completion_length_metrics(torch.tensor([10, 10]), torch.tensor([True, True]))
    close(none_terminated["mean_terminated_length"], 0.0, atol=0)
    close(none_terminated["clipped_ratio"], 1.0, atol=0)


# ---------------------------------------------------------------------------------------------
# Parity with TRL's GRPOTrainer loss code (called on tensors, nothing reimplemented)
# ---------------------------------------------------------------------------------------------

TRL_SKIP = (
    "trl is not installed (it is in the dev extra: pip install -e '.[dev]'); the parity tests call TRL's code"
)


@pytest.fixture(scope="module")
def trl_grpo_trainer():
    module = pytest.importorskip("trl.trainer.grpo_trainer", reason=TRL_SKIP)
    return module.GRPOTrainer


class _TRLLossStub:
    """Stands in for ``self`` of TRL's ``GRPOTrainer._compute_loss``: the attributes it reads (TRL 1.16,
    one process, no gradient accumulation, no vLLM, no entropy mask, no off-policy mask), and the
    per-token log-prob / entropy provider returning the given tensors instead of running a model."""

    def __init__(
        self, loss_type, level, eps_low, eps_high, beta, max_completion_length, entropy_coef, logps, entropies
    ):
        self.loss_type = loss_type
        self.importance_sampling_level = level
        self.epsilon_low, self.epsilon_high = eps_low, eps_high
        self.beta = beta
        self.max_completion_length = max_completion_length
        self.top_entropy_quantile = 1.0
        self.off_policy_mask_threshold = None
        self.use_vllm = False
        self.vllm_importance_sampling_correction = False
        self.aux_loss_enabled = False
        self.current_gradient_accumulation_steps = 1
        self._entropy_bonus_enabled = entropy_coef != 0.0
        self.entropy_coef = entropy_coef
        self.use_adaptive_entropy = False
        self.args = SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1)
        self.model = SimpleNamespace(training=True)
        self.accelerator = SimpleNamespace(
            num_processes=1,
            sync_gradients=True,
            reduce=lambda t, reduction="sum": t,
            gather=lambda t: t,
            gather_for_metrics=lambda t: t,
        )
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._logps, self._entropies = logps, entropies

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kwargs):
        assert logits_to_keep == self._logps.shape[1]
        return self._logps, self._entropies, None


def _parity_inputs():
    torch.manual_seed(5)
    B, T = 6, 7
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # TRL's completion_mask is an int tensor
    old = -torch.rand(B, T) * 3
    # per-sequence shifts put whole sequences outside [0.8, 1.28] on both sides, with both signs of A
    # (rows 0, 4: high with A > 0; rows 1, 3: low with A < 0; row 2: low with A > 0; row 5: high with A < 0);
    # the token noise does the same for single tokens
    shift = torch.tensor([0.35, -0.4, -0.35, -0.3, 0.4, 0.35])
    new = old + shift[:, None] + 0.3 * torch.randn(B, T)
    ref = old + 0.3 * torch.randn(B, T)
    entropy = torch.rand(B, T) * 2
    adv = torch.tensor([1.2, -0.8, 0.5, -1.5, 2.0, -0.3])
    return mask, old, new, ref, entropy, adv


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize(
    ("beta", "entropy_coef", "on_policy"), [(0.0, 0.0, False), (0.04, 0.01, False), (0.04, 0.0, True)]
)
def test_parity_with_trl_compute_loss(trl_grpo_trainer, loss_type, level, beta, entropy_coef, on_policy):
    mask, old, new, ref, entropy, adv = _parity_inputs()
    B, T = mask.shape
    max_len, eps_low, eps_high = 8, 0.2, 0.28
    num_items = mask.sum().float() + 9.0  # the step's count (other micro-batches hold 9 more tokens)

    x_trl = new.clone().requires_grad_(True)
    h_trl = entropy.clone().requires_grad_(True)
    stub = _TRLLossStub(loss_type, level, eps_low, eps_high, beta, max_len, entropy_coef, x_trl, h_trl)
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": None if on_policy else old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": num_items,
    }
    loss_trl = trl_grpo_trainer._compute_loss(stub, None, inputs)
    loss_trl.backward()

    x = new.clone().requires_grad_(True)
    h = entropy.clone().requires_grad_(True)
    loss, m = grpo_loss(
        x,
        None if on_policy else old,
        adv,
        mask,
        ratio_level=level,
        clip_low=eps_low,
        clip_high=eps_high,
        aggregation=loss_type,
        num_items_in_batch=num_items,
        max_completion_length=max_len,
        logp_ref=ref if beta else None,
        beta=beta,
        entropy=h,
        entropy_coef=entropy_coef,
    )
    loss.backward()

    close(loss, loss_trl.detach())
    close(x.grad, x_trl.grad)  # the per-token loss weights and branches
    if entropy_coef:
        close(h.grad, h_trl.grad)
    trl_metrics = {k: v[0] for k, v in stub._metrics["train"].items()}
    close(m["entropy"], trl_metrics["entropy"])
    for ours, theirs in [
        ("clip_ratio_low", "low_mean"),
        ("clip_ratio_high", "high_mean"),
        ("clip_ratio_region", "region_mean"),
    ]:
        close(m[ours], trl_metrics[f"clip_ratio/{theirs}"])
    if beta:
        close(m["kl"], trl_metrics["kl"])
    if not on_policy:  # the inputs really exercise both clip sides
        assert trl_metrics["clip_ratio/low_mean"] > 0 and trl_metrics["clip_ratio/high_mean"] > 0


def test_parity_with_trl_soft_overlong_punishment():
    rewards = pytest.importorskip("trl.rewards", reason=TRL_SKIP)
    lengths = [3, 6, 7, 8, 9, 10, 11, 40]
    theirs = rewards.get_soft_overlong_punishment(max_completion_len=10, soft_punish_cache=4)(
        [[1] * n for n in lengths]
    )
    close(soft_overlong_penalty(torch.tensor(lengths), 10, 4), theirs, atol=0)
