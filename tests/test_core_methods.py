"""Tests for diffusion_rl.core.methods: LUFFY mixed-policy loss and trace slots, ReVisual-R1 PAD,
DAPO dynamic sampling, and the entropy-coefficient schedules.

Expected numbers are worked out by hand in comments. gamma = 0.1 is LUFFY's shaping constant:
f(pi) = pi / (pi + 0.1), d f / d log pi = 0.1 pi / (pi + 0.1)^2.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from _numeric import NAN, close

from diffusion_rl.core.grpo import grpo_loss
from diffusion_rl.core.methods import (
    AdaptiveEntropyCoef,
    ConstantEntropyCoef,
    DynamicSampler,
    ExponentialEntropyCoef,
    degenerate_groups,
    group_reward_spread,
    keep_groups,
    luffy_loss,
    make_entropy_schedule,
    pad_probabilities,
    pad_select,
    pad_sequence_scores,
    policy_shaping,
    replace_with_off_policy,
)

LN = math.log


# ---------------------------------------------------------------------------------------------
# LUFFY
# ---------------------------------------------------------------------------------------------


def test_policy_shaping_value_and_gradient():
    # pi = 0.4: f = 0.4 / 0.5 = 0.8, f' = 0.1 * 0.4 / 0.25 = 0.16
    # pi = 0.1: f = 0.5, f' = 0.01 / 0.04 = 0.25;   pi = 0.9: f = 0.9, f' = 0.09 / 1 = 0.09
    # pi = 1e-6: f ~ 1e-5, f' ~ 1e-5 (ten times the raw pi: low-probability tokens are up-weighted)
    lp = torch.tensor([LN(0.4), LN(0.1), LN(0.9), LN(1e-6), 50.0], requires_grad=True)
    f = policy_shaping(lp)
    close(f[:4], [0.8, 0.5, 0.9, 1e-6 / (1e-6 + 0.1)])
    assert f[4].item() == 1.0  # a log-density of 50 (pi = e^50) neither overflows nor NaNs
    f.sum().backward()
    pi = torch.tensor([0.4, 0.1, 0.9, 1e-6], dtype=torch.float64)
    close(lp.grad[:4], 0.1 * pi / (pi + 0.1) ** 2)
    close(lp.grad[:3], [0.16, 0.25, 0.09])
    assert torch.isfinite(lp.grad).all() and lp.grad[4].item() < 1e-20
    close(policy_shaping(torch.tensor([LN(0.5)]), gamma=0.5), [0.5])  # LUFFY's p_div_p_0.5 variant
    with pytest.raises(ValueError, match="gamma must be > 0"):
        policy_shaping(lp, gamma=0.0)


def _toy_luffy():
    # seq 0: on-policy, A = -1, logp_old = logp_new -> r = 1 -> l = max(1, 1) = 1 per token
    # seq 1: off-policy trace, A = 2, pi = [0.4, 0.1] -> l = -2 f = [-1.6, -1.0]; its logp_old is NaN
    lp_new = torch.tensor([[LN(0.5), LN(0.3)], [LN(0.4), LN(0.1)]], requires_grad=True)
    lp_old = torch.tensor([[LN(0.5), LN(0.3)], [NAN, NAN]])
    adv = torch.tensor([-1.0, 2.0])
    off = torch.tensor([False, True])
    return lp_new, lp_old, adv, off


def test_luffy_off_policy_tokens_value_gradient_and_metrics_by_hand():
    lp_new, lp_old, adv, off = _toy_luffy()
    loss, met = luffy_loss(lp_new, lp_old, adv, torch.ones(2, 2), off, aggregation="bnpo")
    # bnpo: (1 + 1 - 1.6 - 1.0) / 4 = -0.15
    close(loss, -0.15)
    loss.backward()
    # on tokens: d(-A r)/d logp = -A r = 1, / 4;  off tokens: -A * 0.1 pi / (pi + 0.1)^2 / 4
    close(lp_new.grad, [[0.25, 0.25], [-2 * 0.16 / 4, -2 * 0.25 / 4]])
    close(met["policy_loss"], -0.15)
    close(met["on_policy_loss"], 2 / 4)  # additive parts: 0.5 + (-0.65) = -0.15
    close(met["off_policy_loss"], -2.6 / 4)
    close(met["on_policy_token_loss"], 1.0)
    close(met["off_policy_token_loss"], -1.3)
    close(met["on_policy_tokens"], 2.0)
    close(met["off_policy_tokens"], 2.0)
    close(met["off_policy_fraction"], 0.5)
    # LUFFY's mixture: p * mean_off + (1 - p) * mean_on = 0.5 * -1.3 + 0.5 * 1 = -0.15
    close(0.5 * met["off_policy_token_loss"] + 0.5 * met["on_policy_token_loss"], met["policy_loss"])
    close(met["off_policy_prob"], (0.4 + 0.1) / 2)
    close(met["off_policy_shaped"], (0.8 + 0.5) / 2)
    close(met["on_policy_prob"], (0.5 + 0.3) / 2)
    close(met["clipfrac"], 0.0)
    close(met["ratio_mean"], 1.0)
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in met.values())


def test_luffy_without_policy_shaping_is_the_plain_ratio_pi():
    # gamma=None (the paper's no-shaping ablation): off tokens l = -A pi = -2 * [0.4, 0.1], d/d logp = -A pi
    lp_new, lp_old, adv, off = _toy_luffy()
    loss, met = luffy_loss(lp_new, lp_old, adv, torch.ones(2, 2), off, gamma=None, aggregation="bnpo")
    close(loss, (1 + 1 - 0.8 - 0.2) / 4)
    loss.backward()
    close(lp_new.grad, [[0.25, 0.25], [-2 * 0.4 / 4, -2 * 0.1 / 4]])
    close(met["off_policy_shaped"], (0.4 + 0.1) / 2)


def test_luffy_off_policy_is_unclipped():
    # A trace token at pi = 0.999 has "ratio" far outside any clip range if one were computed against
    # logp_old = log(0.001); LUFFY has no ratio there, so the loss is -A f(pi) and the gradient flows.
    lp_new = torch.tensor([[LN(0.999)]], requires_grad=True)
    loss, met = luffy_loss(
        lp_new,
        torch.tensor([[LN(0.001)]]),
        torch.tensor([1.0]),
        None,
        torch.tensor([True]),
        aggregation="bnpo",
        clip_low=0.2,
        clip_high=0.2,
    )
    close(loss, -0.999 / 1.099)
    loss.backward()
    close(lp_new.grad, [[-0.1 * 0.999 / 1.099**2]])
    close(met["clipfrac"], 0.0)  # clip metrics are over on-policy tokens: none here


AGG_KW = [
    ("grpo", {}),
    ("bnpo", {}),
    ("dapo", {"num_items_in_batch": 40.0}),
    ("dr_grpo", {"max_completion_length": 8}),
]


def _random_batch(seed: int, b: int = 4, t: int = 6):
    g = torch.Generator().manual_seed(seed)
    lp_old = -torch.rand(b, t, generator=g) * 3
    lp_new = (lp_old + 0.3 * torch.randn(b, t, generator=g)).clamp(max=0.0)
    adv = torch.randn(b, generator=g)
    mask = torch.ones(b, t)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    return lp_new, lp_old, adv, mask


@pytest.mark.parametrize("aggregation,kw", AGG_KW)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_luffy_without_off_policy_is_grpo_loss(aggregation, kw, level):
    lp_new, lp_old, adv, mask = _random_batch(0)
    a = lp_new.clone().requires_grad_(True)
    b = lp_new.clone().requires_grad_(True)
    ent = torch.rand(4, 6)
    common = dict(
        ratio_level=level,
        clip_low=0.2,
        clip_high=0.28,
        dual_clip=3.0,
        aggregation=aggregation,
        entropy=ent,
        entropy_coef=0.01,
        **kw,
    )
    ours, met = luffy_loss(a, lp_old, adv, mask, torch.zeros(4, dtype=torch.bool), **common)
    ref, ref_met = grpo_loss(b, lp_old, adv, mask, **common)
    assert torch.equal(ours, ref)
    ours.backward()
    ref.backward()
    assert torch.equal(a.grad, b.grad)
    for k, v in ref_met.items():
        close(met[k], v, atol=1e-7)
    close(met["off_policy_tokens"], 0.0)
    close(met["off_policy_loss"], 0.0)
    close(met["on_policy_loss"], met["policy_loss"])


@pytest.mark.parametrize("aggregation,kw", AGG_KW)
def test_luffy_parts_add_up_and_bnpo_is_the_token_mixture(aggregation, kw):
    lp_new, lp_old, adv, mask = _random_batch(1)
    off = torch.tensor([False, True, False, True])
    _, met = luffy_loss(lp_new, lp_old, adv, mask, off, aggregation=aggregation, **kw)
    close(met["on_policy_loss"] + met["off_policy_loss"], met["policy_loss"], atol=1e-7)
    close(met["on_policy_tokens"] + met["off_policy_tokens"], mask.sum())
    if aggregation == "bnpo":
        p = met["off_policy_fraction"]
        close(
            p * met["off_policy_token_loss"] + (1 - p) * met["on_policy_token_loss"],
            met["policy_loss"],
            atol=1e-7,
        )


def test_luffy_per_token_prefix_flags_and_masking():
    lp_new, lp_old, adv, mask = _random_batch(2)
    prefix = torch.zeros(4, 6, dtype=torch.bool)
    prefix[1, :3] = True  # seq 1: a 3-token trace prefix, then on-policy continuation
    prefix[3, :] = True  # seq 3: a whole trace
    clean_new = lp_new.clone().requires_grad_(True)
    ref, ref_met = luffy_loss(clean_new, lp_old, adv, mask, prefix, aggregation="bnpo")
    ref.backward()
    # garbage at padded positions (all inputs) and a NaN logp_old at every trace token
    dirty_new = lp_new.clone()
    dirty_new[mask == 0] = NAN
    dirty_old = lp_old.clone()
    dirty_old[mask == 0] = float("inf")
    dirty_old[prefix] = NAN
    dirty_adv = adv[:, None].expand(4, 6).clone()
    dirty_adv[mask == 0] = NAN
    dirty_new.requires_grad_(True)
    loss, met = luffy_loss(dirty_new, dirty_old, dirty_adv, mask, prefix, aggregation="bnpo")
    loss.backward()
    assert torch.equal(loss, ref)
    assert torch.isfinite(dirty_new.grad).all()
    assert torch.equal(dirty_new.grad, clean_new.grad)
    assert (dirty_new.grad[mask == 0] == 0).all()
    for k in ("policy_loss", "off_policy_tokens", "off_policy_prob", "clipfrac", "ratio_mean"):
        close(met[k], ref_met[k], atol=1e-7)
    # the trace-prefix tokens of seq 1 (3 counted) plus seq 3 (6) are off-policy
    close(met["off_policy_tokens"], 3 + 6)


def test_luffy_fp16_inputs_are_computed_in_fp32():
    lp_new, lp_old, adv, mask = _random_batch(3)
    off = torch.tensor([True, False, False, False])
    l32, _ = luffy_loss(lp_new, lp_old, adv, mask, off, aggregation="bnpo")
    l16, _ = luffy_loss(lp_new.half(), lp_old.half(), adv, mask, off, aggregation="bnpo")
    assert l16.dtype == torch.float32
    close(l16, l32, atol=2e-3)  # only the fp16 rounding of the inputs differs


def test_luffy_argument_errors():
    lp_new, lp_old, adv, _ = _toy_luffy()
    with pytest.raises(ValueError, match="off_policy must be a bool tensor"):
        luffy_loss(lp_new, lp_old, adv, None, torch.tensor([0, 1]), aggregation="bnpo")
    with pytest.raises(ValueError, match="off_policy must be a bool tensor"):
        luffy_loss(lp_new, lp_old, adv, None, torch.tensor([True, False, True]), aggregation="bnpo")
    with pytest.raises(ValueError, match="gamma must be > 0"):
        luffy_loss(lp_new, lp_old, adv, None, torch.tensor([False, True]), gamma=-1.0, aggregation="bnpo")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        luffy_loss(lp_new, lp_old, adv, None, torch.tensor([False, True]))  # dapo needs the global count
    with pytest.raises(ValueError, match="advantages has shape"):
        luffy_loss(lp_new, lp_old, torch.ones(3), None, torch.tensor([False, True]), aggregation="bnpo")
    with pytest.raises(ValueError, match="unknown aggregation"):
        luffy_loss(lp_new, lp_old, adv, None, torch.tensor([False, True]), aggregation="token_mean")


def test_replace_with_off_policy_first_slots_and_seeded_draws():
    groups = torch.tensor([7, 7, 7, 3, 3, 3, 7, 3])  # two groups of 4, not contiguous
    first = replace_with_off_policy(groups, 1)  # LUFFY's layout: the first slot of each group
    assert first.tolist() == [True, False, False, True, False, False, False, False]
    assert replace_with_off_policy(groups, 2).tolist() == [True, True, False, True, True, False, False, False]
    assert not replace_with_off_policy(groups, 0).any()

    a = replace_with_off_policy(groups, 2, torch.Generator().manual_seed(0))
    b = replace_with_off_policy(groups, 2, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.dtype == torch.bool
    for label in (7, 3):
        assert int(a[groups == label].sum()) == 2
    # uniform within a group: over 600 seeds each of group 7's 4 slots takes the one trace ~1/4 of the
    # time; binomial sd sqrt(0.25 * 0.75 / 600) = 0.018, and 0.09 is 5 sd (deterministic seeds anyway)
    hits = torch.zeros(8)
    for seed in range(600):
        hits += replace_with_off_policy(groups, 1, torch.Generator().manual_seed(seed)).float()
    close(hits[groups == 7] / 600, [0.25] * 4, atol=0.09)
    close(hits[groups == 3] / 600, [0.25] * 4, atol=0.09)

    with pytest.raises(ValueError, match="smallest group has 4"):
        replace_with_off_policy(groups, 5)
    with pytest.raises(ValueError, match="m must be an int"):
        replace_with_off_policy(groups, -1)
    with pytest.raises(ValueError, match="integer tensor"):
        replace_with_off_policy(groups.float(), 1)


# ---------------------------------------------------------------------------------------------
# PAD
# ---------------------------------------------------------------------------------------------


def test_pad_probabilities_by_hand():
    # power alpha 2 on [0.5, 0.25]: [0.25, 0.0625] / 0.3125 = [0.8, 0.2] (the 1e-8 shift is below 1e-7)
    close(pad_probabilities(torch.tensor([0.5, 0.25]), "power", alpha=2.0), [0.8, 0.2], atol=1e-7)
    # power alpha 1.5 on [1, 4]: [1, 8] / 9
    close(pad_probabilities(torch.tensor([1.0, 4.0]), "power", alpha=1.5), [1 / 9, 8 / 9], atol=1e-7)
    # alpha 0: uniform
    close(pad_probabilities(torch.tensor([0.1, 0.7, 0.9]), "power", alpha=0.0), [1 / 3] * 3)
    # softmax tau 0.5 on [0.1, 0.3]: exp([0.2, 0.6]) normalised = [1, e^0.4] / (1 + e^0.4)
    e = math.exp(0.4)
    close(pad_probabilities(torch.tensor([0.1, 0.3]), "softmax", temperature=0.5), [1 / (1 + e), e / (1 + e)])
    assert pad_probabilities(torch.tensor([0.5, 0.25]), alpha=1e4).isfinite().all()  # no overflow
    with pytest.raises(ValueError, match="needs temperature > 0"):
        pad_probabilities(torch.tensor([0.1]), "softmax")
    with pytest.raises(ValueError, match="finite"):
        pad_probabilities(torch.tensor([0.1, NAN]))


# |A| = [0.01, 0.03, 0.5, 0.97, 0.98, NaN, 0.2, 0.0]; band [0.03, 0.97] -> E = {1, 2, 3, 6}
BAND_ADV = torch.tensor([0.01, 0.03, 0.5, -0.97, 0.98, NAN, -0.2, 0.0])


def test_pad_band_filter_inclusive_strict_and_open():
    idx, met = pad_select(BAND_ADV, ratio=10.0, replacement=False)
    assert sorted(idx.tolist()) == [1, 2, 3, 6]
    close(met["num_samples"], 8)
    close(met["num_kept"], 4)
    close(met["kept_fraction"], 0.5)
    close(met["mean_abs_adv_before"], (0.01 + 0.03 + 0.5 + 0.97 + 0.98 + 0.2 + 0.0) / 7)  # NaN not counted
    close(met["mean_abs_adv_after"], (0.03 + 0.5 + 0.97 + 0.2) / 4)
    idx, _ = pad_select(BAND_ADV, ratio=10.0, replacement=False, inclusive=False)  # released code: > and <
    assert sorted(idx.tolist()) == [2, 6]
    idx, _ = pad_select(BAND_ADV, ratio=10.0, replacement=False, t_high=None)
    assert sorted(idx.tolist()) == [1, 2, 3, 4, 6]


def test_pad_fixed_generator_draw_is_multinomial_over_the_band():
    idx, _ = pad_select(BAND_ADV, generator=torch.Generator().manual_seed(123))  # k = round(1.5 * 8) = 12
    band = torch.tensor([1, 2, 3, 6])
    probs = pad_probabilities(BAND_ADV.abs()[band], "power", alpha=1.5)
    expected = band[
        torch.multinomial(probs, 12, replacement=True, generator=torch.Generator().manual_seed(123))
    ]
    assert idx.tolist() == expected.tolist()
    again, _ = pad_select(BAND_ADV, generator=torch.Generator().manual_seed(123))
    other, _ = pad_select(BAND_ADV, generator=torch.Generator().manual_seed(124))
    assert torch.equal(idx, again) and not torch.equal(idx, other)
    soft, _ = pad_select(
        BAND_ADV, priority="softmax", temperature=0.3, generator=torch.Generator().manual_seed(5)
    )
    sp = torch.softmax(BAND_ADV.abs()[band].double() / 0.3, 0)
    assert (
        soft.tolist()
        == band[torch.multinomial(sp, 12, True, generator=torch.Generator().manual_seed(5))].tolist()
    )


def test_pad_with_and_without_replacement_counts_and_cap():
    gen = torch.Generator().manual_seed(0)
    idx, met = pad_select(BAND_ADV, ratio=1.5, replacement=True, generator=gen)  # k = 12 from |E| = 4
    assert idx.numel() == 12 and set(idx.tolist()) <= {1, 2, 3, 6} and idx.dtype == torch.long
    close(met["num_requested"], 12)
    close(met["num_selected"], 12)
    assert met["unique_fraction"].item() <= 4 / 12 + 1e-7
    idx, met = pad_select(BAND_ADV, ratio=1.5, replacement=False, generator=gen)  # capped at |E| = 4
    assert sorted(idx.tolist()) == [1, 2, 3, 6]
    close(met["num_requested"], 12)
    close(met["num_selected"], 4)
    close(met["unique_fraction"], 1.0)
    idx, _ = pad_select(BAND_ADV, ratio=0.25, replacement=False, generator=gen)  # k = 2 <= |E|
    assert idx.numel() == 2 and len(set(idx.tolist())) == 2


def test_pad_empty_band_never_crashes():
    for adv in (torch.tensor([0.0, 0.01, 2.0]), torch.tensor([NAN, NAN]), torch.zeros(0)):
        idx, met = pad_select(adv, generator=torch.Generator().manual_seed(0))
        assert idx.numel() == 0 and idx.dtype == torch.long
        close(met["empty"], 1.0)
        close(met["num_selected"], 0.0)
        close(met["mean_abs_adv_after"], 0.0)
    idx, met = pad_select(torch.tensor([0.5, 0.5]), ratio=0.1)  # k = round(0.2) = 0
    assert idx.numel() == 0
    close(met["empty"], 1.0)


def test_pad_rounding_rules():
    adv = torch.full((5,), 0.5)
    # 0.3 * 5 = 1.5: half up 2, floor (released int()) 1, ceil (paper) 2
    for rounding, k in (("round", 2), ("floor", 1), ("ceil", 2)):
        assert pad_select(adv, ratio=0.3, rounding=rounding)[0].numel() == k
    # 0.7 * 10 = 7.000000000000001 in floating point: all three give 7
    for rounding in ("round", "floor", "ceil"):
        assert pad_select(torch.full((10,), 0.5), ratio=0.7, rounding=rounding)[0].numel() == 7


def test_pad_priority_proportions_over_many_draws():
    # |A| = [0.1, 0.3, 0.6] in band plus one sample below T_low; k = 5000 * 4 = 20000 draws with
    # replacement. Each share is a binomial proportion, sd = sqrt(p (1 - p) / 20000) <= 0.0036;
    # atol 0.018 is 5 sd (a false failure has probability < 1e-6; with a fixed seed it is deterministic).
    adv = torch.tensor([0.1, -0.3, 0.6, 0.0])
    k = 20000
    for priority, kw, p in (
        ("power", {"alpha": 1.0}, [0.1, 0.3, 0.6]),
        ("power", {"alpha": 2.0}, [0.01 / 0.46, 0.09 / 0.46, 0.36 / 0.46]),
        (
            "softmax",
            {"temperature": 0.2},
            torch.softmax(torch.tensor([0.5, 1.5, 3.0], dtype=torch.float64), 0),
        ),
    ):
        idx, met = pad_select(
            adv, ratio=5000.0, priority=priority, generator=torch.Generator().manual_seed(1), **kw
        )
        assert idx.numel() == k and 3 not in idx.tolist()
        close(torch.bincount(idx, minlength=4)[:3].double() / k, p, atol=0.018)
        close(met["kept_fraction"], 0.75)


def test_pad_sequence_scores_from_token_advantages():
    adv = torch.tensor([[1.0, -3.0, NAN], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # row 0: (1 - 3) / 2 = -1 -> |.| = 1 (abs after the mean), unnormalised |-2| = 2; row 1: 0.5, 1.5
    close(pad_sequence_scores(adv, mask), [1.0, 0.5])
    close(pad_sequence_scores(adv, mask, normalize_by_length=False), [2.0, 1.5])
    close(pad_sequence_scores(torch.tensor([-0.4, NAN]))[:1], [0.4])
    idx, _ = pad_select(adv, mask, t_high=None, ratio=1.0, replacement=False)
    assert sorted(idx.tolist()) == [0, 1]
    with pytest.raises(ValueError, match="mask has shape"):
        pad_sequence_scores(adv, torch.ones(2, 2))


def test_pad_softmax_underflow_without_replacement_still_returns_every_sample():
    # tau = 1e-4: exp(-(0.9 - 0.03) / 1e-4) underflows to 0 in float64; without replacement the
    # zero-weight sample is drawn last instead of making torch.multinomial refuse
    idx, _ = pad_select(
        torch.tensor([0.03, 0.9]),
        ratio=1.0,
        replacement=False,
        priority="softmax",
        temperature=1e-4,
        generator=torch.Generator().manual_seed(0),
    )
    assert idx.tolist() == [1, 0]


def test_pad_argument_errors():
    a = torch.tensor([0.5])
    with pytest.raises(ValueError, match="ratio must be > 0"):
        pad_select(a, ratio=0.0)
    with pytest.raises(ValueError, match="t_low <= t_high"):
        pad_select(a, t_low=0.5, t_high=0.1)
    with pytest.raises(ValueError, match="needs temperature"):
        pad_select(a, priority="softmax")
    with pytest.raises(ValueError, match="unknown rounding"):
        pad_select(a, rounding="nearest")
    with pytest.raises(ValueError, match="unknown priority"):
        pad_select(a, priority="rank")


# ---------------------------------------------------------------------------------------------
# DAPO dynamic sampling
# ---------------------------------------------------------------------------------------------

# group 0 [1, 1, 1] flat; 1 [0, 1, 0] spread 1; 2 [1, NaN, 1] flat over its finite rewards;
# 3 [0, NaN, 1] spread 1; 4 [NaN, NaN] nothing scorable; 9 [5, NaN] one finite reward
DS_R = torch.tensor([1, 1, 1, 0, 1, 0, 1, NAN, 1, 0, NAN, 1, NAN, NAN, 5, NAN])
DS_G = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 9, 9])


def test_group_reward_spread_and_keep_groups_nan_aware():
    labels, spread, count = group_reward_spread(DS_R, DS_G)
    assert labels.tolist() == [0, 1, 2, 3, 4, 9]
    assert count.tolist() == [3, 3, 2, 2, 0, 1]
    close(spread[[0, 1, 2, 3, 5]], [0.0, 1.0, 0.0, 1.0, 0.0], atol=0)
    assert math.isnan(spread[4].item())
    _, degenerate = degenerate_groups(DS_R, DS_G)
    assert degenerate.tolist() == [True, False, True, False, True, True]
    _, degenerate = degenerate_groups(DS_R, DS_G, keep_singletons=True)  # verl keeps one-sample groups
    assert degenerate.tolist() == [True, False, True, False, True, False]
    keep = keep_groups(DS_R, DS_G)
    assert keep.tolist() == [False] * 3 + [True] * 3 + [False] * 3 + [True] * 3 + [False] * 4
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))  # groups need not be contiguous
    assert torch.equal(keep_groups(DS_R[perm], DS_G[perm]), keep[perm])
    cont = torch.tensor([0.5, 0.5000001, 0.2, 0.9])
    g = torch.tensor([0, 0, 1, 1])
    assert keep_groups(cont, g).tolist() == [True, True, True, True]  # exact comparison by default
    assert keep_groups(cont, g, atol=1e-3).tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match="floating point"):
        keep_groups(torch.tensor([1, 0]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="atol must be >= 0"):
        keep_groups(cont, g, atol=-1.0)


def test_dynamic_sampler_refills_until_the_target():
    s = DynamicSampler(target_groups=3, max_rounds=5)
    # round 1 (6 samples): groups 0 flat, 1 spread, 2 flat -> keeps group 1 = indices 2, 3
    assert s.add(None, torch.tensor([1.0, 1, 0, 1, 0, 0]), torch.tensor([0, 0, 1, 1, 2, 2])) is False
    assert s.num_groups == 1 and not s.done
    # round 2 (8 samples, labels reused, offset 6): groups 0, 2, 3 have spread -> 4 kept >= 3: done
    assert (
        s.add(None, torch.tensor([1.0, 0, 1, 1, 0, 1, 1, 0]), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])) is True
    )
    assert s.reached_target and s.num_groups == 4
    # the first 3 kept groups in arrival order: round 1 group 1, round 2 groups 0 and 2; round 2 group 3 dropped
    assert s.selected().tolist() == [2, 3, 6, 7, 10, 11]
    m = s.metrics()
    assert m == {
        "rounds": 2.0,
        "groups_seen": 7.0,
        "groups_kept": 4.0,
        "kept_fraction": 4 / 7,
        "reached_target": 1.0,
    }
    with pytest.raises(RuntimeError, match="call reset"):
        s.add(None, torch.tensor([0.0, 1.0]), torch.tensor([0, 0]))
    s.reset()
    assert s.rounds == 0 and s.selected().numel() == 0 and not s.done


def test_dynamic_sampler_round_cap_and_no_cap():
    flat = torch.tensor([1.0, 1.0, 0.0, 0.0])
    gid = torch.tensor([0, 0, 1, 1])
    s = DynamicSampler(target_groups=2, max_rounds=2)
    assert s.add(None, flat, gid) is False
    assert s.add(None, flat, gid) is True  # cap hit: done without the target (verl would raise)
    assert not s.reached_target and s.selected().numel() == 0
    s = DynamicSampler(target_groups=1)  # max_rounds None: keep generating
    for _ in range(20):
        assert s.add(None, flat, gid) is False
    assert s.add(None, torch.tensor([1.0, 0.0, 0.0, 0.0]), gid) is True
    assert s.selected().tolist() == [80, 81]
    with pytest.raises(ValueError, match="target_groups"):
        DynamicSampler(0)
    with pytest.raises(ValueError, match="max_rounds"):
        DynamicSampler(2, max_rounds=0)


def test_dynamic_sampler_explicit_indices_group_order_and_duplicates():
    s = DynamicSampler(target_groups=5)
    # groups interleaved: group 1 has the first sample, so it is kept first
    s.add(torch.tensor([100, 101, 102, 103]), torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.tensor([1, 0, 1, 0]))
    assert s.selected().tolist() == [100, 102, 101, 103]
    with pytest.raises(ValueError, match="repeat an index"):
        s.add(torch.tensor([103, 104]), torch.tensor([0.0, 1.0]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="repeat an index"):
        s.add(torch.tensor([7, 7]), torch.tensor([0.0, 1.0]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="integer tensor"):
        s.add(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]), torch.tensor([0, 0]))
    assert s.rounds == 1  # a refused round changes nothing
    mixed = DynamicSampler(target_groups=5)
    mixed.add(None, torch.tensor([0.0, 1.0]), torch.tensor([0, 0]))  # names 0, 1
    with pytest.raises(ValueError, match="not a mix"):
        mixed.add(torch.tensor([1, 2]), torch.tensor([0.0, 1.0]), torch.tensor([0, 0]))


# ---------------------------------------------------------------------------------------------
# Entropy-coefficient schedules
# ---------------------------------------------------------------------------------------------


def _run(schedule, entropies):
    out = []
    for e in entropies:
        out.append(schedule.value(e))
        schedule.step(e)
    return out


def test_constant_entropy_coef():
    s = ConstantEntropyCoef(1e-3)
    assert _run(s, [None] * 3) == [1e-3] * 3
    assert s.state_dict() == {"kind": "constant", "steps": 3, "config": {"coef": 1e-3}}


def test_exponential_entropy_coef_hand_values_floor_and_warmup():
    # warm-up 2: [0, 0], then 0.02, 0.02 * 0.985 = 0.0197, 0.02 * 0.985^2 = 0.0194045
    s = ExponentialEntropyCoef(init=0.02, decay=0.985, warmup_steps=2)
    close(_run(s, [None] * 5), [0.0, 0.0, 0.02, 0.0197, 0.0194045], atol=1e-12)
    # floor: 0.02, 0.01, 0.005, then max(0.004, 0.0025) = 0.004
    close(
        _run(ExponentialEntropyCoef(0.02, 0.5, minimum=0.004), [None] * 5), [0.02, 0.01, 0.005, 0.004, 0.004]
    )


def test_exponential_entropy_coef_reproduces_revisual_r1_code_with_warmup_plus_one():
    # CSfufu/Revisual-R1 dp_actor.py: entropy_coef starts at 0 and _anneal_entropy_coef runs after each
    # optimizer step: step < W -> 0; step == W -> init; after -> max(min, coef * decay)
    w, init, decay = 20, 0.02, 0.985
    coef, step, used = 0.0, 0, []
    for _ in range(60):
        used.append(coef)
        if step < w:
            coef = 0.0
        elif step == w:
            coef = init
        else:
            coef = max(0.0, coef * decay)
        step += 1
    ours = _run(ExponentialEntropyCoef(init, decay, warmup_steps=w + 1), [None] * 60)
    close(ours, used, atol=1e-12)


def test_adaptive_entropy_coef_by_hand():
    # target 0.2, c_0 = 0, delta 0.002, c_max 0.005; alpha_k = c_k if e_k <= target else 0
    s = AdaptiveEntropyCoef(target=0.2, init=0.0, delta=0.002, c_min=0.0, c_max=0.005)
    e = [0.1, 0.1, 0.1, 0.3, 0.2, torch.tensor(0.1)]
    # c: 0 -> 0.002 -> 0.004 -> 0.005 (clamped) -> 0.003 (above target) -> 0.003 (at target) -> 0.005
    close(_run(s, e), [0.0, 0.002, 0.004, 0.0, 0.003, 0.003], atol=1e-12)
    close(s.coef, 0.005, atol=1e-12)
    ungated = AdaptiveEntropyCoef(target=0.2, delta=0.002, c_max=0.005, gate=False)
    close(_run(ungated, [0.1, 0.3, 0.3, 0.3]), [0.0, 0.002, 0.0, 0.0], atol=1e-12)  # floored at c_min = 0
    with pytest.raises(ValueError, match="needs the step's entropy"):
        s.value()
    with pytest.raises(ValueError, match="entropy must be finite"):
        s.step(NAN)
    with pytest.raises(ValueError, match="c_min <= init <= c_max"):
        AdaptiveEntropyCoef(init=0.01, c_max=0.005)


@pytest.mark.parametrize(
    "kind,kwargs",
    [("constant", {"coef": 0.01}), ("exponential", {"warmup_steps": 1}), ("adaptive", {"delta": 0.001})],
)
def test_entropy_schedule_state_dict_is_json_and_resumes(kind, kwargs):
    e = [0.1, 0.3, 0.1, 0.1, 0.25, 0.05, 0.1]
    full = make_entropy_schedule(kind, **kwargs)
    expected = _run(full, e)
    first = make_entropy_schedule(kind, **kwargs)
    _run(first, e[:3])
    state = json.loads(json.dumps(first.state_dict()))  # JSON-serialisable, round-trips
    resumed = make_entropy_schedule(kind, **kwargs)
    resumed.load_state_dict(state)
    assert resumed.steps == 3
    assert _run(resumed, e[3:]) == expected[3:]
    other = "adaptive" if kind != "adaptive" else "constant"
    with pytest.raises(ValueError, match="construct the matching schedule"):
        make_entropy_schedule(other).load_state_dict(state)


def test_make_entropy_schedule_errors():
    assert isinstance(make_entropy_schedule("exponential"), ExponentialEntropyCoef)
    with pytest.raises(ValueError, match="unknown entropy schedule"):
        make_entropy_schedule("cosine")
    with pytest.raises(ValueError, match="bad arguments"):
        make_entropy_schedule("constant", decay=0.9)
    with pytest.raises(ValueError, match="decay must be in"):
        ExponentialEntropyCoef(decay=1.5)
