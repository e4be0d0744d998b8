#!/usr/bin/env python
"""GPU: peak memory and time of the LM-head log-prob + GRPO loss, forward + backward, in bf16 at the real Qwen
vocabulary: naive (full logits), Liger-Kernel's `LigerFusedLinearGRPOLoss`, drl's fused op on its Triton backend
(and its torch backend for reference).

Workload: hidden states [N, H] bf16 (N tokens as N / 1024 sequences), a bf16 LM head [V, H] (V = 151,936, H = 896,
Qwen2.5-0.5B's head), random ids and advantages, GRPO clipped surrogate with dapo aggregation on policy, beta 0;
gradients for the hidden states and (`--head trained`, the default) the head. Every (N, method) runs in a fresh
process; peak = `torch.cuda.max_memory_allocated()` during the pass minus the memory allocated before it (inputs);
time = median of `--iters` passes after 2 warm-ups, `torch.cuda.synchronize()` around each.

Targets (from the issue): the Triton path's peak <= 1/4 of naive's at <= 1.0x naive's time.

    python benchmarks/gpu_fused_logprob.py                       # N = 8k, 16k, 32k (under 10 minutes on one H100/H200)
    python benchmarks/gpu_fused_logprob.py --tokens 8192 --iters 5 --out gpu_fused.json
    python benchmarks/gpu_fused_logprob.py --device cpu --tokens 1024 --vocab 4096 --hidden 64 --methods naive drl_torch
        (CPU smoke run of the harness, seconds)

On a machine without CUDA, the default (GPU) run exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("naive", "liger", "drl_triton", "drl_torch")
SEQ_LEN = 1024


def child(method, tokens, vocab, hidden, head, iters, device) -> dict:
    import torch
    from fused_logprob import make_step  # benchmarks/fused_logprob.py, beside this script

    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    B, T = max(tokens // SEQ_LEN, 1), min(SEQ_LEN, tokens)
    h = torch.randn(B, T, hidden, device=device, dtype=dtype, generator=gen).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device, generator=gen) * 0.02).to(dtype).requires_grad_(head == "trained")
    ids = torch.randint(0, vocab, (B, T), device=device, generator=gen)
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    advantages = torch.randn(B, device=device, generator=gen)

    if method.startswith("drl_"):
        step = make_step("drl", h, w, ids, mask, advantages, backend=method.removeprefix("drl_"))
    else:
        step = make_step(method, h, w, ids, mask, advantages, liger_compiled=cuda)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    times, peak = [], 0
    for i in range(iters + 2):
        h.grad, w.grad = None, None
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        step().backward()
        sync()
        elapsed = time.perf_counter() - start
        if cuda:
            peak = max(peak, torch.cuda.max_memory_allocated() - before)
        if i >= 2:
            times.append(elapsed)
    return {"method": method, "tokens": tokens, "vocab": vocab, "hidden": hidden, "head": head,
            "time_ms": 1000 * statistics.median(times), "peak_mb": peak / 2**20 if cuda else None, "device": device}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--head", choices=("trained", "frozen"), default="trained")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens[0], args.vocab, args.hidden, args.head, args.iters,
                               args.device)))
        return
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("gpu_fused_logprob: no CUDA device here; this benchmark is for a GPU machine (the CPU one is "
                  "benchmarks/fused_logprob.py; --device cpu runs a smoke test of this harness)", file=sys.stderr)
            sys.exit(2)
    rows = []
    for tokens in args.tokens:
        for method in args.methods:
            cmd = [sys.executable, __file__, "--child", method, "--tokens", str(tokens), "--vocab", str(args.vocab),
                   "--hidden", str(args.hidden), "--head", args.head, "--iters", str(args.iters),
                   "--device", args.device]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1],
                                  env={**os.environ})
            if proc.returncode != 0:
                rows.append({"method": method, "tokens": tokens, "error": proc.stderr.strip().splitlines()[-1:]})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print("[gpu-bench]", json.dumps(rows[-1]), flush=True)
    print("\n| N | method | peak MB | time ms | peak / naive | time / naive |\n|---|---|---|---|---|---|")
    for tokens in args.tokens:
        cell = {r["method"]: r for r in rows if r["tokens"] == tokens and "error" not in r}
        base = cell.get("naive")
        for method in args.methods:
            r = cell.get(method)
            if r is None:
                print(f"| {tokens} | {method} | failed | | | |")
                continue
            mem = (f"{r['peak_mb']:.0f}", f"{r['peak_mb'] / base['peak_mb']:.2f}") if base and r["peak_mb"] else ("-", "-")
            ratio = f"{r['time_ms'] / base['time_ms']:.2f}" if base else "-"
            print(f"| {tokens} | {method} | {mem[0]} | {r['time_ms']:.1f} | {mem[1]} | {ratio} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
