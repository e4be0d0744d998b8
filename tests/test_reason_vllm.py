"""rollout.backend=vllm (reasoning_rl.vllm_rollout). vLLM needs CUDA and cannot be installed here, so the engine is the
stand-in of tests/_fake_vllm.py (it samples from the tiny transformers model itself and records the pushed weights),
put in sys.modules; vLLM's CUDA check is the only other thing patched. Checked: the Rollouts are what the trainer
needs (prompts exactly as encode_prompts pads them, the engine's tokens, masks, stop flags, decoded text, the
engine's log-probs equal to the trainer's), the weights pushed before each step are the merged policy's, the
importance-sampling weights' math, and the errors that name the fix."""

import copy
import math
import sys
from pathlib import Path

import _fake_vllm
import pytest
import torch
from typer.testing import CliRunner

from diffusion_rl.cli import _mount_reason_cli, app
from diffusion_rl.core import grpo
from reasoning_rl import vllm_rollout
from reasoning_rl.config import ConfigError, load_config
from reasoning_rl.models import build_tiny_causal_lm, prepare_trainable
from reasoning_rl.rollout import Rollouts, encode_prompts, token_log_probs
from reasoning_rl.trainer import train
from reasoning_rl.vllm_rollout import (
    VLLMRollout,
    VLLMUnavailableError,
    importance_weights,
    merged_named_weights,
)

TINY = Path(__file__).parents[1] / "configs" / "reason_tiny.yaml"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def fake_vllm(monkeypatch):
    module = _fake_vllm.module()
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(vllm_rollout, "cuda_available", lambda: True)  # vLLM runs on CUDA only; the stand-in on CPU
    return module


def digits(completions, prompts, metadata):
    return torch.tensor([sum(ch.isdigit() for ch in c[:8]) / 8 for c in completions]), {}


def _cfg(tmp_path, *overrides):
    return load_config(TINY, [f"output_dir={tmp_path}", "checkpoint.every=0", "rollout.backend=vllm",
                              "rollout.max_new_tokens=6", "train.learning_rate=0.01", *overrides])


def _chat(tok, problems):
    return [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in problems]


# ------------------------------------------------------------------------------------------------ errors


def test_without_vllm_or_cuda_the_error_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(VLLMUnavailableError, match=r"pip install 'diffusion-rl\[vllm\]'.*rollout.backend=transformers"):
        train(_cfg(tmp_path / "a", "num_steps=1"), reward_fn=digits)
    _mount_reason_cli()  # through the CLI: a user error (exit 2), no traceback
    result = CliRunner().invoke(app, ["reason", "train", str(TINY), "--set", "rollout.backend=vllm", "--output-dir",
                                      str(tmp_path / "b")])
    assert result.exit_code == 2 and "diffusion-rl[vllm]" in result.output and "Traceback" not in result.output
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm.module())
    monkeypatch.setattr(vllm_rollout, "cuda_available", lambda: False)
    with pytest.raises(VLLMUnavailableError, match="needs a CUDA GPU.*rollout.backend=transformers"):
        train(_cfg(tmp_path / "c", "num_steps=1"), reward_fn=digits)


def test_config_rules_of_the_vllm_backend():
    assert load_config(TINY).rollout.backend == "transformers"
    with pytest.raises(ConfigError) as exc:
        load_config(TINY, ["rollout.backend=vllm", "prompts.image_column=image", "rollout.vllm_max_model_len=2",
                           "rollout.vllm_importance_sampling_min=4", "rollout.vllm_importance_sampling_max=2"])
    text = str(exc.value)
    assert "does not take image prompts" in text and "must exceed rollout.max_new_tokens" in text
    assert "vllm_importance_sampling_min (4.0) exceeds" in text
    with pytest.raises(ConfigError, match="vllm_importance_sampling"):
        load_config(TINY, ["rollout.vllm_importance_sampling=tis"])


def test_images_are_refused_with_a_clear_error(fake_vllm):
    model, tok = build_tiny_causal_lm()
    engine = VLLMRollout(model, tok, "builtin:tiny-random-lm")
    with pytest.raises(ValueError, match="does not take image prompts yet.*rollout.backend=transformers"):
        engine.generate(model, tok, ["a"], ["a"], [{}], 2, 4, 1.0, 1.0, 0, [], 4, images=[object()])


