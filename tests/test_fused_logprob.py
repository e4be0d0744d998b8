"""The fused log-prob op (reasoning_rl.kernels): parity with the unfused fp32 computation (log-probs, entropies,
hidden / weight / bias gradients; odd shapes, masks, temperatures, bf16 judged against fp64 truth), the Triton
kernels under TRITON_INTERPRET=1, Liger-Kernel's fused GRPO loss, the model path (tied and untied heads, VLM
placeholder ids, refusals) and the trainer (`model.fused_logprob=torch` trains like `off`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion_rl.core import grpo
from reasoning_rl.config import ConfigError, load_config
from reasoning_rl.kernels import FusedLogProbError, fused_token_logprobs, reference_token_logprobs
from reasoning_rl.models import build_tiny_causal_lm
from reasoning_rl.rollout import lm_head_for_fused, token_log_probs
from reasoning_rl.trainer import train

REPO = Path(__file__).parents[1]
TINY = REPO / "configs" / "reason_tiny.yaml"

# Liger's fp32 tolerances for the gradients; the log-probs and entropies to 1e-5
LOGP_TOL = dict(atol=1e-5, rtol=0)
GRAD_TOL = dict(atol=2e-5, rtol=1e-3)


def _inputs(N, H, V, bias, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=gen)
    w = torch.randn(V, H, generator=gen) * 0.2
    b = torch.randn(V, generator=gen) * 0.5 if bias else None
    y = torch.randint(0, V, (N,), generator=gen)
    mask = torch.rand(N, generator=gen) > 0.2  # ~20 % of the positions masked
    upstream = (torch.randn(N, generator=gen), torch.randn(N, generator=gen))
    return h.to(dtype), w.to(dtype), (b.to(dtype) if bias else None), y, mask, upstream


def _run(fn, h, w, b, y, mask, upstream, temperature, entropy, **kwargs):
    """Outputs and the gradients of sum(g_logp * logp + g_H * H) in hidden, weight and bias (fresh leaves)."""
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    bb = b.clone().requires_grad_() if b is not None else None
    logp, ent = fn(hh, ww, y, bb, temperature=temperature, mask=mask, with_entropy=entropy, **kwargs)
    loss = (logp * upstream[0]).sum() + ((ent * upstream[1]).sum() if entropy else 0.0)
    loss.backward()
    return {"logp": logp.detach(), "ent": ent.detach() if entropy else None, "grad_h": hh.grad,
            "grad_w": ww.grad, "grad_b": bb.grad if bb is not None else None}


@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
@pytest.mark.parametrize("N, H, V, bias, chunk_rows, vocab_block", [
    (47, 31, 123, True, 16, 40),  # odd shapes, ragged last tiles in both directions
    (47, 31, 123, False, None, None),  # one tile
    (300, 64, 4096, True, 128, 1024),
])
def test_torch_backend_matches_the_unfused_fp32_computation(N, H, V, bias, chunk_rows, vocab_block, temperature):
    h, w, b, y, mask, upstream = _inputs(N, H, V, bias, seed=N + V)
    ref = _run(reference_token_logprobs, h, w, b, y, mask, upstream, temperature, True)
    mine = _run(fused_token_logprobs, h, w, b, y, mask, upstream, temperature, True, backend="torch",
                chunk_rows=chunk_rows, vocab_block=vocab_block)
    assert mine["logp"].dtype == torch.float32 and mine["logp"].shape == (N,)
    assert torch.all(mine["logp"][~mask] == 0) and torch.all(mine["ent"][~mask] == 0)
    torch.testing.assert_close(mine["logp"], ref["logp"], **LOGP_TOL)
    torch.testing.assert_close(mine["ent"], ref["ent"], **LOGP_TOL)
    for key in ("grad_h", "grad_w") + (("grad_b",) if bias else ()):
        torch.testing.assert_close(mine[key], ref[key], **GRAD_TOL)
    assert torch.all(mine["grad_h"][~mask] == 0)  # masked positions get no gradient


def test_without_entropy_and_with_a_frozen_head_or_frozen_hidden_states():
    h, w, b, y, mask, upstream = _inputs(47, 31, 123, True, seed=3)
    ref = _run(reference_token_logprobs, h, w, b, y, mask, upstream, 1.0, False)
    mine = _run(fused_token_logprobs, h, w, b, y, mask, upstream, 1.0, False, backend="torch", chunk_rows=10,
                vocab_block=50)
    assert mine["ent"] is None
    torch.testing.assert_close(mine["logp"], ref["logp"], **LOGP_TOL)
    torch.testing.assert_close(mine["grad_w"], ref["grad_w"], **GRAD_TOL)
    # frozen head (LoRA): only the hidden states get a gradient
    hh = h.clone().requires_grad_()
    logp, _ = fused_token_logprobs(hh, w, y, b, mask=mask, backend="torch")
    (logp * upstream[0]).sum().backward()
    torch.testing.assert_close(hh.grad, ref["grad_h"], **GRAD_TOL)
    # frozen hidden states: only the head
    ww = w.clone().requires_grad_()
    logp, _ = fused_token_logprobs(h, ww, y, b, mask=mask, backend="torch", vocab_block=32)
    (logp * upstream[0]).sum().backward()
    torch.testing.assert_close(ww.grad, ref["grad_w"], **GRAD_TOL)


def test_unlikely_targets_and_huge_logits_take_the_overflow_path_exactly():
    """Logits spread over hundreds of nats: most targets have log-probs far below -88, where exp(z - z_target)
    overflows fp32, so the stream falls back to the tile's true maximum; numbers and gradients stay exact."""
    h, w, b, y, mask, upstream = _inputs(64, 16, 700, False, seed=8)
    h = h * 60.0
    ref = _run(reference_token_logprobs, h, w, b, y, mask, upstream, 0.7, False)
    assert float(ref["logp"][mask].min()) < -200  # the regime this test is about
    mine = _run(fused_token_logprobs, h, w, b, y, mask, upstream, 0.7, False, backend="torch", chunk_rows=16,
                vocab_block=64)
    assert torch.isfinite(mine["logp"]).all()
    torch.testing.assert_close(mine["logp"], ref["logp"], atol=1e-5, rtol=1e-6)
    # logits of +-100 carry fp32 rounding of ~1e-5 each: judge the gradients against fp64 truth, within 1e-4 of the
    # largest true value on top of the naive fp32 error
    truth = _run(reference_token_logprobs, h.double(), w.double(), None, y, mask, tuple(u.double() for u in upstream),
                 0.7, False)
    for key in ("grad_h", "grad_w"):
        tol = 1e-4 * float(truth[key].abs().max())
        assert _max_err(mine[key], truth[key]) <= _max_err(ref[key], truth[key]) + tol, key


