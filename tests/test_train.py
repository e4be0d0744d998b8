"""The trainer end to end on the tiny pipeline: artefacts, TensorBoard, LoRA, resume, failure handling."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rewards
from diffusion_rl.config import PromptsConfig, load_config
from diffusion_rl.prompts import PromptError, PromptSampler, PromptSet, load_prompts
from diffusion_rl.sampling import Trajectories
from diffusion_rl.trainer import NonFiniteTrainingError, train, training_view

REPO = Path(__file__).parents[1]
TINY = REPO / "configs" / "tiny.yaml"
COCA = ["credit.kind=coca", "credit.window=2", "credit.min_count=2", "train.timestep_selection=credit",
        "train.timestep_fraction=0.5"]


def drl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process."""
    proc = subprocess.run([sys.executable, "-m", "diffusion_rl.cli", *args], capture_output=True, text=True, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"drl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def lora(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "lora" / "pytorch_lora_weights.safetensors")


# --------------------------------------------------------------------------------------------- units


def test_training_view_keeps_each_pair_with_its_own_advantage():
    """Plant A[n, k] = 1000 n + k; after the sample and time shuffles every trained (sample, step) pair
    must carry its own advantage, timestep, latents and old log-prob."""
    N, T = 5, 6
    latents = torch.arange(N * T, dtype=torch.float32).reshape(N, T, 1, 1, 1).expand(N, T, 4, 2, 2).clone()
    samples = Trajectories(
        cond={"embeds": torch.arange(N, dtype=torch.float32)[:, None, None].expand(N, 3, 2).clone(),
              "negative_embeds": torch.zeros(N, 3, 2)},
        latents=latents,
        next_latents=latents + 0.5,
        timesteps=torch.arange(T)[None].expand(N, T) * 100 + torch.arange(N)[:, None],
        next_timesteps=torch.arange(T)[None].expand(N, T) * 100 + torch.arange(N)[:, None] - 100,
        log_probs=-torch.arange(N * T, dtype=torch.float32).reshape(N, T),
        similarities=torch.zeros(N, T + 1),
        images=torch.zeros(N, 3, 4, 4),
    )
    planted = 1000.0 * torch.arange(N)[:, None] + torch.arange(T)[None]  # [N, T]
    for mode, k in (("all", T), ("random", 3), ("credit", 2)):
        view = training_view(samples, planted, k, mode, torch.Generator().manual_seed(3))
        n = view["perm"][:, None].expand(N, k)
        s = view["steps"]
        assert torch.equal(view["advantages"], 1000.0 * n + s)
        assert torch.equal(view["timesteps"], s * 100 + n)
        assert torch.equal(view["log_probs"], -(n * T + s).float())
        assert torch.equal(view["latents"][..., 0, 0, 0], (n * T + s).float())
        assert torch.equal(view["next_latents"][..., 0, 0, 0], (n * T + s).float() + 0.5)
        assert torch.equal(view["next_timesteps"], s * 100 + n - 100)
        assert torch.equal(view["cond"]["embeds"][:, 0, 0], view["perm"].float())
        if mode == "all":
            assert torch.equal(s.sort(1).values, torch.arange(T)[None].expand(N, T))
        if mode == "credit":  # the two largest |A| per row are the last two steps
            assert torch.equal(s.sort(1).values, torch.tensor([[4, 5]] * N))
    # a flow model's SDE window: the advantages of steps 2..4 only, true step indices back
    view = training_view(samples, planted[:, 2:5], 2, "random", torch.Generator().manual_seed(4), first_step=2)
    n, s = view["perm"][:, None].expand(N, 2), view["steps"]
    assert bool(((s >= 2) & (s < 5)).all())
    assert torch.equal(view["advantages"], 1000.0 * n + s) and torch.equal(view["timesteps"], s * 100 + n)
    # the time shuffle really permutes (not the identity order for every row)
    view = training_view(samples, planted, T, "all", torch.Generator().manual_seed(0))
    assert not torch.equal(view["steps"], torch.arange(T)[None].expand(N, T))


def test_prompt_sources(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n a dog \n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat", "id": 1}\n{"prompt": "a dog", "id": 2}\n')
    assert load_prompts(PromptsConfig(source="file", path=str(tmp_path / "p.txt"))).prompts == ["a cat", "a dog"]
    js = load_prompts(PromptsConfig(source="file", path=str(tmp_path / "p.jsonl")))
    assert js.prompts == ["a cat", "a dog"] and js.metadata == [{"id": 1}, {"id": 2}]
    import datasets

    datasets.Dataset.from_dict({"text": ["x", "y", "z"], "tag": [1, 2, 3]}).save_to_disk(str(tmp_path / "ds"))
    ds = load_prompts(PromptsConfig(source="dataset", dataset=str(tmp_path / "ds"), column="text"))
    assert ds.prompts == ["x", "y", "z"] and ds.metadata[2] == {"tag": 3}
    with pytest.raises(PromptError, match="no column 'prompt'"):
        load_prompts(PromptsConfig(source="dataset", dataset=str(tmp_path / "ds")))
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n')
    with pytest.raises(PromptError, match="bad.jsonl:1"):
        load_prompts(PromptsConfig(source="file", path=str(tmp_path / "bad.jsonl")))


def test_prompt_sampler_gives_ranks_disjoint_prompts_and_is_deterministic():
    ps = PromptSet([f"p{i}" for i in range(10)], [{}] * 10)
    r0 = PromptSampler(ps, 1, 2, 0).epoch_indices(3, 2, 2)
    r1 = PromptSampler(ps, 1, 2, 1).epoch_indices(3, 2, 2)
    flat0, flat1 = sum(r0, []), sum(r1, [])
    assert not set(flat0) & set(flat1)
    assert PromptSampler(ps, 1, 2, 0).epoch_indices(3, 2, 2) == r0
    assert PromptSampler(ps, 1, 2, 0).epoch_indices(4, 2, 2) != r0
    other = PromptSampler(PromptSet(["q"], [{}]), 1, 1, 0)
    with pytest.raises(PromptError, match="differs from the checkpoint"):
        other.load_state_dict(PromptSampler(ps, 1, 1, 0).state_dict())


# ------------------------------------------------------------------------------- in-process training


def _tiny(tmp_path, *overrides):
    return load_config(TINY, [f"output_dir={tmp_path}", "num_epochs=1", "checkpoint.every=0", *overrides])


def test_overlapped_reward_scoring_equals_synchronous(tmp_path):
    a = train(_tiny(tmp_path / "a", "reward.overlap=true"))
    b = train(_tiny(tmp_path / "b", "reward.overlap=false"))
    assert a.history[0]["reward/mean"] == b.history[0]["reward/mean"]
    la, lb = lora(tmp_path / "a"), lora(tmp_path / "b")
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)


def test_skipped_final_steps_are_never_trained(tmp_path):
    """All credit on the final step: with train.skip_final_steps=1 nothing is trained (the LoRA up-projections stay
    exactly zero); without it the same run moves them."""
    def final_step_only(ctx):
        a = torch.zeros(len(ctx.advantages), ctx.num_steps)
        a[:, -1] = ctx.advantages
        return a

    ups = {}
    for skip in (0, 1):
        result = train(_tiny(tmp_path / f"skip{skip}", f"train.skip_final_steps={skip}"), credit_fn=final_step_only)
        assert result.history[0]["credit/steps_trained_per_trajectory"] == 4 - skip
        ups[skip] = [v for k, v in lora(tmp_path / f"skip{skip}").items() if "lora_B" in k]  # peft key names
        assert ups[skip]
    assert all(torch.count_nonzero(v) == 0 for v in ups[1])
    assert any(torch.count_nonzero(v) > 0 for v in ups[0])


def test_unscorable_rewards_are_masked_counted_or_an_error(tmp_path):
    jpeg = rewards.load("jpeg_compressibility")

    def half_broken(images, prompts, metadata):
        scores, info = jpeg(images, prompts, metadata)
        scores[0] = float("nan")  # the first sample of every batch cannot be scored
        return scores, info

    res = train(_tiny(tmp_path / "mask", "reward.nonfinite=mask", "reward.max_unscorable_fraction=0.5"), reward_fn=half_broken)
    assert res.history[0]["reward/unscorable"] == 1
    assert torch.isfinite(torch.tensor(res.history[0]["reward/mean"]))
    with pytest.raises(rewards.RewardError, match="half_broken.*non-finite"):
        train(_tiny(tmp_path / "err", "reward.nonfinite=error"), reward_fn=half_broken)
    with pytest.raises(rewards.RewardError, match="max_unscorable_fraction"):
        train(_tiny(tmp_path / "frac", "reward.max_unscorable_fraction=0.1"), reward_fn=half_broken)


def test_a_crashed_run_resumes_on_the_same_lr_schedule(tmp_path):
    """The schedule is a function of the global step: a 3-epoch cosine run that dies while scoring its third
    epoch, resumed from its epoch-2 checkpoint, logs the same lr curve and ends with the same weights as an
    uninterrupted run."""
    sets = ["num_epochs=3", "checkpoint.every=1", "train.lr_schedule=cosine", "train.lr_warmup_steps=1"]
    jpeg = rewards.load("jpeg_compressibility")
    calls = []

    def dies_in_epoch_3(images, prompts, metadata):  # tiny.yaml: one scored batch per epoch
        calls.append(len(prompts))
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return jpeg(images, prompts, metadata)

    straight = train(_tiny(tmp_path / "a", *sets))
    with pytest.raises(rewards.RewardError, match="simulated crash"):  # the reward wrapper names the failure
        train(_tiny(tmp_path / "b", *sets), reward_fn=dies_in_epoch_3)
    resumed = train(_tiny(tmp_path / "b", *sets), resume="auto")
    assert [r["epoch"] for r in resumed.history] == [2]
    # 3 epochs x 2 updates: 1 warm-up step, then a half cosine over the other 5; lr after steps 2, 4, 6
    peak = load_config(TINY).train.learning_rate
    expected = [peak * 0.5 * (1 + math.cos(math.pi * (s - 1) / 5)) for s in (2, 4, 6)]
    assert [r["loss/learning_rate"] for r in straight.history] == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert [r["loss/learning_rate"] for r in metrics(tmp_path / "b")] == pytest.approx(expected, rel=1e-6, abs=1e-12)
    a, b = lora(tmp_path / "a"), lora(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_nonfinite_steps_are_skipped_then_abort(tmp_path):
    """An absurd learning rate blows the LoRA weights up: later steps have non-finite loss and
    gradients, are skipped (weights untouched) and the run stops after max_consecutive_nonfinite."""
    cfg = _tiny(tmp_path, "train.learning_rate=1e30", "train.max_consecutive_nonfinite=1", "num_epochs=3")
    with pytest.raises(NonFiniteTrainingError, match="1 optimizer steps in a row had a non-finite loss"):
        train(cfg)


# ---------------------------------------------------------------------------- the real CLI, CoCA


@pytest.fixture(scope="module")
def coca_runs(tmp_path_factory):
    """A straight 3-epoch CoCA run, and the same run as 2 epochs + resume + 1, through the CLI."""
    root = tmp_path_factory.mktemp("runs")
    straight, resumed = root / "straight", root / "resumed"
    drl("train", str(TINY), "--output-dir", str(straight), *sum([["--set", o] for o in COCA], []))
    drl("train", str(TINY), "--output-dir", str(resumed), "--set", "num_epochs=2", *sum([["--set", o] for o in COCA], []))
    out = drl("train", str(TINY), "--output-dir", str(resumed), "--resume", "auto", *sum([["--set", o] for o in COCA], []))
    assert "resumed from" in out.stdout and "at epoch 2" in out.stdout
    return straight, resumed


def test_run_writes_artefacts_and_derived_numbers(coca_runs):
    straight, _ = coca_runs
    assert (straight / "config.yaml").is_file() and load_config(straight / "config.yaml").credit.kind == "coca"
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["checkpoint-000002", "checkpoint-000003"]
    assert sorted(p.name for p in (straight / "images").iterdir()) == ["epoch_0001.png", "epoch_0002.png", "epoch_0003.png"]
    rows = metrics(straight)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert all(r["credit/steps_trained_per_trajectory"] == 2 and r["credit/steps_skipped_per_trajectory"] == 2 for r in rows)
    assert rows[-1]["global_step"] == 3 * 2  # 4 samples / train batch 2 = 2 updates per epoch


def test_tensorboard_event_file_holds_grouped_tags_and_logged_values(coca_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    straight, _ = coca_runs
    acc = EventAccumulator(str(straight / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("reward/mean", "reward/std", "loss/policy_loss", "loss/clipfrac", "loss/approx_kl", "loss/grad_norm",
                "loss/learning_rate",
                "perf/epoch_s", "perf/samples_per_s", "credit/share_first", "credit/share_last"):
        assert tag in tags["scalars"], tag
    assert "samples/grid" in tags["images"]
    assert {"credit/contribution_by_step", "credit/abs_advantage_by_step", "credit/similarity_curve_sample0"} <= set(
        tags["histograms"]
    )
    contrib = acc.Histograms("credit/contribution_by_step")[-1].histogram_value
    assert sum(contrib.bucket) == pytest.approx(1.0, abs=1e-5)  # mean contributions over 4 steps sum to 1
    logged = [e.value for e in acc.Scalars("reward/mean")]
    assert logged == pytest.approx([r["reward/mean"] for r in metrics(straight)], rel=1e-6)
    assert [e.step for e in acc.Scalars("reward/mean")] == [1, 2, 3]
    assert "hparams" in {t.split("/")[0] for t in tags["tensors"]}


def test_lora_loads_in_plain_diffusers_and_changes_the_output(coca_runs):
    from diffusion_rl.models import build_tiny_pipeline

    straight, _ = coca_runs
    base = build_tiny_pipeline(seed=0)
    base.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, output_type="pt", generator=torch.Generator().manual_seed(0))
    before = base("a red circle", **kw).images
    base.load_lora_weights(straight / "lora")
    kw["generator"] = torch.Generator().manual_seed(0)
    after = base("a red circle", **kw).images
    assert not torch.allclose(before, after, atol=1e-6)
    sd = lora(straight)
    assert len(sd) == 64 and all(k.startswith("unet.") for k in sd)


def test_resume_equals_straight_run(coca_runs):
    straight, resumed = coca_runs
    a, b = lora(straight), lora(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    ra, rb = metrics(straight), metrics(resumed)
    assert [r["epoch"] for r in rb] == [0, 1, 2]
    for key in ("reward/mean", "reward/std", "loss/policy_loss", "global_step", "loss/learning_rate"):
        assert [r[key] for r in ra] == pytest.approx([r[key] for r in rb], rel=1e-6, abs=1e-9)


def test_credit_inspect_prints_the_latest_profile(coca_runs):
    straight, _ = coca_runs
    out = drl("credit", "inspect", str(straight), "--json").stdout
    row = json.loads(out)
    assert row["epoch"] == 2 and len(row["mean_contribution"]) == 4
    assert sum(row["mean_contribution"]) == pytest.approx(1.0, abs=1e-5)
    table = drl("credit", "inspect", str(straight)).stdout
    assert "contribution" in table and len(table.strip().splitlines()) == 2 + 4


def test_sample_command_writes_images_and_grid(coca_runs, tmp_path):
    straight, _ = coca_runs
    drl("sample", str(straight), "--prompt", "a red circle", "--prompt", "a dog", "--num", "2", "--out", str(tmp_path))
    from PIL import Image

    assert sorted(p.name for p in tmp_path.iterdir()) == ["000_00.png", "000_01.png", "001_00.png", "001_01.png", "grid.png"]
    assert Image.open(tmp_path / "grid.png").size == (2 * 16 + 3, 2 * 16 + 3)


def test_resume_errors_are_clear(coca_runs, tmp_path):
    straight, _ = coca_runs
    empty = drl("train", str(TINY), "--output-dir", str(tmp_path / "empty"), "--resume", "auto", check=False)
    assert empty.returncode == 2 and "no complete checkpoint" in empty.stderr and "Traceback" not in empty.stderr
    broken = tmp_path / "checkpoint-000003"
    shutil.copytree(straight / "checkpoints" / "checkpoint-000003", broken)
    weights = next(broken.glob("model*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated by a crash / full disk
    bad = drl("train", str(TINY), "--output-dir", str(tmp_path / "x"), "--resume", str(broken), check=False)
    assert bad.returncode == 2 and "corrupt" in bad.stderr and weights.name in bad.stderr
    model = drl("train", str(TINY), "--output-dir", str(tmp_path / "y"), "--set", "model.pretrained=/nonexistent/sd", check=False)
    assert model.returncode == 2 and "/nonexistent/sd" in model.stderr and "Traceback" not in model.stderr


def test_multi_reward_components_logged_and_combined_per_advantage(tmp_path):
    cfg = _tiny(
        tmp_path, "reward.name=null", "reward.combine=advantage",
        "reward.components=[{name: jpeg_compressibility, weight: 1.0}, {name: jpeg_incompressibility, weight: 0.5}]",
    )
    rec = train(cfg).history[0]
    assert rec["reward/jpeg_compressibility"] == pytest.approx(-rec["reward/jpeg_incompressibility"])
    # the combined scalar is the weighted sum 1 * (-kB) + 0.5 * (+kB) = -0.5 kB
    assert rec["reward/mean"] == pytest.approx(0.5 * rec["reward/jpeg_compressibility"], rel=1e-5)


def test_eval_command_reports_each_reward(coca_runs, tmp_path):
    straight, _ = coca_runs
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na dog\n")
    out = drl("eval", str(straight), "--prompts", str(prompts), "--reward", "jpeg_compressibility",
              "--reward", "jpeg_incompressibility", "--num", "2", "--json", "--out", str(tmp_path / "ev")).stdout
    res = json.loads(out.strip().splitlines()[-1])
    assert res["images"] == 4 and res["seed"] == 1234
    r = res["results"]
    assert r["jpeg_compressibility"]["mean"] == pytest.approx(-r["jpeg_incompressibility"]["mean"])
    again = json.loads(drl("eval", str(straight), "--prompts", str(prompts), "--reward", "jpeg_compressibility",
                           "--num", "2", "--json").stdout.strip().splitlines()[-1])
    assert again["results"]["jpeg_compressibility"] == r["jpeg_compressibility"]  # fixed seed: identical
    assert (tmp_path / "ev" / "grid.png").is_file() and (tmp_path / "ev" / "results.json").is_file()


def test_bf16_weights_and_mixed_precision_keep_trainable_params_fp32(tmp_path):
    res = train(_tiny(tmp_path, "model.dtype=bfloat16", "train.mixed_precision=bf16"))
    unet = res.pipeline.unet
    assert {p.dtype for p in unet.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in unet.parameters() if not p.requires_grad} == {torch.bfloat16}
    rec = res.history[0]
    assert rec["global_step"] == 2 and all(torch.isfinite(torch.tensor(rec[k])) for k in ("loss/policy_loss", "loss/approx_kl"))


# ----------------------------------------------------------------- precision, EMA, evaluation settings


def test_trajectories_keep_no_predicted_x0():
    """Only the similarity curve [B, T+1] survives sampling: T predicted-x0 latents per sample are never kept."""
    from dataclasses import fields

    assert "pred_x0" not in {f.name for f in fields(Trajectories)}
    assert "similarities" in {f.name for f in fields(Trajectories)}


def test_kl_is_zero_at_initialisation_under_mixed_precision(tmp_path):
    """The reference forward runs under the policy's autocast: before the first update (LoRA up-projections are
    zero) the policy and the reference are the same function, so the KL is exactly 0 under bf16."""
    cfg = _tiny(tmp_path, "train.mixed_precision=bf16", "train.kl_coef=0.1", "train.batch_size=4")
    assert cfg.geometry(1)["updates_per_epoch"] == 1  # every logged micro-step precedes the only update
    record = train(cfg).history[0]
    assert record["loss/kl"] == 0.0
    assert record["loss/ratio_min"] == record["loss/ratio_max"] == 1.0


def test_ema_weights_are_evaluated_saved_and_resume_exact(tmp_path):
    sets = ["num_epochs=2", "checkpoint.every=1", "train.ema=true", "train.ema_decay=0.5"]
    straight = train(_tiny(tmp_path / "a", *sets))
    train(_tiny(tmp_path / "b", *sets[1:], "num_epochs=1"))
    train(_tiny(tmp_path / "b", *sets), resume="auto")
    a, b = lora(tmp_path / "a"), lora(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    # the saved weights are the EMA the final checkpoint holds, not the live weights
    ckpt = sorted((tmp_path / "a" / "checkpoints").iterdir())[-1]
    shadow = load_file(ckpt / "trainer_tensors.safetensors")
    trained = [p for p in straight.pipeline.unet.parameters() if p.requires_grad]
    assert len(shadow) == len(trained)
    for i, p in enumerate(trained):
        assert torch.equal(p.detach().cpu(), shadow[f"ema.shadow.{i}"])
    plain = lora(Path(train(_tiny(tmp_path / "c", *sets[:2])).output_dir))
    assert any(not torch.equal(a[k], plain[k]) for k in a)


def test_text_encoder_lora_trains_saves_loads_and_resumes_exactly(tmp_path):
    """model.text_encoder_lora_rank: the text encoder's adapter is trained with the UNet's (its conditioning
    re-encoded with grad in the training forward), saved in the LoRA directory the plain pipeline loads, and
    checkpointed so that a resumed run ends with the same weights."""
    from diffusion_rl.families import family_of
    from diffusion_rl.inference import load_for_inference
    from diffusion_rl.models import load_pipeline, prepare_trainable_denoiser

    # the training forward's re-encoding gives exactly the conditioning the sampler used
    pipe = load_pipeline("builtin:tiny-random")
    prepare_trainable_denoiser(pipe, True, 4, 4.0, ["to_q", "to_v"], text_encoder_rank=4)
    family = family_of(pipe)
    with torch.no_grad():
        cond = family.encode(pipe, ["a red circle", "two blue squares"], "")
    assert cond["ids"].shape == cond["negative_ids"].shape == (2, 77)
    latents, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 500])
    with torch.no_grad():
        stored = family.predict(pipe, pipe.unet, latents, t, cond, 5.0)
    regrad = family.predict(pipe, pipe.unet, latents, t, cond, 5.0)
    assert regrad.requires_grad and torch.equal(regrad.detach(), stored)

    sets = ["num_epochs=2", "checkpoint.every=1", "model.text_encoder_lora_rank=4", "train.learning_rate=3e-2"]
    straight = train(_tiny(tmp_path / "a", *sets))
    saved = lora(tmp_path / "a")
    text_keys = [k for k in saved if k.startswith("text_encoder.")]
    assert len(text_keys) == 2 * 6 * 2  # lora_A and lora_B of q/k/v/out_proj, fc1, fc2 in both layers
    assert all(saved[k].abs().sum() > 0 for k in text_keys if "lora_B" in k)  # B starts at 0: it was trained
    train(_tiny(tmp_path / "b", *sets[1:], "num_epochs=1"))
    train(_tiny(tmp_path / "b", *sets), resume="auto")
    resumed = lora(tmp_path / "b")
    assert saved.keys() == resumed.keys()
    for k in saved:
        torch.testing.assert_close(saved[k], resumed[k], atol=1e-6, rtol=0)

    def image(p):
        p.set_progress_bar_config(disable=True)
        return p(["a red circle"], num_inference_steps=4, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images

    loaded, _ = load_for_inference(str(tmp_path / "a"))
    assert torch.equal(image(loaded), image(straight.pipeline))
    unet_only = load_pipeline("builtin:tiny-random")
    unet_only.load_lora_weights({k: v for k, v in saved.items() if k not in text_keys})
    assert not torch.allclose(image(unet_only), image(straight.pipeline), atol=1e-3)


def test_text_encoder_lora_is_refused_where_it_is_not_implemented(tmp_path):
    from diffusion_rl.config import ConfigError

    with pytest.raises(ConfigError, match="is for SD 1.x / 2.x models"):
        train(_tiny(tmp_path, "model.pretrained=builtin:tiny-random-sd3", "model.text_encoder_lora_rank=4"))
    assert not (tmp_path / "config.yaml").exists()  # refused before the run directory is written


VALIDATION = ['validation.prompts=["a red circle", "a yellow square"]', "validation.every=1"]


def test_best_of_run_weights_end_the_run_and_resume_exact(tmp_path):
    """validation.keep_best: the run ends with the weights of its best validation score, which are exactly the
    weights a run stopped at that epoch ends with; a resumed run selects the same ones."""
    sets = ["num_epochs=2", "checkpoint.every=1", *VALIDATION]
    best = train(_tiny(tmp_path / "best", *sets))
    scores = [r["validation/mean"] for r in best.history]  # after epochs 1 and 2
    assert len(scores) == 2 and all(math.isfinite(x) for x in scores)
    assert best.best_epoch == 1 + int(scores[1] > scores[0]) == best.history[1]["validation/best_epoch"]
    assert best.history[0]["validation/best"] == scores[0] and best.history[1]["validation/best"] == max(scores)
    stopped = train(_tiny(tmp_path / "stopped", f"num_epochs={best.best_epoch}"))  # no validation, same training
    last = train(_tiny(tmp_path / "last", *sets, "validation.keep_best=false"))
    assert last.best_epoch is None and [r["validation/mean"] for r in last.history] == scores  # logged, not applied
    a, b, c = lora(tmp_path / "best"), lora(tmp_path / "stopped"), lora(tmp_path / "last")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert best.best_epoch == 2 or any(not torch.equal(a[k], c[k]) for k in a)  # epoch 1 kept: not the last weights
    train(_tiny(tmp_path / "resumed", *sets[1:], "num_epochs=1"))
    resumed = train(_tiny(tmp_path / "resumed", *sets), resume="auto")
    assert resumed.best_epoch == best.best_epoch
    r = lora(tmp_path / "resumed")
    for k in a:
        torch.testing.assert_close(r[k], a[k], atol=1e-6, rtol=0)


def test_validation_on_the_eval_prompts_is_refused_before_anything_is_written(tmp_path):
    from diffusion_rl.config import ConfigError

    with pytest.raises(ConfigError, match="share 1 prompt.*a red circle.*validation.prompts=world:train"):
        train(_tiny(tmp_path / "run", *VALIDATION, 'eval.prompts=["a red circle", "two blue squares"]'))
    assert not (tmp_path / "run").exists()


def test_drl_eval_uses_the_runs_negative_prompt(tmp_path):
    """`drl eval RUN` reports what the trainer's evaluation reports: same prompts, seeds and negative prompt."""
    from diffusion_rl.config import dump_config
    from diffusion_rl.evaluation import evaluate
    from diffusion_rl.models import load_pipeline

    prompts = tmp_path / "eval.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    cfg = _tiny(tmp_path, "sample.negative_prompt=a green triangle", f"eval.prompts={prompts}",
                "eval.reward=jpeg_compressibility")
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    shown = json.loads(drl("eval", str(tmp_path), "--json", "--num", "2").stdout)["results"]["jpeg_compressibility"]
    pipe = load_pipeline("builtin:tiny-random")
    pipe.set_progress_bar_config(disable=True)
    jpeg = rewards.load("jpeg_compressibility")
    args = (pipe, pipe.unet, ["a red circle", "two blue squares"], [jpeg], 1234, 2, 4, 5.0, 1.0)
    with_negative = evaluate(*args, negative_prompt="a green triangle")[0]["jpeg_compressibility"]
    without = evaluate(*args)[0]["jpeg_compressibility"]
    assert shown["mean"] == pytest.approx(with_negative["mean"], rel=1e-6)
    assert shown["mean"] != pytest.approx(without["mean"], rel=1e-6)


def test_callbacks_are_told_of_every_epoch(tmp_path):
    """The public seam benchmarks time phases through (no patching of private names)."""
    from diffusion_rl.core.run import TrainerCallback

    seen, records = [], []

    class Recorder(TrainerCallback):
        def on_epoch_start(self, epoch):
            seen.append(("start", epoch))

        def on_epoch_end(self, epoch, record):
            seen.append(("end", epoch))
            records.append(record)

    result = train(_tiny(tmp_path, "num_epochs=2"), callbacks=[Recorder()])
    assert seen == [("start", 0), ("end", 0), ("start", 1), ("end", 1)]
    assert records == result.history and records[1]["perf/epoch_s"] > 0
