"""Fused kernels for the reasoning trainer: per-token log-probs and entropies from hidden states.

`fused_token_logprobs(hidden, weight, targets, ...)` is the entry point; see `reasoning_rl.kernels.fused_logprob`
for the algorithm and the backends (chunked PyTorch everywhere, Triton on CUDA).
"""

from reasoning_rl.kernels.fused_logprob import (
    BACKENDS,
    FusedLogProbError,
    fused_token_logprobs,
    reference_token_logprobs,
    resolve_backend,
)

__all__ = ["BACKENDS", "FusedLogProbError", "fused_token_logprobs", "reference_token_logprobs", "resolve_backend"]
