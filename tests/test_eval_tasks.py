"""`drl reason eval --task mathif | satori | mmkc`: the scoring on hand-made completions (numbers worked by hand),
the procedural data, the MMKC-Bench reader on a hand-written file, and each task end to end through the CLI on a
shipped tiny model (--json parsed)."""

import json
import re

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffusion_rl.cli import _mount_reason_cli, app
from reasoning_rl.eval_tasks import mathif, mmkc, satori

torch.set_num_threads(1)
runner = CliRunner()


def _eval(*args, code=0):
    _mount_reason_cli()
    result = runner.invoke(app, ["reason", "eval", *args])
    assert result.exit_code == code, result.output + repr(result.exception)
    return result


def _json(*args):
    output = _eval(*args, "--json").output  # (a weight-loading progress bar may precede it on the same line)
    return json.loads(output[output.rindex('{"task": '):])


# ------------------------------------------------------------------------------------------------ MathIF


def test_mathif_scores_hand_made_completions():
    """Three problems with 3, 1 and 2 constraints: the first completion satisfies 2 of its 3 (soft 2/3, hard 0,
    wrong answer), the second its only one with the right answer, the third leaves <think> open (empty response:
    every constraint fails)."""
    metas = [
        {"answer": "4", "constraint_name": ["punctuation:no_comma", "change_case:english_lowercase",
                                            "length_constraints:number_words"],
         "constraint_args": [{}, {}, {"num_words": 3, "relation": "less than"}]},
        {"answer": "7", "constraint_name": ["punctuation:no_comma"], "constraint_args": [{}]},
        {"answer": "5", "constraint_name": ["keywords:existence", "change_case:english_capital"],
         "constraint_args": [{"keywords": ["total"]}, {}]},
    ]
    texts = ["<think>2+2=4</think><answer>the total is 4</answer>",  # no comma, lowercase, but 4 words >= 3
             "<think>3+4=7</think><answer>7</answer>",
             "<think>5+0=5 and so on"]
    reward = mathif.make_reward("exact_match")
    records = mathif.score(texts, ["p"] * 3, metas, [10, 20, 30], reward)
    assert [(r["k"], r["hard"], r["soft"], r["correct"]) for r in records] == [
        (3, 0.0, pytest.approx(2 / 3), 0.0), (1, 1.0, 1.0, 1.0), (2, 0.0, 0.0, 0.0)]
    s = mathif.summarise(records)
    assert s["overall"] == {"samples": 3, "hard_accuracy": pytest.approx(1 / 3), "soft_accuracy": pytest.approx(5 / 9),
                            "correctness": pytest.approx(1 / 3), "hard_and_correct": pytest.approx(1 / 3),
                            "mean_length": 20.0, "unscorable": 0}
    assert s["constraints_1"]["hard_accuracy"] == 1.0 and s["constraints_3"]["soft_accuracy"] == pytest.approx(2 / 3)
    assert s["constraints_2"]["soft_accuracy"] == 0.0 and s["constraints_2"]["mean_length"] == 30.0
    assert mathif.by_constraint(records) == {
        "change_case:english_capital": 0.0, "change_case:english_lowercase": 1.0, "keywords:existence": 0.0,
        "length_constraints:number_words": 0.0, "punctuation:no_comma": 1.0}
    # an id outside the 15: unscorable, left out of the constraint means but counted
    bad = mathif.score(["<answer>4</answer>"], ["p"], [{"answer": "4", "constraint_name": ["nope:x"],
                                                         "constraint_args": [{}]}], [3], reward)
    assert mathif.summarise(bad)["overall"]["unscorable"] == 1 and mathif.summarise(bad)["overall"]["hard_accuracy"] is None


