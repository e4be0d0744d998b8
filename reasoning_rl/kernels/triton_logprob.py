"""Triton backend of the fused log-prob op (CUDA; the CPU under ``TRITON_INTERPRET=1`` for tests).

Structure after Liger-Kernel's fused linear cross-entropy (``liger_kernel/ops/fused_linear_cross_entropy.py``):
rows are processed in chunks; each chunk's logits [R, V] come from one cuBLAS matmul, a Triton kernel streams
them once per row with an online log-sum-exp (log-prob, log Z, entropy) and, when the hidden states need a
gradient, overwrites the logits in place with their gradient, which a second matmul contracts with the head.
What differs from Liger: the outputs are per-token log-probs and entropies (no loss inside), so the logit
gradients are the upstream-independent d logp / dz = 1[j = y] - p and d H / dz = -p (log p + H), contracted in
the forward into one [H] vector per row; the head's weight gradient, when it is trainable, recomputes the chunk
and runs a second kernel that writes the combined gradient. Tile math is fp32 whatever the input dtype.

Memory: one [R, V] fp32 chunk (two with the entropy), R = `chunk_rows` (default: as many rows as fit in 2**28
elements, 1 GiB, at least 16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from reasoning_rl.kernels.fused_logprob import fused_backward

CHUNK_ELEMENTS = 2**28


@triton.jit
def _logprob_fwd_kernel(
    z_ptr, z_stride, gent_ptr, gent_stride, y_ptr, logp_ptr, m_ptr, logs_ptr, ent_ptr, V, inv_t,
    WITH_ENT: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per row: log Z (as its running max m and log s, s = sum exp(z - m): z - m stays exact near the
    top of the row), log p(y), entropy; with WRITE_GRAD the row's logits become dlogp/dz * (1/T) in place and
    dH/dz * (1/T) goes to gent."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    y = tl.load(y_ptr + row)
    m = tl.zeros([], dtype=tl.float32) - float("inf")  # running max
    s = tl.zeros([], dtype=tl.float32)  # sum exp(z - m)
    t = tl.zeros([], dtype=tl.float32)  # sum exp(z - m) z
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        inside = cols < V
        z = tl.load(z_row + cols, mask=inside, other=-float("inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(z, axis=0))
        scale = tl.exp(m - m_new)
        e = tl.exp(z - m_new)  # 0 outside the vocabulary
        s = s * scale + tl.sum(e, axis=0)
        if WITH_ENT:
            t = t * scale + tl.sum(e * tl.where(inside, z, 0.0), axis=0)  # (0 * -inf would be NaN)
        m = m_new
    log_s = tl.log(s)
    z_y = tl.load(z_row + y).to(tl.float32) * inv_t
    tl.store(logp_ptr + row, (z_y - m) - log_s)
    tl.store(m_ptr + row, m)
    tl.store(logs_ptr + row, log_s)
    ent = (m - t / s) + log_s
    if WITH_ENT:
        tl.store(ent_ptr + row, ent)
    if WRITE_GRAD:
        gent_row = gent_ptr + row * gent_stride
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            inside = cols < V
            log_p = (tl.load(z_row + cols, mask=inside, other=0.0).to(tl.float32) * inv_t - m) - log_s
            p = tl.exp(log_p)
            if WITH_ENT:
                tl.store(gent_row + cols, -p * (log_p + ent) * inv_t, mask=inside)
            g = (tl.where(cols == y, 1.0, 0.0) - p) * inv_t
            tl.store(z_row + cols, g, mask=inside)


@triton.jit
def _logprob_grad_kernel(
    z_ptr, z_stride, y_ptr, m_ptr, logs_ptr, ent_ptr, glogp_ptr, gent_ptr, V, inv_t,
    WITH_ENT: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per row: the row's logits become dL/d(h W^T + b) = (g_logp dlogp/dz + g_H dH/dz) / T in place."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    y = tl.load(y_ptr + row)
    m = tl.load(m_ptr + row)
    log_s = tl.load(logs_ptr + row)
    g_l = tl.load(glogp_ptr + row)
    g_e = 0.0
    ent = 0.0
    if WITH_ENT:
        g_e = tl.load(gent_ptr + row)
        ent = tl.load(ent_ptr + row)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        inside = cols < V
        log_p = (tl.load(z_row + cols, mask=inside, other=0.0).to(tl.float32) * inv_t - m) - log_s
        p = tl.exp(log_p)
        g = g_l * (tl.where(cols == y, 1.0, 0.0) - p)
        if WITH_ENT:
            g = g - g_e * p * (log_p + ent)
        tl.store(z_row + cols, g * inv_t, mask=inside)


def _block_v(V: int) -> int:
    return min(2048, triton.next_power_of_2(V))


def _chunk_rows(N: int, V: int, chunk_rows: int | None) -> int:
    if chunk_rows is None:
        chunk_rows = max(16, CHUNK_ELEMENTS // V)
    return max(1, min(N, chunk_rows))


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Raw logits of a chunk, h @ W^T + b, in the input dtype (cuBLAS), then fp32 [R, V] contiguous."""
    z = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
    return z.float().contiguous()


