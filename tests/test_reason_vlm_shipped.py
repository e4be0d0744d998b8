"""The shipped tiny vision-language model (builtin:tiny-shapes-vlm), its training script and configs/reason_vqa.yaml."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reasoning_rl.config import ConfigError, load_config
from reasoning_rl.world import TINY_ARITH_LM, TINY_ARITH_LM_MIXED, TINY_SHAPES_VLM, visual

REPO = Path(__file__).parents[1]


def test_the_text_model_copied_from_the_arithmetic_llama_computes_the_same_logits():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reasoning_rl.world.pretrain import prompt_text
    from reasoning_rl.world.pretrain_vlm import build_model

    tokenizer = AutoTokenizer.from_pretrained(TINY_ARITH_LM)
    llama = AutoModelForCausalLM.from_pretrained(TINY_ARITH_LM)
    vlm = build_model(tokenizer, llama, vision_depth=1, vision_dim=32, seed=0)
    texts = [prompt_text(tokenizer, "Ann has 7 pens. She buys 5 more. How many pens does Ann have now?") + "<think>7+5",
             prompt_text(tokenizer, "Ivy has 3 books. She doubles them. How many books does Ivy have now?")]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        torch.testing.assert_close(vlm(**enc).logits, llama(**enc).logits, atol=1e-5, rtol=0)
    assert all(float(b.detach().abs().max()) == 0.0 for n, b in vlm.named_parameters() if n.endswith("q_proj.bias"))


def test_shipped_vlm_loads_with_the_auto_classes_and_reads_the_scenes():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from reasoning_rl.models import load_policy
    from reasoning_rl.world.pretrain import world_tokenizer
    from reasoning_rl.world.pretrain_vlm import eval_visual_problems, greedy_accuracy

    def size_of(directory):
        return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())

    size = size_of(TINY_SHAPES_VLM)
    every = size + size_of(TINY_ARITH_LM) + size_of(TINY_ARITH_LM_MIXED)
    assert size < 10e6 and every < 25e6  # the budget for the shipped reasoning models together
    model = AutoModelForImageTextToText.from_pretrained(TINY_SHAPES_VLM)
    processor = AutoProcessor.from_pretrained(TINY_SHAPES_VLM)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    text = "<think>I see a red circle.</think><answer>1</answer>"
    assert processor.tokenizer(text).input_ids == world_tokenizer()(text).input_ids  # the saved tokenizer, as is
    report = json.loads((TINY_SHAPES_VLM / "training_report.json").read_text())
    policy, policy_processor = load_policy("builtin:tiny-shapes-vlm")
    assert type(policy_processor).__name__ == "Qwen2VLProcessor"
    # 4 held-out problems per question type, greedy: the shipped model reads the image (chance is about 0.3)
    result = greedy_accuracy(policy, policy_processor, eval_visual_problems(4, seed=0), [])
    assert result["visual_accuracy"] >= 0.4, result
    assert report["final"]["visual_accuracy"] >= 0.4


def test_pretrain_vlm_script_is_deterministic_and_writes_a_loadable_model(tmp_path):
    from reasoning_rl.models import load_policy

    args = ["--steps", "3", "--batch-size", "4", "--vision-depth", "1", "--vision-dim", "32", "--eval-per-type", "1",
            "--eval-text-per-step", "1", "--eval-every", "0", "--warmup", "1", "--log-every", "1", "--text-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for run in ("a", "b"):
        proc = subprocess.run([sys.executable, "-m", "reasoning_rl.world.pretrain_vlm", "--out", str(tmp_path / run),
                               *args], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "visual" in proc.stdout and "text" in proc.stdout
    report = json.loads((tmp_path / "a" / "training_report.json").read_text())
    assert report["steps_done"] == 3 and {"visual_accuracy", "text_accuracy", "visual_accuracy_count"} <= set(report["final"])
    a, _ = load_policy(str(tmp_path / "a"))
    b, _ = load_policy(str(tmp_path / "b"))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


def test_reason_vqa_config_evaluates_on_the_visual_eval_split_and_trains(tmp_path):
    from reasoning_rl.data import held_out_problems, load_problems
    from reasoning_rl.trainer import train

    cfg = load_config(REPO / "configs" / "reason_vqa.yaml")
    assert cfg.model.pretrained == "builtin:tiny-shapes-vlm" and cfg.prompts.image_column == "image"
    held_out = held_out_problems(cfg)
    train_set = load_problems(cfg.prompts)
    sig = {m["signature"] for m in held_out.metadata}
    assert {m["split"] for m in held_out.metadata} == {"eval"} and not sig & {m["signature"] for m in train_set.metadata}
    assert all(m["image"].size == (64, 64) for m in held_out.metadata[:4])
    short = load_config(REPO / "configs" / "reason_vqa.yaml", [
        "num_steps=1", "rollout.prompts_per_step=2", "rollout.num_generations=2", "rollout.max_new_tokens=8",
        "eval.prompts.size=4", f"output_dir={tmp_path / 'run'}", "logging.completions_every=0"])
    result = train(short)
    assert set(result.eval_before) == set(result.eval_after) and "greedy_reward" in result.eval_after
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_eval_prompts_and_eval_problems_are_exclusive():
    with pytest.raises(ConfigError, match="eval.problems and eval.prompts are both set"):
        load_config(REPO / "configs" / "reason_tiny.yaml",
                    ["eval.prompts={source: world, world: arithmetic, split: eval, size: 4, problem_column: prompt}"])
    assert visual.QUESTION_TYPES == ("count", "colour", "shape", "position")