def test_mathif_world_rows_compose_compatible_constraints_deterministically(tmp_path):
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_CONFLICTS

    from rewards.mathif import CHECKERS, check_constraint

    rows = mathif.world_rows(30, seed=3)
    assert rows == mathif.world_rows(30, seed=3) and rows != mathif.world_rows(30, seed=4)
    assert [len(r["constraint_name"]) for r in rows[:6]] == [1, 2, 3, 1, 2, 3]
    for r in rows:
        ids = r["constraint_name"]
        assert len(set(ids)) == len(ids) and set(ids) <= set(CHECKERS)
        assert not any(b in INSTRUCTION_CONFLICTS.get(a, ()) for a in ids for b in ids if a != b)
        for iid, kw in zip(ids, r["constraint_args"], strict=True):
            check_constraint("a short answer", iid, kw)  # every drawn argument set is accepted by the checker
        assert mathif.prompt_of(r).startswith(r["question"] + "\n") and r["constraint_desc"]
    path = tmp_path / "m.jsonl"
    mathif.write_jsonl(rows[:4], path)
    assert mathif.check_rows([json.loads(x) for x in path.read_text().splitlines()], "f") == rows[:4]
    with pytest.raises(Exception, match="constraint_name / constraint_args must be lists"):
        mathif.check_rows([{"question": "q", "answer": "1", "constraint_name": ["a", "b"], "constraint_args": [{}]}], "f")


def test_mathif_task_through_the_cli(tmp_path):
    out = _json("builtin:tiny-arith-lm", "--task", "mathif", "--limit", "3", "--num", "2", "--max-new-tokens", "40")
    r = out["results"]
    assert out["task"] == "mathif" and r["problems"] == 3 and r["num"] == 2 and r["correctness"] == "exact_match"
    assert set(r["greedy"]) == {"overall", "constraints_1", "constraints_2", "constraints_3"}
    assert [r["greedy"][f"constraints_{k}"]["samples"] for k in (1, 2, 3)] == [1, 1, 1]
    assert r["sampled"]["overall"]["samples"] == 6
    for block in (r["greedy"]["overall"], r["sampled"]["overall"], r["without_constraints"]):
        assert 0.0 <= block["correctness"] <= 1.0 and 0 < block["mean_length"] <= 40
    assert 0.0 <= r["greedy"]["overall"]["hard_accuracy"] <= r["greedy"]["overall"]["soft_accuracy"] <= 1.0
    # a data file in MathIF's columns, one constraint count kept; the table output
    path = tmp_path / "mathif.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [
        {"source": "hand", "id": "a", "question": "Ann has 2 pens. She buys 3 more. How many pens does Ann have now?",
         "answer": "5", "constraint_desc": "Do not use commas.", "constraint_name": ["punctuation:no_comma"],
         "constraint_args": [{}]},
        {"source": "hand", "id": "b", "question": "Ben has 4 cards. He loses 1. How many cards does Ben have now?",
         "answer": "3", "constraint_desc": "No commas, all lowercase.",
         "constraint_name": json.dumps(["punctuation:no_comma", "change_case:english_lowercase"]),
         "constraint_args": json.dumps([{}, {}])}]))
    table = _eval("builtin:tiny-arith-lm", "--task", "mathif:2", "--data", str(path), "--num", "1",
                  "--max-new-tokens", "30").output
    assert "problems" in table and "greedy/constraints_2/hard_accuracy" in table
    assert "greedy/constraints_1" not in table and re.search(r"^correctness +math_answer$", table, re.M)
    assert re.search(r"^problems +1$", table, re.M)
    bad = _eval("builtin:tiny-arith-lm", "--task", "mathif:7", code=2)
    assert "constraint count" in bad.output and "Traceback" not in bad.output


# ------------------------------------------------------------------------------------------------ SATORI


