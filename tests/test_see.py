"""SEE (reasoning_rl.continual): indicator data, expert training, routing, only-the-new-expert-trains, the
`drl reason train configs/see_continual.yaml` / `drl reason eval --task see` path and resume between tasks."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from diffusion_rl.cli import _mount_reason_cli, app
from reasoning_rl.continual import experts as ex
from reasoning_rl.continual.config import ConfigError, TaskConfig, load_config
from reasoning_rl.continual.tasks import Example, Item, expert_examples, family_of, world_item, world_items
from reasoning_rl.models import build_tiny_causal_lm, load_policy
from reasoning_rl.world import text

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "see_continual.yaml"
runner = CliRunner()
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _problem(start, ops, name="Ann", pronoun="She", items="pens"):
    """An ArithProblem written by hand (the world's phrasing)."""
    phrases = {"add": "{P} buys {n} more.", "sub": "{P} loses {n}."}
    words = [f"{name} has {start} {items}."]
    words += [text.MUL_PHRASES[n].format(P=pronoun) if k == "mul" else phrases[k].format(P=pronoun, n=n) for k, n in ops]
    words.append(text.QUESTION.format(items=items, name=name))
    solution, answer = text.solution_trace(start, ops)
    key = text.arithmetic_key(start, ops)
    return text.ArithProblem(" ".join(words), answer, solution, len(ops), start, tuple(ops), key, text.split_of(key))


# ------------------------------------------------------------------------------------------------------------
# data / indicator construction
# ------------------------------------------------------------------------------------------------------------


def test_world_item_writes_the_tasks_answer_format_after_the_trace():
    p = _problem(7, [("sub", 3)])
    assert p.prompt == "Ann has 7 pens. She loses 3. How many pens does Ann have now?"
    sub = world_item(p, TaskConfig(name="sub", family="sub", answer_format="={answer}"))
    assert sub == Item(p.prompt, "<think>7-3=4</think><answer>=4</answer>", "=4", "sub")
    items = world_item(p, TaskConfig(name="x", answer_format="{answer} {items} of {name}"))
    assert items.completion == "<think>7-3=4</think><answer>4 pens of Ann</answer>" and items.gold == "4 pens of Ann"
    assert world_item(_problem(5, [("mul", 2), ("add", 1)]), TaskConfig(name="m", answer_format="*{answer}")).completion \
        == "<think>5*2=10; 10+1=11</think><answer>*11</answer>"


def test_families_partition_the_problems_and_splits_stay_disjoint():
    assert [family_of(ops) for ops in ([("add", 1)], [("sub", 1), ("sub", 2)], [("add", 1), ("mul", 2)],
                                        [("add", 1), ("sub", 1)])] == ["add", "sub", "mul", "mixed"]
    task = TaskConfig(name="sub", family="sub", steps=[1, 2])
    train, held = world_items(task, "train", 40, seed=0), world_items(task, "eval", 10, seed=0)
    assert len(train) == 40 and len(held) == 10 and len({it.prompt for it in train}) == 40
    for it in train + held:
        assert " loses " in it.prompt or " gives away " in it.prompt or " sells " in it.prompt
        assert "more." not in it.prompt and "them." not in it.prompt
    assert not {it.prompt for it in train} & {it.prompt for it in held}
    assert world_items(task, "train", 40, seed=0) == train  # deterministic


def test_expert_examples_are_own_accept_then_rehearsal_and_general_reject():
    own = [Item(f"own {i}", f"<answer>{i}</answer>", str(i), "b") for i in range(3)]
    earlier = [[Item(f"a {i}", "<answer>x</answer>", "x", "a") for i in range(10)]]
    general = [Item(f"g {i}", "<answer>y</answer>", "y", "g") for i in range(5)]
    got = expert_examples(own, earlier, general, "+", "-", rehearsal_per_task=4, general_negatives=2, seed=0)
    assert [e.completion for e in got[:3]] == ["+<answer>0</answer>", "+<answer>1</answer>", "+<answer>2</answer>"]
    assert [e.kind for e in got] == ["own"] * 3 + ["rehearsal"] * 4 + ["general"] * 2
    assert all(e.completion == "-" for e in got[3:])
    assert len({e.prompt for e in got[3:7]}) == 4 and all(e.prompt.startswith("a ") for e in got[3:7])
    assert all(e.prompt.startswith("g ") for e in got[7:])
    assert got == expert_examples(own, earlier, general, "+", "-", 4, 2, seed=0)  # seeded
    # a rehearsal sample larger than the earlier task takes all of it
    assert len(expert_examples(own, earlier, general, "+", "-", 50, 0, seed=1)) == 3 + 10


def test_encoding_labels_only_the_completion_and_eos():
    _, tok = build_tiny_causal_lm(0)
    enc = ex.encode_examples(tok, [Example("2+3?", "+<answer>5</answer>", "own", "t")], use_chat_template=False)
    ids, n_prompt = enc[0]
    assert tok.decode(ids[:n_prompt]) == "2+3?" and n_prompt == 4
    assert tok.decode(ids[n_prompt:-1]) == "+<answer>5</answer>" and ids[-1] == tok.eos_token_id
    input_ids, mask, labels = ex.right_padded(enc + ex.encode_examples(tok, [Example("1?", "-", "rehearsal", "u")],
                                                                       False), tok.pad_token_id)
    assert input_ids.shape == labels.shape == (2, len(ids))
    assert (labels[0, :n_prompt] == -100).all() and labels[0, n_prompt:].tolist() == ids[n_prompt:]
    assert labels[1].tolist() == [-100, -100, tok.convert_tokens_to_ids("-"), tok.eos_token_id] + [-100] * (len(ids) - 4)
    assert mask[1].sum() == 4


def test_forgetting_is_best_earlier_minus_final():
    # task 0: 0.9 -> 0.5 -> 0.3 (forgot 0.6); task 1: -, 0.8 -> 0.6 (forgot 0.2); the last task does not count
    assert ex.forgetting([[0.9, 0.5, 0.3], [0.0, 0.8, 0.6], [0.0, 0.0, 0.7]]) == pytest.approx((0.6 + 0.2) / 2)
    assert ex.forgetting([[0.2, 0.5]]) == 0.0 and ex.forgetting([[0.4]]) == 0.0


def test_config_problems_are_reported_together():
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, ["tasks=[{name: a, answer_format: 'x'}, {name: a, source: jsonl}]", "see.reject_marker=+",
                             "see.general_negatives=4", "general=[]", "train.lr_warmup_steps=1000"])
    text_ = str(err.value)
    for needle in ("used twice", "must contain {answer}", "needs train_path", "two different", "general_negatives=4",
                   "lr_warmup_steps (1000)"):
        assert needle in text_, needle
    cfg = load_config(CONFIG)
    assert cfg.trainer == "see" and [t.name for t in cfg.tasks] == ["add", "sub", "mul"]


