"""Tool-calling rollouts (reasoning_rl.tools): the tool interface and registry, the OpenThinkIMG action format,
the visual-world tools, token-in / token-out multi-turn rollouts with the tool mask, and the trainer integration."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import rewards
from reasoning_rl import tools
from reasoning_rl.config import ConfigError, ReasonConfig, load_config
from reasoning_rl.data import format_prompt
from reasoning_rl.models import build_tiny_causal_lm
from reasoning_rl.rollout import Rollouts, token_log_probs
from reasoning_rl.tools.rollout import CHATML_OBSERVATION, expert_rollouts, generate_with_tools, tool_metrics
from reasoning_rl.tools.visual import VisualState, answer_prior, count_rows

torch.set_num_threads(1)

AREA_SCHEMA = {"type": "object", "properties": {"box": {"type": "array", "items": {"type": "number"},
                                                        "minItems": 4, "maxItems": 4}}, "required": ["box"]}


@tools.tool(name="test_area", description="Area of a box [x1, y1, x2, y2].", parameters=AREA_SCHEMA)
def _area(state, box):
    x1, y1, x2, y2 = box
    if x2 < x1:
        raise ValueError("x2 < x1")
    return tools.Observation(text=str((x2 - x1) * (y2 - y1)))


def _scene() -> VisualState:
    objects = [{"colour": "red", "shape": "circle", "box": [0, 0, 5, 5]},
               {"colour": "red", "shape": "square", "box": [10, 10, 15, 15]},
               {"colour": "blue", "shape": "circle", "box": [20, 2, 24, 6]}]
    return VisualState.from_metadata({"objects": json.dumps(objects)})


# ------------------------------------------------------------------------------------------------
# interface, registry, action format
# ------------------------------------------------------------------------------------------------


def test_user_tool_registers_validates_and_runs():
    tools.register_tool(_area, overwrite=True)
    assert "test_area" in tools.available_tools()
    registry = tools.get_tools(["test_area"])
    assert tools.call_tool(registry, "test_area", {"box": [1, 2, 4, 6]}, None).text == "12"
    bad = tools.call_tool(registry, "test_area", {"box": [1, 2]}, None)  # schema: minItems 4
    assert bad.error and "box" in bad.text and "short" in bad.text
    missing = tools.call_tool(registry, "test_area", {}, None)
    assert missing.error and "'box' is a required property" in missing.text
    raised = tools.call_tool(registry, "test_area", {"box": [5, 0, 1, 1]}, None)
    assert raised.error and "ValueError: x2 < x1" in raised.text
    unknown = tools.call_tool(registry, "zoom", {}, None)
    assert unknown.error and "unknown tool 'zoom'" in unknown.text
    with pytest.raises(tools.ToolError, match="already registered"):
        tools.register_tool(_area)
    with pytest.raises(tools.ToolError, match="not a valid JSON schema"):
        tools.register_tool(tools.FunctionTool(fn=lambda s: "", name="bad", parameters={"type": "object",
                                                                                         "required": 3}))
    with pytest.raises(tools.ToolError, match="other than 'terminate'"):
        tools.register_tool(tools.FunctionTool(fn=lambda s: "", name="Terminate"))
    with pytest.raises(tools.ToolError, match=r"unknown tool\(s\) \['nope'\]"):
        tools.get_tools(["count", "nope"])
    assert tools.TOOLS["count"].spec()["parameters"]["properties"]["colour"]["enum"] == ["blue", "green", "red",
                                                                                         "yellow"]


def test_parse_turn_actions_terminate_and_errors():
    t = tools.parse_turn('I look. {"thought":"count","actions":[{"name":"count","arguments":{"colour":"red"}}]} ok')
    assert (t.thought, t.calls, t.answer, t.error) == ("count", [("count", {"colour": "red"})], None, None)
    t = tools.parse_turn('{"thought":"a","actions":[{"name":"Terminate","arguments":{"ans":3}}]}')
    assert t.answer == "3" and t.calls == [] and t.error is None
    assert "no JSON action" in tools.parse_turn("<answer>3</answer>").error
    assert "no JSON action" in tools.parse_turn('{"thought": "unclosed"').error
    assert "non-empty list" in tools.parse_turn('{"thought":"x","actions":[]}').error
    assert '"name"' in tools.parse_turn('{"actions":[{"arguments":{}}]}').error
    assert "ans" in tools.parse_turn('{"actions":[{"name":"terminate","arguments":{}}]}').error
    text = ('{"actions":[{"name":"count","arguments":{}}]}\nuser\ncount: 4\nassistant\n'
            '{"thought":"x","actions":[{"name":"terminate","arguments":{"ans":"4"}}]}')
    assert tools.terminate_answer(text) == "4"
    assert tools.terminate_answer('{"actions":[{"name":"count","arguments":{}}]}') is None
    assert json.loads(tools.format_action("t", "count", {"shape": "circle"})) == {
        "thought": "t", "actions": [{"name": "count", "arguments": {"shape": "circle"}}]}


def test_tool_answer_reward_scores_the_terminate_answer():
    fn = rewards.load("tool_answer")
    done = '{"actions":[{"name":"terminate","arguments":{"ans":" 3 "}}]}'
    scores, info = fn([done, done, "no action", done], ["q"] * 4,
                      [{"answer": "3"}, {"answer": "4"}, {"answer": "3"}, {}])
    assert scores[:3].tolist() == [1.0, 0.0, 0.0] and torch.isnan(scores[3])
    assert info == {"terminated": 3, "correct": 1, "unscorable": 1}


# ------------------------------------------------------------------------------------------------
# the visual-world tools
# ------------------------------------------------------------------------------------------------


def test_visual_tools_on_a_known_scene():
    state, T = _scene(), tools.get_tools(["count", "locate", "crop", "draw_box"])
    assert state.image.size == (32, 32) and state.image.getpixel((2, 2)) != (0, 0, 0)
    call = lambda name, args: tools.call_tool(T, name, args, state)  # noqa: E731
    assert call("count", {"colour": "red"}).text == "count: 2"
    assert call("count", {"shape": "circle", "colour": "blue"}).text == "count: 1"
    assert call("count", {}).text == "count: 3"
    assert call("locate", {"shape": "circle"}).text == "boxes: [[0,0,5,5],[20,2,24,6]]"
    assert call("locate", {"shape": "triangle"}).text == "boxes: []"
    crop = call("crop", {"box": [8, 8, 16, 16], "zoom": 3})
    assert crop.text == "objects: red square" and crop.image.size == (24, 24)
    assert crop.image.getpixel((12, 12)) == state.image.getpixel((12, 12))
    drawn = call("draw_box", {"box": [0, 0, 16, 16]})
    assert drawn.text == "drawn; inside: 2" and drawn.image.getpixel((15, 8)) == (255, 255, 255)
    assert state.canvas.getpixel((15, 8)) == (255, 255, 255) and state.image.getpixel((15, 8)) == (0, 0, 0)
    assert call("count", {"colour": "purple"}).error  # not in the enum
    assert call("crop", {"box": [10, 10, 5, 40]}).error  # not inside the image: the tool's ValueError
    assert call("locate", {"colour": "red"}).error  # shape is required
    assert call("count", {"size": 3}).error  # additionalProperties: false


def test_count_rows_are_exact_deterministic_and_split_by_scene():
    train, again, held = count_rows(40, "train", 3), count_rows(40, "train", 3), count_rows(40, "eval", 3)
    assert [r["prompt"] for r in train] == [r["prompt"] for r in again]
    assert not {r["signature"] for r in train} & {r["signature"] for r in held}
    for r in train:
        objects = json.loads(r["objects"])
        assert 5 <= len(objects) <= 9 and isinstance(r["image"], Image.Image)
        word = r["prompt"].split()[2]
        n = sum(o["colour"] == word for o in objects) if r["prompt"].endswith("objects are there?") else \
            sum(o["shape"] + "s" == word for o in objects)
        assert r["answer"] == str(n) and n >= 1
    assert 0.0 < answer_prior(held) < 1.0


# ------------------------------------------------------------------------------------------------
# token-in / token-out rollouts
# ------------------------------------------------------------------------------------------------


def _eos_biased_model(seed=0, bias=4.0):
    """The tiny random LM with its end-of-turn logit raised (short turns, so rollouts have several rounds)."""
    model, tok = build_tiny_causal_lm(seed)
    model.lm_head.register_forward_hook(lambda m, i, out: out + bias * torch.nn.functional.one_hot(
        torch.tensor(tok.eos_token_id), out.shape[-1]).to(out.dtype))
    return model.eval(), tok


def test_expert_rollout_tokens_are_turns_and_real_observations():
    model, tok = build_tiny_causal_lm(0)
    rows = count_rows(3, "train", 0)
    texts = [format_prompt(tok, r["prompt"], None, True) for r in rows]
    turns = [json.loads(r["solution"]) for r in rows]
    ro = expert_rollouts(tok, texts, [r["prompt"] for r in rows], rows, turns, tools.get_tools(["count"]), 3,
                         tools.get_state("visual"))
    for i, r in enumerate(rows):
        n = int(ro.completion_mask[i].sum())
        expected = (tok(turns[i][0], add_special_tokens=False).input_ids + [tok.eos_token_id]
                    + tok(CHATML_OBSERVATION.format(observation=f"count: {r['answer']}"), add_special_tokens=False).input_ids
                    + tok(turns[i][1], add_special_tokens=False).input_ids + [tok.eos_token_id])
        assert ro.completion_ids[i, :n].tolist() == expected
        obs_len = len(tok(CHATML_OBSERVATION.format(observation=f"count: {r['answer']}"), add_special_tokens=False).input_ids)
        first = len(tok(turns[i][0], add_special_tokens=False).input_ids) + 1
        assert ro.tool_mask[i, :n].tolist() == [1] * first + [0] * obs_len + [1] * (n - first - obs_len)
    assert ro.tool_stats.tolist() == [[1, 0, 2]] * 3
    scores, _ = rewards.load("tool_answer")(ro.completions, ro.prompts, ro.metadata)
    assert scores.tolist() == [1.0, 1.0, 1.0]


def test_sampled_multiturn_logprobs_equal_the_trainers_and_observations_are_masked():
    model, tok = _eos_biased_model()
    rows = count_rows(4, "train", 1)
    texts = [format_prompt(tok, r["prompt"], None, True) for r in rows]
    torch.manual_seed(0)
    ro = generate_with_tools(model, tok, texts, [r["prompt"] for r in rows], rows, 2, 12, 0.9, 1.0, 0, 3,
                             tools.get_tools(["count"]), 3, tools.get_state("visual"))
    assert ro.completion_ids.shape[0] == 8 and ro.tool_mask.shape == ro.completion_ids.shape
    policy, real = ro.tool_mask.bool(), ro.completion_mask.bool()
    observation = real & ~policy
    assert int(observation.sum()) > 0 and bool((policy <= real).all())
    # every malformed turn was answered by an error observation and counted, none crashed the rollout
    assert int(ro.tool_stats[:, 1].sum()) > 0 and tool_metrics(ro.tool_stats)["tool_errors"] == ro.tool_stats[:, 1].sum()
    assert "error: no JSON action" in ro.completions[0] or "error:" in " ".join(ro.completions)
    # observation tokens are exactly the template's tokens, appended after an end-of-turn token
    obs_ids = tok(CHATML_OBSERVATION.format(observation='error: no JSON action {"thought":..,"actions":[..]}'),
                  add_special_tokens=False).input_ids
    row = next(i for i in range(8) if int(ro.tool_stats[i, 2]) > 1 and int(ro.tool_stats[i, 0]) == 0)
    ids, pol = ro.completion_ids[row].tolist(), ro.tool_mask[row].tolist()
    start = pol.index(0)
    assert ids[start - 1] == tok.eos_token_id and ids[start:start + len(obs_ids)] == obs_ids
    assert pol[start:start + len(obs_ids)] == [0] * len(obs_ids) and pol[start + len(obs_ids)] == 1
    # the trainer's recomputation of the exact sampled sequence gives the sampler's log-probs
    with torch.no_grad():
        logp, _ = token_log_probs(model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask, 0.9,
                                  fused="off")
    assert torch.isfinite(ro.tool_logp[policy]).all() and torch.isnan(ro.tool_logp[~policy]).all()
    assert float((logp[policy] - ro.tool_logp[policy]).abs().max()) < 1e-5
    # select / cat keep the tool fields aligned with the rows
    sub = ro.select(torch.tensor([row, 0]))
    assert torch.equal(sub.tool_mask[0], ro.tool_mask[row]) and torch.equal(sub.tool_stats[1], ro.tool_stats[0])
    both = Rollouts.cat([ro.select(torch.tensor([0])), ro.select(torch.tensor([row]))])
    assert both.tool_mask.shape == both.completion_ids.shape and torch.equal(both.tool_stats[1], ro.tool_stats[row])


# ------------------------------------------------------------------------------------------------
# config and trainer
# ------------------------------------------------------------------------------------------------


def test_config_rules_for_tools():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["rollout.tools=[count,nope]", "rollout.tool_state=zz", "rollout.backend=vllm",
                           "rollout.tool_observation_template=obs"])
    text = str(err.value)
    for fragment in ("unregistered tool(s) ['nope']", "tool_state 'zz'", "{observation}", "backend=transformers"):
        assert fragment in text
    cfg = load_config("configs/reason_tools.yaml")
    assert cfg.rollout.tools and cfg.reward.name == "tool_answer"


def _tool_config(tmp_path, rows, steps, **over) -> ReasonConfig:
    base = dict(
        num_steps=steps, output_dir=str(tmp_path), seed=0,
        model=dict(pretrained="builtin:tiny-random-lm", use_lora=False, fused_logprob="off"),
        rollout=dict(num_generations=2, prompts_per_step=4, max_new_tokens=8, tools=["count", "locate"],
                     max_tool_rounds=2),
        prompts=dict(source="list", problems=rows, problem_column="prompt", solution_column="solution"),
        reward=dict(name="tool_answer"), train=dict(learning_rate=1e-3, micro_batch_size=4),
        checkpoint=dict(every=0), logging=dict(completions_every=0),
    )
    base.update(over)
    return ReasonConfig.model_validate(base)


def test_trainer_grpo_with_tools_masks_observations(tmp_path, monkeypatch):
    from diffusion_rl.core import grpo
    from reasoning_rl import trainer

    rows = [{k: v for k, v in r.items() if k != "image"} for r in count_rows(4, "train", 0)]
    seen = []
    real_loss = grpo.grpo_loss
    real_generate = trainer.generate_with_tools

    def spy_generate(*a, **k):
        seen.append(("rollouts", real_generate(*a, **k)))
        return seen[-1][1]

    def spy_loss(logp, old, adv, mask, **k):
        seen.append(("mask", mask.clone()))
        return real_loss(logp, old, adv, mask, **k)

    monkeypatch.setattr(trainer, "generate_with_tools", spy_generate)
    monkeypatch.setattr(grpo, "grpo_loss", spy_loss)
    result = trainer.train(_tool_config(tmp_path, rows, 1))
    ro = next(v for k, v in seen if k == "rollouts")
    masks = torch.cat([v for k, v in seen if k == "mask"])  # the micro-batches' loss masks, rows in training order
    expected = ro.completion_mask * ro.tool_mask  # observation tokens carry no loss
    assert ro.tool_stats.shape == (8, 3) and masks.shape[0] == 8
    assert int(masks.sum()) == int(expected.sum()) < int(ro.completion_mask.sum())
    assert sorted(masks.sum(1).tolist()) == sorted(expected.sum(1).tolist())
    rec = result.history[0]
    assert rec["reason/tool_errors"] == float(ro.tool_stats[:, 1].sum()) and "reason/tool_calls" in rec
    assert (tmp_path / "model").exists()


def test_trainer_sft_on_expert_traces_skips_observation_tokens(tmp_path):
    from reasoning_rl.models import load_policy
    from reasoning_rl.trainer import train

    rows = [{k: v for k, v in r.items() if k != "image"} for r in count_rows(4, "train", 0)]
    cfg = _tool_config(tmp_path, rows, 1, stages=[dict(name="sft", kind="sft", num_steps=1)])
    result = train(cfg)
    model, tok = load_policy("builtin:tiny-random-lm", None, "float32", True, False, None, 0)
    texts = [format_prompt(tok, r["prompt"], None, True) for r in rows]
    ro = expert_rollouts(tok, texts, [r["prompt"] for r in rows], rows, [json.loads(r["solution"]) for r in rows],
                         tools.get_tools(["count", "locate"]), 2, tools.get_state("visual"))
    with torch.no_grad():
        logp, _ = token_log_probs(model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask, 1.0,
                                  fused="off")
    targets = ro.completion_mask * ro.tool_mask
    expected = float(-(logp * targets).sum() / targets.sum())
    assert result.history[0]["loss/sft_nll"] == pytest.approx(expected, rel=1e-4)
    everything = float(-(logp * ro.completion_mask).sum() / ro.completion_mask.sum())
    assert abs(everything - expected) > 1e-3  # the observation tokens would have changed the loss