# ------------------------------------------------------------------------------------------------ rollouts


def test_rollouts_are_what_the_trainer_needs(fake_vllm):
    model, tok = build_tiny_causal_lm(seed=1)
    engine = VLLMRollout(model, tok, "builtin:tiny-random-lm", logprobs=True)
    llm = fake_vllm.LLM.instances[-1]
    assert llm.kwargs["distributed_executor_backend"] == "external_launcher"
    assert llm.kwargs["logprobs_mode"] == "processed_logprobs" and llm.kwargs["load_format"] == "dummy"
    assert not Path(llm.model_path).exists()  # the built-in model's config directory is gone once the engine is built
    assert engine.sync_weights(model) == len(list(model.named_parameters())) and llm.prefix_cache_resets == 1

    texts = _chat(tok, ["2+3=", "What is 10 + 7?"])  # prompts of different lengths: left padding
    torch.manual_seed(0)
    r = engine.generate(model, tok, texts, ["p", "q"], [{"answer": 5}, {"answer": 17}], 4, 24, 0.7, 1.0, 0,
                        ["e", "x"], 4)
    # prompts exactly as encode_prompts pads them for the transformers backend, G consecutive rows per prompt
    expected = encode_prompts(tok, [t for t in texts for _ in range(4)], None, torch.device("cpu"))
    assert torch.equal(r.prompt_ids, expected.prompt_ids) and torch.equal(r.prompt_mask, expected.prompt_mask)
    assert r.prompts == ["p"] * 4 + ["q"] * 4 and r.metadata[4] == {"answer": 17} and len(r) == 8
    # the engine was asked once per unique prompt, with its unpadded token ids, n = G and vLLM's "off" top_k
    requests, params = llm.calls[-1]
    assert [q["prompt_token_ids"] for q in requests] == [tok(t, add_special_tokens=False).input_ids for t in texts]
    sp = params[0]
    assert (sp.n, sp.temperature, sp.top_p, sp.top_k, sp.max_tokens, sp.stop, sp.stop_token_ids, sp.logprobs) == (
        4, 0.7, 1.0, -1, 24, ["e", "x"], [tok.eos_token_id], 0)
    assert sp.include_stop_str_in_output and params[0].seed != params[1].seed
    outputs = [c for o in llm.generate(requests, params) for c in o.outputs]  # the same seeds: the same samples
    for i, c in enumerate(outputs):
        n = len(c.token_ids)
        assert r.completion_ids[i, :n].tolist() == c.token_ids and r.lengths[i] == n
        assert torch.all(r.completion_ids[i, n:] == tok.pad_token_id) and torch.all(r.completion_mask[i, n:] == 0)
        assert bool(r.stopped[i]) == (c.finish_reason == "stop")
        assert r.completions[i] == tok.decode(c.token_ids, skip_special_tokens=True)
        if c.finish_reason == "length":
            assert n == 24
        elif c.stop_reason is None:  # ended by eos: the eos token is the last completion token
            assert c.token_ids[-1] == tok.eos_token_id
        else:  # a stop string: kept in the completion
            assert r.completions[i].endswith(c.stop_reason)
    kinds = {("length" if c.finish_reason == "length" else "eos" if c.stop_reason is None else "string") for c in outputs}
    assert kinds == {"length", "eos", "string"}
    # the engine's log-probs of the sampled tokens are the trainer's (same weights: importance ratio 1)
    logp, _ = token_log_probs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, 0.7)
    m = r.completion_mask.bool()
    torch.testing.assert_close(r.sampling_logp[m], logp[m], atol=1e-5, rtol=0)
    # top_k on: passed through; the processed log-probs then renormalise over the k kept tokens (above the trainer's
    # full-vocabulary log-probs: the importance weights see the truncation, as TRL's)
    r = engine.generate(model, tok, texts, ["p", "q"], [{}, {}], 2, 5, 1.0, 1.0, 3, [], 4)
    assert llm.calls[-1][1][0].top_k == 3
    logp, _ = token_log_probs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, 1.0)
    m = r.completion_mask.bool()
    assert torch.all(r.sampling_logp[m] >= logp[m] - 1e-6) and torch.all(r.sampling_logp[m] > logp[m] + 1e-3)


