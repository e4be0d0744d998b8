#!/usr/bin/env python
"""Peak memory and time of the LM-head log-prob + GRPO loss, forward + backward, on the CPU: naive (full logits),
TRL's `selective_log_softmax`, Liger-Kernel's `LigerFusedLinearGRPOLoss` (chunked, compiled=False) and drl's fused
op (`reasoning_rl.kernels.fused_token_logprobs`, torch backend).

Workload per configuration: hidden states [N, H] (N tokens as N / T sequences of T = 512), an LM head [V, H], fp32,
random token ids, random advantages per sequence, every token counted; the loss is GRPO's clipped surrogate with
dapo aggregation, on policy (old log-probs = the detached current ones, as with one PPO pass), beta 0. drl, naive
and TRL feed their per-token log-probs to the same `diffusion_rl.core.grpo.grpo_loss`; Liger computes its own loss
(the parity test in tests/test_fused_logprob.py shows the two losses and gradients agree). Gradients: the hidden
states always; the head too with `--head trained` (full fine-tuning), not with `--head frozen` (LoRA keeps it
frozen: the trainer's default).

Each (configuration, method) runs in a fresh process: inputs are built, the process's resident memory is read
(the baseline), then one warm-up and `--reps` timed forward+backward passes run; the reported peak is the
process's peak resident set size (`ru_maxrss`) minus that baseline, which counts every temporary the pass
allocates (CPU tensors over a few hundred KiB are mmap-ed and returned to the OS when freed, so the peak is the
pass's high-water mark). Time is the fastest timed pass. Ratios are against naive, measured in the same run.

Targets (from the issue), on the CPU: at V = 152k, drl's peak <= 1/4 of naive's and its time <= 1.1x naive's;
drl's peak <= Liger's at no more than Liger's time.

    .venv/bin/python benchmarks/fused_logprob.py                         # V 32k / 152k x N 1k / 4k, H 896, trained head
    .venv/bin/python benchmarks/fused_logprob.py --head frozen --vocab 151936 --tokens 4096
    .venv/bin/python benchmarks/fused_logprob.py --out fused.json --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("naive", "trl", "liger", "drl")
SEQ_LEN = 512


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_step(method: str, h, w, ids, mask, advantages, backend: str = "torch", liger_compiled: bool = False):
    """A no-argument callable returning the GRPO loss (clipped surrogate, dapo, on policy, beta 0) of hidden states
    h [B, T, H] under the head w [V, H] computed by `method`: naive | trl | liger | drl (`backend` of the fused op).
    Shared with gpu_fused_logprob.py."""
    import torch

    from diffusion_rl.core import grpo

    def core_loss(logp):
        loss, _ = grpo.grpo_loss(logp, logp.detach(), advantages, mask, aggregation="dapo",
                                 num_items_in_batch=mask.sum())
        return loss

    if method == "naive":
        def step():
            logits = (h @ w.T).float()  # [B, T, V]
            return core_loss(torch.log_softmax(logits, dim=-1).gather(-1, ids[..., None]).squeeze(-1))
    elif method == "trl":
        from trl.trainer.utils import selective_log_softmax

        def step():
            return core_loss(selective_log_softmax((h @ w.T).float(), ids))
    elif method == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        fn = LigerFusedLinearGRPOLoss(beta=0.0, loss_type="dapo", compiled=liger_compiled, use_ref_model=False)

        def step():
            out = fn(h, w, ids, mask, advantages)
            return out[0] if isinstance(out, tuple) else out
    else:
        from reasoning_rl.kernels import fused_token_logprobs

        def step():
            return core_loss(fused_token_logprobs(h, w, ids, backend=backend)[0])
    return step


def child(method: str, tokens: int, vocab: int, hidden: int, head: str, reps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)

    gen = torch.Generator().manual_seed(0)
    B, T = tokens // SEQ_LEN, SEQ_LEN
    h0 = torch.randn(B, T, hidden, generator=gen)
    w0 = torch.randn(vocab, hidden, generator=gen) * 0.02
    ids = torch.randint(0, vocab, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    advantages = torch.randn(B, generator=gen)
    h = h0.clone().requires_grad_()
    w = w0.clone().requires_grad_(head == "trained")

    step = make_step(method, h, w, ids, mask, advantages)

    baseline = _rss_bytes()
    times, loss_value = [], None
    for rep in range(reps + 1):
        h.grad = None
        w.grad = None
        start = time.perf_counter()
        loss = step()
        loss.backward()
        elapsed = time.perf_counter() - start
        loss_value = float(loss.detach())
        if rep:  # the first pass is warm-up
            times.append(elapsed)
        del loss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"method": method, "tokens": tokens, "vocab": vocab, "hidden": hidden, "head": head,
            "time_s": min(times), "times_s": times, "peak_above_baseline_mb": max(peak - baseline, 0) / 2**20,
            "loss": loss_value, "threads": threads}


def run_one(method, tokens, vocab, hidden, head, reps, threads) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--child", method, "--tokens", str(tokens), "--vocab", str(vocab),
           "--hidden", str(hidden), "--head", head, "--reps", str(reps), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1])
    if proc.returncode != 0:
        return {"method": method, "tokens": tokens, "vocab": vocab, "head": head,
                "error": (proc.stderr.strip().splitlines() or ["exit " + str(proc.returncode)])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _liger_available() -> bool:
    try:
        import liger_kernel.chunked_loss  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 151936])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--head", choices=("trained", "frozen"), default="trained")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--reps", type=int, default=1, help="timed passes after one warm-up (the fastest counts)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write every measurement as JSON")
    parser.add_argument("--table-from", type=Path, help="print the table of a JSON written by --out; run nothing")
    args = parser.parse_args()
    if args.table_from:
        saved = json.loads(args.table_from.read_text())
        for key in ("vocab", "tokens", "hidden", "head", "methods"):
            setattr(args, key, saved["args"][key])
        args.out = None
        rows = saved["rows"]
        report(args, rows, [m for m in args.methods if any(r["method"] == m for r in rows)])
        return
    if args.child:
        print(json.dumps(child(args.child, args.tokens[0], args.vocab[0], args.hidden, args.head, args.reps,
                               args.threads)))
        return
    methods = [m for m in args.methods if m != "liger" or _liger_available()]
    if "liger" in args.methods and "liger" not in methods:
        print("[bench] liger-kernel is not installed: its column is skipped (pip install liger-kernel)")
    print(f"[bench] H {args.hidden}, fp32, head {args.head}, {args.threads} threads, sequences of {SEQ_LEN}, "
          f"{args.reps} timed passes after 1 warm-up; each run in a fresh process")
    rows = []
    for vocab in args.vocab:
        for tokens in args.tokens:
            for method in methods:
                r = run_one(method, tokens, vocab, args.hidden, args.head, args.reps, args.threads)
                rows.append(r)
                shown = r.get("error") or f"{r['time_s']:.2f} s, peak +{r['peak_above_baseline_mb']:.0f} MB"
                print(f"[bench] V {vocab:>6}  N {tokens:>5}  {method:<6} {shown}", flush=True)
    report(args, rows, methods)


def report(args, rows: list[dict], methods: list[str]) -> None:
    """The markdown table, the verdicts on the issue's targets, and the JSON (--out)."""
    print()
    # with a trained head every method returns the head's gradient (V x H fp32): the peak less that is what each
    # method's temporaries cost
    grad_mb = (lambda vocab: vocab * args.hidden * 4 / 2**20) if args.head == "trained" else (lambda vocab: 0.0)
    print("| V | N | method | peak MB | peak less head grad MB | time s | peak / naive | temporaries / naive "
          "| time / naive |")
    print("|---|---|---|---|---|---|---|---|---|")
    verdicts = []
    for vocab in args.vocab:
        for tokens in args.tokens:
            cell = {r["method"]: r for r in rows if r["vocab"] == vocab and r["tokens"] == tokens and "error" not in r}
            base = cell.get("naive")
            for method in methods:
                r = cell.get(method)
                if r is None:
                    print(f"| {vocab} | {tokens} | {method} | failed | | | | | |")
                    continue
                temp = r["peak_above_baseline_mb"] - grad_mb(vocab)
                mem_ratio = r["peak_above_baseline_mb"] / base["peak_above_baseline_mb"] if base else float("nan")
                temp_ratio = temp / (base["peak_above_baseline_mb"] - grad_mb(vocab)) if base else float("nan")
                time_ratio = r["time_s"] / base["time_s"] if base else float("nan")
                print(f"| {vocab} | {tokens} | {method} | {r['peak_above_baseline_mb']:.0f} | {temp:.0f} | "
                      f"{r['time_s']:.2f} | {mem_ratio:.2f} | {temp_ratio:.2f} | {time_ratio:.2f} |")
            drl, liger = cell.get("drl"), cell.get("liger")
            if drl and base and vocab >= 150000:
                m = drl["peak_above_baseline_mb"] / base["peak_above_baseline_mb"]
                tm = ((drl["peak_above_baseline_mb"] - grad_mb(vocab))
                      / (base["peak_above_baseline_mb"] - grad_mb(vocab)))
                t = drl["time_s"] / base["time_s"]
                verdicts.append(f"V {vocab} N {tokens}: drl peak {m:.2f}x naive (target <= 0.25: "
                                f"{'met' if m <= 0.25 else 'NOT met'}; temporaries {tm:.2f}x), time {t:.2f}x naive "
                                f"(target <= 1.1: {'met' if t <= 1.1 else 'NOT met'})")
            if drl and liger:
                ok = (drl["peak_above_baseline_mb"] <= liger["peak_above_baseline_mb"]
                      and drl["time_s"] <= liger["time_s"])
                verdicts.append(f"V {vocab} N {tokens}: drl vs Liger peak {drl['peak_above_baseline_mb']:.0f} vs "
                                f"{liger['peak_above_baseline_mb']:.0f} MB, time {drl['time_s']:.2f} vs "
                                f"{liger['time_s']:.2f} s (target: memory <= Liger's at <= Liger's time: "
                                f"{'met' if ok else 'NOT met'})")
    print()
    for line in verdicts:
        print("[bench]", line)
    if args.out:
        args.out.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v)
                                                 for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