# ------------------------------------------------------------------------------------------------------------
# experts on a tiny random model: indicator training, only the new expert trains, routing
# ------------------------------------------------------------------------------------------------------------

KW = dict(batch_size=8, learning_rate=1e-2, warmup_steps=2, weight_decay=0.0, max_grad_norm=1.0,
          use_chat_template=False, reject_share=0.5)


def _queries(word, n, offset=0):
    return [Item(f"{word} {i + offset} {(3 * i + 1) % 10}", f"<answer>{word[0]}{i}</answer>", f"{word[0]}{i}", word)
            for i in range(n)]


def _ids(tok, items):
    return tok([it.prompt for it in items], add_special_tokens=False).input_ids


def _margins(model, name, tok, items):
    acc, rej = tok("+", add_special_tokens=False).input_ids, tok("-", add_special_tokens=False).input_ids
    return ex.indicator_margin(model, name, _ids(tok, items), acc, rej, 64)


def _margin(model, name, tok, items):
    return float(_margins(model, name, tok, items).mean())


def _accept_rate(model, name, tok, items):
    return float((_margins(model, name, tok, items) > 0).float().mean())


@pytest.fixture(scope="module")
def two_experts():
    """expert_0 trained on `apple` queries (rejects `zebra` general queries), then expert_1 on `berry` queries
    (rejects a rehearsal sample of `apple` and the general ones); weights snapshotted in between. The shipped tiny
    arithmetic model (0.8 M parameters): it already emits `+` and `-`, so 24 steps of batch 8 separate the tasks."""
    torch.set_num_threads(1)
    base, tok = load_policy("builtin:tiny-arith-lm")
    base.requires_grad_(False)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    apple, berry, zebra = _queries("apple", 24), _queries("berry", 24), _queries("zebra", 24)
    lora = lambda: ex.lora_config(8, 16, TARGETS)  # noqa: E731
    model = ex.add_expert(base, "expert_0", lora(), seed=1)
    before = {"own_margin": _margin(model, "expert_0", tok, apple)}  # the untrained adapter = the base model
    ex.train_adapter(model, "expert_0", tok, expert_examples(apple, [], zebra, "+", "-", 0, 24, 0), steps=24, seed=0,
                     **KW)
    snap0 = ex.adapter_state(model, "expert_0")
    model = ex.add_expert(model, "expert_1", lora(), seed=2)
    fresh1 = ex.adapter_state(model, "expert_1")
    ex.train_adapter(model, "expert_1", tok, expert_examples(berry, [apple], zebra, "+", "-", 12, 12, 1), steps=24,
                     seed=1, **KW)
    return dict(model=model, tok=tok, apple=apple, berry=berry, zebra=zebra, snap0=snap0, fresh1=fresh1,
                before=before, base_state=base_state)