def test_rollouts_carry_the_sampling_log_probs_through_select_cat_and_luffy_traces():
    def rows(width, value):
        r = Rollouts(prompt_ids=torch.ones(2, 3, dtype=torch.long), prompt_mask=torch.ones(2, 3, dtype=torch.long),
                     completion_ids=torch.full((2, width), 7), completion_mask=torch.ones(2, width, dtype=torch.long),
                     stopped=torch.zeros(2, dtype=torch.bool), completions=["a", "b"], prompts=["p", "p"],
                     metadata=[{}, {}], pad_id=0)
        r.sampling_logp, r.trainer_logp = torch.full((2, width), value), torch.full((2, width), value)
        r.is_weights = torch.full((2, width), 2.0)
        return r

    both = Rollouts.cat([rows(2, -1.0), rows(4, -2.0)])
    assert both.sampling_logp.tolist()[0] == [-1.0, -1.0, 0.0, 0.0] and both.is_weights.tolist()[0] == [2, 2, 1, 1]
    picked = both.select(torch.tensor([3, 0]))
    assert picked.sampling_logp[0].tolist() == [-2.0] * 4 and picked.trainer_logp[1].tolist() == [-1, -1, 0, 0]
    _, tok = build_tiny_causal_lm()
    mixed = rows(2, -1.0).with_traces(torch.tensor([False, True]), ["", "12345"], tok)  # row 1 becomes a trace
    assert mixed.sampling_logp.shape == (2, 6) and torch.isnan(mixed.sampling_logp[1]).all()
    assert mixed.sampling_logp[0].tolist() == [-1.0, -1.0, 0, 0, 0, 0] and mixed.is_weights[1].tolist() == [1.0] * 6


# ------------------------------------------------------------------------------------------------ weights


def test_merged_weights_equal_peft_merge_without_touching_the_model():
    base, _ = build_tiny_causal_lm(seed=3)
    names = [n for n, _ in base.named_parameters()]
    model, _ = prepare_trainable(base, True, 4, 8.0, TARGETS)
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_()  # a trained adapter (LoRA B starts at 0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pushed = dict(merged_named_weights(model))
    assert list(pushed) == names  # the base model's names, tied weights once
    merged = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    for n in names:
        torch.testing.assert_close(pushed[n], merged[n], atol=0, rtol=0)
    assert any(not torch.equal(pushed[n], before["base_model.model." + n.replace("q_proj.", "q_proj.base_layer.")])
               for n in names if "q_proj" in n)  # the merge changed them
    after = {n: p for n, p in model.named_parameters()}
    assert all(torch.equal(before[n], after[n]) for n in before)  # nothing merged into the model itself
    assert not any(getattr(m, "merged", False) for m in model.modules())


