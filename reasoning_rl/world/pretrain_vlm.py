"""Train the tiny shapes-world vision-language model and save it as a transformers model directory.

    python -m reasoning_rl.world.pretrain_vlm --out reasoning_rl/assets/tiny_vlm

The model is a standard `Qwen2VLForConditionalGeneration` with a `Qwen2VLProcessor` (loadable with
`AutoModelForImageTextToText` / `AutoProcessor`, and through `model.pretrained: builtin:tiny-shapes-vlm`): a
2-block vision transformer over 8-px patches of the 64x64 scene (images are resized to exactly 64x64: 8x8 patches,
merged 2x2 into 16 image tokens) and a 4-layer text model over the project's character tokenizer.

The text model starts from the shipped arithmetic LM (`builtin:tiny-arith-lm`, a Llama of the same sizes): Qwen2's
decoder is Llama's plus q/k/v biases (set to zero) and Qwen2-VL's multimodal RoPE reduces to Llama's 1-D RoPE on
text (the three position axes are equal there), so the copied model computes the same text logits
(`tests/test_reason_vlm.py` checks it). That is what ReVisual-R1-style staged training needs: one model that reads
both the text world and the visual world.

Training: the visual world's train split (`reasoning_rl.world.visual`, images at scale 2), every problem formatted
with the chat template (an image part, then the question) exactly as the reasoning trainer formats it, the
reference solution (`<think>I see CAPTION.</think><answer>ANSWER</answer>`) plus `<|im_end|>` as the completion;
every `--text-every`-th step is a batch of arithmetic problems instead, so the text skill is kept. Cross-entropy
on the completion tokens only, AdamW with warm-up and cosine decay, gradient clipping, a fixed data order and a
seeded initialisation: with a step budget that finishes inside `--max-minutes` (and the same thread count) the run
is exactly reproducible.

Greedy accuracy on held-out visual problems (per question type) and on the arithmetic eval problems is measured
every `--eval-every` steps and at the end; the model is saved at each evaluation, and `training_report.json` is
written next to the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from reasoning_rl.world import TINY_ARITH_LM, TINY_SHAPES_VLM, text, visual

IMAGE_SIDE = 64  # every image is resized to IMAGE_SIDE x IMAGE_SIDE
IMAGE_SCALE = 2  # the visual world's 32x32 scenes, enlarged (nearest) to IMAGE_SIDE
PATCH = 8


def build_processor(tokenizer):
    """A Qwen2-VL processor over `tokenizer`: images resized to exactly 64x64, 8-px patches merged 2x2."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    from reasoning_rl.models import CHATML_TEMPLATE

    pixels = IMAGE_SIDE * IMAGE_SIDE
    image_processor = Qwen2VLImageProcessor(size={"shortest_edge": pixels, "longest_edge": pixels},
                                            patch_size=PATCH, merge_size=2, temporal_patch_size=2)
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor(), chat_template=CHATML_TEMPLATE)


def build_model(tokenizer, text_model, vision_depth: int, vision_dim: int, seed: int):
    """A Qwen2VLForConditionalGeneration whose text model has `text_model`'s sizes and weights (a LlamaForCausalLM)
    and whose vision tower is freshly initialised from `seed` (the global RNG left as it was)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from reasoning_rl.models import VISION_TOKENS, _seeded_init

    lm = text_model.config
    head_dim = lm.hidden_size // lm.num_attention_heads
    half = head_dim // 2  # rotary frequencies, shared out over the (time, height, width) axes
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=lm.vocab_size, hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size,
            num_hidden_layers=lm.num_hidden_layers, num_attention_heads=lm.num_attention_heads,
            num_key_value_heads=lm.num_key_value_heads, max_position_embeddings=lm.max_position_embeddings,
            rms_norm_eps=lm.rms_norm_eps, tie_word_embeddings=True, bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            rope_parameters={"rope_type": "default", "type": "mrope", "rope_theta": lm.rope_parameters["rope_theta"],
                             "mrope_section": [half // 2, half // 4, half - half // 2 - half // 4]},
        ),
        vision_config=dict(depth=vision_depth, embed_dim=vision_dim, hidden_size=lm.hidden_size,
                           num_heads=max(1, vision_dim // 16), mlp_ratio=2, patch_size=PATCH, spatial_merge_size=2,
                           temporal_patch_size=2, in_channels=3),
        image_token_id=ids["<|image_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True,
    )
    model = _seeded_init(Qwen2VLForConditionalGeneration, config, seed, tokenizer)
    copy_text_weights(text_model, model)
    return model


@torch.no_grad()
def copy_text_weights(llama, vlm) -> None:
    """Llama decoder weights into Qwen2-VL's text model (same names below `layers.` / `embed_tokens` / `norm`);
    Qwen2's q/k/v biases, which Llama has not, are zeroed."""
    source = llama.model.state_dict()
    target = vlm.model.language_model
    missing = []
    for name, param in target.named_parameters():
        if name in source:
            param.copy_(source[name])
        elif name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            param.zero_()
        else:
            missing.append(name)
    if missing:
        raise RuntimeError(f"text weights without a Llama counterpart: {missing}")


