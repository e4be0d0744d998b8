"""The reasoning trainer on the tiny random Qwen2: no diffusers, log-probs that match generation, masks,
artefacts and TensorBoard, a LoRA plain peft loads, exact resume, custom rewards and advantages, config and CLI."""

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

import reasoning_rl
from diffusion_rl.cli import _mount_reason_cli, app
from reasoning_rl.config import ConfigError, ReasonConfig, documented_fields, load_config
from reasoning_rl.models import build_tiny_causal_lm
from reasoning_rl.rollout import completion_mask, generate, token_log_probs
from reasoning_rl.trainer import train

REPO = Path(__file__).parents[1]
TINY = REPO / "configs" / "reason_tiny.yaml"
runner = CliRunner()


def digits(completions, prompts, metadata):
    """A reward a random character model can move: the share of digits among the first 8 characters."""
    return torch.tensor([sum(ch.isdigit() for ch in c[:8]) / 8 for c in completions]), {}


def _tiny(tmp_path, *overrides):
    return load_config(TINY, [f"output_dir={tmp_path}", "num_steps=2", "checkpoint.every=0", *overrides])


def test_no_reasoning_module_imports_diffusers():
    modules = sorted(f"reasoning_rl.{m.name}" for m in pkgutil.iter_modules(reasoning_rl.__path__))
    assert {"reasoning_rl.trainer", "reasoning_rl.rollout", "reasoning_rl.cli"} <= set(modules)
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] == 'diffusers'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_recomputed_log_probs_equal_the_samplers():
    """Left-padded prompts of different lengths, temperature 0.7: the training forward's log-probs of the sampled
    tokens equal generate's own (its raw logits / T, log-softmax), so the first PPO ratio is 1."""
    model, tok = build_tiny_causal_lm(seed=1)
    model.eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in ("2+3=", "What is 10 + 7?")]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    out = model.generate(**enc, max_new_tokens=12, do_sample=True, temperature=0.7, top_k=None,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
    completion = out.sequences[:, enc.input_ids.shape[1]:]
    mask = completion_mask(completion, tok.eos_token_id, tok.pad_token_id)
    expected = torch.log_softmax(torch.stack(out.logits, 1).float() / 0.7, -1).gather(-1, completion[..., None])[..., 0]
    logp, entropy = token_log_probs(model, enc.input_ids, enc.attention_mask, completion, mask.long(), 0.7,
                                    with_entropy=True)
    assert logp.dtype == torch.float32 and logp.shape == completion.shape
    torch.testing.assert_close(logp[mask], expected[mask], atol=1e-5, rtol=0)
    assert torch.all(logp[~mask] == 0) and torch.all(entropy[mask] > 0)


def test_completion_mask_stops_after_the_first_eos_and_drops_padding():
    eos, pad = 2, 0
    ids = torch.tensor([[5, 6, 2, 0, 0], [5, 2, 7, 2, 0], [5, 6, 7, 8, 9], [5, 6, 0, 0, 0]])
    assert completion_mask(ids, eos, pad).long().tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1] * 5, [1, 1, 0, 0, 0]]
    same = torch.tensor([[5, 2, 2, 2]])  # pad == eos: everything after the first eos is padding
    assert completion_mask(same, 2, 2).long().tolist() == [[1, 1, 0, 0]]


def test_rollouts_group_completions_per_prompt():
    model, tok = build_tiny_causal_lm()
    torch.manual_seed(0)
    r = generate(model, tok, ["a", "bb"], ["p", "q"], [{"answer": 1}, {"answer": 2}], 3, 6, 1.0, 1.0, 0, [], 4)
    assert len(r) == 6 and r.prompts == ["p"] * 3 + ["q"] * 3 and r.metadata[3] == {"answer": 2}
    assert r.completion_ids.shape[1] <= 6 and r.prompt_ids.shape == (6, 2) and r.prompt_mask[0].tolist() == [0, 1]
    assert torch.equal(r.stopped, (r.completion_ids == tok.eos_token_id).any(1))


