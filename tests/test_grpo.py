"""Tests for diffusion_rl.grpo: advantages, the per-prompt tracker and the PPO-clip loss.

Expected numbers are worked out by hand in comments and written literally.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from _numeric import NAN, close

from diffusion_rl.grpo import (
    ADV_EPS,
    BATCH_ADV_EPS,
    PerPromptStatTracker,
    batch_advantages,
    clip_advantages,
    group_advantages,
    policy_loss,
)

# ---------------------------------------------------------------------------------------------
# Per-prompt stat tracker
# ---------------------------------------------------------------------------------------------


def test_tracker_min_count_fallback_then_buffer_stats_then_bound():
    tr = PerPromptStatTracker(buffer_size=4, min_count=3)

    # Update 1: buffers a=[1,2], b=[3]; both < 3 -> whole-batch stats of [1,2,3]:
    # mu = 2, sigma = sqrt((1 + 0 + 1)/3) = sqrt(2/3) = 0.816497 -> A = [-1.224745, 0, 1.224745].
    adv = tr.update(["a", "a", "b"], torch.tensor([1.0, 2.0, 3.0]))
    assert adv.dtype == torch.float32
    s = math.sqrt(2 / 3)
    close(adv, [-1 / (s + ADV_EPS), 0.0, 1 / (s + ADV_EPS)])
    close(adv, [-1.224745, 0.0, 1.224745], atol=2e-6)
    assert tr.stats()["frac_prompts_batch_stats"] == 1.0

    # Update 2: a=[1,2,4] reaches min_count -> its own buffer: mu = 7/3,
    # sigma = sqrt(((4/3)^2 + (1/3)^2 + (5/3)^2)/3) = sqrt(42/27) = 1.247219; A_a = (5/3)/1.247219 = 1.336306.
    # b=[3,5] still < 3 -> batch stats of [4,5]: mu = 4.5, sigma = 0.5 -> A_b = 0.5/0.5 = 1.
    adv = tr.update(["a", "b"], torch.tensor([4.0, 5.0]))
    close(adv, [(5 / 3) / (math.sqrt(42 / 27) + ADV_EPS), 0.5 / (0.5 + ADV_EPS)])
    close(adv, [1.336306, 1.0], atol=3e-6)
    assert tr.stats()["frac_prompts_batch_stats"] == 0.5

    # Update 3: a=[1,2,4,10,11,12] is bounded to its last 4 -> [4,10,11,12], mu = 9.25,
    # sigma = sqrt((5.25^2 + 0.75^2 + 1.75^2 + 2.75^2)/4) = sqrt(38.75/4) = 3.112475.
    adv = tr.update(["a", "a", "a"], torch.tensor([10.0, 11.0, 12.0]))
    assert list(tr.buffers["a"]) == [4.0, 10.0, 11.0, 12.0]
    sig = math.sqrt(38.75 / 4)
    close(adv, [(10 - 9.25) / sig, (11 - 9.25) / sig, (12 - 9.25) / sig], atol=2e-6)
    st = tr.stats()
    assert st["num_prompts"] == 2 and st["mean_buffer_len"] == 3.0 and st["max_buffer_len"] == 4.0


def test_tracker_nan_is_zero_and_never_enters_statistics():
    tr = PerPromptStatTracker(buffer_size=8, min_count=1)
    # a: finite [1, 3] -> mu 2, sigma 1 -> A = [-1, 0 (NaN), 1]; b: only NaN -> no buffer entries.
    adv = tr.update(["a", "a", "a", "b"], torch.tensor([1.0, NAN, 3.0, NAN]))
    assert adv[1].item() == 0.0 and adv[3].item() == 0.0  # exactly zero
    close(adv, [-1 / (1 + ADV_EPS), 0.0, 1 / (1 + ADV_EPS), 0.0])
    assert list(tr.buffers["a"]) == [1.0, 3.0]
    assert list(tr.buffers.get("b", [])) == []
    assert torch.isfinite(adv).all()

    # Batch fallback ignores NaN too: batch finite values [0, 4] -> mu 2, sigma 2.
    tr2 = PerPromptStatTracker(buffer_size=8, min_count=5)
    adv = tr2.update(["x", "y", "z"], torch.tensor([0.0, NAN, 4.0]))
    close(adv, [-2 / (2 + ADV_EPS), 0.0, 2 / (2 + ADV_EPS)])


def test_tracker_scale_std_off_is_dr_grpo():
    tr = PerPromptStatTracker(buffer_size=8, min_count=1, scale_std=False)
    adv = tr.update(["a", "a", "a"], torch.tensor([1.0, 2.0, 6.0]))  # mu = 3
    close(adv, [-2.0, -1.0, 3.0], atol=0)


def test_tracker_state_dict_round_trip_through_json():
    torch.manual_seed(0)
    tr = PerPromptStatTracker(buffer_size=5, min_count=3)
    prompts = ["cat", "dog", "cat", "owl", "dog", "cat"]
    for _ in range(3):
        tr.update(prompts, torch.randn(6) * 3.7 + 0.123456789)
    state = tr.state_dict()
    blob = json.dumps(state)  # must be JSON-serialisable
    tr2 = PerPromptStatTracker(buffer_size=5, min_count=3)
    tr2.load_state_dict(json.loads(blob))
    assert tr2.state_dict() == state  # exact, floats included
    r = torch.randn(6)
    assert torch.equal(tr.update(prompts, r), tr2.update(prompts, r))

    with pytest.raises(ValueError, match="buffer_size=5"):
        PerPromptStatTracker(buffer_size=7, min_count=3).load_state_dict(state)
    with pytest.raises(ValueError, match="buffers"):
        tr2.load_state_dict({"buffer_size": 5})


def test_tracker_bad_arguments():
    with pytest.raises(ValueError, match="min_count"):
        PerPromptStatTracker(buffer_size=4, min_count=8)
    tr = PerPromptStatTracker()
    with pytest.raises(ValueError, match="2 prompts for 3 rewards"):
        tr.update(["a", "b"], torch.zeros(3))
    with pytest.raises(ValueError, match="1-D"):
        tr.update(["a"], torch.zeros(1, 1))


# ---------------------------------------------------------------------------------------------
# Stateless advantages
# ---------------------------------------------------------------------------------------------


def test_batch_advantages_hand_values():
    # finite [1,2,3]: mu 2, sigma sqrt(2/3); NaN -> 0.
    adv = batch_advantages(torch.tensor([1.0, 2.0, 3.0, NAN]))
    s = math.sqrt(2 / 3)
    close(adv, [-1 / (s + BATCH_ADV_EPS), 0.0, 1 / (s + BATCH_ADV_EPS), 0.0])
    assert adv[3].item() == 0.0 and adv.dtype == torch.float32
    close(batch_advantages(torch.tensor([1.0, 2.0, 6.0]), scale_std=False), [-2.0, -1.0, 3.0], atol=0)


def test_group_advantages_hand_values():
    # Non-contiguous labels. group 7: [1, 3] -> mu 2, sigma 1 -> [-1, +1]
    # group 3: [10, 20, 30] -> mu 20, sigma sqrt(200/3) = 8.164966 -> [-1.224745, 0, 1.224745]
    # group 9: [5] -> singleton -> 0;  group 4: [NaN, 8, 8] -> sigma 0 -> [0, 0, 0]
    r = torch.tensor([1.0, 10.0, 3.0, 20.0, 30.0, 5.0, NAN, 8.0, 8.0])
    g = torch.tensor([7, 3, 7, 3, 3, 9, 4, 4, 4])
    adv = group_advantages(r, g)
    s = math.sqrt(200 / 3)
    e = ADV_EPS
    close(adv, [-1 / (1 + e), -10 / (s + e), 1 / (1 + e), 0.0, 10 / (s + e), 0.0, 0.0, 0.0, 0.0])
    assert adv.dtype == torch.float32 and adv[6].item() == 0.0

    # Unbiased (TRL): group 7 sigma sqrt(2) -> +-0.707107; group 3 sigma 10 -> [-1, 0, 1]; singleton 0.
    adv_u = group_advantages(r, g, unbiased=True)
    close(adv_u[:6], [-0.707107, -1.0, 0.707107, 0.0, 1.0, 0.0], atol=2e-6)

    # Dr.GRPO: R - mu_g.
    close(group_advantages(r, g, scale_std=False), [-1, -10, 1, 0, 10, 0, 0, 0, 0], atol=0)

    with pytest.raises(ValueError, match="integer"):
        group_advantages(r, g.float())
    with pytest.raises(ValueError, match="group_ids shape"):
        group_advantages(r, g[:3])


def test_clip_advantages():
    close(clip_advantages(torch.tensor([-7.0, -1.0, 0.0, 4.0, 9.0]), 5.0), [-5, -1, 0, 4, 5], atol=0)
    with pytest.raises(ValueError, match="max_abs"):
        clip_advantages(torch.zeros(2), 0.0)


# ---------------------------------------------------------------------------------------------
# PPO-clip loss
# ---------------------------------------------------------------------------------------------

# B = 2, T = 3, clip 0.2 -> ratio clipped to [0.8, 1.2]; A = [2, -1]; last element of row 1 masked.
RATIOS = [[1.0, 1.5, 0.5], [1.1, 0.7, 9.0]]
MASK = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
# l = max(-A r, -A clip(r)):
#   row 0 (A = 2):  r=1.0 -> max(-2, -2) = -2;  r=1.5 -> max(-3, -2.4) = -2.4;  r=0.5 -> max(-1, -1.6) = -1
#   row 1 (A = -1): r=1.1 -> max(1.1, 1.1) = 1.1; r=0.7 -> max(0.7, 0.8) = 0.8;  (masked)
# token_mean = (-2 - 2.4 - 1 + 1.1 + 0.8) / 5 = -3.5 / 5 = -0.7
# seq_mean   = ((-5.4 / 3) + (1.9 / 2)) / 2 = (-1.8 + 0.95) / 2 = -0.425
# constant/6 = -3.5 / 6 = -0.583333
EXPECTED = {"token_mean": -0.7, "seq_mean": -0.425, "constant": -3.5 / 6}


def _toy_logps():
    logp_old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.5, -2.5]])
    logp_new = (logp_old + torch.tensor(RATIOS).log()).requires_grad_(True)
    return logp_new, logp_old


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean", "constant"])
def test_policy_loss_hand_values_per_aggregation(aggregation):
    logp_new, logp_old = _toy_logps()
    loss, m = policy_loss(
        logp_new,
        logp_old,
        torch.tensor([2.0, -1.0]),
        mask=torch.tensor(MASK).bool(),
        clip_low=0.2,
        clip_high=0.2,
        adv_clip=None,
        aggregation=aggregation,
        constant_divisor=6.0 if aggregation == "constant" else None,
    )
    close(loss, EXPECTED[aggregation])
    close(m["policy_loss"], EXPECTED[aggregation])
    # Diagnostics over the 5 counted elements (independent of aggregation):
    # outside [0.8, 1.2]: 1.5 (high), 0.5 and 0.7 (low) -> clipfrac 3/5; ratio mean 4.8/5 = 0.96.
    close(m["clipfrac"], 0.6)
    close(m["clipfrac_low"], 0.4)
    close(m["clipfrac_high"], 0.2)
    close(m["ratio_mean"], 0.96)
    close(m["ratio_min"], 0.5)
    close(m["ratio_max"], 1.5)  # the masked 9.0 is ignored
    logs = [math.log(x) for x in (1.0, 1.5, 0.5, 1.1, 0.7)]
    close(m["approx_kl"], 0.5 * sum(v * v for v in logs) / 5)
    assert "kl" not in m
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())


def test_policy_loss_on_policy_equals_minus_mean_advantage():
    torch.manual_seed(0)
    lp = torch.randn(4, 3)
    logp_new = lp.clone().requires_grad_(True)
    adv = torch.tensor([1.5, -0.5, 3.0, -2.0])
    loss, m = policy_loss(logp_new, lp, adv, clip_low=1e-4, clip_high=1e-4)
    close(loss, -adv.mean())  # ratio 1 -> loss = -mean(A)
    close(m["clipfrac"], 0.0, atol=0)
    close(m["ratio_mean"], 1.0, atol=0)
    close(m["approx_kl"], 0.0, atol=0)
    loss.backward()
    # d/dlogp (-A r) at r = 1 is -A, token_mean divides by B*T = 12.
    close(logp_new.grad, (-adv[:, None] / 12).expand(4, 3))


def test_policy_loss_adv_clip_inside_loss():
    lp = torch.zeros(2, 1)
    loss, _ = policy_loss(lp, lp, torch.tensor([10.0, -1.0]), adv_clip=5.0)
    close(loss, -(5.0 - 1.0) / 2)  # A clamped to [5, -1]
    loss, _ = policy_loss(lp, lp, torch.tensor([10.0, -1.0]), adv_clip=None)
    close(loss, -(10.0 - 1.0) / 2)


def test_policy_loss_asymmetric_clip_boundaries():
    # clip_low 0.1, clip_high 0.3 -> [0.9, 1.3]. Ratios inside stay unclipped, outside get flagged.
    r = torch.tensor([[0.85, 0.95, 1.25, 1.35]])
    logp_old = torch.zeros(1, 4)
    for a, expected in [
        # A = +1: l = -min(r, clip r) -> [-0.85, -0.95, -1.25, -1.30]; mean = -4.35/4
        (1.0, -4.35 / 4),
        # A = -1: l = max(r, clip r) -> [0.90, 0.95, 1.25, 1.35]; mean = 4.45/4
        (-1.0, 4.45 / 4),
    ]:
        loss, m = policy_loss(
            r.log(), logp_old, torch.tensor([a]), clip_low=0.1, clip_high=0.3, adv_clip=None
        )
        close(loss, expected)
        close(m["clipfrac_low"], 0.25)
        close(m["clipfrac_high"], 0.25)
        close(m["clipfrac"], 0.5)
    # Just inside each boundary nothing is clipped; the symmetric 0.1 clip would flag 1.25.
    inside = torch.tensor([[0.9 + 1e-4, 1.3 - 1e-4]]).log()
    _, m = policy_loss(inside, torch.zeros(1, 2), torch.tensor([1.0]), clip_low=0.1, clip_high=0.3)
    close(m["clipfrac"], 0.0, atol=0)
    _, m = policy_loss(r.log(), logp_old, torch.tensor([1.0]), clip_low=0.1, clip_high=0.1)
    close(m["clipfrac_high"], 0.5)


def test_policy_loss_gradient_zero_when_clipped_on_the_right_side():
    # Element-wise: (A, r) pairs; clip 0.2.
    #   A>0, r=1.5 (above 1.2): clipped, zero gradient (no incentive to push r further up)
    #   A<0, r=0.5 (below 0.8): clipped, zero gradient
    #   A>0, r=0.5: pessimistic branch is the unclipped one -> gradient -A r / n
    #   A<0, r=1.5: unclipped -> gradient -A r / n
    r = torch.tensor([[1.5], [0.5], [0.5], [1.5]])
    adv = torch.tensor([2.0, -2.0, 2.0, -2.0])
    logp_new = r.log().requires_grad_(True)
    loss, _ = policy_loss(logp_new, torch.zeros(4, 1), adv, clip_low=0.2, clip_high=0.2, adv_clip=None)
    loss.backward()
    close(logp_new.grad.squeeze(1), [0.0, 0.0, -2.0 * 0.5 / 4, 2.0 * 1.5 / 4])
    assert logp_new.grad[0].item() == 0.0 and logp_new.grad[1].item() == 0.0


def test_policy_loss_masked_garbage_is_harmless():
    logp_new, logp_old = _toy_logps()
    bad = logp_new.detach().clone()
    bad[1, 2] = float("nan")  # garbage at the padded position
    bad.requires_grad_(True)
    loss, m = policy_loss(
        bad,
        logp_old,
        torch.tensor([2.0, -1.0]),
        mask=torch.tensor(MASK),
        clip_low=0.2,
        clip_high=0.2,
        adv_clip=None,
        logp_ref=logp_old,
        kl_coef=0.1,
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(bad.grad).all()
    assert bad.grad[1, 2].item() == 0.0
    close(m["policy_loss"], -0.7)


def test_policy_loss_kl_estimators_vs_hand_formulas():
    # Sign convention: x = logp_ref - logp_new.  k1 = -x = logp_new - logp_ref; k2 = x^2/2; k3 = e^x - 1 - x.
    logp_new = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    logp_ref = torch.tensor([[-1.5, -1.0], [-0.5, -2.0]])
    x = [-1.5 + 1.0, -1.0 + 2.0, -0.5 + 0.5, -2.0 + 3.0]  # = [-0.5, 1.0, 0.0, 1.0]
    hand = {
        "k1": sum(-v for v in x) / 4,  # -1.5 / 4 = -0.375
        "k2": sum(0.5 * v * v for v in x) / 4,  # 0.5 * 2.25 / 4 = 0.28125
        "k3": sum(math.exp(v) - 1 - v for v in x) / 4,
    }
    close(hand["k1"], -0.375, atol=0)
    close(hand["k2"], 0.28125, atol=0)
    adv = torch.tensor([1.0, -1.0])
    base, _ = policy_loss(logp_new, logp_new, adv)  # on policy -> -mean(A) = 0
    for est, value in hand.items():
        loss, m = policy_loss(logp_new, logp_new, adv, logp_ref=logp_ref, kl_coef=0.1, kl_estimator=est)
        close(m["kl"], value)
        close(loss, base + 0.1 * value)
        close(m["policy_loss"], base)
    # k3 is non-negative and zero only at logp_new == logp_ref.
    _, m = policy_loss(logp_new, logp_new, adv, logp_ref=logp_new, kl_coef=1.0)
    close(m["kl"], 0.0, atol=0)
    # kl gradient: d k3/d logp_new = 1 - e^x per element.
    lp = logp_new.clone().requires_grad_(True)
    loss, _ = policy_loss(lp, logp_new, torch.zeros(2), logp_ref=logp_ref, kl_coef=1.0, kl_estimator="k3")
    loss.backward()
    close(lp.grad.reshape(-1), [(1 - math.exp(v)) / 4 for v in x])


def test_policy_loss_fp16_inputs_computed_in_fp32():
    torch.manual_seed(0)
    old16 = (torch.randn(3, 5) * 50).half()
    new16 = (old16.float() + torch.randn(3, 5) * 1e-3).half()
    adv = torch.tensor([1.0, -2.0, 0.5]).half()
    loss16, m16 = policy_loss(new16, old16, adv, clip_low=1e-3, clip_high=1e-3)
    loss32, m32 = policy_loss(new16.float(), old16.float(), adv.float(), clip_low=1e-3, clip_high=1e-3)
    assert loss16.dtype == torch.float32
    assert torch.equal(loss16, loss32)
    for k in m32:
        assert m16[k].dtype == torch.float32 and torch.equal(m16[k], m32[k]), k
    # in fp16 arithmetic, exp(logp_new - logp_old) near logp ~ 50 would be visibly wrong; ours is exact.
    ratio32 = torch.exp(new16.float() - old16.float())
    close(m16["ratio_mean"], ratio32.mean(), atol=1e-6)


def test_policy_loss_bad_arguments():
    lp = torch.zeros(2, 3)
    adv = torch.zeros(2)
    with pytest.raises(ValueError, match="unknown aggregation 'mean'.*token_mean"):
        policy_loss(lp, lp, adv, aggregation="mean")
    with pytest.raises(ValueError, match="unknown kl_estimator 'k4'"):
        policy_loss(lp, lp, adv, logp_ref=lp, kl_estimator="k4")
    with pytest.raises(ValueError, match="constant_divisor"):
        policy_loss(lp, lp, adv, aggregation="constant")
    with pytest.raises(ValueError, match=r"logp_old has shape \(2, 2\)"):
        policy_loss(lp, lp[:, :2], adv)
    with pytest.raises(ValueError, match="advantages has shape"):
        policy_loss(lp, lp, torch.zeros(3))
    with pytest.raises(ValueError, match="mask has shape"):
        policy_loss(lp, lp, adv, mask=torch.ones(2, 2))
    with pytest.raises(ValueError, match="unsqueeze"):
        policy_loss(torch.zeros(2), torch.zeros(2), adv)
    with pytest.raises(ValueError, match="logp_ref is None"):
        policy_loss(lp, lp, adv, kl_coef=0.1)
    with pytest.raises(ValueError, match="clip_low"):
        policy_loss(lp, lp, adv, clip_low=1.5)


# ---------------------------------------------------------------------------------------------
# Modality-agnostic toy: a categorical policy on a 5-armed bandit
# ---------------------------------------------------------------------------------------------


def test_grpo_learns_a_bandit():
    """GRPO with PPO inner epochs must move a uniform softmax policy onto the best arm."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1234)
    arm_reward = torch.tensor([0.1, 0.3, 0.5, 0.7, 1.0])
    logits = torch.zeros(5, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)
    n_groups, group_size, inner_epochs = 4, 8, 2

    def expected_reward() -> float:
        return float((torch.softmax(logits.detach(), -1) * arm_reward).sum())

    start = expected_reward()
    close(start, arm_reward.mean(), atol=1e-6)
    for _ in range(150):
        with torch.no_grad():
            probs = torch.softmax(logits, -1)
            actions = torch.multinomial(probs, n_groups * group_size, replacement=True, generator=gen)  # [B]
            noise = 0.1 * torch.randn(actions.shape, generator=gen)
            rewards = arm_reward[actions] + noise
            logp_old = torch.log_softmax(logits, -1)[actions][:, None]  # [B, 1]
        groups = torch.arange(n_groups).repeat_interleave(group_size)
        adv = group_advantages(rewards, groups)
        for _ in range(inner_epochs):
            logp_new = torch.log_softmax(logits, -1)[actions][:, None]
            loss, _ = policy_loss(logp_new, logp_old, adv, clip_low=0.2, clip_high=0.2)
            opt.zero_grad()
            loss.backward()
            opt.step()
    final = expected_reward()
    assert start < 0.53
    assert final > 0.9 * arm_reward.max().item(), f"expected reward {final:.3f} did not rise"