def test_training_pushes_the_merged_policy_before_each_step(fake_vllm, tmp_path):
    """2 steps: before step 0 the engine receives the base weights (LoRA B = 0), before step 1 the policy after one
    update, which equals a 1-step run's LoRA merged into its base model (same seeds)."""
    two = train(_cfg(tmp_path / "two", "num_steps=2"), reward_fn=digits)
    llm = fake_vllm.LLM.instances[-1]
    one = train(_cfg(tmp_path / "one", "num_steps=1"), reward_fn=digits)
    base, _ = build_tiny_causal_lm()
    names = [n for n, _ in base.named_parameters()]
    pushes = [dict(llm.engine_model.pushed[i * len(names):(i + 1) * len(names)]) for i in range(2)]
    assert len(llm.engine_model.pushed) == 2 * len(names) and llm.prefix_cache_resets == 2
    assert all(list(p) == names for p in pushes)  # no peft prefixes, no base_layer, no lora_ tensors
    for n, p in base.named_parameters():
        torch.testing.assert_close(pushes[0][n], p, atol=0, rtol=0)
    merged = dict(copy.deepcopy(one.model).merge_and_unload().named_parameters())
    for n in names:
        torch.testing.assert_close(pushes[1][n], merged[n], atol=1e-6, rtol=0)
    assert any((pushes[1][n] - pushes[0][n]).abs().max() > 1e-4 for n in names if "q_proj" in n)  # it trained
    # the engine samples with the pushed weights, so its log-probs are the trainer's: importance weights 1
    for record in two.history:
        assert record["loss/vllm_logp_diff_max"] < 1e-4
        assert record["loss/vllm_is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert two.history[0]["reward/mean"] == one.history[0]["reward/mean"]


# ------------------------------------------------------------------------------------------------ importance sampling


def test_importance_weights_math():
    trainer = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    vllm = torch.tensor([[-1.5, -1.0, float("nan")], [-0.5, -2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    e = math.exp  # differences: [0.5, -1, 0 (NaN: no correction)], [0, 1.5, masked]
    cases = {
        ("token_truncate", 3.0, None): [[e(0.5), e(-1), 1], [1, 3.0, 1]],
        ("token_truncate", 3.0, 0.5): [[e(0.5), 0.5, 1], [1, 3.0, 1]],
        ("token_truncate", None, None): [[e(0.5), e(-1), 1], [1, e(1.5), 1]],
        ("token_mask", 3.0, None): [[e(0.5), e(-1), 1], [1, 0, 1]],
        ("token_mask", 3.0, 0.5): [[e(0.5), 0, 1], [1, 0, 1]],
        ("sequence_truncate", 3.0, None): [[e(-0.5)] * 3, [3.0, 3.0, 1]],
        ("sequence_mask", 3.0, None): [[e(-0.5)] * 3, [0, 0, 1]],
        ("sequence_mask", 3.0, 0.7): [[0, 0, 0], [0, 0, 1]],
        ("none", 3.0, None): [[1, 1, 1], [1, 1, 1]],
    }
    for (mode, high, low), expected in cases.items():
        w = importance_weights(trainer, vllm, mask, mode, high, low)
        torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0, msg=str((mode, high, low)))
    with pytest.raises(ValueError, match="not one of"):
        importance_weights(trainer, vllm, mask, "tis")


@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("aggregation", ["dapo", "grpo"])
def test_weighted_advantages_are_the_weighted_per_token_loss(dual_clip, aggregation):
    """The trainer passes w x A as the advantages; that is TRL's per_token_loss x w: the same loss and gradient,
    here against the clipped surrogate written out by hand (clip 0.2 / 0.28, a dual-clipped negative advantage)."""
    torch.manual_seed(0)
    old = torch.randn(3, 5) * 0.3 - 1.0
    new = (old + torch.tensor([[0.0, 0.5, -0.5, 1.5, 0.1]] * 3)).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    adv = torch.tensor([1.0, -2.0, 0.5])
    w = torch.tensor([[1.0, 0.5, 3.0, 0.0, 2.0], [1.2, 0.8, 1.0, 1.0, 1.0], [0.0, 1.0, 2.5, 0.3, 1.0]])
    n = float(mask.sum())
    loss, _ = grpo.grpo_loss(new, old, adv[:, None] * w, mask, clip_low=0.2, clip_high=0.28, dual_clip=dual_clip,
                             aggregation=aggregation, num_items_in_batch=n)
    (grad,) = torch.autograd.grad(loss, new)

    new2 = new.detach().clone().requires_grad_(True)
    r = torch.exp(new2 - old)
    a = adv[:, None].expand_as(r)
    per_token = torch.maximum(-a * r, -a * r.clamp(0.8, 1.28))
    if dual_clip is not None:
        per_token = torch.where(a < 0, torch.minimum(per_token, -dual_clip * a), per_token)
    per_token = per_token * w * mask
    manual = per_token.sum() / n if aggregation == "dapo" else (per_token.sum(1) / mask.sum(1)).mean()
    (grad2,) = torch.autograd.grad(manual, new2)
    torch.testing.assert_close(loss, manual, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, grad2, atol=1e-6, rtol=0)
