"""The reasoning worlds (reasoning_rl.world): the arithmetic text world, the shapes VQA world, reasoning-gym as a
prompt source and reward, the shipped tiny arithmetic LM and its pretraining script."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from reasoning_rl.config import load_config
from reasoning_rl.data import load_problems
from reasoning_rl.world import TINY_ARITH_LM, TINY_ARITH_LM_MIXED, text, visual
from reasoning_rl.world.pretrain import with_bare_answers
from rewards.text import ExactMatchReward, ThinkAnswerFormatReward

REPO = Path(__file__).parents[1]
TRACE = re.compile(r"^<think>(.*)</think><answer>(-?\d+)</answer>$")
STEP = re.compile(r"^(\d+)([+\-*])(\d+)=(\d+)$")


# ------------------------------------------------------------------------------------------------ text world


def test_arithmetic_splits_are_disjoint_deterministic_and_cover_every_step_count():
    train = text.generate_problems(3000, "train", seed=0)
    held_out = text.generate_problems(400, "eval", seed=0)
    assert {p.split for p in train} == {"train"} and {p.split for p in held_out} == {"eval"}
    assert not {p.prompt for p in train} & {p.prompt for p in held_out}
    assert not {p.key for p in train} & {p.key for p in held_out}  # disjoint in the arithmetic, not only the text
    assert all(text.split_of(p.key) == p.split for p in train + held_out)
    other_seed = text.generate_problems(400, "eval", seed=1)
    assert not {p.key for p in train} & {p.key for p in other_seed}  # the split does not depend on the seed
    assert [p.prompt for p in text.generate_problems(50, "eval", seed=0)] == [p.prompt for p in held_out[:50]]
    assert [p.prompt for p in other_seed[:50]] != [p.prompt for p in held_out[:50]]
    assert {p.steps for p in train} == {1, 2, 3, 4} and {p.steps for p in held_out} == {1, 2, 3, 4}
    assert len({p.prompt for p in held_out}) == len(held_out)
    assert {p.steps for p in text.generate_problems(20, "train", steps=[3], seed=0)} == {3}


def test_arithmetic_answers_recomputed_from_the_text_and_the_traces_are_worked_steps():
    problems = text.generate_problems(1000, "train", seed=3) + text.generate_problems(200, "eval", seed=3)
    for p in problems:
        assert text.solve(p.prompt) == p.answer, p.prompt
        m = TRACE.match(p.solution)
        assert m and int(m.group(2)) == p.answer, p.solution
        lines = m.group(1).split("; ")
        assert len(lines) == p.steps
        value = int(re.match(r"^\w+ has (\d+) ", p.prompt).group(1))
        assert 2 <= value <= text.MAX_OPERAND
        for line in lines:  # each step is a correct equation continuing from the previous result
            a, op, b, c = STEP.match(line).groups()
            assert int(a) == value and int(b) <= text.MAX_OPERAND
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert int(c) == value and 0 <= value <= text.MAX_VALUE
        assert value == p.answer


def test_arithmetic_traces_are_scored_by_the_trainers_rewards():
    problems = text.generate_problems(64, "eval", seed=0)
    meta = [{"answer": p.row()["answer"]} for p in problems]
    solutions = [p.solution for p in problems]
    right, _ = ExactMatchReward()(solutions, None, meta)
    formatted, _ = ThinkAnswerFormatReward()(solutions, None, meta)
    assert right.tolist() == [1.0] * 64 and formatted.tolist() == [1.0] * 64
    wrong = [s.replace(f"<answer>{p.answer}</answer>", f"<answer>{p.answer + 1}</answer>")
             for s, p in zip(solutions, problems, strict=True)]
    assert ExactMatchReward()(wrong, None, meta)[0].sum() == 0


def test_arithmetic_dataset_and_the_world_prompt_source(tmp_path):
    ds = text.arithmetic_dataset(20, "eval", steps=[1, 2], seed=0)
    assert {"prompt", "answer", "solution", "steps"} <= set(ds.column_names) and len(ds) == 20
    assert set(ds["steps"]) == {1, 2} and all(isinstance(a, str) for a in ds["answer"])
    cfg = load_config(REPO / "configs" / "reason_tiny.yaml", [
        f"output_dir={tmp_path}", "prompts.source=world", "prompts.world=arithmetic", "prompts.size=30",
        "prompts.steps=[2]", "prompts.problem_column=prompt", "prompts.solution_column=solution",
        "prompts.off_policy_column=solution", "prompts.split=eval"])
    problems = load_problems(cfg.prompts)
    assert len(problems.prompts) == 30
    for prompt, meta in zip(problems.prompts, problems.metadata, strict=True):
        assert meta["answer"] == str(text.solve(prompt)) and meta["steps"] == 2 and meta["split"] == "eval"
        assert meta["solution"] == meta["off_policy"] and meta["solution"].endswith(f"<answer>{meta['answer']}</answer>")
    with pytest.raises(Exception, match="steps"):
        load_config(REPO / "configs" / "reason_tiny.yaml", ["prompts.source=world", "prompts.steps=[]"])


# ------------------------------------------------------------------------------------------------ visual world


def _objects(row):
    return json.loads(row["objects"])


def _relation(a, b):
    (ax, ay), (bx, by) = [((o["box"][0] + o["box"][2] - 1) / 2, (o["box"][1] + o["box"][3] - 1) / 2) for o in (a, b)]
    dx, dy = bx - ax, by - ay
    return {"left of": dx > abs(dy), "right of": -dx > abs(dy), "above": dy > abs(dx), "below": -dy > abs(dx)}


def test_visual_splits_are_disjoint_in_their_object_combinations():
    train = visual.generate_problems(600, "train", seed=0)
    held_out = visual.generate_problems(120, "eval", seed=0)
    assert not {p.signature for p in train} & {p.signature for p in held_out}
    assert all(visual.scene_split(p.signature) == p.split for p in train + held_out)
    assert {p.question_type for p in held_out} == set(visual.QUESTION_TYPES)
    again = visual.generate_problems(20, "eval", seed=0)
    assert [p.prompt for p in again] == [p.prompt for p in held_out[:20]]
    assert [p.row()["objects"] for p in again] == [p.row()["objects"] for p in held_out[:20]]


def test_visual_answers_boxes_and_captions_match_the_drawn_scene():
    from diffusion_rl.world.shapes import COLOURS

    for scale in (1, 2):
        for row in visual.visual_rows(80, "train", seed=1, scale=scale):
            objects, q, answer = _objects(row), row["prompt"], row["answer"]
            image = row["image"]
            assert image.size == (32 * scale, 32 * scale) and image.mode == "RGB"
            pixels = torch.tensor(list(image.getdata())).reshape(32 * scale, 32 * scale, 3)
            for o in objects:  # the box holds pixels of its colour, touching all four sides
                x1, y1, x2, y2 = o["box"]
                inside = (pixels[y1:y2, x1:x2] == torch.tensor(COLOURS[o["colour"]])).all(-1)
                assert inside.any(0).all() and inside.any(1).all(), (row["caption"], o)
            assert sorted(row["caption"].replace(" and ", ", ").split(", ")) == sorted(
                f"a {o['colour']} {o['shape']}" for o in objects)
            if q == "How many objects are there?":
                about = objects
            elif m := re.fullmatch(r"How many (\w+) objects are there\?", q):
                about = [o for o in objects if o["colour"] == m.group(1)]
            elif m := re.fullmatch(r"How many (\w+)s are there\?", q):
                about = [o for o in objects if o["shape"] == m.group(1)]
            elif m := re.fullmatch(r"What colour is the (\w+)\?", q):
                about = [o for o in objects if o["shape"] == m.group(1)]
                assert len(about) == 1 and answer == about[0]["colour"]
            elif m := re.fullmatch(r"What shape is the (\w+) object\?", q):
                about = [o for o in objects if o["colour"] == m.group(1)]
                assert len(about) == 1 and answer == about[0]["shape"]
            else:
                m = re.fullmatch(r"Is the (\w+) (\w+) left of, right of, above or below the (\w+) (\w+)\?", q)
                (a,), (b,) = ([o for o in objects if (o["colour"], o["shape"]) == pair]
                              for pair in (m.group(1, 2), m.group(3, 4)))
                about = [a, b]
                assert [r for r, holds in _relation(a, b).items() if holds] == [answer]
            if row["question_type"] == "count":
                assert answer == str(len(about))
            assert row["boxes"] == [o["box"] for o in about]
            assert row["solution"].endswith(f"<answer>{answer}</answer>")
            assert row["satori_solution"] == (f"<caption>{row['caption']}</caption><bbox>{json.dumps(row['boxes'])}"
                                              f"</bbox><answer>{answer}</answer>")


def test_visual_dataset_feeds_the_vlm_path(tmp_path):
    from reasoning_rl.evaluation import evaluate
    from reasoning_rl.models import build_tiny_vlm

    ds = visual.visual_dataset(6, "eval", seed=0, scale=2)
    assert isinstance(ds[0]["image"], Image.Image) and ds[0]["boxes"] == ds.to_list()[0]["boxes"]
    cfg = load_config(REPO / "configs" / "reason_tiny.yaml", [
        f"output_dir={tmp_path}", "prompts.source=world", "prompts.world=shapes_vqa", "prompts.size=4",
        "prompts.split=eval", "prompts.problem_column=prompt", "prompts.image_column=image",
        "prompts.solution_column=solution", "prompts.image_scale=2"])
    problems = load_problems(cfg.prompts)
    assert all(isinstance(m["image"], Image.Image) and m["image"].size == (64, 64) for m in problems.metadata)
    model, processor = build_tiny_vlm(seed=0)
    results, completions = evaluate(model, processor, problems, ExactMatchReward(), max_new_tokens=4, batch_size=4)
    assert len(completions["greedy"]) == 4 and 0.0 <= results["greedy_reward"] <= 1.0


# ------------------------------------------------------------------------------------------------ reasoning-gym


def test_reasoning_gym_source_splits_and_verifier_reward(tmp_path):
    pytest.importorskip("reasoning_gym", reason="reasoning-gym is not installed (pip install reasoning-gym)")
    import rewards
    from reasoning_rl.world.gym import gym_dataset, gym_rows
    from reasoning_rl.world.gym_reward import make_reasoning_gym_reward

    train = gym_rows(["chain_sum", "basic_arithmetic"], size=40, seed=0, split="train")
    held_out = gym_rows(["chain_sum", "basic_arithmetic"], size=40, seed=0, split="eval")
    assert len(train) == 40 and {r["task"] for r in train} == {"chain_sum", "basic_arithmetic"}
    assert held_out and not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    assert {"prompt", "answer", "solution"} <= set(gym_dataset(["chain_sum"], size=4).column_names)
    fn = make_reasoning_gym_reward()
    rows = train[:8] + held_out[:4]
    right = [f"<think>adding up</think><answer>{r['answer']}</answer>" for r in rows]
    assert fn(right, None, rows)[0].tolist() == [1.0] * len(rows)
    assert fn([r["solution"] for r in rows], None, rows)[0].tolist() == [1.0] * len(rows)
    wrong = [f"<answer>{r['answer']}1</answer>" for r in rows]
    assert fn(wrong, None, rows)[0].max() < 1.0
    from_json = [{"gym_entry": r["gym_entry"]} for r in rows]  # rows read back from a file: the JSON entry
    assert fn(right, None, from_json)[0].tolist() == [1.0] * len(rows)
    scores, info = fn(["<answer>1</answer>"], None, [{"answer": "1"}])
    assert torch.isnan(scores).all() and info["unscorable"] == 1
    assert rewards.load("reasoning_gym")(right[:2], None, rows[:2])[0].tolist() == [1.0, 1.0]
    cfg = load_config(REPO / "configs" / "reason_tiny.yaml", [
        f"output_dir={tmp_path}", "prompts.source=reasoning_gym", "prompts.tasks=[countdown]", "prompts.size=5",
        "prompts.problem_column=prompt", "reward.name=reasoning_gym"])
    problems = load_problems(cfg.prompts)
    assert len(problems.prompts) == 5 and cfg.reward.build()(
        [m["solution"] for m in problems.metadata], problems.prompts, problems.metadata)[0].tolist() == [1.0] * 5
    with pytest.raises(Exception, match="tasks"):
        load_config(REPO / "configs" / "reason_tiny.yaml", ["prompts.source=reasoning_gym"])


# ------------------------------------------------------------------------------------------------ the tiny LM

# measured on the shipped model with these 16 + 16 problems: 0.875 (1 step) and 0.625 (2 steps); the floors leave a
# margin for other torch builds (greedy decoding of a few near-tied digits may differ) and fail a broken model
ACCURACY_FLOOR = {1: 0.7, 2: 0.45}


def test_the_shipped_tiny_lm_loads_and_solves_held_out_problems():
    from reasoning_rl.models import load_policy
    from reasoning_rl.world.pretrain import eval_problems, greedy_accuracy

    files = list(TINY_ARITH_LM.glob("*.safetensors"))
    assert files and sum(f.stat().st_size for f in TINY_ARITH_LM.rglob("*") if f.is_file()) < 10e6
    from transformers import AutoTokenizer

    from reasoning_rl.world.pretrain import world_tokenizer

    model, tokenizer = load_policy("builtin:tiny-arith-lm")
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.padding_side == "left"
    text_ = "<|im_start|>user\nAnn has 7 pens. <|im_end|>\n<|im_start|>assistant\n<think>7+5=12; 12-3=9</think>"
    for loaded in (tokenizer, AutoTokenizer.from_pretrained(TINY_ARITH_LM)):  # the very tokenizer it was trained with
        assert loaded(text_, add_special_tokens=False).input_ids == world_tokenizer()(text_, add_special_tokens=False).input_ids
    problems = eval_problems(16, seed=0, steps=(1, 2))
    result = greedy_accuracy(model, tokenizer, problems)
    assert result["format"] == 1.0
    for steps, floor in ACCURACY_FLOOR.items():
        assert result[f"accuracy_steps_{steps}"] >= floor, result


def test_the_shipped_mixed_lm_answers_some_problems_bare_and_works_the_others_out():
    """builtin:tiny-arith-lm-mixed is the room configs/reason_default.yaml trains into: it must still work some
    problems out (otherwise GRPO's groups have no worked sample to reinforce) and answer others bare."""
    from reasoning_rl.models import load_policy
    from reasoning_rl.world.pretrain import eval_problems, greedy_accuracy

    report = json.loads((TINY_ARITH_LM_MIXED / "training_report.json").read_text())
    assert report["args"]["bare_share"] == 0.5 and report["args"]["init"].endswith("tiny_lm")
    model, tokenizer = load_policy("builtin:tiny-arith-lm-mixed")
    assert type(model).__name__ == "LlamaForCausalLM"
    result = greedy_accuracy(model, tokenizer, eval_problems(16, seed=0, steps=(1, 2)))
    # measured: 0.44 of the 32 greedy completions worked out, accuracy 0.41 (builtin:tiny-arith-lm: 1.00 and 0.75)
    assert result["format"] == 1.0 and 0.15 <= result["worked"] <= 0.85, result
    assert 0.15 <= result["accuracy"] <= 0.65, result


def test_bare_answers_replace_a_seeded_share_of_the_solutions():
    problems = text.generate_problems(400, "train", seed=0, unique=False)
    assert with_bare_answers(problems, 0.0, seed=0) == problems  # the default corpus is the worked one
    mixed = with_bare_answers(problems, 0.5, seed=0)
    assert mixed == with_bare_answers(problems, 0.5, seed=0) != with_bare_answers(problems, 0.5, seed=1)
    bare = [m for m, p in zip(mixed, problems, strict=True) if m.solution != p.solution]
    assert 160 <= len(bare) <= 240
    assert all(m.solution == f"<think></think><answer>{m.answer}</answer>" for m in bare)
    assert [(m.prompt, m.answer) for m in mixed] == [(p.prompt, p.answer) for p in problems]
    meta = [{"answer": str(m.answer)} for m in bare]  # still the format both rewards accept, with the right answer
    assert ExactMatchReward(extract=("answer",))([m.solution for m in bare], None, meta)[0].min() == 1.0
    assert ThinkAnswerFormatReward()([m.solution for m in bare], None, meta)[0].min() == 1.0


def test_pretrain_script_runs_and_writes_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from reasoning_rl.models import load_policy

    args = ["--steps", "3", "--batch-size", "4", "--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads",
            "1", "--intermediate", "64", "--eval-per-step", "2", "--eval-every", "0", "--warmup", "1",
            "--log-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def pretrain(out: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "reasoning_rl.world.pretrain", "--out", str(tmp_path / out),
                               *extra, *args], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)

    for run in ("a", "b"):
        proc = pretrain(run)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "greedy accuracy" in proc.stdout
    report = json.loads((tmp_path / "a" / "training_report.json").read_text())
    assert report["steps_done"] == 3 and set(report["final"]) >= {"accuracy", "accuracy_steps_1", "accuracy_steps_4"}
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    b, tokenizer = load_policy(str(tmp_path / "b"))
    assert (tmp_path / "a" / "model.safetensors").is_file()
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name  # same seed, same budget: the same weights
    assert tokenizer.decode(tokenizer("<think>1+2=3</think>").input_ids) == "<think>1+2=3</think>"
    # continued training of a saved model on a corpus with bare answers (how builtin:tiny-arith-lm-mixed is made)
    proc = pretrain("c", "--init", str(tmp_path / "a"), "--bare-share", "0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    c = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    assert c.config.hidden_size == 32 and any(not torch.equal(pa, pc) for pa, pc in
                                              zip(a.state_dict().values(), c.state_dict().values(), strict=True))
    bad = pretrain("d", "--bare-share", "1.5")
    assert bad.returncode == 2 and "--bare-share must be a share in [0, 1], got 1.5" in bad.stderr
    assert not (tmp_path / "d").exists()  # rejected before anything is written
    missing = pretrain("e", "--init", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "not a model directory (no config.json)" in missing.stderr
    assert not (tmp_path / "e").exists()


def test_reason_default_config_holds_out_the_pretraining_eval_set_and_trains(tmp_path):
    from reasoning_rl.trainer import train
    from reasoning_rl.world.pretrain import eval_problems

    path = REPO / "configs" / "reason_default.yaml"
    cfg = load_config(path)
    assert cfg.model.pretrained == "builtin:tiny-arith-lm-mixed" and cfg.prompts.source == "world"
    expected = eval_problems(50, seed=0)
    assert [(r["prompt"], r["answer"]) for r in cfg.eval.problems] == [(p.prompt, str(p.answer)) for p in expected]
    train_prompts = set(load_problems(cfg.prompts).prompts)
    assert not train_prompts & {r["prompt"] for r in cfg.eval.problems}
    short = load_config(path, [f"output_dir={tmp_path}", "num_steps=1", "rollout.prompts_per_step=2",
                               "rollout.num_generations=2", "prompts.size=8", "train.micro_batch_size=4",
                               f"eval.problems={json.dumps(cfg.eval.problems[::50])}"])
    result = train(short)
    assert set(result.eval_before) >= {"greedy_reward"} and result.eval_after is not None
    assert len(result.history) == 1 and (tmp_path / "model" / "model.safetensors").is_file()


def test_arithmetic_steps_reward_credits_the_leading_reference_steps():
    import rewards

    fn = rewards.load("arithmetic_steps", step_weight=0.5)
    problem = text.generate_problems(1, "train", steps=(2,), seed=0)[0]
    first, second = problem.solution.split("<think>")[1].split("</think>")[0].split("; ")
    wrong_second = f"{second.split('=')[0]}={int(second.split('=')[1]) + 1}"
    meta = [{"answer": str(problem.answer), "solution": problem.solution}] * 4 + [{"answer": "1"}]
    completions = [problem.solution,  # all steps and the answer
                   f"<think>{first}; {wrong_second}</think><answer>{problem.answer + 1}</answer>",  # 1 of 2 steps
                   f"<think>{wrong_second}; {first}</think><answer>{problem.answer}</answer>",  # answer, no leading step
                   "no trace", "<answer>1</answer>"]
    scores, info = fn(completions, None, meta)
    torch.testing.assert_close(scores[:4], torch.tensor([1.5, 0.25, 1.0, 0.0]))
    assert torch.isnan(scores[4]) and info["unscorable"] == 1  # no reference solution: unscorable, not 0
    torch.testing.assert_close(info["components"]["steps"][:4], torch.tensor([1.0, 0.5, 0.0, 0.0]))
    with pytest.raises(rewards.RewardError, match="step_weight must be"):
        rewards.load("arithmetic_steps", step_weight=-1)


def test_an_eval_the_reward_cannot_score_is_an_error_not_accuracy_zero():
    """Training on arithmetic_steps with eval problems that carry only answers used to log eval accuracy 0.0."""
    import rewards
    from diffusion_rl.core.prompts import PromptSet
    from reasoning_rl.evaluation import evaluate
    from reasoning_rl.models import load_policy

    model, tokenizer = load_policy("builtin:tiny-arith-lm")
    problem = text.generate_problems(1, "eval", steps=(1,), seed=0)[0]
    answers_only = PromptSet([problem.prompt], [{"answer": str(problem.answer)}])
    with pytest.raises(rewards.RewardError, match=r"could not score any of the 1 held-out.*eval.reward: \{name: exact_match"):
        evaluate(model, tokenizer, answers_only, rewards.load("arithmetic_steps"), max_new_tokens=4)
    with_solution = PromptSet([problem.prompt], [{"answer": str(problem.answer), "solution": problem.solution}])
    results, _ = evaluate(model, tokenizer, with_solution, rewards.load("arithmetic_steps"), max_new_tokens=48)
    assert 0.0 <= results["greedy_reward"] <= 1.5
