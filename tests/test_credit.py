"""Tests for diffusion_rl.credit: CoCA contributions, stage 2, built-in assigners, step selection.

Hand-worked numbers are derived in comments and written literally.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from _numeric import NAN, close
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_rl.credit import (
    SUM_EPS,
    CoCACredit,
    CreditContext,
    CreditResult,
    SparseCredit,
    UniformCredit,
    as_credit_assigner,
    coca_contributions,
    credit_shares,
    make_credit,
    reward_to_go,
    select_steps,
    trajectory_similarities,
)


def make_ctx(adv, sims, prompts=None, valid=None) -> CreditContext:
    adv = torch.as_tensor(adv, dtype=torch.float32)
    sims = torch.as_tensor(sims, dtype=torch.float32)
    N, T = sims.shape[0], sims.shape[1] - 1
    return CreditContext(
        advantages=adv,
        similarities=sims,
        timesteps=torch.arange(T, 0, -1).repeat(N, 1) * 20,  # [N, T] descending, sampling order
        prompts=list(prompts) if prompts is not None else ["p"] * N,
        valid=torch.ones(N, dtype=torch.bool) if valid is None else torch.as_tensor(valid),
    )


# ---------------------------------------------------------------------------------------------
# Hand-worked examples
# ---------------------------------------------------------------------------------------------

# T = 6, w = 2 -> K = 3 windows.  s = [s0, s1, ..., s6] with s6 = 1.
S_HAND = [0.1, 0.2, 0.4, 0.5, 0.9, 0.8, 1.0]
# Window means of the POST-step similarities:
#   m0 = (s1 + s2)/2 = (0.2 + 0.4)/2 = 0.3     (steps 0, 1)
#   m1 = (s3 + s4)/2 = (0.5 + 0.9)/2 = 0.7     (steps 2, 3)
#   m2 = (s5 + s6)/2 = (0.8 + 1.0)/2 = 0.9     (steps 4, 5)
# Gains: g0 = m0 - s0 = 0.2, g1 = m1 - m0 = 0.4, g2 = m2 - m1 = 0.2; Σg = 0.8 = m2 - s0.
# c_j = g_j / (w Σg) = g_j / 1.6 = [0.125, 0.25, 0.125]; broadcast to steps:
C_HAND = [0.125, 0.125, 0.25, 0.25, 0.125, 0.125]
# Reward-to-go C_{>=k}: [1, 0.875, 0.75, 0.5, 0.25, 0.125]
RTG_HAND = [1.0, 0.875, 0.75, 0.5, 0.25, 0.125]

# A negative gain: s = [0.2, 0.5, 0.3, 0.2, 0.4, 0.9, 1.0]
#   m0 = 0.4, m1 = 0.3, m2 = 0.95;  g = [0.2, -0.1, 0.65];  Σg = 0.75;  w Σg = 1.5
#   c_j = [2/15, -1/15, 13/30] -> stays negative, row still sums to 1;
#   C_{>=k} = [1, 13/15, 11/15, 12/15, 13/15, 13/30]  (not monotone: a negative gain raises it)
S_NEG = [0.2, 0.5, 0.3, 0.2, 0.4, 0.9, 1.0]
C_NEG = [2 / 15, 2 / 15, -1 / 15, -1 / 15, 13 / 30, 13 / 30]
RTG_NEG = [1.0, 13 / 15, 11 / 15, 12 / 15, 13 / 15, 13 / 30]


def test_hand_worked_contributions_T6_w2():
    c, deg = coca_contributions(torch.tensor([S_HAND, S_NEG]), window=2)
    assert c.dtype == torch.float32 and deg.tolist() == [False, False]
    close(c, [C_HAND, C_NEG])
    close(reward_to_go(c), [RTG_HAND, RTG_NEG])
    close(c.sum(1), [1.0, 1.0])


def test_hand_worked_coca_step_returns():
    # A = 2, alpha = 0.25, no stage 2: R = A (α + (1-α) C) = 0.5 + 1.5 C
    #   = [0.5 + 1.5, 0.5 + 1.3125, 0.5 + 1.125, 0.5 + 0.75, 0.5 + 0.375, 0.5 + 0.1875]
    cred = CoCACredit(window=2, alpha=0.25, stage2="none")
    res = cred(make_ctx([2.0], [S_HAND]))
    close(res.step_advantages, [[2.0, 1.8125, 1.625, 1.25, 0.875, 0.6875]])
    close(res.contributions, [C_HAND])
    assert res.info["stage2"] == "none" and res.info["degenerate"] == 0
    # alpha = 0, A = 8 -> R = 8 C = [8, 7, 6, 4, 2, 1]; adv_clip 5 clamps the first three.
    res = CoCACredit(window=2, alpha=0.0, stage2="none", adv_clip=5.0)(make_ctx([8.0], [S_HAND]))
    close(res.step_advantages, [[5.0, 5.0, 5.0, 4.0, 2.0, 1.0]])


def test_window_one_is_the_per_step_similarity_jump():
    # w = 1: c_k = (s_{k+1} - s_k) / (s_T - s_0).  s = [0, 0.5, 0.75, 1] -> c = [0.5, 0.25, 0.25]
    c, _ = coca_contributions(torch.tensor([[0.0, 0.5, 0.75, 1.0]]), window=1)
    close(c, [[0.5, 0.25, 0.25]])


def test_trajectory_similarities_hand_values():
    # B = 1, T = 2, latent [2, 1]: x^(T) = (1, 0); x̂0^(0) = (0, 3) -> cos 0; x̂0^(1) = (2, 2) -> cos 1/sqrt(2)
    x0 = torch.tensor([[[[0.0], [3.0]], [[2.0], [2.0]]]])  # [1, 2, 2, 1]
    xT = torch.tensor([[[1.0], [0.0]]])  # [1, 2, 1]
    s = trajectory_similarities(x0, xT)
    assert s.shape == (1, 3) and s.dtype == torch.float32
    close(s, [[0.0, 1 / math.sqrt(2), 1.0]])
    assert s[0, -1].item() == 1.0
    with pytest.raises(ValueError, match="final_latent"):
        trajectory_similarities(x0, torch.zeros(1, 3, 1))


# ---------------------------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------------------------


@st.composite
def curves(draw, monotone: bool = False):
    """Random similarity curves [B, T + 1] with T a multiple of w ∈ {1, 2, 3, 5}."""
    w = draw(st.sampled_from([1, 2, 3, 5]))
    K = draw(st.integers(1, 5))
    B = draw(st.integers(1, 4))
    T = w * K
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    if monotone:
        s = torch.rand(B, T, generator=g).sort(dim=1).values  # non-decreasing in [0, 1)
    else:
        s = torch.rand(B, T, generator=g) * 2 - 1  # [-1, 1)
    s = torch.cat([s, torch.ones(B, 1)], dim=1)  # s_T = 1
    return s, w


def _rows_ok(s: torch.Tensor, w: int) -> torch.Tensor:
    """Rows whose gain sum is not tiny (the sum-to-1 tolerance scales with 1/|Σg|)."""
    T = s.shape[1] - 1
    total = s[:, 1:].reshape(s.shape[0], T // w, w).mean(-1)[:, -1] - s[:, 0]
    return total.abs() > 1e-3


@settings(max_examples=100, deadline=None)
@given(curves())
def test_prop_contributions_sum_to_one_and_telescope(data):
    s, w = data
    c, deg = coca_contributions(s, w)
    T = s.shape[1] - 1
    assert c.shape == (s.shape[0], T) and c.dtype == torch.float32
    ok = _rows_ok(s, w) | deg
    scale = 1.0 + c.abs().sum(1)
    assert ((c.sum(1) - 1).abs()[ok] <= 1e-5 * scale[ok]).all()
    # Dense per-step rewards ρ_k = A c_k telescope back to A.
    A = torch.linspace(-5, 5, s.shape[0])
    rho = A[:, None] * c
    assert ((rho.sum(1) - A).abs()[ok] <= 1e-5 * (1 + A.abs()[ok]) * scale[ok]).all()
    # C_{>=0} = 1 (the full advantage at the first step).
    assert ((reward_to_go(c)[:, 0] - 1).abs()[ok] <= 1e-5 * scale[ok]).all()


@settings(max_examples=100, deadline=None)
@given(curves(monotone=True))
def test_prop_reward_to_go_non_increasing_for_non_negative_gains(data):
    s, w = data
    c, _ = coca_contributions(s, w)
    assert (c >= 0).all()
    C = reward_to_go(c)
    assert (C[:, 1:] <= C[:, :-1] + 1e-7).all()


@settings(max_examples=100, deadline=None)
@given(curves(), st.integers(0, 2**31 - 1))
def test_prop_alpha_one_without_stage2_is_sparse(data, seed):
    s, w = data
    N = s.shape[0]
    g = torch.Generator().manual_seed(seed)
    adv = (torch.rand(N, generator=g) * 10 - 5).clamp(-5, 5)  # stage-1 advantages, already clipped
    valid = torch.rand(N, generator=g) > 0.2
    ctx = make_ctx(adv, s, prompts=[f"p{i % 2}" for i in range(N)], valid=valid)
    coca = CoCACredit(window=w, alpha=1.0, stage2="none")(ctx)
    sparse = SparseCredit()(ctx)
    assert torch.equal(coca.step_advantages, sparse.step_advantages)


@settings(max_examples=100, deadline=None)
@given(curves(), st.sampled_from([torch.float16, torch.bfloat16]))
def test_prop_half_inputs_computed_in_fp32(data, dtype):
    s, w = data
    s_half = s.to(dtype)
    c_half, deg_half = coca_contributions(s_half, w)
    c_ref, deg_ref = coca_contributions(s_half.float(), w)  # same values, upcast by hand
    assert c_half.dtype == torch.float32
    assert torch.equal(c_half, c_ref) and torch.equal(deg_half, deg_ref)


def test_half_latents_similarities_computed_in_fp32():
    # ||x||² of a 4x64x64 latent with entries ~ 30 is ~ 1.5e7: overflows fp16 (max 65504).
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randn(2, 3, 4, 64, 64, generator=g) * 30).half()
    xT = (torch.randn(2, 4, 64, 64, generator=g) * 30).half()
    s16 = trajectory_similarities(x0, xT)
    s32 = trajectory_similarities(x0.float(), xT.float())
    assert s16.dtype == torch.float32 and torch.isfinite(s16).all()
    assert torch.equal(s16, s32)
    sb = trajectory_similarities(x0.bfloat16(), xT.bfloat16())
    assert torch.equal(sb, trajectory_similarities(x0.bfloat16().float(), xT.bfloat16().float()))


# ---------------------------------------------------------------------------------------------
# Built-in assigners
# ---------------------------------------------------------------------------------------------


def test_uniform_by_true_index_and_sparse():
    sims = torch.rand(2, 5)
    ctx = make_ctx([2.0, -1.0], sims)
    # R[n, k] = A_n (T - k)/T, T = 4 -> factors [1, 0.75, 0.5, 0.25]
    res = UniformCredit()(ctx)
    close(res.step_advantages, [[2.0, 1.5, 1.0, 0.5], [-1.0, -0.75, -0.5, -0.25]], atol=0)
    close(res.contributions, torch.full((2, 4), 0.25), atol=0)
    res = SparseCredit()(ctx)
    close(res.step_advantages, [[2.0] * 4, [-1.0] * 4], atol=0)
    assert res.step_advantages.dtype == torch.float32


def test_degenerate_rows_fall_back_to_uniform_and_are_counted():
    # Row 1: s constant -> Σg = 0. Row 2: Σg = 1e-9 < SUM_EPS. Row 3: NaN similarities (invalid row).
    assert SUM_EPS == 1e-8
    sims = torch.tensor(
        [
            S_HAND,
            [1.0] * 7,
            [0.5, 0.5, 0.5, 0.5, 0.5, 0.5 + 1e-9, 0.5 + 1e-9],
            [NAN] * 7,
        ],
        dtype=torch.float64,
    )
    c, deg = coca_contributions(sims, window=2)
    assert deg.tolist() == [False, True, True, True]
    close(c[1:], torch.full((3, 6), 1 / 6), atol=0)
    res = CoCACredit(window=2, stage2="none")(
        make_ctx([1.0, 1.0, 1.0, 1.0], sims.float(), valid=[True, True, True, False])
    )
    assert res.info["degenerate"] == 2  # the invalid row is not counted
    # Degenerate rows behave like UCA: R = A (T - k)/T.
    close(res.step_advantages[1], [1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])


@pytest.mark.parametrize(
    "kind", ["sparse", "uniform", "coca-paper", "coca-batch", "coca-running", "coca-none"]
)
def test_invalid_rows_are_exactly_zero_and_do_not_touch_statistics(kind):
    def build():
        if kind.startswith("coca"):
            return make_credit("coca", window=2, stage2=kind.split("-")[1], buffer_size=4, min_count=2)
        return make_credit(kind)

    sims = torch.tensor([S_HAND, S_NEG, S_HAND, [NAN] * 7])
    with_bad = make_ctx(
        [1.0, -2.0, 0.5, 4.0], sims, prompts=["a", "a", "b", "a"], valid=[True, True, True, False]
    )
    clean = make_ctx([1.0, -2.0, 0.5], sims[:3], prompts=["a", "a", "b"])
    a, b = build(), build()
    for _ in range(3):  # several updates so buffered statistics kick in
        ra, rb = a(with_bad), b(clean)
        assert torch.equal(ra.step_advantages[3], torch.zeros(6))
        close(ra.step_advantages[:3], rb.step_advantages, atol=1e-6)
        assert torch.isfinite(ra.step_advantages).all()


# Stage 2 fixtures: T = 2, w = 1, s = [0, 0.5, 1] -> c = [0.5, 0.5], C_{>=k} = [1, 0.5], so with
# α = 0 a trajectory with advantage A has R = [A, A/2]: row mean 0.75 A, row std 0.25 |A|.
S_T2 = [0.0, 0.5, 1.0]


def _stage2_sequence(stage2: str, **kw):
    cred = CoCACredit(window=1, alpha=0.0, stage2=stage2, adv_clip=5.0, **kw)
    u1 = cred(make_ctx([2.0, -2.0, 4.0], [S_T2] * 3, prompts=["p", "p", "q"]))  # R = [[2,1],[-2,-1],[4,2]]
    u2 = cred(make_ctx([4.0, 0.0, 0.0], [S_T2] * 3, prompts=["p", "p", "q"]))  # R = [[4,2],[0,0],[0,0]]
    u3 = cred(make_ctx([-4.0], [S_T2], prompts=["p"]))  # R = [[-4,-2]]
    return cred, u1, u2, u3


def test_stage2_paper_reproduces_published_statistics():
    # buffer_size 4 (= 2 pairs), min_count 4 entries (= 2 updates).
    cred, u1, u2, u3 = _stage2_sequence("paper", buffer_size=4, min_count=4)
    e = 1e-6
    # Update 1: deque p = [μ=[1.5,-1.5], σ=[0.5,0.5]] has 2 < 4 entries -> whole-batch stats over
    # {2,1,-2,-1,4,2}: μ = 1, σ² = (1+0+9+4+9+1)/6 = 4 -> σ = 2.  Â = (R - 1)/2.
    close(u1.step_advantages, [[0.5, 0.0], [-1.5, -1.0], [1.5, 0.5]], atol=2e-6)
    assert u1.info["stage2"] == "paper" and u1.info["stage2_frac_buffered"] == 0.0
    # Update 2: p deque = [μ1, σ1, μ2=[3,0], σ2=[1,0]] -> 4 entries -> OLDEST pair (update 1):
    #   μ = mean([1.5, -1.5]) = 0;  σ = sqrt(mean([1.5²+0.5², 1.5²+0.5²]) - 0) = sqrt(2.5) = 1.581139
    #   Â_p = [[4, 2], [0, 0]] / 1.581139 = [[2.529822, 1.264911], [0, 0]]
    # q deque = [[3], [1], [0], [0]] -> oldest pair: μ = 3, σ = sqrt(9 + 1 - 9) = 1 -> Â_q = [-3, -3]
    s = math.sqrt(2.5)
    close(u2.step_advantages, [[4 / (s + e), 2 / (s + e)], [0.0, 0.0], [-3 / (1 + e), -3 / (1 + e)]])
    close(u2.step_advantages[0], [2.529822, 1.264911], atol=2e-6)
    assert u2.info["stage2_frac_buffered"] == 1.0
    # Update 3: p deque (maxlen 4) = [μ2=[3,0], σ2=[1,0], μ3=[-3], σ3=[1]] -> oldest pair is update 2:
    #   μ = mean([3, 0]) = 1.5;  σ = sqrt(mean([3²+1², 0²+0²]) - 1.5²) = sqrt(5 - 2.25) = sqrt(2.75)
    #   Â = ([-4, -2] - 1.5)/1.658312 = [-3.316625, -2.110579]   (update 3's own R is ignored)
    close(u3.step_advantages, [[-5.5 / (math.sqrt(2.75) + e), -3.5 / (math.sqrt(2.75) + e)]])
    close(u3.step_advantages, [[-3.316625, -2.110579]], atol=5e-6)
    state = cred.state_dict()
    assert state["buffers"]["p"] == [[3.0, 0.0], [1.0, 0.0], [-3.0], [1.0]]


def test_stage2_batch_and_running_differ_as_documented():
    e = 1e-6
    # batch: current batch per prompt only. Update 2, p values {4,2,0,0}: μ = 1.5,
    # σ² = (6.25 + 0.25 + 2.25 + 2.25)/4 = 2.75 -> Â_p = [[2.5, 0.5], [-1.5, -1.5]] / 1.658312;
    # q = [[0, 0]] alone: σ = 0 -> Â = 0 / (0 + eps) = 0.
    _, b1, b2, b3 = _stage2_sequence("batch")
    s = math.sqrt(2.75)
    close(b2.step_advantages, [[2.5 / (s + e), 0.5 / (s + e)], [-1.5 / (s + e), -1.5 / (s + e)], [0.0, 0.0]])
    # Update 3, a single row [-4, -2]: μ = -3, σ = 1 -> [-1, 1]; no memory of earlier updates.
    close(b3.step_advantages, [[-1 / (1 + e), 1 / (1 + e)]])

    # running: per-trajectory (mean, var) buffer of up to 4 samples, min_count 3 samples.
    cred, r1, r2, r3 = _stage2_sequence("running", buffer_size=4, min_count=3)
    # Update 1: p has 2 samples < 3 -> whole-batch stats (μ 1, σ 2), same as paper's fallback.
    close(r1.step_advantages, [[0.5, 0.0], [-1.5, -1.0], [1.5, 0.5]], atol=2e-6)
    # Update 2: p pools 4 trajectories {2,1,-2,-1,4,2,0,0}: μ = 6/8 = 0.75, E[R²] = 30/8 = 3.75,
    #   σ = sqrt(3.75 - 0.5625) = 1.785357 -> Â_p row 0 = ([4, 2] - 0.75)/1.785357 = [1.820364, 0.700140]
    # q has 2 samples < 3 -> whole batch {4,2,0,0,0,0}: μ = 1, σ² = 20/6 - 1 -> σ = 1.527525 -> -0.654654
    close(r2.step_advantages[0], [1.820364, 0.700140], atol=5e-6)
    close(r2.step_advantages[2], [-0.654654, -0.654654], atol=5e-6)
    # Update 3: p buffer keeps the last 4 samples: (-1.5,.25), (3,1), (0,0), (-3,1), i.e. values
    #   {-2,-1,4,2,0,0,-4,-2}: μ = -3/8, E[R²] = 45/8 -> σ = sqrt(5.625 - 0.140625) = 2.341874
    #   Â = ([-4, -2] + 0.375)/2.341874 = [-1.547905, -0.693889]
    close(r3.step_advantages, [[-1.547905, -0.693889]], atol=5e-6)
    assert [round(m, 6) for m, _ in cred.state_dict()["buffers"]["p"]] == [-1.5, 3.0, 0.0, -3.0]
    # All three differ on the same data.
    _, p1, p2, p3 = _stage2_sequence("paper", buffer_size=4, min_count=4)
    assert not torch.allclose(p3.step_advantages, r3.step_advantages)
    assert not torch.allclose(p3.step_advantages, b3.step_advantages)
    assert not torch.allclose(r3.step_advantages, b3.step_advantages)


def test_stage2_global_standardises_the_whole_step_return_matrix():
    """stage2=global (the published code without per-prompt tracking): one (μ, σ) over every valid entry of R,
    all prompts together; unscorable rows stay 0 and do not enter the statistics."""
    g = torch.Generator().manual_seed(0)
    sims = torch.rand(5, 5, generator=g).cumsum(1)
    sims = sims / sims[:, -1:]  # s_T = 1
    ctx = make_ctx([1.0, -0.5, 2.0, -1.0, 7.0], sims, prompts=["a", "a", "b", "b", "c"],
                   valid=[True, True, True, True, False])
    res = CoCACredit(window=2, alpha=0.0, stage2="global", adv_clip=None)(ctx)
    R = ctx.advantages[:4, None].double() * reward_to_go(res.contributions[:4]).double()  # [4, T]
    mu, sigma = R.mean(), ((R - R.mean()) ** 2).mean().sqrt()
    close(res.step_advantages[:4], (R - mu) / (sigma + 1e-6))
    assert torch.equal(res.step_advantages[4], torch.zeros(4))
    batch = CoCACredit(window=2, alpha=0.0, stage2="batch", adv_clip=None)(ctx)
    assert not torch.allclose(batch.step_advantages, res.step_advantages)  # per prompt is a different statistic


@pytest.mark.parametrize("stage2", ["paper", "running"])
def test_coca_state_dict_round_trip_json(stage2):
    g = torch.Generator().manual_seed(3)
    prompts = ["cat", "dog", "cat", "owl"]

    def ctx():
        s = torch.cat([torch.rand(4, 10, generator=g).sort(1).values, torch.ones(4, 1)], 1)
        return make_ctx(torch.randn(4, generator=g), s, prompts=prompts)

    a = CoCACredit(window=5, stage2=stage2, buffer_size=6, min_count=4)
    for _ in range(4):
        a(ctx())
    state = a.state_dict()
    b = CoCACredit(window=5, stage2=stage2, buffer_size=6, min_count=4)
    b.load_state_dict(json.loads(json.dumps(state)))
    assert b.state_dict() == state
    c = ctx()
    assert torch.equal(a(c).step_advantages, b(c).step_advantages)
    with pytest.raises(ValueError, match="same settings"):
        CoCACredit(window=5, stage2=stage2, buffer_size=8, min_count=4).load_state_dict(state)


def test_coca_rescale_effect_of_paper_stage2_is_visible():
    # Zero-mean A and a sigmoid-like similarity curve: stage 2 rescales early steps by ≈ 1/RMS(C) > 1.
    T, w = 50, 5
    k = torch.arange(T + 1, dtype=torch.float32)
    curve = torch.sigmoid((k - 25) / 5)
    curve = (curve - curve[0]) / (curve[-1] - curve[0]) * 0.9 + 0.1  # s_0 = 0.1, s_T = 1
    adv = torch.tensor([1.0, -1.0] * 8)
    ctx = make_ctx(adv, curve.repeat(16, 1), prompts=["p"] * 16)
    res = CoCACredit(window=w, stage2="paper")(ctx)  # first update -> whole-batch statistics
    C = reward_to_go(coca_contributions(curve[None], w)[0])[0]
    rms = C.pow(2).mean().sqrt()
    close(res.step_advantages[0, 0], 1.0 / rms, atol=1e-4)  # μ = 0, σ = RMS(C)
    assert 1.4 < float(res.step_advantages[0, 0]) < 2.0


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="not divisible by window = 4"):
        coca_contributions(torch.rand(2, 7), window=4)
    with pytest.raises(ValueError, match=r"unknown credit kind 'dense'.*coca.*sparse.*uniform"):
        make_credit("dense")
    with pytest.raises(ValueError, match="unknown stage2"):
        make_credit("coca", stage2="mean")
    with pytest.raises(ValueError, match="even"):
        CoCACredit(stage2="paper", buffer_size=31)
    bad_ctx = CreditContext(
        advantages=torch.ones(1),
        similarities=torch.ones(1, 3),  # T + 1 = 3, but timesteps say T = 6
        timesteps=torch.ones(1, 6),
        prompts=["p"],
        valid=torch.ones(1, dtype=torch.bool),
    )
    with pytest.raises(ValueError, match=r"similarities must be \[N, T \+ 1\] = \(1, 7\)"):
        SparseCredit()(bad_ctx)
    assert isinstance(make_credit("uniform"), UniformCredit)
    assert make_credit("coca", window=2).window == 2


# ---------------------------------------------------------------------------------------------
# User callables, logging, step selection
# ---------------------------------------------------------------------------------------------


def test_as_credit_assigner_validates_output():
    ctx = make_ctx([1.0, 2.0], [S_HAND, S_HAND], valid=[True, False])

    def my_credit(ctx):
        return ctx.advantages[:, None] * torch.linspace(1, 0, 6)

    cred = as_credit_assigner(my_credit)
    assert cred.name == "my_credit"
    res = cred(ctx)
    assert isinstance(res, CreditResult)
    close(res.step_advantages[0], torch.linspace(1, 0, 6), atol=0)
    assert torch.equal(res.step_advantages[1], torch.zeros(6))  # invalid row forced to 0
    close(res.contributions, torch.full((2, 6), 1 / 6), atol=0)

    def wrong_shape(ctx):
        return torch.zeros(2, 5)

    with pytest.raises(ValueError, match=r"'wrong_shape'.*\(2, 5\).*\(2, 6\)"):
        as_credit_assigner(wrong_shape)(ctx)

    def wrong_dtype(ctx):
        return torch.zeros(2, 6, dtype=torch.float64)

    with pytest.raises(ValueError, match="'wrong_dtype'.*float32"):
        as_credit_assigner(wrong_dtype)(ctx)

    def non_finite(ctx):
        return torch.full((2, 6), NAN)

    with pytest.raises(ValueError, match="'non_finite'.*non-finite"):
        as_credit_assigner(non_finite)(ctx)

    def returns_list(ctx):
        return [0.0]

    with pytest.raises(TypeError, match="'returns_list' returned list"):
        as_credit_assigner(returns_list)(ctx)


def test_credit_shares():
    close(list(credit_shares(torch.full((3, 6), 1 / 6)).values()), [1 / 3] * 3)
    shares = credit_shares(torch.tensor([C_HAND]))
    # thirds of 6 steps: [0.125 + 0.125], [0.25 + 0.25], [0.125 + 0.125]
    assert shares == pytest.approx({"first": 0.25, "middle": 0.5, "last": 0.25})


def test_select_steps_credit_picks_top_abs_advantage():
    adv = torch.tensor([[0.1, -3.0, 2.0, 0.5], [1.0, 1.0, -1.0, 4.0]])
    idx = select_steps(adv, 2, "credit", torch.Generator().manual_seed(0))
    assert idx.dtype == torch.long and idx.shape == (2, 2)
    assert set(idx[0].tolist()) == {1, 2}
    assert set(idx[1].tolist()) == {3, 0}  # ties among |A| = 1 broken toward the earliest step


def test_select_steps_all_random_and_determinism():
    N, T = 64, 10
    adv = torch.randn(N, T)
    idx = select_steps(adv, T, "all", torch.Generator().manual_seed(0))
    assert torch.equal(idx.sort(1).values, torch.arange(T).expand(N, T))  # every step exactly once
    assert not torch.equal(idx, torch.arange(T).expand(N, T))  # ... in a shuffled order
    for mode, k in [("all", T), ("random", 4), ("credit", 4)]:
        a = select_steps(adv, k, mode, torch.Generator().manual_seed(7))
        b = select_steps(adv, k, mode, torch.Generator().manual_seed(7))
        c = select_steps(adv, k, mode, torch.Generator().manual_seed(8))
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert all(len(set(row.tolist())) == k for row in a)  # distinct steps per row
    # Index alignment (§9.7): plant Â[n, k] = 1000 n + k; every gathered pair keeps its own value.
    planted = (1000 * torch.arange(N)[:, None] + torch.arange(T)[None, :]).float()
    idx = select_steps(planted, 5, "random", torch.Generator().manual_seed(1))
    assert torch.equal(planted.gather(1, idx), (1000 * torch.arange(N)[:, None] + idx).float())
    with pytest.raises(ValueError, match="k must equal T"):
        select_steps(adv, 3, "all", torch.Generator())
    with pytest.raises(ValueError, match="unknown step-selection mode"):
        select_steps(adv, 3, "top", torch.Generator())