def test_training_writes_artefacts_tensorboard_and_a_lora_peft_loads(tmp_path):
    result = train(_tiny(tmp_path, "train.beta=0.05", "train.num_iterations=2"), reward_fn=digits)
    assert [r["step"] for r in result.history] == [0, 1]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0 <= r["reward/mean"] <= 1 for r in rows)
    assert rows[0]["loss/ratio_min"] <= 1.0 <= rows[0]["loss/ratio_max"] and "loss/kl" in rows[0]
    completions = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert len(completions) == 8 and {"prompt", "completion", "reward"} <= set(completions[0])
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"reward/mean", "reason/frac_reward_zero_std", "reason/completion_length_mean", "reason/clipped_ratio",
            "loss/policy_loss", "loss/kl", "eval/greedy_reward", "perf/step_s"} <= tags
    assert "reason/completions/text_summary" in acc.Tags()["tensors"]
    # plain transformers + peft load the saved adapter onto a fresh base model and reproduce the trained logits
    from peft import PeftModel

    base, tok = build_tiny_causal_lm()
    loaded = PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    ids = tok(["2+3="], return_tensors="pt").input_ids
    result.model.eval()
    torch.testing.assert_close(loaded(ids).logits, result.model(ids).logits, atol=1e-6, rtol=0)
    lora = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert any("lora_B" in k and torch.count_nonzero(v) > 0 for k, v in lora.items())