def test_satori_scores_hand_made_completions():
    """A perfect staged answer; a half-overlapping box (IoU 50/150) without a caption tag and with the wrong
    answer; a malformed box list (in the format's pattern) with the right answer, differently cased."""
    meta = {"caption": "a red circle and a blue square", "boxes": [[0, 0, 10, 10]], "answer": "red",
            "question_type": "colour", "width": 32, "height": 32}
    texts = ["<caption>a red circle and a blue square</caption><bbox>[[0, 0, 10, 10]]</bbox><answer>red</answer>",
             "<bbox>[[5, 0, 15, 10]]</bbox><answer>blue</answer>",
             "<caption>a red circle</caption><bbox>[[1, 2]]</bbox><answer> Red </answer>"]
    records = satori.score(texts, [meta] * 3, [4, 5, 6], satori.make_reward({"bbox_rescale": "none"}))
    assert [r["format"] for r in records] == [1.0, 0.0, 1.0]  # [[1, 2]] fits SATORI's [[...]] pattern, not a box
    assert [r["answer"] for r in records] == [1.0, 0.0, 1.0]
    assert records[0]["caption"] == pytest.approx(1.0) and records[1]["caption"] == 0.0
    assert 0.0 < records[2]["caption"] < 1.0
    assert [r["bbox"] for r in records] == [pytest.approx(1.0), pytest.approx(50 / 150), 0.0]
    assert [r["malformed"] for r in records] == [False, False, True]
    s = satori.summarise(records)["overall"]
    assert s["accuracy"] == pytest.approx(2 / 3) and s["bbox"] == pytest.approx((1 + 1 / 3) / 3)
    assert s["format_rate"] == pytest.approx(2 / 3) and s["malformed_bbox_rate"] == pytest.approx(1 / 3)
    assert s["mean_length"] == 5.0 and s["reward"] == pytest.approx(
        sum(r["format"] + r["caption"] + r["bbox"] + r["answer"] for r in records) / 3)


def test_satori_rescales_boxes_with_the_models_own_processor():
    """The tiny VLM's processor resizes 32 px scenes to 56 px (4-16 patches of 28): a box over the whole resized
    image is the whole original one."""
    from reasoning_rl.models import build_tiny_vlm

    _, processor = build_tiny_vlm()
    opts = satori.rescale_options(processor)
    assert opts == {"bbox_rescale": "smart_resize", "factor": 28, "min_pixels": 4 * 784, "max_pixels": 16 * 784}
    meta = {"caption": "a red circle", "boxes": [[0, 0, 32, 32]], "answer": "1", "width": 32, "height": 32}
    (r,) = satori.score(["<caption>x</caption><bbox>[[0, 0, 56, 56]]</bbox><answer>1</answer>"], [meta], [1],
                        satori.make_reward(opts))
    assert r["bbox"] == pytest.approx(1.0) and r["answer"] == 1.0 and r["format"] == 1.0
    assert satori.rescale_options(object()) == {"bbox_rescale": "none"}


def test_satori_task_through_the_cli():
    out = _json("builtin:tiny-random-vlm", "--task", "satori", "--limit", "2", "--num", "1", "--max-new-tokens", "6")
    r = out["results"]
    assert r["problems"] == 2 and r["bbox_rescale"] == "smart_resize" and r["source"] == "visual world (eval split)"
    assert set(r["greedy"]) == {"overall", "count", "colour"} and r["sampled"]["overall"]["samples"] == 2
    for key in ("accuracy", "caption", "bbox", "format_rate", "malformed_bbox_rate"):
        assert 0.0 <= r["greedy"]["overall"][key] <= 1.0
    assert 0 < r["greedy"]["overall"]["mean_length"] <= 6
    bad = _eval("builtin:tiny-arith-lm", "--task", "satori", code=2)
    assert "text-only model" in bad.output and "Traceback" not in bad.output


# ------------------------------------------------------------------------------------------------ MMKC


def _item(truth, a, b, order, **kw):
    return mmkc.Item("i", "arithmetic", "Q?", mmkc._statement(a), mmkc._statement(b, another=True), a, b,
                     mmkc._statement(truth), truth, fine_order=order, **kw)


