"""Verified-step credit (`credit.kind: arithmetic_facts`): the arithmetic world's fact checker, the character-to-token
mapping, the [B, C] credit and its path into the trainer's loss."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from reasoning_rl.config import load_config
from reasoning_rl.credit import spans_to_token_credit, step_credit, token_char_ends
from reasoning_rl.world import TINY_ARITH_LM
from reasoning_rl.world.fact_credit import fact_spans

REPO = Path(__file__).parents[1]


def test_fact_spans_mark_each_result_true_or_false_by_itself():
    text = "<think>7+5=12; 12-3=8; 8*2=16; 16 - 10 = 6</think><answer>6</answer>"
    spans = fact_spans(text)
    assert [(text[s:e], sign) for s, e, sign in spans] == [("12", 1.0), ("8", -1.0), ("16", 1.0), ("6", 1.0)]
    # a wrong carried value does not make the arithmetic done on it wrong; only the first <think> block is read
    assert [sign for *_, sign in fact_spans("<think>3+4=8; 8+1=9</think><think>1+1=3</think>")] == [-1.0, 1.0]
    assert fact_spans("<answer>9</answer>") == []  # no trace: nothing to check
    assert fact_spans("<think>I see it; 2+2=; x=4; 5/5=1</think>") == []  # not `a op b = c` with op in + - *


def test_token_char_ends_match_prefix_decoding_and_the_credit_lands_on_result_tokens():
    tokenizer = AutoTokenizer.from_pretrained(TINY_ARITH_LM)
    texts = ["<think>7+5=12; 12-3=8</think><answer>8</answer>", "<think>9-7=2</think><answer>2</answer>"]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    width = max(map(len, rows)) + 2  # right padding past the eos
    ids = torch.full((2, width), tokenizer.pad_token_id)
    mask = torch.zeros(2, width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)], mask[b, : len(row)] = torch.tensor(row), 1
    ends = token_char_ends(tokenizer, ids, mask, texts)
    for b, row in enumerate(rows):  # the fast path equals decoding every prefix (the eos decodes to nothing)
        assert ends[b] == [len(tokenizer.decode(row[: t + 1], skip_special_tokens=True)) for t in range(len(row))]
    credit, info = step_credit("arithmetic_facts", tokenizer, texts, ids, mask)
    assert credit.shape == (2, width) and credit.dtype == torch.float32
    for b, text in enumerate(texts):  # the credited tokens decode to exactly the results, with their signs
        credited = [(tokenizer.decode([int(ids[b, t])]), float(credit[b, t])) for t in range(width) if credit[b, t]]
        expected = [(ch, sign) for s, e, sign in fact_spans(text) for ch in text[s:e]]
        assert credited == expected
    assert [float(v) for v in credit[0] if v] == [1.0, 1.0, -1.0]  # "12" right, "8" wrong (12 - 3 = 9)
    assert info == {"credit/steps_checked": 1.5, "credit/step_accuracy": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="unknown credit.kind 'nope'"):
        step_credit("nope", tokenizer, texts, ids, mask)


def test_spans_to_token_credit_handles_multi_character_tokens_and_padding():
    # tokens covering characters [0, 2), [2, 5), [5, 7) and a padded position: the span [4, 6) overlaps tokens 1 and 2
    credit = spans_to_token_credit([[(4, 6, -1.0)]], [[2, 5, 7]], width=4)
    torch.testing.assert_close(credit, torch.tensor([[0.0, -1.0, -1.0, 0.0]]))
    assert spans_to_token_credit([[]], [[1, 2]], width=3).abs().sum() == 0


def _one_step(tmp_path, name, *overrides):
    path = REPO / "configs" / "reason_default.yaml"
    cfg = load_config(path)
    short = load_config(path, [f"output_dir={tmp_path / name}", "num_steps=1", "rollout.prompts_per_step=4",
                               "rollout.num_generations=4", "prompts.size=16", "train.micro_batch_size=8",
                               "train.learning_rate=1e-3", "eval.every=0",
                               f"eval.problems={json.dumps(cfg.eval.problems[::100])}", *overrides])
    from reasoning_rl.trainer import train

    result = train(short)
    return result, load_file(str(tmp_path / name / "model" / "model.safetensors"))


def test_the_credit_reaches_the_loss(tmp_path):
    sparse, w_sparse = _one_step(tmp_path, "sparse")
    zero, w_zero = _one_step(tmp_path, "zero", "credit.kind=arithmetic_facts", "credit.weight=0")
    facts, w_facts = _one_step(tmp_path, "facts", "credit.kind=arithmetic_facts", "credit.weight=1")
    # same completions (same seed); weight 0 is exactly the outcome advantage, weight 1 moves the update
    assert sparse.history[0]["reward/mean"] == facts.history[0]["reward/mean"]
    assert all(torch.equal(w_sparse[k], w_zero[k]) for k in w_sparse)
    assert any(not torch.equal(w_sparse[k], w_facts[k]) for k in w_sparse)
    record = facts.history[0]
    assert record["credit/steps_checked"] > 0 and 0.0 <= record["credit/step_accuracy"] <= 1.0
    assert "credit/steps_checked" not in sparse.history[0]


def test_an_unknown_credit_kind_is_a_config_error(tmp_path):
    from diffusion_rl.core.config import ConfigError

    with pytest.raises(ConfigError, match="credit.kind"):
        load_config(REPO / "configs" / "reason_default.yaml", ["credit.kind=coca"])
