"""GLIDER and the text environments: the interface and determinism, counted invalid actions, the expert, the splits,
hindsight relabelling, the ScienceWorld adapter (skipped without Java), the critic's TD update against a
hand-computed target, the Polyak update, both actor weightings, and the CLI end to end (train, checkpoints,
TensorBoard, exact resume, online rounds, `drl reason eval --task env:...`)."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from diffusion_rl.cli import _mount_reason_cli, app
from reasoning_rl.agents import data, glider, lm, rooms
from reasoning_rl.agents.config import ConfigError, GliderConfig, load_config
from reasoning_rl.agents.env import INVALID_OBSERVATION
from reasoning_rl.agents.scienceworld_env import available

REPO = Path(__file__).parents[1]
CONFIG = REPO / "configs" / "glider_text.yaml"
runner = CliRunner()
TINY = ["data.episodes=40", "model.pretrain_steps=5", "bc.steps=3", "bc.batch_size=8", "offline_rl.steps=3",
        "offline_rl.batch_size=8", "offline_rl.critic_warmup=1", "eval.episodes=3", "checkpoint.every=3",
        "checkpoint.keep_last=2", "logging.log_every=1"]


# ------------------------------------------------------------------------------------------------
# the embedded environment
# ------------------------------------------------------------------------------------------------


def test_reset_and_step_are_deterministic_and_follow_the_interface():
    a, b = rooms.RoomsEnv(), rooms.RoomsEnv()
    oa, ob = a.reset("put:apple:box", seed=3), b.reset("put:apple:box", seed=3)
    assert oa == ob and oa.task == "put the apple in the box"
    assert oa.text.startswith("in ") and "exits" in oa.text and oa.valid_actions
    for _ in range(6):
        act = oa.valid_actions[0]
        ra, rb = a.step(act), b.step(act)
        assert (ra.observation, ra.reward, ra.done) == (rb.observation, rb.reward, rb.done)
        oa = ra.observation
    starts = {rooms.RoomsEnv().reset("put:apple:box", seed=s).text.split(";")[0] for s in range(20)}
    assert len(starts) > 1  # the seed picks the start room


def test_invalid_and_malformed_actions_are_counted_no_ops():
    env = rooms.RoomsEnv()
    obs = env.reset("bring:key:garden", seed=0)
    before = env.snapshot()
    for bad in ["fly to the moon", "", "   ", None, "take key now please" * 20]:
        r = env.step(bad)
        assert r.invalid and r.reward == 0.0 and not r.done
        assert r.observation.text == INVALID_OBSERVATION and r.observation.valid_actions == obs.valid_actions
    assert env.counter.invalid_actions == 5 and env.counter.steps == 5
    after = env.snapshot()
    assert (after["room"], after["location"]) == (before["room"], before["location"])
    r = env.step(obs.valid_actions[0].upper() + ".")  # case and punctuation are normalised, not invalid
    assert not r.invalid and env.counter.invalid_actions == 5


def test_episode_times_out_at_max_steps():
    env = rooms.RoomsEnv(max_steps=4)
    env.reset("put:apple:box", 0)
    results = [env.step("nonsense") for _ in range(4)]
    assert [r.done for r in results] == [False, False, False, True] and results[-1].info["timeout"]


@pytest.mark.parametrize("variant", rooms.VARIANTS)
def test_the_expert_solves_every_task(variant):
    env = rooms.RoomsEnv(variant)
    for task in env.tasks("seen") + env.tasks("unseen"):
        for seed in (0, 1):
            ep = rooms.play(env, task, seed, "expert", epsilon=0.0)
            assert ep["success"] and ep["invalid"] == 0, (task, seed, ep["segments"])
            assert all(s["achieved"] and s["relabel"] == s["subgoal"] for s in ep["segments"])
            assert len(ep["segments"]) in (2, 3)  # get X [-> go to R] -> put / drop


def test_splits_are_disjoint_and_every_part_is_seen():
    split = rooms.task_split(0)
    seen, unseen = set(split["seen"]), set(split["unseen"])
    assert not seen & unseen and len(seen) + len(unseen) == len(rooms.all_tasks()) == 88
    assert len(unseen) == 22
    parts = {p for t in seen for p in t.split(":")[1:]}
    assert set(rooms.OBJECTS) | set(rooms.RECEPTACLES) | set(rooms.ROOMS) <= parts
    assert rooms.task_split(0) == split and rooms.task_split(1) != split


def test_changed_variants_change_what_they_say():
    base, moved, rewired = rooms.RoomsEnv(), rooms.RoomsEnv("rooms-moved"), rooms.RoomsEnv("rooms-rewired")
    assert moved.adjacent == base.adjacent and moved.receptacle_room != base.receptacle_room
    assert rewired.adjacent != base.adjacent and rewired.receptacle_room == base.receptacle_room
    with pytest.raises(ValueError, match="unknown rooms variant"):
        rooms.RoomsEnv("rooms-upside-down")


def test_medium_policy_makes_its_mistake_and_relabelling_names_what_was_achieved():
    env = rooms.RoomsEnv()
    ep = rooms.play(env, "put:apple:box", 0, "medium", epsilon=0.0, recover=0.0)
    decoy = env.decoy_room()
    goals = [s["subgoal"] for s in ep["segments"]]
    assert goals[:3] == ["get apple", f"go to {decoy}", "put apple in box"] and not ep["success"]
    put = ep["segments"][2]
    assert not put["achieved"] and put["relabel"] is None and all(s["invalid"] for s in put["steps"])
    # hindsight: a "go to cellar" segment that stopped in the study is relabelled "go to study"
    seg = {"subgoal": "go to cellar", "relabel": "go to study", "steps": [
        {"obs": "in hall", "action": "go study", "reward": 0.0, "done": False, "invalid": False, "next_obs": "in study"},
        {"obs": "in study", "action": "go cellar", "reward": 0.0, "done": False, "invalid": True, "next_obs": "x"}]}
    rows = data.low_samples([{"task": "t", "segments": [seg]}])
    assert rows == [{"prompt": glider.low_prompt("go to study", "in hall"), "action": "go study"}]


def test_high_and_flat_transitions():
    env = rooms.RoomsEnv()
    ep = rooms.play(env, "bring:ball:hall", 0, "expert")
    high = data.high_transitions([ep])
    assert [h["action"] for h in high] == [s["subgoal"] for s in ep["segments"]]
    assert [h["reward"] for h in high] == [0.0] * (len(high) - 1) + [1.0]
    assert [h["done"] for h in high] == [0.0] * (len(high) - 1) + [1.0]
    assert high[0]["next_action"] == high[1]["action"] and high[0]["next_prompt"] == high[1]["prompt"]
    flat = data.flat_transitions([ep])
    assert len(flat) == ep["steps"] and flat[-1]["reward"] == 1.0 and flat[-1]["done"] == 1.0
    assert sum(f["reward"] for f in flat) == ep["return"] == 1.0


def test_word_tokenizer_round_trips_environment_text():
    env = rooms.RoomsEnv()
    model, tok = lm.build_word_lm(env.vocabulary() + ["plan", "do", "act"], seed=0, hidden_size=16, layers=1)
    obs = env.reset("put:apple:box", 0)
    ids = tok(glider.high_prompt(obs.task, obs.text), add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids
    assert tok.decode(tok(" put apple in box", add_special_tokens=False).input_ids) == "put apple in box"
    assert model.config.vocab_size == len(tok)


# ------------------------------------------------------------------------------------------------
# the model's math
# ------------------------------------------------------------------------------------------------


def _constant_heads(hidden: int, q: float, v: float) -> glider.CriticHeads:
    heads = glider.CriticHeads(hidden, width=4)
    with torch.no_grad():
        for mlp, value in ((heads.q, q), (heads.v, v)):
            mlp[-1].weight.zero_()
            mlp[-1].bias.fill_(value)
    return heads


def test_td_target_by_hand():
    y = glider.td_target(torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.0, 1.0, 0.0]), torch.tensor([2.0, 7.0, -1.0]),
                         0.9)
    assert torch.allclose(y, torch.tensor([1.0 + 0.9 * 2.0, 0.0, 0.5 - 0.9]))


def test_critic_losses_match_a_hand_computed_target():
    """Q = 0.5, V = 0.1 (online), Q_target = 2 everywhere: y = r + 0.99 (1 - d) 2."""
    env = rooms.RoomsEnv()
    model, tok = lm.build_word_lm(env.vocabulary() + ["plan", "do", "act"], seed=0, hidden_size=16, layers=1)
    heads, target = _constant_heads(16, 0.5, 0.1), _constant_heads(16, 2.0, -3.0)
    batch = {"prompt": ["plan : a", "plan : b"], "action": ["go hall", "take key"], "reward": [1.0, 0.0],
             "done": [0.0, 1.0], "next_prompt": ["plan : c", "plan : d"], "next_action": ["go study", "drop key"]}
    loss, info = glider.critic_losses(model, heads, target, tok, batch, 0.99, 64)
    y = torch.tensor([1.0 + 0.99 * 2.0, 0.0])
    expected_q = ((0.5 - y) ** 2).mean().item()
    expected_v = (0.1 - 2.0) ** 2
    assert info["loss/critic_q"] == pytest.approx(expected_q, rel=1e-6)
    assert info["loss/critic_v"] == pytest.approx(expected_v, rel=1e-6)
    assert info["reason/td_target_mean"] == pytest.approx(y.mean().item())
    assert loss.item() == pytest.approx(expected_q + expected_v, rel=1e-6)
    loss.backward()  # the critic trains its heads only: no gradient reaches the backbone
    assert heads.q[-1].bias.grad.item() == pytest.approx(2 * ((0.5 - y).mean()).item(), rel=1e-5)
    assert all(p.grad is None for p in model.parameters())
    # critic_trains_backbone: the same numbers, and the TD loss now reaches the shared backbone too
    loss2, info2 = glider.critic_losses(model, heads, target, tok, batch, 0.99, 64, train_backbone=True)
    assert info2 == info
    torch.manual_seed(0)
    random_heads = glider.CriticHeads(16, width=4)  # (the constant heads above pass no gradient to h)
    loss2, _ = glider.critic_losses(model, random_heads, target, tok, batch, 0.99, 64, train_backbone=True)
    loss2.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_a_critic_step_moves_q_towards_the_td_target():
    env = rooms.RoomsEnv()
    model, tok = lm.build_word_lm(env.vocabulary() + ["plan", "do", "act"], seed=0, hidden_size=16, layers=1)
    torch.manual_seed(0)
    heads = glider.CriticHeads(16, 8)
    target = glider.CriticHeads(16, 8).requires_grad_(False)
    batch = {"prompt": ["plan : a"] * 4, "action": ["go hall"] * 4, "reward": [1.0] * 4, "done": [1.0] * 4,
             "next_prompt": ["plan : a"] * 4, "next_action": ["go hall"] * 4}
    opt = torch.optim.SGD(heads.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        loss, info = glider.critic_losses(model, heads, target, tok, batch, 0.99, 64)
        losses.append(info["loss/critic_q"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.1 * losses[0]


def test_polyak_update_by_hand():
    online, target = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        online.weight.fill_(1.0), online.bias.fill_(-1.0), target.weight.fill_(0.0), target.bias.fill_(4.0)
    glider.polyak_update(target, online, tau=0.2)
    assert torch.allclose(target.weight, torch.full((1, 2), 0.2)) and target.bias.item() == pytest.approx(3.0)
    glider.polyak_update(target, online, tau=0.2)
    assert target.bias.item() == pytest.approx(0.8 * 3.0 + 0.2 * -1.0)


def test_awac_and_q_weighted_weights_by_hand():
    q, v = torch.tensor([1.0, 0.5, 0.45, 0.2]), torch.tensor([0.5, 0.5, 0.5, 0.5])
    w = glider.actor_weights("awac", q, v, lam=0.1, max_weight=20.0)
    expected = [min(math.exp(5.0), 20.0), 1.0, math.exp(-0.5), math.exp(-3.0)]
    assert w.tolist() == pytest.approx(expected, rel=1e-6)
    assert glider.actor_weights("awac", q, v, lam=1.0, max_weight=100.0).tolist() == pytest.approx(
        [math.exp(0.5), 1.0, math.exp(-0.05), math.exp(-0.3)], rel=1e-6)
    assert glider.actor_weights("q_weighted", q, v, 0.1, 20.0).tolist() == pytest.approx(q.tolist())
    with pytest.raises(ValueError, match="awac"):
        glider.actor_weights("ppo", q, v, 0.1, 20.0)


def test_weighted_nll_and_encoding():
    env = rooms.RoomsEnv()
    model, tok = lm.build_word_lm(env.vocabulary() + ["plan", "do", "act"], seed=0, hidden_size=16, layers=1)
    enc = glider.encode(tok, ["plan : put the apple in the box", "do : get key"], ["get apple", "go study"], 64)
    assert enc.label_mask.sum(1).tolist() == [3, 3]  # two words + eos
    for i in range(2):
        assert enc.input_ids[i, enc.action_end[i]] == tok.eos_token_id
        assert tok.convert_ids_to_tokens(int(enc.input_ids[i, enc.state_end[i]])) in ("box", "key")
    logp, h_act, h_state = glider.forward(model, enc)
    assert logp.shape == (2,) and h_act.shape == h_state.shape == (2, 16) and logp.dtype == torch.float32
    # the sequence log-prob equals the sum of the completion tokens' log-softmax, computed independently
    out = model(input_ids=enc.input_ids[:1, : int(enc.action_end[0]) + 1])
    lsm = torch.log_softmax(out.logits[0].float(), -1)
    start = int(enc.state_end[0]) + 1
    manual = sum(lsm[t - 1, enc.input_ids[0, t]] for t in range(start, int(enc.action_end[0]) + 1))
    assert logp[0].item() == pytest.approx(manual.item(), rel=1e-5)
    w = torch.tensor([2.0, 0.5])
    assert glider.weighted_nll(logp, w, enc.label_mask.sum(1)).item() == pytest.approx(
        (-(2.0 * logp[0] + 0.5 * logp[1]) / 2 / 3).item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------


def test_config_is_strict_and_reports_every_problem():
    cfg = load_config(CONFIG)
    assert isinstance(cfg, GliderConfig) and cfg.trainer == "glider" and cfg.offline_rl.tau == 0.2
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, ["offline_rl.weightin=awac", "offline_rl.weighting=ppo", "offline_rl.critic_warmup=999"])
    text = str(err.value)
    assert "did you mean 'offline_rl.weighting'" in text and "ppo" in text and "critic_warmup" in text


# ------------------------------------------------------------------------------------------------
# ScienceWorld
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(available() is not None, reason=f"ScienceWorld cannot run here: {available()}")
def test_scienceworld_adapter_gold_data_and_invalid_actions():
    from reasoning_rl.agents.scienceworld_env import ScienceWorldEnv

    env = ScienceWorldEnv(["find-living-thing"], max_steps=40, variations_per_split=2)
    try:
        assert len(env.tasks("seen")) == 2 and len(env.tasks("unseen")) == 2
        assert not set(env.tasks("seen")) & set(env.tasks("unseen"))
        obs = env.reset(env.tasks("seen")[0])
        assert "focus" in obs.task.lower() and obs.valid_actions
        r = env.step("fly to the moon")
        assert r.invalid and r.observation.text == INVALID_OBSERVATION and env.counter.invalid_actions == 1
        eps = env.gold_episodes(1, 0, subtask_steps=4)
        ep = eps[0]
        assert ep["success"] and ep["return"] == pytest.approx(1.0) and ep["invalid"] == 0
        assert all(s["achieved"] and s["subgoal"] == s["steps"][-1]["action"] for s in ep["segments"])
        assert data.high_transitions(eps)[-1]["reward"] > 0
    finally:
        env.close()


# ------------------------------------------------------------------------------------------------
# end to end through the CLI
# ------------------------------------------------------------------------------------------------


def _json_line(output: str) -> dict:
    start = output.index('{"task"')  # progress bars of weight loading may share its line
    return json.loads(output[start:].splitlines()[0])


def _train(out, *extra, resume=None):
    _mount_reason_cli()
    args = ["reason", "train", str(CONFIG), "--set", f"output_dir={out}"]
    for item in [*TINY, *extra]:
        args += ["--set", item]
    if resume:
        args += ["--resume", resume]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, (res.output, res.exception)
    return res


@pytest.mark.slow
def test_cli_train_checkpoints_tensorboard_resume_and_eval(tmp_path):
    full = tmp_path / "full"
    res = _train(full)
    assert "[drl glider] hierarchical agent on rooms; weighting=awac" in res.output
    ckpts = sorted(p.name for p in (full / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-000003", "checkpoint-000006"]
    assert (full / "final" / "lora" / "adapter_model.safetensors").is_file()
    assert set(load_file(str(full / "final" / "critic.safetensors"))) >= {"q.0.weight", "v.4.bias"}
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(6))
    assert "loss/bc" in rows[0] and "loss/critic_q" in rows[3] and "loss/actor" not in rows[3]
    assert "loss/actor" in rows[4] and "reason/actor_weight_mean" in rows[4]
    tags = EventAccumulator(str(full / "tb")).Reload().Tags()["scalars"]
    assert {"loss/bc", "loss/critic_q", "loss/actor", "eval/final/seen_success", "perf/step_s"} <= set(tags)
    final = json.loads((full / "eval_final.json").read_text())
    assert final["seen"]["episodes"] == 3 and final["unseen"]["episodes"] == 3

    # resume from the step-3 checkpoint of a copy: the same adapters, critic and metrics as the uninterrupted run
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "checkpoint-000006")
    shutil.rmtree(part / "final")
    (part / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    _train(part, resume="auto")
    a, b = load_file(str(full / "final" / "lora" / "adapter_model.safetensors")), \
        load_file(str(part / "final" / "lora" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = load_file(str(full / "final" / "critic.safetensors")), load_file(str(part / "final" / "critic.safetensors"))
    assert all(torch.equal(ca[k], cb[k]) for k in ca)
    resumed = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss/critic_q"] for r in resumed[3:]] == [r["loss/critic_q"] for r in rows[3:]]

    # drl reason eval: the same greedy numbers as the run's own final evaluation; other environments by name
    res = runner.invoke(app, ["reason", "eval", str(full), "--task", "env:rooms", "--json", "--limit", "3"])
    assert res.exit_code == 0, res.output
    out = _json_line(res.output)
    assert out["task"] == "env:rooms" and out["results"] == final
    res = runner.invoke(app, ["reason", "eval", str(full), "--task", "env:rooms-rewired", "--json", "--limit", "2"])
    assert _json_line(res.output)["results"]["env"] == "rooms-rewired"
    res = runner.invoke(app, ["reason", "eval", str(full), "--task", "env:mars"])
    assert res.exit_code != 0 and "unknown environment" in res.output


@pytest.mark.slow
def test_flat_agent_with_q_weighting_and_an_online_round_in_a_changed_environment(tmp_path):
    out = tmp_path / "flat"
    _train(out, "agent.hierarchical=false", "offline_rl.weighting=q_weighted", "online.rounds=1",
           "online.env=rooms-rewired", "online.episodes_per_round=3", "online.updates_per_round=2")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and rows[-1]["reason/online_episodes"] == 3.0
    assert 0.0 <= rows[-1]["reason/online_success"] <= 1.0 and "loss/actor" in rows[-1]
    before = json.loads((out / "eval_offline.json").read_text())
    after = json.loads((out / "eval_final.json").read_text())
    assert before["env"] == after["env"] == "rooms-rewired" and not after["hierarchical"]