def test_indicator_training_raises_the_accept_rate_on_the_own_task(two_experts):
    t = two_experts
    m, tok = t["model"], t["tok"]
    assert _margin(m, "expert_0", tok, t["apple"]) > t["before"]["own_margin"] + 2.0
    assert _accept_rate(m, "expert_0", tok, t["apple"]) == 1.0
    assert _accept_rate(m, "expert_0", tok, t["zebra"]) == 0.0
    assert _accept_rate(m, "expert_1", tok, t["berry"]) == 1.0
    assert _accept_rate(m, "expert_1", tok, t["apple"]) == 0.0  # learned from the rehearsal sample
    assert _accept_rate(m, "expert_1", tok, t["zebra"]) == 0.0


def test_only_the_new_expert_trains(two_experts):
    t = two_experts
    m = t["model"]
    now0 = ex.adapter_state(m, "expert_0")
    layers = m.get_base_model().config.num_hidden_layers
    assert now0.keys() == t["snap0"].keys() and len(now0) == 2 * layers * len(TARGETS)  # A and B per module
    assert all(torch.equal(now0[k], t["snap0"][k]) for k in now0)  # bit-identical after training expert_1
    now1 = ex.adapter_state(m, "expert_1")
    assert any(not torch.equal(now1[k], t["fresh1"][k]) for k in now1)  # ... while expert_1 did change
    base_now = m.get_base_model().state_dict()
    for k, v in t["base_state"].items():
        peft_key = k.replace(".weight", ".base_layer.weight") if any(f".{x}." in k for x in TARGETS) else k
        assert torch.equal(base_now.get(peft_key, base_now.get(k)), v), k


def test_routing_asks_in_order_and_falls_back_to_the_general_model(two_experts, monkeypatch):
    t = two_experts
    m, tok = t["model"], t["tok"]
    acc, rej = tok("+", add_special_tokens=False).input_ids, tok("-", add_special_tokens=False).input_ids
    queries = [t["apple"][0], t["berry"][0], t["zebra"][0]]
    ids = _ids(tok, queries)
    # the trained experts, newest first: berry -> expert_1 (position 0), apple -> expert_0 (1), zebra -> nobody
    assert ex.route(m, ["expert_1", "expert_0"], ids, acc, rej, 8) == [1, 0, ex.GENERAL]
    # constructed margins: the first accepting expert in the order wins, later ones are not asked about it
    margins = {"e0": [1.0, -1.0, 2.0, -3.0], "e1": [5.0, 3.0, -1.0, -2.0]}
    asked = []

    def fake_margin(model, name, prompt_ids, accept_ids, reject_ids, batch_size):
        asked.append((name, [p[0] for p in prompt_ids]))
        return torch.tensor([margins[name][p[0]] for p in prompt_ids])

    monkeypatch.setattr(ex, "indicator_margin", fake_margin)
    four = [[0], [1], [2], [3]]
    assert ex.route(None, ["e0", "e1"], four, acc, rej, 8) == [0, 1, 0, ex.GENERAL]
    assert asked == [("e0", [0, 1, 2, 3]), ("e1", [1, 3])]
    assert ex.route(None, ["e1", "e0"], four, acc, rej, 8) == [0, 0, 1, ex.GENERAL]