def test_mmkc_behaviour_and_detection_on_hand_made_completions():
    """Item 0 remembers the truth (9), follows context A (12) in the context-memory scenario and its memory in the
    inter-context one, detects everything. Item 1 remembers 6 (wrong), answers 4 (other) and context B (3), detects
    nothing (one coarse answer is not yes/no). Item 2 remembers 10 = context A: filtered from both scenarios."""
    items = [_item("9", "12", "15", "AB"), _item("5", "7", "3", "BA"), _item("8", "10", "11", "AB")]
    completions = {
        "memory": ["<think>4+5=9</think><answer>9</answer>", "<answer>6</answer>", "<answer>10</answer>"],
        "context_memory": ["<answer>12</answer>", "<answer>4</answer>", "<answer>10</answer>"],
        "inter_context": ["<answer>9</answer>", "<answer>3</answer>", "<answer>11</answer>"],
        "coarse_conflicting": ["No, it does not agree.", "<answer>Yes</answer>", "no"],
        "coarse_consistent": ["<answer>Yes</answer>", "hmm", "No."],
        "fine": ["<answer>B</answer>", "<answer>B</answer>", "<answer>A</answer>"],
    }
    out = mmkc.score(items, completions)
    assert set(out["behaviour"]) == {"overall"}  # one conflict type
    b = out["behaviour"]["overall"]
    assert b["context_memory"] == {"compared": 2, "filtered": 1, "no_memory": 0, "memory": 0.0, "context_a": 50.0, "context_b": 0.0,
                                   "other": 50.0, "accuracy": 0.0}
    assert b["inter_context"] == {"compared": 2, "filtered": 1, "no_memory": 0, "memory": 50.0, "context_a": 0.0, "context_b": 50.0,
                                  "other": 0.0, "accuracy": pytest.approx(100 / 3)}
    assert b["memory_accuracy"] == pytest.approx(100 / 3)
    assert out["detection"]["coarse"] == {"probes": 6, "accuracy": 50.0, "conflicting": pytest.approx(200 / 3),
                                          "consistent": pytest.approx(100 / 3), "answered": pytest.approx(500 / 6)}
    assert out["detection"]["fine"] == {"probes": 3, "accuracy": pytest.approx(100 / 3), "answered": 100.0,
                                        "chance": 50.0}
    # the fine-detection prompt puts the contradicting piece at the label it expects
    p = mmkc.prompts_of(items[1])["fine"]
    assert p.index("(A) " + items[1].evidence_a) < p.index("(B) " + items[1].support) and mmkc.fine_label(items[1]) == "A"
    assert mmkc.extract_answer("The answer is B.", mcq=True) == "B" and mmkc.extract_answer("<answer> Red. </answer>", False) == "red"


def test_mmkc_procedural_items():
    vis = mmkc.visual_items(8, seed=1)
    assert [it.conflict_type for it in vis[:4]] == ["count", "colour", "shape", "position"]
    for it in vis + mmkc.text_items(6, seed=1):
        assert len({it.truth, it.answer_a, it.answer_b}) == 3  # both pieces contradict the memory and each other
        assert it.answer_a in it.evidence_a and it.truth in it.support
        kinds = mmkc.prompts_of(it)
        assert set(kinds) == {"memory", "context_memory", "inter_context", "coarse_conflicting", "coarse_consistent",
                              "fine"}
        assert it.evidence_b in kinds["inter_context"] and it.evidence_b not in kinds["context_memory"]
    assert vis[0].image.size == (32, 32) and mmkc.text_items(6, seed=1)[0].image is None
    assert [it.truth for it in mmkc.text_items(6, seed=1)] == [it.truth for it in mmkc.text_items(6, seed=1)]


def _released(tmp_path):
    """A hand-written copy of the released format: ER.json (descriptions), people_knowledge.json (two kinds of
    knowledge errors), ED.json (image-only: skipped), images beside them."""
    (tmp_path / "image").mkdir()
    for name, colour in (("q.png", (255, 0, 0)), ("e1.png", (0, 255, 0)), ("e2.png", (0, 0, 255))):
        Image.new("RGB", (40, 40), colour).save(tmp_path / "image" / name)
    paths = ["image/q.png", "image/e1.png", "image/e2.png"]
    er = [{"ID": 1, "instance": "nike", "image_path": paths, "description": "This is the Nike logo.",
           "mis_description": {"incorrect_description_1": "This is the Adidas logo.",
                               "incorrect_description_2": "This is the Puma logo."},
           "open_query": "Which brand is this?", "mcq_query": "Which brand is this?\nA. Nike\nB. Adidas\nC. Puma\nD. Fila",
           "mcq_disanswer1": "B", "mcq_disanswer2": "c", "mcq_answer": "A"}]
    people = [{"ID": 7, "instance": "kobe", "image_path": paths, "knowledge": "He was born in 1978 in Philadelphia.",
               "mis_knowledge": {"Temporal_error": {"mis_knowledge1": "He was born in 1985.",
                                                    "mis_knowledge2": "He was born in 1990."},
                                 "location_error": {"mis_knowledge1": "He was born in Rome.",
                                                    "mis_knowledge2": "He was born in Paris."}},
               "mcq_query_temporal": "When was he born?\nA. 1978\nB. 1985\nC. 1990\nD. 2000",
               "mcq_query_location": "Where was he born?\nA. Philadelphia\nB. Rome\nC. Paris\nD. Oslo",
               "mcq_disanswer_temporal_1": "B", "mcq_disanswer_temporal_2": "C",
               "mcq_disanswer_location_1": "B", "mcq_disanswer_location_2": "C"}]
    ed = [{"ID": 3, "image_path": paths, "open_query": "What is the value?", "mcq_query": "Value?\nA. 1\nB. 2",
           "mcq_disanswer1": "B", "mcq_disanswer2": "A"}]
    for name, rows in (("ER", er), ("people_knowledge", people), ("ED", ed)):
        (tmp_path / f"{name}.json").write_text(json.dumps(rows))
    return tmp_path


