"""The rectified-flow MDP (Flow-GRPO's SDE step) and the SD3 / FLUX / SDXL families: step parity with diffusers,
the Gaussian log-prob, ratio 1 on recomputation, the ODE image at noise 0, SDE windows, LoRA files the plain
diffusers pipelines load, and short training runs per family through the CLI."""

import math
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from typer.testing import CliRunner

from diffusion_rl.cli import app
from diffusion_rl.families import family_of
from diffusion_rl.flow_logprob import flow_sde_step_with_logprob, sde_std
from diffusion_rl.models import load_pipeline, prepare_trainable_denoiser, save_trained_weights
from diffusion_rl.sampling import FlowRule, recompute_log_prob, sample_trajectories
from diffusion_rl.tiny_pipelines import build_tiny_flux, build_tiny_sd3, build_tiny_sdxl

TINY_YAML = Path(__file__).parents[1] / "configs" / "tiny.yaml"
PROMPTS = ["a red circle", "two blue squares", "a cat", "a dog"]
runner = CliRunner()


# ------------------------------------------------------------------------------------------- the step


def test_noise_zero_is_the_diffusers_euler_step():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(6)
    x, v = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(3, 4, 8, 8)
    for k, t in enumerate(sched.timesteps):
        sched._step_index = k  # diffusers' own step at index k
        expected = sched.step(v, t, x).prev_sample
        ours = flow_sde_step_with_logprob(v, sched.sigmas[k], sched.sigmas[k + 1], x, noise_level=0.0,
                                          sigma_cap=float(sched.sigmas[1]))
        torch.testing.assert_close(ours.prev_sample, expected, atol=1e-6, rtol=0)
        assert torch.equal(ours.log_prob, torch.zeros(3))  # a deterministic step has no density
        torch.testing.assert_close(ours.pred_original_sample, x - sched.sigmas[k] * v)


def test_log_prob_is_the_normal_density_mean_over_dims():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    sigma, sigma_next = torch.tensor([1.0, 0.8, 0.5, 0.2]), torch.tensor([0.8, 0.5, 0.2, 0.0])
    out = flow_sde_step_with_logprob(v, sigma, sigma_next, x, noise_level=0.7, sigma_cap=0.8,
                                     generator=[torch.Generator().manual_seed(i) for i in range(4)])
    # by hand: std_t = a sqrt(s / (1 - s)) with s = 1 -> the cap in the denominator, transition std std_t sqrt(-dt)
    std_t = 0.7 * torch.sqrt(sigma / (1 - torch.tensor([0.8, 0.8, 0.5, 0.2])))
    torch.testing.assert_close(sde_std(sigma, 0.7, 0.8), std_t)
    dt = (sigma_next - sigma)[:, None, None, None]
    s, st = sigma[:, None, None, None], std_t[:, None, None, None]
    mean = x * (1 + st**2 / (2 * s) * dt) + v * (1 + st**2 * (1 - s) / (2 * s)) * dt
    torch.testing.assert_close(out.mean, mean)
    normal = torch.distributions.Normal(mean, st * torch.sqrt(-dt))
    torch.testing.assert_close(out.log_prob, normal.log_prob(out.prev_sample).mean(dim=(1, 2, 3)), atol=1e-5, rtol=0)
    # the SDE step's mean is the ODE step plus the score correction, which vanishes as a -> 0
    ode = flow_sde_step_with_logprob(v, sigma, sigma_next, x, noise_level=1e-6, sigma_cap=0.8)
    torch.testing.assert_close(ode.mean, x + v * dt, atol=1e-5, rtol=0)


def test_bad_flow_steps_are_refused():
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="sigma_cap"):
        flow_sde_step_with_logprob(x, torch.tensor([1.0]), torch.tensor([0.5]), x)
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        flow_sde_step_with_logprob(x, torch.tensor([0.5]), torch.tensor([0.6]), x)
    with pytest.raises(ValueError, match="noise_level"):
        flow_sde_step_with_logprob(x, torch.tensor([0.5]), torch.tensor([0.4]), x, noise_level=-1.0)


# ------------------------------------------------------------------------------------------- the MDP