def test_answers_come_from_the_routed_expert_or_the_base_model(two_experts):
    t = two_experts
    m, tok = t["model"], t["tok"]
    acc = tok("+", add_special_tokens=False).input_ids
    ids = _ids(tok, [t["apple"][1], t["zebra"][1]])
    got = ex.answer(m, tok, ids, [0, ex.GENERAL], ["expert_0"], acc, 6, 8)
    m.set_adapter("expert_0")
    assert got[0] == ex.generate_greedy(m, tok, [ids[0] + acc], 6, 8)[0]
    with m.disable_adapter():
        assert got[1] == ex.generate_greedy(m, tok, [ids[1]], 6, 8)[0]
    res = ex.evaluate_system(m, tok, ["expert_0", "expert_1"], "newest_first",
                             {"apple": t["apple"][:8], "berry": t["berry"][:8]}, t["zebra"][:8], "+", "-", 8, 16, False,
                             {"apple": "expert_0", "berry": "expert_1"})
    assert res["routing"] == {"apple": 1.0, "berry": 1.0, "mean": 1.0}
    assert res["ood_detection"] == 1.0 and res["accept"] == {"apple": 1.0, "berry": 1.0}
    assert 0.0 <= res["accuracy"]["mean"] <= 1.0


# ------------------------------------------------------------------------------------------------------------
# end to end through the CLI
# ------------------------------------------------------------------------------------------------------------

SMALL = ["model.pretrained=builtin:tiny-random-lm", "train.steps_per_task=3", "train.lr_warmup_steps=1",
         "train.batch_size=4", "eval.max_new_tokens=4", "see.use_chat_template=false",
         "general=[{name: general, family: mixed, steps: [3], train_size: 8, eval_size: 1}]",
         "ood=[{name: ood, family: mixed, steps: [2], train_size: 1, eval_size: 3}]",
         "see.rehearsal_per_task=4", "see.general_negatives=4"]
TASK_A = "{name: add, family: add, train_size: 8, eval_size: 3}"
TASK_B = "{name: sub, family: sub, answer_format: '={answer}', train_size: 8, eval_size: 3}"


def _train(out, tasks, *extra):
    sets = [x for s in [*SMALL, f"tasks=[{', '.join(tasks)}]"] for x in ("--set", s)]
    return runner.invoke(app, ["reason", "train", str(CONFIG), *sets, "--output-dir", str(out), *extra])


def test_cli_train_eval_and_resume_with_a_new_task(tmp_path):
    _mount_reason_cli()
    out = tmp_path / "see"
    first = _train(out, [TASK_A])
    assert first.exit_code == 0, first.output
    assert (out / "checkpoints" / "checkpoint-000001" / "manifest.json").is_file()
    e0 = (out / "experts" / "expert_0" / "adapter_model.safetensors").read_bytes()
    # resume with one more task: only expert_1 trains, expert_0 is restored from the checkpoint unchanged
    second = _train(out, [TASK_A, TASK_B], "--resume", "auto")
    assert second.exit_code == 0, second.output
    assert "resumed from" in second.output and "task 1 (sub)" in second.output and "task 0 (add)" not in second.output
    assert (out / "experts" / "expert_0" / "adapter_model.safetensors").read_bytes() == e0
    assert (out / "experts" / "expert_1" / "adapter_config.json").is_file()
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"checkpoint-000001", "checkpoint-000002"}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (out / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"loss/nll", "reason/lr", "eval/accuracy/add", "eval/accuracy/sub", "eval/routing/mean",
            "eval/ood_detection", "perf/train_s"} <= tags
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in lines] == [(0, 3), (1, 3)]
    summary = json.loads((out / "see.json").read_text())
    assert summary["tasks"] == ["add", "sub"] and summary["experts"] == {"add": "expert_0", "sub": "expert_1"}
    assert list(summary["matrix"]["add"]) == ["after_0", "after_1"]

    shown = runner.invoke(app, ["reason", "eval", str(out), "--task", "see", "--json"])
    assert shown.exit_code == 0, shown.output
    res = json.loads(shown.output)["results"]
    assert res["experts"] == 2 and res["queries_per_task"] == 3 and res["ood_queries"] == 3
    # experts never change after training: the recomputed matrix is the one training measured
    assert res["matrix"] == summary["matrix"]
    assert res["routing_accuracy"] == summary["routing_accuracy"]
    assert 0.0 <= res["ood_detection"] <= 1.0 and res["forgetting"] == pytest.approx(summary["forgetting"])
    table = runner.invoke(app, ["reason", "eval", str(out), "--task", "see:oldest_first", "--limit", "2"])
    assert table.exit_code == 0, table.output
    assert "matrix/add/after_1" in table.output and "oldest_first" in table.output