def test_mmkc_reads_the_released_format(tmp_path):
    items, skipped = mmkc.released_items(_released(tmp_path), seed=0)
    assert skipped == 1  # ED.json's image-only item
    assert [it.conflict_type for it in items] == ["ER", "people_knowledge/Temporal", "people_knowledge/location"]
    er, temporal, location = items
    assert (er.answer_a, er.answer_b, er.truth, er.mcq) == ("B", "C", "A", True)
    assert er.evidence_a == "This is the Adidas logo." and er.support == "This is the Nike logo."
    assert temporal.question.startswith("When was he born?") and temporal.evidence_b == "He was born in 1990."
    assert location.question.startswith("Where") and location.truth is None and er.image.size == (40, 40)
    prompt = mmkc.prompts_of(er)["context_memory"]
    assert prompt.startswith(mmkc.PREFIX + " This is the Adidas logo.\nWhich brand") and mmkc.MCQ_INSTRUCTION in prompt
    # MMKC-Bench's filtering and classification on letters: original A; B = context A, C = context B
    assert [mmkc.classify(x, "A", er, "inter_context") for x in ("A", "B", "C", "D", None)] == [
        "memory", "context_a", "context_b", "other", "other"]
    assert mmkc.classify("B", "B", er, "context_memory") is None and mmkc.classify("C", "C", er, "context_memory") == "memory"
    with pytest.raises(Exception, match="no image_path"):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "x.json").write_text(json.dumps([{"ID": 1, "mcq_query": "q"}]))
        mmkc.released_items(tmp_path / "bad", seed=0)


def test_mmkc_task_through_the_cli(tmp_path):
    out = _json("builtin:tiny-arith-lm", "--task", "mmkc", "--limit", "2", "--max-new-tokens", "40")
    r = out["results"]
    assert r["source"].startswith("text world") and r["items"] == 2 and r["skipped"] == 0
    for scenario in mmkc.SCENARIOS:
        block = r["behaviour"]["overall"][scenario]
        assert block["compared"] + block["filtered"] + block["no_memory"] == 2
        if block["compared"]:
            assert sum(block[s] for s in mmkc.SOURCES) == pytest.approx(100.0)
    assert r["detection"]["coarse"]["probes"] == 4 and r["detection"]["fine"]["probes"] == 2
    assert 0.0 <= r["behaviour"]["overall"]["memory_accuracy"] <= 100.0
    released = _json("builtin:tiny-random-vlm", "--task", "mmkc", "--data", str(_released(tmp_path)),
                     "--max-new-tokens", "4")["results"]
    assert released["items"] == 3 and released["skipped"] == 1
    assert set(released["behaviour"]) == {"overall", "ER", "people_knowledge/Temporal", "people_knowledge/location"}
    assert released["behaviour"]["people_knowledge/location"]["inter_context"]["accuracy"] is None
    text_only = _eval("builtin:tiny-arith-lm", "--task", "mmkc", "--data", str(tmp_path), code=2)
    assert "text-only model" in text_only.output and "Traceback" not in text_only.output