def test_resume_is_exact(tmp_path):
    """3 steps straight = 2 steps + resume + 1: same rewards, same trainable weights."""
    sets = ["num_steps=3", "checkpoint.every=1", "train.num_iterations=2"]
    straight = train(_tiny(tmp_path / "a", *sets), reward_fn=digits)
    train(_tiny(tmp_path / "b", "num_steps=2", *sets[1:]), reward_fn=digits)
    resumed = train(_tiny(tmp_path / "b", *sets), reward_fn=digits, resume="auto")
    assert [r["step"] for r in resumed.history] == [2]
    assert resumed.history[0]["reward/mean"] == straight.history[2]["reward/mean"]
    a = load_file(tmp_path / "a" / "lora" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "lora" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_custom_advantage_function(tmp_path):
    """advantage_fn replaces the group standardisation: all-zero advantages leave the LoRA up-projections at 0."""
    calls = []

    def no_signal(scores, group_ids):
        calls.append((scores.shape, group_ids.tolist()))
        return torch.zeros_like(scores)

    train(_tiny(tmp_path, "num_steps=1"), reward_fn=digits, advantage_fn=no_signal)
    assert calls == [(torch.Size([16]), [i // 4 for i in range(16)])]
    lora = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert all(torch.count_nonzero(v) == 0 for k, v in lora.items() if "lora_B" in k)


# ------------------------------------------------------------------------------------------------ config, CLI


def test_reason_config_rules_and_docs(tmp_path):
    assert isinstance(load_config(TINY), ReasonConfig)
    assert [p for p, doc in documented_fields() if len(doc.split()) < 2] == []
    with pytest.raises(ConfigError) as exc:
        load_config(TINY, ["train.lerning_rate=1", "rollout.num_generations=1", "prompts.problems=[{question: x}]"])
    text = str(exc.value)
    assert "3 problem(s)" in text and "did you mean 'train.learning_rate'" in text
    assert "rollout.num_generations (1) < 2" in text and "has no 'problem' key" in text


def test_drl_reason_cli(tmp_path):
    _mount_reason_cli()
    shown = runner.invoke(app, ["reason", "config", "show", str(TINY), "--set", "rollout.max_new_tokens=3"])
    assert shown.exit_code == 0, shown.output
    assert "max_new_tokens: 3" in shown.output
    bad = runner.invoke(app, ["reason", "train", str(TINY), "--set", "rollout.temprature=1"])
    assert bad.exit_code == 2 and "did you mean 'rollout.temperature'" in bad.output and "Traceback" not in bad.output
    missing = runner.invoke(app, ["reason", "train", str(TINY), "--set", "model.pretrained=/nonexistent/dir",
                                  "--set", "model.local_files_only=true", "--output-dir", str(tmp_path)])
    assert missing.exit_code == 2 and "could not load model" in missing.output


@pytest.mark.parametrize("aggregation", ["dapo", "dr_grpo"])
def test_token_level_aggregations_do_not_depend_on_the_micro_batch_size(tmp_path, aggregation):
    """dapo divides by every completion token of the step (all micro-batches and processes), dr_grpo by
    completions x max length: splitting the same 16 completions into 4 micro-batches of 4 gives the same
    gradient (its pre-clip norm) as one micro-batch of 16."""
    norms = {}
    for mb in (16, 4):
        cfg = _tiny(tmp_path / f"{aggregation}{mb}", "num_steps=1", "rollout.max_new_tokens=6",
                    f"train.loss_aggregation={aggregation}", f"train.micro_batch_size={mb}")
        norms[mb] = train(cfg, reward_fn=digits).history[0]["loss/grad_norm"]
    assert norms[16] > 0 and norms[4] == pytest.approx(norms[16], rel=1e-5)


@pytest.mark.slow
def test_two_cpu_processes_generate_different_completions_and_keep_equal_weights(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), str(Path(__file__).parent / "_reason_dist_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r0, r1 = (json.loads((tmp_path / f"rank_{i}.json").read_text()) for i in (0, 1))
    assert len(r0["prompts"]) == len(r1["prompts"]) == 2 * 2 * 4  # steps x prompts x G
    assert set(r0["prompts"][:8]).isdisjoint(r1["prompts"][:8])  # each step, the ranks draw different problems
    assert r0["params_sha256"] == r1["params_sha256"] and r0["lora_b_abs"] > 0  # DDP kept the weights equal
    assert "2 process(es) | prompts/step 4 | completions/step 16" in proc.stdout
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]


def digits_trl(completions, **columns):
    """The digit-share reward in TRL's signature, loaded by import path through the `trl_function` reward."""
    return [sum(ch.isdigit() for ch in c[:8]) / 8 for c in completions]


def test_cli_resume_eval_and_sample(tmp_path):
    """Through `drl reason`: 3 steps straight = 2 steps + `--resume auto` + 1 (same rewards, same adapter); then
    `eval` and `sample` on the finished run."""
    _mount_reason_cli()
    sets = ["--set", "reward.name=trl_function", "--set", "reward.options.function=test_reason_trainer:digits_trl",
            "--set", "checkpoint.every=1", "--set", "rollout.max_new_tokens=6"]

    def reason(*args):
        result = runner.invoke(app, ["reason", *args])
        assert result.exit_code == 0, result.output + repr(result.exception)
        return result

    reason("train", str(TINY), "--output-dir", str(tmp_path / "a"), "--set", "num_steps=3", *sets)
    reason("train", str(TINY), "--output-dir", str(tmp_path / "b"), "--set", "num_steps=2", *sets)
    reason("train", str(TINY), "--output-dir", str(tmp_path / "b"), "--set", "num_steps=3", *sets, "--resume", "auto")
    rows = {k: [json.loads(x) for x in (tmp_path / k / "metrics.jsonl").read_text().splitlines()] for k in "ab"}
    assert [r["step"] for r in rows["b"]] == [0, 1, 2]
    assert [r["reward/mean"] for r in rows["a"]] == [r["reward/mean"] for r in rows["b"]]
    a = load_file(tmp_path / "a" / "lora" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "lora" / "adapter_model.safetensors")
    assert any(torch.count_nonzero(v) for k, v in a.items() if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    shown = json.loads(reason("eval", str(tmp_path / "a"), "--num", "3", "--json").output.strip().splitlines()[-1])
    assert shown["problems"] == 2 and shown["num"] == 3 and set(shown["results"]) == {
        "greedy_reward", "sampled_reward", "pass_at_3", "completion_length"}
    assert 0.0 <= shown["results"]["sampled_reward"] <= 1.0
    sampled = reason("sample", str(tmp_path / "a"), "-p", "2+3=", "-n", "2", "--max-new-tokens", "4").output
    assert sampled.count("[2+3=]") == 2


# ------------------------------------------------------------------------ seed methods in the trainer


def test_dynamic_sampling_keeps_only_problems_with_reward_spread(tmp_path):
    """Problems whose G rewards are all equal carry no signal: DAPO dynamic sampling drops them and draws new
    problems (up to max_generation_rounds) until prompts_per_step problems are kept."""
    flat = {"2+3=", "1+4=", "3+3=", "2+2="}

    def half_flat(completions, prompts, metadata):
        scores, _ = digits(completions, prompts, metadata)
        return torch.where(torch.tensor([p in flat for p in prompts]), 0.5, scores + torch.rand(len(scores)) * 1e-3), {}

    seen = []

    def record(scores, group_ids):
        seen.append(scores.clone())
        return grpo_group(scores, group_ids)

    from diffusion_rl.core.grpo import group_advantages as grpo_group

    cfg = _tiny(tmp_path, "num_steps=1", "rollout.dynamic_sampling=true", "rollout.max_generation_rounds=4",
                "rollout.prompts_per_step=2")
    record_row = train(cfg, reward_fn=half_flat, advantage_fn=record).history[0]
    assert len(seen[0]) == 2 * 4 and not torch.any(seen[0] == 0.5)  # 2 problems x G, none of the flat ones
    assert record_row["loss/dynamic_sampling_reached_target"] == 1.0
    assert record_row["loss/dynamic_sampling_groups_kept"] >= 2 and record_row["loss/dynamic_sampling_rounds"] >= 1


def test_soft_overlong_penalty_shapes_the_rewards_the_advantages_see():
    """max_new_tokens 6, buffer 4: completions of 2 tokens or fewer keep their reward, longer ones lose
    (L - 2) / 4 of it, down to -1 at 6 tokens (DAPO Eq. 13), before the group standardisation."""
    from types import SimpleNamespace

    from reasoning_rl.rollout import Rollouts
    from reasoning_rl.trainer import compute_advantages

    cfg = load_config(TINY, ["rollout.max_new_tokens=6", "advantage.overlong_buffer=4", "rollout.num_generations=4"])
    lengths = torch.tensor([1, 2, 4, 6])
    mask = (torch.arange(6)[None] < lengths[:, None]).long()
    rollouts = Rollouts(prompt_ids=torch.zeros(4, 1).long(), prompt_mask=torch.ones(4, 1).long(),
                        completion_ids=torch.zeros(4, 6).long(), completion_mask=mask, stopped=torch.ones(4).bool(),
                        completions=[""] * 4, prompts=["p"] * 4, metadata=[{}] * 4)
    seen = []
    compute_advantages(SimpleNamespace(cfg=cfg), rollouts, torch.ones(4), lambda r, g: seen.append(r) or r)
    torch.testing.assert_close(seen[0], torch.tensor([1.0, 1.0, 0.5, 0.0]))


def test_pad_trains_on_a_priority_draw_of_the_completions(tmp_path):
    cfg = _tiny(tmp_path, "num_steps=1", "advantage.pad=true", "advantage.pad_ratio=0.5", "advantage.pad_t_high=null",
                "advantage.pad_t_low=0.0", "rollout.max_new_tokens=6", "eval.problems=[]")
    row = train(cfg, reward_fn=digits).history[0]
    assert row["loss/pad_num_samples"] == 16 and row["loss/pad_num_selected"] == 8  # round(0.5 x 16), with replacement
    assert row["loss/grad_norm"] > 0


def test_pad_with_no_completion_in_its_band_skips_the_update_without_error(tmp_path):
    # every reward equal: every advantage is 0, below pad_t_low, so PAD keeps nothing; with a KL term and two passes
    # the empty batch reaches the reference and old log-probs too
    cfg = _tiny(tmp_path, "num_steps=2", "advantage.pad=true", "rollout.max_new_tokens=4", "eval.problems=[]",
                "train.beta=0.1", "train.num_iterations=2")
    rows = train(cfg, reward_fn=lambda c, p, m: (torch.ones(len(c)), {})).history
    assert [r["loss/pad_num_selected"] for r in rows] == [0, 0]
    assert all(r["loss/grad_norm"] == 0.0 for r in rows)
    assert all(r["perf/generated_tokens"] > 0 for r in rows)


def test_luffy_mixes_off_policy_traces_into_each_group(tmp_path):
    traces = tmp_path / "luffy.jsonl"
    traces.write_text("".join(json.dumps({"problem": f"{a}+{b}=", "answer": str(a + b), "trace": f"{a}+{b}={a + b}"})
                              + "\n" for a in range(1, 5) for b in range(1, 3)))
    seen = []

    def record(completions, prompts, metadata):
        seen.append(list(completions))
        return digits(completions, prompts, metadata)

    cfg = _tiny(tmp_path, "num_steps=1", "prompts.source=jsonl", f"prompts.path={traces}",
                "prompts.off_policy_column=trace", "train.off_policy_per_group=1", "eval.problems=[]",
                "rollout.max_new_tokens=6")
    row = train(cfg, reward_fn=record).history[0]
    completions = seen[0]
    # the first completion of every group of 4 is its problem's trace
    assert all(completions[g * 4].count("+") == 1 and completions[g * 4].endswith(str(eval(completions[g * 4].split("=")[0])))
               for g in range(4))
    assert row["loss/off_policy_loss"] != 0.0 and "loss/on_policy_loss" in row
    with pytest.raises(ConfigError, match="needs prompts.off_policy_column"):
        load_config(TINY, ["train.off_policy_per_group=1"])
    with pytest.raises(ConfigError, match="must leave on-policy samples"):
        load_config(TINY, ["train.off_policy_per_group=4", "prompts.off_policy_column=trace"])


def test_entropy_coefficient_schedule_is_applied_and_resumed(tmp_path):
    sets = ["num_steps=3", "checkpoint.every=1", "train.entropy_coef=0.02", "train.entropy_schedule=exponential",
            "train.entropy_decay=0.5", "eval.problems=[]"]
    straight = train(_tiny(tmp_path / "a", *sets), reward_fn=digits)
    assert [r["loss/entropy_coef"] for r in straight.history] == pytest.approx([0.02, 0.01, 0.005])
    train(_tiny(tmp_path / "b", *sets[1:], "num_steps=2"), reward_fn=digits)
    resumed = train(_tiny(tmp_path / "b", *sets), reward_fn=digits, resume="auto")
    assert resumed.history[0]["loss/entropy_coef"] == pytest.approx(0.005)
    assert resumed.history[0]["loss/entropy"] > 0


def test_staged_curriculum_sft_then_grpo_resumes_across_the_boundary(tmp_path):
    """ReVisual-R1's shape: an SFT cold start on reference solutions, then GRPO, in one run. The SFT stage lowers
    the solutions' NLL; a run that dies in the first GRPO step and resumes from the stage-boundary checkpoint ends
    with the same adapter as an uninterrupted run."""
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"problem": f"{a}+{b}=", "answer": str(a + b), "worked": f"{a}+{b}={a + b}"})
                            + "\n" for a in range(1, 3) for b in range(1, 3)))
    stages = (f"stages=[{{name: cold_start, kind: sft, num_steps: 3, learning_rate: 0.01, prompts: {{source: jsonl, "
              f"path: '{data}', solution_column: worked}}}}, {{name: rl, kind: grpo, num_steps: 2}}]")
    sets = [stages, "num_steps=5", "checkpoint.every=1", "rollout.prompts_per_step=4", "eval.problems=[]",
            "rollout.max_new_tokens=6"]
    cfg = _tiny(tmp_path / "a", *sets)
    assert [(s.name, s.kind, s.num_steps) for s in cfg.curriculum()] == [("cold_start", "sft", 3), ("rl", "grpo", 2)]
    assert cfg.total_steps() == 5
    straight = train(cfg, reward_fn=digits)
    nll = [r["loss/sft_nll"] for r in straight.history[:3]]
    assert nll[2] < nll[0]  # the same 4 solutions each step (prompts_per_step = all of them)
    assert [r["reason/stage_index"] for r in straight.history] == [0, 0, 0, 1, 1]
    assert "reward/mean" in straight.history[3] and straight.history[3]["loss/learning_rate"] == pytest.approx(1e-3)

    calls = []

    def dies_in_rl(completions, prompts, metadata):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated crash in the first GRPO step")
        return digits(completions, prompts, metadata)

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(_tiny(tmp_path / "b", *sets), reward_fn=dies_in_rl)
    resumed = train(_tiny(tmp_path / "b", *sets), reward_fn=digits, resume="auto")
    assert [r["step"] for r in resumed.history] == [3, 4]
    a = load_file(tmp_path / "a" / "lora" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "lora" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="sft stage: its prompts need a solution_column"):
        load_config(TINY, ["stages=[{name: s, kind: sft, num_steps: 1}]"])


@pytest.mark.slow
def test_dapo_over_two_ranks_equals_one_rank_on_the_same_completions(tmp_path):
    """dapo normalises by every completion token of the step on every process: 2 ranks x 4 completions give the
    same (all-reduced) gradient as 1 rank x 8; bnpo, a per-process token mean, does not when lengths differ."""
    import socket

    worker = str(Path(__file__).parent / "_reason_dapo_worker.py")
    norms = {}
    for aggregation in ("dapo", "bnpo"):
        one = tmp_path / f"{aggregation}_1"
        one.mkdir()
        proc = subprocess.run([sys.executable, worker, str(one), aggregation], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        two = tmp_path / f"{aggregation}_2"
        two.mkdir()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
             "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), worker,
             str(two), aggregation], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        ranks = [json.loads((two / f"grad_norm_{r}.json").read_text()) for r in (0, 1)]
        assert ranks[0]["world"] == 2 and ranks[0]["grad_norm"] == pytest.approx(ranks[1]["grad_norm"], rel=1e-6)
        norms[aggregation] = (json.loads((one / "grad_norm_0.json").read_text())["grad_norm"], ranks[0]["grad_norm"])
    assert norms["dapo"][1] == pytest.approx(norms["dapo"][0], rel=1e-5)
    assert norms["bnpo"][1] != pytest.approx(norms["bnpo"][0], rel=1e-3)


def test_eval_reward_scores_the_held_out_problems_instead_of_the_training_reward(tmp_path):
    def constant(completions, prompts, metadata):  # a "shaped" training reward
        return torch.full((len(completions),), 0.7), {}

    sets = ["num_steps=1", "rollout.max_new_tokens=2"]
    plain = train(_tiny(tmp_path / "a", *sets), reward_fn=constant)
    assert plain.eval_after["greedy_reward"] == pytest.approx(0.7)  # no eval.reward: the training reward
    scored = train(_tiny(tmp_path / "b", *sets, "eval.reward={name: exact_match}"), reward_fn=constant)
    assert all(scored.eval_after[k] in (0.0, 0.5, 1.0) for k in ("greedy_reward", "sampled_reward"))  # 2 problems