@pytest.mark.parametrize("build", [build_tiny_sd3, build_tiny_flux], ids=["sd3", "flux"])
def test_recomputed_flow_transitions_give_ratio_one(build):
    pipe = build(0)
    prepare_trainable_denoiser(pipe, True, 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    family, rule = family_of(pipe, 8), FlowRule(0.7)
    den = family.denoiser(pipe)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    traj = sample_trajectories(pipe, den, PROMPTS, gens, 5, 4.0, 1.0, family=family, rule=rule)
    assert traj.log_probs.shape == (4, 5) and bool(torch.isfinite(traj.log_probs).all())
    assert traj.timesteps.dtype == torch.float32 and float(traj.timesteps[0, 0]) == 1.0
    assert torch.equal(traj.next_timesteps[:, :-1], traj.timesteps[:, 1:]) and float(traj.next_timesteps[0, -1]) == 0
    assert traj.similarities.shape == (4, 6) and torch.allclose(traj.similarities[:, -1], torch.ones(4))
    # a shuffled training batch mixing samples and steps
    rows, steps = torch.tensor([2, 0, 3, 1]), torch.tensor([4, 0, 2, 1])
    out = recompute_log_prob(
        pipe, den, traj.latents[rows, steps], traj.next_latents[rows, steps], traj.timesteps[rows, steps],
        {k: v[rows] for k, v in traj.cond.items()}, 4.0, 1.0, next_timesteps=traj.next_timesteps[rows, steps],
        family=family, rule=rule,
    )
    ratio = torch.exp(out.log_prob - traj.log_probs[rows, steps])
    torch.testing.assert_close(ratio, torch.ones(4), atol=1e-5, rtol=0)
    out.log_prob.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in den.parameters() if p.requires_grad)


@pytest.mark.parametrize("build", [build_tiny_sd3, build_tiny_flux], ids=["sd3", "flux"])
def test_noise_zero_sampling_reproduces_the_pipeline_image(build):
    """Flow-GRPO's FAQ check: with every step deterministic, drl's sampler gives the diffusers pipeline's image."""
    pipe = build(0)
    pipe.set_progress_bar_config(disable=True)
    family = family_of(pipe, 8)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    ours = sample_trajectories(pipe, family.denoiser(pipe), PROMPTS[:2], gens(), 4, 3.0, 1.0, family=family,
                               rule=FlowRule(0.7), stochastic_steps=torch.zeros(4, dtype=torch.bool))
    theirs = pipe(PROMPTS[:2], num_inference_steps=4, guidance_scale=3.0, generator=gens(), output_type="pt",
                  max_sequence_length=8, height=16, width=16).images
    torch.testing.assert_close(ours.images, theirs.float(), atol=1e-4, rtol=0)
    assert torch.equal(ours.log_probs, torch.zeros(2, 4))


def test_sde_window_steps_are_the_only_stochastic_ones():
    pipe = build_tiny_sd3(0)
    family = family_of(pipe, 8)
    window = torch.tensor([False, True, True, False, False])
    traj = sample_trajectories(pipe, family.denoiser(pipe), PROMPTS[:2], [torch.Generator().manual_seed(i) for i in range(2)],
                               5, 4.0, 1.0, family=family, rule=FlowRule(0.7), stochastic_steps=window)
    assert bool((traj.log_probs[:, window] != 0).all()) and bool((traj.log_probs[:, ~window] == 0).all())


def test_timestep_shift_overrides_the_scheduler_shift():
    pipe = build_tiny_sd3(0)
    family = family_of(pipe, 8)
    sigmas_3, _ = FlowRule(0.7).schedule(pipe, family, 4, "cpu")
    sigmas_1, _ = FlowRule(0.7, shift=1.0).schedule(pipe, family, 4, "cpu")
    assert math.isclose(float(sigmas_1[1]), 0.667, abs_tol=1e-3)  # linspace(1000, 1, 4) / 1000, unshifted
    assert math.isclose(float(sigmas_3[1]), 3 * 0.667 / (1 + 2 * 0.667), abs_tol=1e-3)  # SD3's shift 3
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        FlowRule(0.7, shift=2.0).schedule(build_tiny_flux(0), family_of(build_tiny_flux(0)), 4, "cpu")


# ------------------------------------------------------------------------------------------- LoRA files


@pytest.mark.parametrize("family_name,build", [("sd3", build_tiny_sd3), ("flux", build_tiny_flux),
                                               ("sdxl", build_tiny_sdxl)])
def test_saved_lora_loads_in_the_plain_diffusers_pipeline(family_name, build, tmp_path):
    pipe = build(1)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    params = prepare_trainable_denoiser(pipe, True, 4, 8.0, targets)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))  # trained-looking adapters (lora_B starts at 0)
    family = family_of(pipe, 8)
    save_trained_weights(family.denoiser(pipe), True, tmp_path, family_name)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    fresh = build(1)
    fresh.load_lora_weights(tmp_path)
    den, den_fresh = family.denoiser(pipe), family.denoiser(fresh)
    trained = {n: m for n, m in den.named_modules() if hasattr(m, "lora_B")}
    loaded = {n: m for n, m in den_fresh.named_modules() if hasattr(m, "lora_B")}
    assert trained.keys() == loaded.keys() and len(trained) > 0
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    a = sample_trajectories(pipe, den, PROMPTS[:2], gens(), 3, 3.0, 1.0, family=family)
    b = sample_trajectories(fresh, den_fresh, PROMPTS[:2], gens(), 3, 3.0, 1.0, family=family_of(fresh, 8))
    torch.testing.assert_close(a.images, b.images, atol=1e-5, rtol=0)  # same scaling alpha / r as trained