class TritonFusedLogProb(torch.autograd.Function):
    """Chunks of full-vocabulary rows; Triton kernels for the softmax statistics and the logit gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, with_entropy, chunk_rows, vocab_block):
        N, V = hidden.shape[0], weight.shape[0]
        inv_t = 1.0 / temperature
        need_h = ctx.needs_input_grad[0]
        R = _chunk_rows(N, V, chunk_rows or None)
        block_v = _block_v(V)
        targets = targets.contiguous()
        logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
        ref_m, log_s = torch.empty_like(logp), torch.empty_like(logp)  # log Z = m + log s
        entropy = torch.empty_like(logp) if with_entropy else logp.new_empty(1)
        grad_h_logp = torch.empty(N, hidden.shape[1], dtype=torch.float32, device=hidden.device) if need_h else None
        grad_h_ent = torch.empty_like(grad_h_logp) if need_h and with_entropy else None
        for r0 in range(0, N, R):
            r1 = min(r0 + R, N)
            z = _chunk_logits(hidden[r0:r1].to(weight.dtype), weight, bias)  # [R, V]
            g_ent = torch.empty_like(z) if need_h and with_entropy else z  # (unused pointer when not written)
            _logprob_fwd_kernel[(r1 - r0,)](
                z, z.stride(0), g_ent, g_ent.stride(0), targets[r0:r1], logp[r0:r1], ref_m[r0:r1], log_s[r0:r1],
                entropy[r0:r1] if with_entropy else entropy, V, inv_t,
                WITH_ENT=with_entropy, WRITE_GRAD=need_h, BLOCK_V=block_v)
            if need_h:  # z now holds dlogp/dz / T
                grad_h_logp[r0:r1] = (z.to(weight.dtype) @ weight).float()
                if with_entropy:
                    grad_h_ent[r0:r1] = (g_ent.to(weight.dtype) @ weight).float()
        entropy = entropy if with_entropy else None
        ctx.save_for_backward(hidden, weight, bias, targets, ref_m, log_s, entropy, grad_h_logp, grad_h_ent)
        ctx.config = (temperature, with_entropy, R, block_v)
        return logp, (entropy if with_entropy else logp.new_zeros(0))

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        return fused_backward(ctx, g_logp, g_entropy, _triton_head_grads)


def _triton_head_grads(hidden, weight, bias, targets, ref_m, log_s, entropy, g_logp, g_ent, inv_t, R, block_v,
                       need_w, need_b):
    """Head weight [V, H] and bias [V] gradients: each row chunk's logits recomputed, the Triton kernel turning them
    into dL/dz in place, one matmul with the chunk's hidden states."""
    N, V = hidden.shape[0], weight.shape[0]
    with_entropy = g_ent is not None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_b = torch.zeros(V, dtype=torch.float32, device=weight.device) if need_b else None
    for r0 in range(0, N, R):
        r1 = min(r0 + R, N)
        h = hidden[r0:r1].to(weight.dtype)
        z = _chunk_logits(h, weight, bias)
        _logprob_grad_kernel[(r1 - r0,)](
            z, z.stride(0), targets[r0:r1], ref_m[r0:r1], log_s[r0:r1],
            entropy[r0:r1] if with_entropy else log_s,
            g_logp[r0:r1], g_ent[r0:r1] if with_entropy else g_logp, V, inv_t,
            WITH_ENT=with_entropy, BLOCK_V=block_v)
        if need_w:
            grad_w += (z.T.to(h.dtype) @ h).float()
        if need_b:
            grad_b += z.sum(0)
    return (grad_w.to(weight.dtype) if need_w else None), (grad_b.to(bias.dtype) if need_b else None)