def test_cli_eval_of_a_directory_without_experts_is_a_clear_error(tmp_path):
    _mount_reason_cli()
    result = runner.invoke(app, ["reason", "eval", str(tmp_path), "--task", "see"])
    assert result.exit_code == 2 and "SEE run directory" in result.output


# ------------------------------------------------------------------------------------------------------------
# the benchmark script
# ------------------------------------------------------------------------------------------------------------


def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("see_bench", ROOT / "benchmarks" / "see.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_runs_every_method_and_aggregates_over_seeds(tmp_path):
    bench = _bench()
    sets = [x for s in [*SMALL, f"tasks=[{TASK_A}, {TASK_B}]", "train.steps_per_task=1"] for x in ("--set", s)]
    parts = [tmp_path / "see_seed0.json", tmp_path / "see_seed1.json"]
    bench.main(["--seeds", "0", "--out", str(parts[0]), *sets])
    bench.main(["--seeds", "1", "--methods", "seq_ft", "--out", str(parts[1]), *sets])
    merged = bench.main(["--merge", *map(str, parts), "--out", str(tmp_path / "see.json")])
    assert sorted(merged["per_seed"]) == ["0", "1"] and set(merged["summary"]) == set(bench.METHODS)
    runs = merged["per_seed"]["0"]
    assert [len(v) for v in runs["see"]["matrix"].values()] == [2, 2]  # task x after-stage
    assert [len(v) for v in runs["seq_ft"]["matrix"].values()] == [2, 2]
    assert [len(v) for v in runs["multitask"]["matrix"].values()] == [1, 1] and runs["multitask"]["forgetting"] is None
    assert runs["rehearsal"]["average_accuracy"] == pytest.approx(
        sum(v[-1] for v in runs["rehearsal"]["matrix"].values()) / 2)
    assert 0.0 <= runs["see"]["routing_accuracy"] <= 1.0 and 0.0 <= runs["see"]["ood_detection"] <= 1.0
    vals = [merged["per_seed"][s]["seq_ft"]["average_accuracy"] for s in ("0", "1")]
    assert merged["summary"]["seq_ft"]["average_accuracy"]["values"] == vals
    assert merged["summary"]["seq_ft"]["average_accuracy"]["mean"] == pytest.approx(sum(vals) / 2)
    assert merged["summary"]["see"]["average_accuracy"]["values"] == [runs["see"]["average_accuracy"]]
    assert json.loads((tmp_path / "see.json").read_text())["summary"] == merged["summary"]
    table = bench.markdown_table(merged).splitlines()
    assert len(table) == 2 + len(bench.METHODS) and table[2].startswith("| SEE") and "final sub" in table[0]


def test_committed_benchmark_results_have_three_seeds_of_every_method():
    path = ROOT / "benchmarks" / "results" / "see.json"
    if not path.is_file():
        pytest.skip("benchmarks/results/see.json not written yet (python benchmarks/see.py)")
    result = json.loads(path.read_text())
    assert len(result["per_seed"]) >= 3
    bench = _bench()
    assert result["summary"] == json.loads(json.dumps(bench.aggregate(result["per_seed"])))
    for method in bench.METHODS:
        assert len(result["summary"][method]["average_accuracy"]["values"]) >= 3