def test_a_second_backward_through_the_same_forward_is_a_clear_error():
    h, w, b, y, mask, _ = _inputs(20, 8, 50, False, seed=9)
    hh = h.clone().requires_grad_()
    logp, _ = fused_token_logprobs(hh, w, y, backend="torch")
    logp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"second backward .*retain_graph=True"):
        logp.sum().backward()


def test_no_grad_variant_gives_the_same_numbers_and_no_graph():
    h, w, b, y, mask, _ = _inputs(47, 31, 123, True, seed=4)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.no_grad():
        logp, ent = fused_token_logprobs(hh, ww, y, b, mask=mask, with_entropy=True, temperature=0.7)
    ref_logp, ref_ent = reference_token_logprobs(h, w, y, b, mask=mask, with_entropy=True, temperature=0.7)
    assert logp.grad_fn is None and not logp.requires_grad
    torch.testing.assert_close(logp, ref_logp, **LOGP_TOL)
    torch.testing.assert_close(ent, ref_ent, **LOGP_TOL)


def _max_err(a, b):
    return float((a.double() - b.double()).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_error_against_fp64_truth_is_no_worse_than_the_naive_computation_in_the_same_dtype(dtype):
    """Cut Cross-Entropy's criterion: |fused - fp64 truth| <= |naive same-dtype - truth| + tol (fp32 1e-5 forward,
    5e-4 backward; bf16 1e-2, relative to the largest true value)."""
    h, w, b, y, mask, upstream = _inputs(252, 64, 507, True, seed=5, dtype=dtype)
    truth = _run(reference_token_logprobs, h.double(), w.double(), b.double(), y, mask,
                 tuple(u.double() for u in upstream), 1.0, True)
    naive = _run(reference_token_logprobs, h, w, b, y, mask, upstream, 1.0, True)
    mine = _run(fused_token_logprobs, h, w, b, y, mask, upstream, 1.0, True, backend="torch", chunk_rows=64,
                vocab_block=128)
    for key in ("logp", "ent", "grad_h", "grad_w", "grad_b"):
        scale = float(truth[key].abs().max())
        tol = (1e-5 if key in ("logp", "ent") else 5e-4) if dtype == torch.float32 else 1e-2 * scale
        assert _max_err(mine[key], truth[key]) <= _max_err(naive[key], truth[key]) + tol, key


def test_bad_inputs_are_clear_errors():
    h, w, b, y, mask, _ = _inputs(8, 4, 10, False)
    with pytest.raises(FusedLogProbError, match=r"share H"):
        fused_token_logprobs(h, w[:, :3], y)
    with pytest.raises(FusedLogProbError, match=r"target ids must lie in \[0, 10\).*max 12"):
        fused_token_logprobs(h, w, torch.full((8,), 12))
    # an out-of-range id at a masked position is fine: it is never read
    bad = y.clone()
    bad[~mask] = 99
    torch.testing.assert_close(fused_token_logprobs(h, w, bad, mask=mask)[0], reference_token_logprobs(
        h, w, y, mask=mask)[0], **LOGP_TOL)
    with pytest.raises(FusedLogProbError, match=r"backend must be one of .* got 'cuda'"):
        fused_token_logprobs(h, w, y, backend="cuda")
    with pytest.raises(FusedLogProbError, match=r"temperature must be a positive"):
        fused_token_logprobs(h, w, y, temperature=0.0)
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        with pytest.raises(FusedLogProbError, match=r"TRITON_INTERPRET=1"):
            fused_token_logprobs(h, w, y, backend="triton")


def test_triton_kernels_under_the_interpreter_match_the_reference():
    pytest.importorskip("triton", reason="triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "_triton_logprob_worker.py")],
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for case, result in zip(report["cases"], report["results"], strict=True):
        assert result["dtype_out"] == "torch.float32"
        for key, errors in ((k, v) for k, v in result.items() if k != "dtype_out"):
            if case[-1] == "float32":
                assert errors["vs_naive"] <= (1e-5 if key in ("logp", "ent") else 2e-5 + 1e-3 * errors["scale"]), (
                    case, key, errors)
            else:  # bf16: no worse than the naive bf16 computation against fp64 truth
                assert errors["err"] <= errors["naive_err"] + 1e-2 * errors["scale"], (case, key, errors)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_same_loss_and_gradients_as_liger_fused_linear_grpo(loss_type):
    """drl's fused log-probs + the core's grpo_loss against LigerFusedLinearGRPOLoss (compiled=False runs on the CPU)
    on identical inputs: hidden [B, T, H], head [V, H], old log-probs off policy, padded positions."""
    liger = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is not installed")
    B, T, H, V, temperature = 4, 24, 32, 1000, 0.9
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(B, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 0.2
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 17:], mask[2, 5:] = 0, 0  # padded tails
    advantages = torch.randn(B, generator=gen)
    with torch.no_grad():
        old = reference_token_logprobs(hidden, weight, ids, temperature=temperature)[0] + 0.3 * torch.randn(
            B, T, generator=gen)  # an off-policy old policy: some ratios leave [0.8, 1.28]
    grads = {}
    for who in ("liger", "drl"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if who == "liger":
            fn = liger.LigerFusedLinearGRPOLoss(beta=0.0, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type,
                                                temperature=temperature, compiled=False, use_ref_model=False)
            out = fn(h, w, ids, mask, advantages, old_per_token_logps=old)
            loss = out[0] if isinstance(out, tuple) else out
        else:
            logp, _ = fused_token_logprobs(h, w, ids, temperature=temperature, mask=mask.bool(), backend="torch",
                                           chunk_rows=32, vocab_block=256)
            loss, _ = grpo.grpo_loss(logp, old, advantages, mask, clip_low=0.2, clip_high=0.28,
                                     aggregation=loss_type, num_items_in_batch=mask.sum())
        loss.backward()
        grads[who] = (loss.detach(), h.grad, w.grad)
    torch.testing.assert_close(grads["drl"][0], grads["liger"][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads["drl"][1], grads["liger"][1], **GRAD_TOL)
    torch.testing.assert_close(grads["drl"][2], grads["liger"][2], **GRAD_TOL)
    assert float(grads["drl"][0]) != 0.0


def _sequences(seed=0):
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, 50, (3, 6), generator=gen)  # ids every test model's vocabulary holds
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[1, :2] = 0  # left padding
    completion = torch.randint(3, 50, (3, 7), generator=gen)
    completion_mask = torch.ones_like(completion)
    completion_mask[2, 4:] = 0
    return prompt, prompt_mask, completion, completion_mask


@pytest.mark.parametrize("tied", [True, False])
def test_model_path_equals_the_lm_head_path_for_tied_and_untied_heads(tied):
    """token_log_probs through the backbone's hidden states and the fused op gives the LM-head path's log-probs,
    entropies and parameter gradients (full fine-tune; tied: the embedding's gradient sums both uses)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model, tok = build_tiny_causal_lm(seed=2)
    if not tied:
        config = Qwen2Config(**{**model.config.to_dict(), "tie_word_embeddings": False})
        torch.manual_seed(2)
        model = Qwen2ForCausalLM(config)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    prompt, prompt_mask, completion, completion_mask = _sequences()
    results = {}
    for fused in ("off", "torch"):
        model.zero_grad()
        logp, ent = token_log_probs(model, prompt, prompt_mask, completion, completion_mask, 0.8, with_entropy=True,
                                    fused=fused)
        (logp.sum() + 0.1 * ent.sum()).backward()
        results[fused] = (logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(results["torch"][0], results["off"][0], **LOGP_TOL)
    torch.testing.assert_close(results["torch"][1], results["off"][1], **LOGP_TOL)
    assert torch.all(results["torch"][0][completion_mask == 0] == 0)
    for name, grad in results["off"][2].items():
        torch.testing.assert_close(results["torch"][2][name], grad, **GRAD_TOL, msg=name)


def test_lora_on_the_head_and_post_processed_logits_are_refused():
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma2Config, Gemma2ForCausalLM

    model, tok = build_tiny_causal_lm(seed=0)
    config = model.config
    untied = type(model)(type(config)(**{**config.to_dict(), "tie_word_embeddings": False}))
    lora = get_peft_model(untied, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match=r"plain torch.nn.Linear.*remove 'lm_head' from model.lora_target_modules"):
        lm_head_for_fused(lora)
    with pytest.raises(ConfigError, match=r"lora_target_modules has 'lm_head'"):
        load_config(TINY, ["model.lora_target_modules=[q_proj, lm_head]"])
    assert load_config(TINY, ["model.fused_logprob=off"]).model.fused_logprob == "off"  # YAML's bare off (false)
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                           final_logit_softcapping=5.0))
    prompt, prompt_mask, completion, completion_mask = _sequences()
    with pytest.raises(ValueError, match=r"post-processes its logits.*fused_logprob=off"):
        token_log_probs(gemma, prompt, prompt_mask, completion, completion_mask, 1.0, fused="torch")


def digits(completions, prompts, metadata):
    """A reward a random character model can move: the share of digits among the first 8 characters."""
    return torch.tensor([sum(ch.isdigit() for ch in c[:8]) / 8 for c in completions]), {}


def test_trainer_with_fused_torch_follows_the_same_loss_curve_as_off(tmp_path):
    """`model.fused_logprob=torch` against `off` on the same seeds: per-step losses, rewards and the trained LoRA
    agree to fp32 rounding over a few steps (two PPO passes per step, so the ratios move off 1)."""
    runs = {}
    for fused in ("off", "torch"):
        cfg = load_config(TINY, [f"output_dir={tmp_path / fused}", "num_steps=3", "checkpoint.every=0",
                                 "rollout.max_new_tokens=6", "train.num_iterations=2", "train.learning_rate=0.01",
                                 f"model.fused_logprob={fused}"])
        runs[fused] = train(cfg, reward_fn=digits)
    off, fused = runs["off"].history, runs["torch"].history
    assert len(off) == len(fused) == 3
    assert any(abs(r["loss/policy_loss"]) > 1e-4 for r in off)  # the curve is not flat zero
    for a, b in zip(off, fused, strict=True):
        assert b["reward/mean"] == pytest.approx(a["reward/mean"], abs=1e-6)
        assert b["loss/policy_loss"] == pytest.approx(a["loss/policy_loss"], abs=1e-5)
    from safetensors.torch import load_file

    w_off = load_file(tmp_path / "off" / "lora" / "adapter_model.safetensors")
    w_fused = load_file(tmp_path / "torch" / "lora" / "adapter_model.safetensors")
    for name, value in w_off.items():  # six Adam steps of lr 0.01 amplify fp32 rounding of the gradients
        torch.testing.assert_close(w_fused[name], value, atol=1e-4, rtol=1e-3)
