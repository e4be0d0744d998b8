"""Log-prob parity of the DDIM step and the on-policy ratio of the training recomputation."""

import pytest
import torch
from diffusers import DDIMScheduler

from diffusion_rl.ddim_logprob import ddim_step_with_logprob
from diffusion_rl.models import build_tiny_pipeline, prepare_trainable_denoiser
from diffusion_rl.sampling import recompute_log_prob, sample_trajectories


def _scheduler(**kw) -> DDIMScheduler:
    s = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing", **kw,
    )
    s.set_timesteps(10)
    return s


@pytest.fixture(scope="module")
def tiny_pipe():
    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_log_prob_equals_torch_normal_mean_over_dims():
    sched = _scheduler()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    eps = torch.randn(3, 4, 8, 8, generator=g)
    t = sched.timesteps[[0, 4, 9]]  # a batch of different timesteps
    out = ddim_step_with_logprob(sched, eps, t, x, eta=1.0, generator=torch.Generator().manual_seed(1))
    expected = torch.distributions.Normal(out.mean, out.std).log_prob(out.prev_sample.float()).mean(dim=(1, 2, 3))
    assert out.log_prob.shape == (3,)
    assert out.log_prob.dtype == torch.float32
    torch.testing.assert_close(out.log_prob, expected, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("index", [0, 5, 9])
def test_sample_equals_diffusers_step_with_same_noise(index):
    sched = _scheduler()
    g = torch.Generator().manual_seed(index)
    x = torch.randn(2, 4, 8, 8, generator=g)
    eps = torch.randn(2, 4, 8, 8, generator=g)
    t = sched.timesteps[index]
    ours = ddim_step_with_logprob(sched, eps, t, x, eta=1.0, generator=torch.Generator().manual_seed(7))
    ref = sched.step(eps, t, x, eta=1.0, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours.prev_sample, ref.prev_sample, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.pred_original_sample, ref.pred_original_sample, atol=1e-5, rtol=1e-5)


def test_given_prev_sample_is_scored_not_resampled():
    sched = _scheduler()
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    first = ddim_step_with_logprob(sched, eps, sched.timesteps[3], x, generator=torch.Generator().manual_seed(0))
    again = ddim_step_with_logprob(sched, eps, sched.timesteps[3], x, prev_sample=first.prev_sample)
    assert torch.equal(again.prev_sample, first.prev_sample)
    torch.testing.assert_close(again.log_prob, first.log_prob, atol=0, rtol=0)


def test_fp16_inputs_give_fp32_log_probs():
    sched = _scheduler()
    x, eps = torch.randn(2, 4, 8, 8).half(), torch.randn(2, 4, 8, 8).half()
    out = ddim_step_with_logprob(sched, eps, sched.timesteps[2], x, generator=torch.Generator().manual_seed(0))
    assert out.prev_sample.dtype == torch.float16
    assert out.log_prob.dtype == torch.float32 and torch.isfinite(out.log_prob).all()


def test_eta_zero_and_deterministic_last_step_are_errors():
    sched = _scheduler()
    x, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="eta > 0"):
        ddim_step_with_logprob(sched, eps, sched.timesteps[0], x, eta=0.0)
    one = _scheduler()
    one.final_alpha_cumprod = torch.tensor(1.0)  # what set_alpha_to_one=True does
    with pytest.raises(ValueError, match="set_alpha_to_one"):
        ddim_step_with_logprob(one, eps, one.timesteps[-1], x)


def test_on_policy_ratio_is_one_for_any_batch_composition(tiny_pipe):
    """Recomputing log pi of stored transitions with the training forward gives ratio 1 (fp32, CPU),
    also when the batch mixes samples and steps differently than at sampling time."""
    pipe = tiny_pipe
    prepare_trainable_denoiser(pipe, True, 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    prompts = ["a red circle", "two blue squares", "a cat", "a dog"]
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    traj = sample_trajectories(pipe, pipe.unet, prompts, gens, num_steps=6, guidance_scale=5.0, eta=1.0)
    assert traj.log_probs.shape == (4, 6) and traj.latents.shape == (4, 6, 4, 8, 8)
    assert traj.similarities.shape == (4, 7) and torch.allclose(traj.similarities[:, -1], torch.ones(4))
    # A shuffled training batch: 3 (sample, step) pairs with different timesteps.
    rows, steps = torch.tensor([2, 0, 3]), torch.tensor([5, 1, 3])
    out = recompute_log_prob(
        pipe, pipe.unet, traj.latents[rows, steps], traj.next_latents[rows, steps], traj.timesteps[rows, steps],
        {k: v[rows] for k, v in traj.cond.items()}, 5.0, 1.0,
    )
    ratio = torch.exp(out.log_prob - traj.log_probs[rows, steps])
    torch.testing.assert_close(ratio, torch.ones(3), atol=1e-5, rtol=0)
    # and the gradient reaches the LoRA parameters through mu only
    out.log_prob.sum().backward()
    grads = [p.grad for p in pipe.unet.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
