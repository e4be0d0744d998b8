"""Vision-language models in the reasoning trainer, on the tiny random Qwen2-VL: images through the processor,
log-probs that match generation (multimodal rotary positions, left padding), LoRA on the language model only, a
frozen vision tower, the saved model loaded by AutoModelForImageTextToText + AutoProcessor, clear image errors."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffusion_rl.core.prompts import PromptError
from reasoning_rl.config import PromptsConfig, load_config
from reasoning_rl.data import format_prompt, load_problems
from reasoning_rl.models import build_tiny_vlm, vision_tower
from reasoning_rl.rollout import (
    completion_mask,
    encode_prompts,
    generate,
    placeholder_token_ids,
    token_log_probs,
)
from reasoning_rl.trainer import train

TINY = Path(__file__).parents[1] / "configs" / "reason_tiny.yaml"


def digits(completions, prompts, metadata):
    """A reward a random character model can move: the share of digits among the first 8 characters."""
    return torch.tensor([sum(ch.isdigit() for ch in c[:8]) / 8 for c in completions]), {}


def _problems(tmp_path, n=4):
    """A JSONL file of colour questions with image paths relative to it (images of different sizes)."""
    colours = ["red", "blue", "green", "yellow"]
    rows = []
    for i in range(n):
        name = f"img{i}.png"
        Image.new("RGB", (56 + 28 * (i % 2), 56), colours[i % 4]).save(tmp_path / name)
        rows.append({"question": f"What colour is this? ({i})", "answer": colours[i % 4], "picture": name})
    path = tmp_path / "problems.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_vlm_log_probs_equal_the_samplers(tmp_path):
    model, processor = build_tiny_vlm(seed=3)
    model.eval()
    cfg = PromptsConfig(source="jsonl", path=str(_problems(tmp_path, 2)), problem_column="question",
                        image_column="picture")
    problems = load_problems(cfg)
    images = [m["image"] for m in problems.metadata]
    assert images[0].size == (56, 56) and images[1].size == (84, 56)
    texts = [format_prompt(processor, p, None, True, with_image=True) for p in problems.prompts]
    assert "<|vision_start|><|image_pad|><|vision_end|>" in texts[0]
    prompts = encode_prompts(processor, texts, images, torch.device("cpu"))
    assert prompts.image_grid_thw.tolist() == [[1, 4, 4], [1, 4, 6]] and [len(p) for p in prompts.pixel_values] == [16, 24]
    placeholders = placeholder_token_ids(model)  # the image token: never sampled, excluded from the log-probs
    assert placeholders == [processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")]
    torch.manual_seed(0)
    out = model.generate(input_ids=prompts.prompt_ids, attention_mask=prompts.prompt_mask, **prompts.vision(slice(None)),
                         max_new_tokens=8, do_sample=True, temperature=0.8, top_k=None, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=processor.tokenizer.pad_token_id,
                         eos_token_id=processor.tokenizer.eos_token_id, suppress_tokens=placeholders)
    completion = out.sequences[:, prompts.prompt_ids.shape[1]:]
    mask = completion_mask(completion, processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id)
    raw = torch.stack(out.logits, 1).float() / 0.8  # generate's logits before any processor: mask the placeholders
    raw[..., placeholders] = float("-inf")
    expected = torch.log_softmax(raw, -1).gather(-1, completion[..., None])[..., 0]
    logp, _ = token_log_probs(model, prompts.prompt_ids, prompts.prompt_mask, completion, mask.long(), 0.8,
                              vision=prompts.vision(slice(None)))
    torch.testing.assert_close(logp[mask], expected[mask], atol=1e-5, rtol=0)
    # the rollout keeps each row's own image patches through the G-fold repetition and micro-batch slicing
    rollouts = generate(model, processor, texts, problems.prompts, problems.metadata, 2, 4, 1.0, 1.0, 0, [], 3, images)
    assert [len(p) for p in rollouts.pixel_values] == [16, 16, 24, 24]
    assert rollouts.vision(torch.tensor([3, 0]))["pixel_values"].shape[0] == 24 + 16


def test_vlm_training_lora_on_the_language_model_and_loading(tmp_path):
    path = _problems(tmp_path)
    sets = ["model.pretrained=builtin:tiny-random-vlm", "prompts.source=jsonl", f"prompts.path={path}",
            "prompts.problem_column=question", "prompts.image_column=picture", "rollout.max_new_tokens=6",
            "rollout.prompts_per_step=2", "eval.problems=[]", "checkpoint.every=0", "num_steps=2",
            "model.lora_target_modules=[q_proj, k_proj, v_proj, o_proj, qkv, proj]"]  # qkv/proj exist only in the tower
    result = train(load_config(TINY, [f"output_dir={tmp_path / 'lora_run'}", *sets]), reward_fn=digits)
    assert len(result.history) == 2 and result.history[-1]["loss/grad_norm"] > 0
    names = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert names and all("language_model" in n and "lora_" in n for n in names)
    from peft import PeftModel

    base, processor = build_tiny_vlm()
    loaded = PeftModel.from_pretrained(base, tmp_path / "lora_run" / "lora").eval()
    problems = load_problems(PromptsConfig(source="jsonl", path=str(path), problem_column="question",
                                           image_column="picture"))
    text = format_prompt(processor, problems.prompts[0], None, True, with_image=True)
    enc = processor(text=[text], images=[problems.metadata[0]["image"]], return_tensors="pt")
    result.model.eval()
    torch.testing.assert_close(loaded(**enc).logits, result.model(**enc).logits, atol=1e-6, rtol=0)


def test_vlm_full_fine_tune_keeps_the_vision_tower_frozen_and_saves_a_loadable_model(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    before = {n: p.detach().clone() for n, p in vision_tower(build_tiny_vlm()[0]).named_parameters()}
    sets = ["model.pretrained=builtin:tiny-random-vlm", "model.use_lora=false", "prompts.source=jsonl",
            f"prompts.path={_problems(tmp_path)}", "prompts.problem_column=question", "prompts.image_column=picture",
            "rollout.max_new_tokens=4", "rollout.prompts_per_step=2", "eval.problems=[]", "checkpoint.every=0",
            "num_steps=1", "train.learning_rate=1e-2"]
    result = train(load_config(TINY, [f"output_dir={tmp_path / 'full'}", *sets]), reward_fn=digits)
    after = dict(vision_tower(result.model).named_parameters())
    assert all(torch.equal(before[n], after[n].detach()) for n in before)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "full" / "model")
    processor = AutoProcessor.from_pretrained(tmp_path / "full" / "model")
    lm_trained = dict(result.model.named_parameters())
    assert any(not torch.equal(p, lm_trained[n].detach()) for n, p in build_tiny_vlm()[0].named_parameters()
               if "language_model" in n)
    for n, p in loaded.named_parameters():
        torch.testing.assert_close(p, lm_trained[n].detach())
    assert processor.image_token == "<|image_pad|>"


def test_unreadable_or_missing_images_are_clear_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"problem": "x?", "answer": "1", "image": "missing.png"}) + "\n")
    with pytest.raises(PromptError, match="cannot read the image 'missing.png'.*relative to the JSONL file"):
        load_problems(PromptsConfig(source="jsonl", path=str(path), image_column="image"))
    with pytest.raises(PromptError, match="no column 'picture'.*prompts.image_column"):
        load_problems(PromptsConfig(source="jsonl", path=str(path), image_column="picture"))
