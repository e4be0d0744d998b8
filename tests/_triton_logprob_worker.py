"""Run by tests/test_fused_logprob.py in a fresh interpreter with TRITON_INTERPRET=1 (Triton reads it when the
kernels are defined): the Triton backend against the unfused fp32 reference on small shapes. Prints one JSON
line: the largest absolute and relative errors per case and quantity."""

import json
import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from reasoning_rl.kernels import fused_token_logprobs, reference_token_logprobs  # noqa: E402

CASES = [  # N, H, V, temperature, entropy, bias, chunk rows (None = the default), dtype
    (47, 31, 123, 0.7, True, True, 16, "float32"),
    (47, 31, 123, 1.0, False, False, None, "float32"),
    (160, 64, 2048, 2.0, True, False, 64, "float32"),
    (64, 32, 1000, 1.0, True, True, 32, "bfloat16"),
]


def run_case(N, H, V, temperature, entropy, bias, chunk_rows, dtype):
    gen = torch.Generator().manual_seed(N + V)
    dt = getattr(torch, dtype)
    h = torch.randn(N, H, generator=gen)
    w = torch.randn(V, H, generator=gen) * 0.2
    b = torch.randn(V, generator=gen) * 0.5 if bias else None
    y = torch.randint(0, V, (N,), generator=gen)
    mask = torch.rand(N, generator=gen) > 0.2
    g_logp, g_ent = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    out = {}
    for name, cast in (("truth", torch.float64), ("naive", dt), ("triton", dt)):
        hh = h.to(cast).clone().requires_grad_()  # (clone: .to of the same dtype is the same tensor)
        ww = w.to(cast).clone().requires_grad_()
        bb = b.to(cast).clone().requires_grad_() if bias else None
        if name == "triton":
            logp, ent = fused_token_logprobs(hh, ww, y, bb, temperature=temperature, mask=mask, with_entropy=entropy,
                                             backend="triton", chunk_rows=chunk_rows)
        else:
            logp, ent = reference_token_logprobs(hh, ww, y, bb, temperature=temperature, mask=mask,
                                                 with_entropy=entropy)
        loss = (logp * g_logp.to(logp.dtype)).sum() + ((ent * g_ent.to(ent.dtype)).sum() if entropy else 0.0)
        loss.backward()
        out[name] = {"logp": logp.detach().double(), "ent": ent.detach().double() if entropy else None,
                     "grad_h": hh.grad.double(), "grad_w": ww.grad.double(),
                     "grad_b": bb.grad.double() if bias else None, "dtype": str(logp.dtype)}
    result = {"dtype_out": out["triton"]["dtype"]}
    for key in ("logp", "ent", "grad_h", "grad_w", "grad_b"):
        if out["truth"][key] is None:
            continue
        truth, naive, mine = out["truth"][key], out["naive"][key], out["triton"][key]
        result[key] = {"vs_naive": float((mine - naive).abs().max()),
                       "vs_naive_rel": float(((mine - naive).abs() / (naive.abs() + 1e-12)).max()),
                       "err": float((mine - truth).abs().max()), "naive_err": float((naive - truth).abs().max()),
                       "scale": float(truth.abs().max())}
    return result


if __name__ == "__main__":
    results = [run_case(*case) for case in CASES]
    print(json.dumps({"cases": [list(c) for c in CASES], "results": results}))
    sys.stdout.flush()