# ------------------------------------------------------------------------------------------- training runs


@pytest.mark.parametrize("model", ["builtin:tiny-random-sd3", "builtin:tiny-random-flux", "builtin:tiny-random-sdxl"])
def test_one_epoch_per_family_through_the_cli(model, tmp_path):
    out = tmp_path / "run"
    sets = [f"model.pretrained={model}", f"output_dir={out}", "num_epochs=1", "sample.num_steps=4",
            "sample.batch_size=4", "sample.num_batches_per_epoch=1", "sample.images_per_prompt=2",
            "train.batch_size=2", "credit.kind=coca", "credit.window=2", "eval.prompts=[a red circle]",
            "logging.image_every=0", "checkpoint.every=1"]
    if "sdxl" not in model:
        sets += ["sample.sde_window_size=2", "sample.sde_window_range=[0,3]"]
    result = runner.invoke(app, ["train", str(TINY_YAML), *[a for s in sets for a in ("--set", s)]])
    assert result.exit_code == 0, result.output
    assert ("flow MDP" if "sdxl" not in model else "ddim MDP") in result.output
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert any((out / "checkpoints").iterdir())
    sample = runner.invoke(app, ["sample", str(out), "-p", "a red circle", "-n", "1", "--out", str(tmp_path / "s"),
                                 "--steps", "2"])
    assert sample.exit_code == 0, sample.output
    assert (tmp_path / "s" / "grid.png").is_file()
    ev = runner.invoke(app, ["eval", str(out), "--prompts", str(_prompt_file(tmp_path)), "--reward",
                             "jpeg_compressibility", "--num", "1", "--steps", "2", "--json"])
    assert ev.exit_code == 0, ev.output


def _prompt_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a red circle\n")
    return path


def test_flow_only_options_are_refused_on_a_ddim_model(tmp_path):
    result = runner.invoke(app, ["train", str(TINY_YAML), "--set", "sample.sde_window_size=2",
                                 "--set", f"output_dir={tmp_path}", "--set", "num_epochs=1"])
    assert result.exit_code == 2 and "flow models" in result.output


def test_loading_a_saved_sd3_pipeline_without_t5(tmp_path):
    pipe = build_tiny_sd3(2)
    pipe.text_encoder_3, pipe.tokenizer_3 = None, None
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_pipeline(str(tmp_path), local_files_only=True)
    assert type(loaded).__name__ == "StableDiffusion3Pipeline" and loaded.text_encoder_3 is None
    assert isinstance(loaded.scheduler, FlowMatchEulerDiscreteScheduler)
    for a, b in zip(loaded.transformer.parameters(), pipe.transformer.parameters(), strict=True):
        assert torch.equal(a, b)


def test_cfg_free_training_recomputes_without_guidance():
    """train.guidance_scale=1 (Flow-GRPO's CFG-free training): the trainer's log-prob of a transition sampled with
    CFG uses the conditional model alone, so the ratio starts away from 1; unset, it is the sampling guidance."""
    from types import SimpleNamespace

    from diffusion_rl.config import load_config
    from diffusion_rl.trainer import _log_prob

    pipe = build_tiny_sd3(0)
    family, rule = family_of(pipe, 8), FlowRule(0.7)
    den = family.denoiser(pipe)
    traj = sample_trajectories(pipe, den, PROMPTS[:2], [torch.Generator().manual_seed(i) for i in range(2)], 3, 4.0,
                               1.0, family=family, rule=rule)
    transition = {"latents": traj.latents[:, 1], "next_latents": traj.next_latents[:, 1],
                  "timesteps": traj.timesteps[:, 1], "next_timesteps": traj.next_timesteps[:, 1], "cond": traj.cond}
    ratios = {}
    for guidance in (None, 1.0):
        cfg = load_config(TINY_YAML, ["sample.guidance_scale=4.0"] + ([f"train.guidance_scale={guidance}"] if guidance else []))
        run = SimpleNamespace(cfg=cfg, pipe=pipe, family=family, rule=rule)
        with torch.no_grad():
            ratios[guidance] = torch.exp(_log_prob(run, den, transition).log_prob - traj.log_probs[:, 1])
    torch.testing.assert_close(ratios[None], torch.ones(2), atol=1e-5, rtol=0)
    assert bool(((ratios[1.0] - 1).abs() > 1e-4).all())