def visual_prompt(processor, question: str) -> str:
    from reasoning_rl.data import format_prompt

    return format_prompt(processor, question, None, True, with_image=True)


def batch_inputs(processor, prompts: list[str], completions: list[str], images: list | None):
    """Right-padded model inputs for prompt + completion + eos, and labels (-100 except the completion + eos)."""
    tokenizer = processor.tokenizer
    texts = [p + c + tokenizer.eos_token for p, c in zip(prompts, completions, strict=True)]
    tokenizer.padding_side = "right"
    try:
        if images is None:
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        else:
            enc = processor(text=texts, images=images, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "left"
    labels = torch.full_like(enc.input_ids, -100)
    lengths = enc.attention_mask.sum(1).tolist()
    for i, c in enumerate(completions):
        n = len(tokenizer(c, add_special_tokens=False).input_ids) + 1  # + eos
        labels[i, lengths[i] - n : lengths[i]] = enc.input_ids[i, lengths[i] - n : lengths[i]]
    return dict(enc), labels


@torch.no_grad()
def greedy_completions(model, processor, prompts: list[str], images: list | None, batch_size: int = 32,
                       max_new_tokens: int = 96) -> list[str]:
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        if images is None:
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        else:
            enc = processor(text=chunk, images=images[start : start + batch_size], return_tensors="pt", padding=True)
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    model.train(was_training)
    return out


def eval_visual_problems(per_type: int, seed: int = 0) -> list[visual.VisualProblem]:
    """`per_type` eval-split problems of each question type (a fixed, seeded set)."""
    return [p for q in visual.QUESTION_TYPES for p in visual.generate_problems(per_type, "eval", (q,), seed=seed)]


def greedy_accuracy(model, processor, visual_problems: Sequence[visual.VisualProblem],
                    text_problems: Sequence[text.ArithProblem]) -> dict:
    """Greedy exact-match accuracy (`exact_match` on the `<answer>` tag): visual overall and per question type,
    and on the arithmetic problems."""
    from reasoning_rl.world.pretrain import prompt_text
    from rewards.text import ExactMatchReward

    exact = ExactMatchReward(extract=("answer",))
    result: dict = {}
    if visual_problems:
        rows = [p.row(IMAGE_SCALE) for p in visual_problems]
        done = greedy_completions(model, processor, [visual_prompt(processor, r["prompt"]) for r in rows],
                                  [r["image"] for r in rows])
        correct, _ = exact(done, None, [{"answer": r["answer"]} for r in rows])
        result["visual_accuracy"] = float(correct.mean())
        for q in visual.QUESTION_TYPES:
            idx = [i for i, p in enumerate(visual_problems) if p.question_type == q]
            if idx:
                result[f"visual_accuracy_{q}"] = float(correct[idx].mean())
        result["samples"] = [{"prompt": r["prompt"], "completion": c, "answer": r["answer"]}
                             for r, c in zip(rows[::max(1, len(rows) // 4)], done[::max(1, len(rows) // 4)])]
    if text_problems:
        done = greedy_completions(model, processor, [prompt_text(processor.tokenizer, p.prompt) for p in text_problems],
                                  None, max_new_tokens=64)
        correct, _ = exact(done, None, [{"answer": str(p.answer)} for p in text_problems])
        result["text_accuracy"] = float(correct.mean())
    return result


def save(model, processor, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m reasoning_rl.world.pretrain_vlm",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=Path, default=TINY_SHAPES_VLM, help="output directory (a transformers model dir)")
    ap.add_argument("--text-model", type=Path, default=TINY_ARITH_LM,
                    help="the Llama directory the text model starts from")
    ap.add_argument("--seed", type=int, default=0, help="seed of the vision tower's initialisation and the data")
    ap.add_argument("--steps", type=int, default=1500, help="optimizer steps (the schedule's length)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    ap.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--vision-depth", type=int, default=2)
    ap.add_argument("--vision-dim", type=int, default=64)
    ap.add_argument("--text-every", type=int, default=4, help="every N-th step trains on arithmetic (0 = never)")
    ap.add_argument("--eval-per-type", type=int, default=50, help="held-out visual problems per question type")
    ap.add_argument("--eval-text-per-step", type=int, default=25, help="held-out arithmetic problems per step count")
    ap.add_argument("--eval-every", type=int, default=500, help="evaluate (and save) every N steps; 0 = at the end")
    ap.add_argument("--max-minutes", type=float, default=60.0, help="wall-clock cap of the training loop")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reasoning_rl.world.pretrain import eval_problems, prompt_text

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.text_model)
    text_model = AutoModelForCausalLM.from_pretrained(args.text_model, dtype=torch.float32)
    processor = build_processor(tokenizer)
    model = build_model(tokenizer, text_model, args.vision_depth, args.vision_dim, args.seed)
    del text_model
    n_params = sum(p.numel() for p in model.parameters())
    n_text_steps = args.steps // args.text_every if args.text_every else 0
    n_visual_steps = args.steps - n_text_steps
    visual_train = visual.generate_problems(n_visual_steps * args.batch_size, "train", seed=args.seed)
    text_train = text.generate_problems(max(n_text_steps, 1) * args.batch_size, "train", seed=args.seed, unique=False)
    held_visual = eval_visual_problems(args.eval_per_type, seed=0)
    held_text = eval_problems(args.eval_text_per_step, seed=0)
    print(f"[pretrain-vlm] {n_params:,} parameters ({sum(p.numel() for p in model.model.visual.parameters()):,} in "
          f"the vision tower) | {n_visual_steps} visual + {n_text_steps} text steps of {args.batch_size} | "
          f"{len(held_visual)} visual + {len(held_text)} text eval problems | "
          f"{IMAGE_SIDE}x{IMAGE_SIDE} images, {(IMAGE_SIDE // PATCH // 2) ** 2} image tokens | "
          f"ready in {time.time() - t_start:.1f} s", flush=True)

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))

    def lr_at(progress: float, step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    curve, evals = [], []
    budget_s = args.max_minutes * 60
    t_train = time.time()
    model.train()
    step, visual_done, text_done, losses, clock_bound = 0, 0, 0, [], False

    def evaluate(at_step: int) -> dict:
        t0 = time.time()
        res = greedy_accuracy(model, processor, held_visual, held_text)
        res.update(step=at_step, minutes=(time.time() - t_train) / 60, eval_s=time.time() - t0)
        evals.append({k: v for k, v in res.items() if k != "samples"})
        per = " ".join(f"{q}:{res[f'visual_accuracy_{q}']:.2f}" for q in visual.QUESTION_TYPES)
        print(f"[pretrain-vlm] eval at step {at_step}: visual {res['visual_accuracy']:.3f} ({per}) | text "
              f"{res['text_accuracy']:.3f} | {res['eval_s']:.0f} s", flush=True)
        print(f"[pretrain-vlm]   e.g. {res['samples'][-1]['completion']!r} (answer {res['samples'][-1]['answer']})",
              flush=True)
        save(model, processor, args.out)
        return res

    while step < args.steps:
        elapsed = time.time() - t_train
        if elapsed > budget_s:
            clock_bound = True
            break
        progress = max(step / args.steps, elapsed / budget_s)
        clock_bound = clock_bound or (step >= args.warmup and elapsed / budget_s > step / args.steps)
        lr = lr_at(progress, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        b = args.batch_size
        if args.text_every and step % args.text_every == args.text_every - 1:
            chunk = text_train[text_done * b : (text_done + 1) * b]
            text_done += 1
            inputs, labels = batch_inputs(processor, [prompt_text(tokenizer, p.prompt) for p in chunk],
                                          [p.solution for p in chunk], None)
        else:
            rows = [p.row(IMAGE_SCALE) for p in visual_train[visual_done * b : (visual_done + 1) * b]]
            visual_done += 1
            inputs, labels = batch_inputs(processor, [visual_prompt(processor, r["prompt"]) for r in rows],
                                          [r["solution"] for r in rows], [r["image"] for r in rows])
        logits = model(**inputs).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        step += 1
        if step % args.log_every == 0 or step == args.steps:
            mean = sum(losses) / len(losses)
            curve.append({"step": step, "loss": mean, "lr": lr, "minutes": (time.time() - t_train) / 60})
            print(f"[pretrain-vlm] step {step}/{args.steps} | loss {mean:.4f} | lr {lr:.2e} | "
                  f"{(time.time() - t_train) / step:.2f} s/step", flush=True)
            losses = []
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            evaluate(step)
    train_minutes = (time.time() - t_train) / 60
    final = evaluate(step)
    report = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "parameters": n_params, "steps_done": step, "clock_bound": clock_bound,
        "train_minutes": train_minutes, "total_minutes": (time.time() - t_start) / 60,
        "s_per_step": train_minutes * 60 / max(step, 1), "curve": curve, "evals": evals,
        "final": {k: v for k, v in final.items() if k != "samples"}, "samples": final["samples"],
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "threads": args.threads, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"[pretrain-vlm] done in {report['total_minutes']:.1f} min ({step} steps, {report['s_per_step']:.2f} "
          f"s/step); saved to {args.out}", flush=True)
    return report


if __name__ == "__main__":
    main()
