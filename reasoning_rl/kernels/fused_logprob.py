"""Per-token log-probabilities (and entropies) straight from hidden states, never materialising the logits.

GRPO needs log pi(o_t) of the sampled token only (and sometimes the entropy of the position's distribution), yet
``log_softmax(hidden @ W.T)`` builds several [tokens x vocab] tensors: 8 sequences x 4k tokens x 152k vocab is
20 GB of fp32 logits before the backward. This module computes

    z_i = (h_i @ W.T + b) / T                          logits of row i, temperature T      [V]
    lse_i = logsumexp(z_i)
    logp_i = z_i[y_i] - lse_i                          log-prob of the target y_i
    H_i = lse_i - sum_j p_ij z_ij                      entropy, p_i = softmax(z_i)

with the gradients

    d logp_i / d z_ij = 1[j = y_i] - p_ij              d H_i / d z_ij = -p_ij (log p_ij + H_i)

Both are independent of the upstream gradient, so the hidden-state gradient of each output is a fixed [H] vector
per row that the forward accumulates while it streams the vocabulary, as flash attention accumulates softmax @ V:

    d logp_i / d h_i = (W[y_i] - sum_j p_ij W_j) / T
    d H_i / d h_i = (-sum_j p_ij z_ij W_j + (sum_j p_ij z_ij) sum_j p_ij W_j) / T

The backward then only scales those rows by the upstream gradient; the LM-head weight (and bias) gradient, when
the head is trainable, recomputes each logit tile. Cost: two matmuls of size N x V x H with a frozen head (as
naive), four with a trainable one (naive: three), and one [rows x vocab-block] tile of logits at a time.

Backends behind `fused_token_logprobs(backend=...)`:

* ``"torch"``: the algorithm above in chunked PyTorch (any device); tiles of `chunk_rows` x `vocab_block`, tile
  math in fp32.
* ``"triton"``: CUDA (or the CPU under ``TRITON_INTERPRET=1``): row chunks of logits from a cuBLAS matmul, then
  Triton kernels stream the vocabulary with an online log-sum-exp and write the logit gradient in place, which a
  second matmul contracts with the head (the structure of Liger-Kernel's fused linear cross-entropy). See
  `reasoning_rl.kernels.triton_logprob`.
* ``"auto"``: triton on CUDA when Triton imports, else torch.

Outputs are fp32 [*targets.shape] with 0 at masked positions, so the shared core's GRPO loss applies unchanged.
"""

from __future__ import annotations

import math

import torch

BACKENDS = ("auto", "torch", "triton")

# default tile: 1024 rows x 4096 vocabulary columns = 16 MB of fp32 logits; the weight block (4096 x H) is reused by
# every row of the tile, which keeps the matmuls compute-bound on a CPU
DEFAULT_CHUNK_ROWS = 1024
DEFAULT_VOCAB_BLOCK = 4096


class FusedLogProbError(ValueError):
    """Bad input to the fused log-prob op: the message names the value and the fix."""


def fused_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None, *,
    temperature: float = 1.0, mask: torch.Tensor | None = None, with_entropy: bool = False,
    backend: str = "auto", chunk_rows: int | None = None, vocab_block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(targets | hidden) [*S] fp32 under the head `weight` [V, H] (+ `bias` [V]) at `temperature`, and the
    entropy [*S] with `with_entropy`; hidden is [*S, H], targets [*S] int. Positions where `mask` [*S] is false
    are skipped (never computed) and read 0. Differentiable in hidden, weight and bias.

    Tiles: `chunk_rows` rows (torch default 1024; triton default: as many full-vocabulary rows as fit in 1 GiB)
    by `vocab_block` columns (torch only, default 4096; the Triton kernels stream the vocabulary themselves)."""
    _validate(hidden, weight, targets, bias, temperature, mask, backend, chunk_rows, vocab_block)
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
    y = targets.reshape(-1)  # [N]
    rows = None
    if mask is not None:
        rows = mask.reshape(-1).nonzero().squeeze(1)  # [n] kept positions
        h, y = h.index_select(0, rows), y.index_select(0, rows)
    if int(y.numel()) and (int(y.min()) < 0 or int(y.max()) >= weight.shape[0]):
        raise FusedLogProbError(
            f"target ids must lie in [0, {weight.shape[0]}) (the head's vocabulary), got min {int(y.min())} and "
            f"max {int(y.max())}; mask out padded positions instead of giving them an out-of-range id")
    if not torch.is_grad_enabled():  # the no-grad variant (old / reference log-probs): nothing is accumulated
        h, weight, bias = h.detach(), weight.detach(), (None if bias is None else bias.detach())
    resolved = resolve_backend(backend, hidden.device)
    if resolved == "triton":
        from reasoning_rl.kernels.triton_logprob import TritonFusedLogProb as function
    else:
        function = TorchFusedLogProb
    with torch.autocast(device_type=hidden.device.type, enabled=False):  # tile math stays fp32 under mixed precision
        logp, entropy = function.apply(h, weight, bias, y, float(temperature), bool(with_entropy),
                                       int(chunk_rows or 0), int(vocab_block or 0))
    if rows is not None:
        n_all = shape.numel()
        logp = logp.new_zeros(n_all).index_copy(0, rows, logp)
        entropy = entropy.new_zeros(n_all).index_copy(0, rows, entropy) if with_entropy else None
    return logp.reshape(shape), (entropy.reshape(shape) if with_entropy else None)


def resolve_backend(backend: str, device: torch.device) -> str:
    """`auto` -> triton on CUDA when Triton imports, else torch; `triton` off CUDA needs TRITON_INTERPRET=1."""
    if backend == "torch":
        return "torch"
    triton_ok = _triton_importable()
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_ok else "torch"
    if not triton_ok:
        raise FusedLogProbError("backend 'triton' needs the triton package (pip install triton); use 'torch' or 'auto'")
    if device.type != "cuda" and not _interpreting():
        raise FusedLogProbError(
            f"backend 'triton' runs on CUDA tensors (got {device.type}); on a CPU set TRITON_INTERPRET=1 before "
            f"Python starts (slow, for tests) or use backend 'torch' / 'auto'")
    return "triton"


def reference_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None, *,
    temperature: float = 1.0, mask: torch.Tensor | None = None, with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The unfused computation (full [*S, V] logits in fp32): the parity reference and the `off` path."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature  # [*S, V]
    log_norm = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets[..., None]).squeeze(-1) - log_norm
    entropy = None
    if with_entropy:
        entropy = log_norm - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    if mask is not None:
        keep = mask.bool()
        logp = torch.where(keep, logp, torch.zeros((), device=logp.device))
        entropy = torch.where(keep, entropy, torch.zeros((), device=logp.device)) if with_entropy else None
    return logp, entropy


class TorchFusedLogProb(torch.autograd.Function):
    """Chunked PyTorch backend: tiles of [chunk_rows, vocab_block] logits, online log-sum-exp over the vocabulary."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, with_entropy, chunk_rows, vocab_block):
        N = hidden.shape[0]
        chunk_rows, vocab_block = chunk_rows or DEFAULT_CHUNK_ROWS, vocab_block or DEFAULT_VOCAB_BLOCK
        inv_t = 1.0 / temperature
        need_h = ctx.needs_input_grad[0]
        logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
        # log Z kept as a reference logit m plus log s (s = sum_j exp(z_j - m)): m + log s rounded to one fp32 number
        # at |log Z| ~ 100 would shift every p_ij of a row by the same relative error, which the weight gradient
        # sums up; z - m is exact near the top of the row
        ref_m, log_s = torch.empty_like(logp), torch.empty_like(logp)
        entropy = torch.empty_like(logp) if with_entropy else None
        grad_h_logp = torch.empty(N, hidden.shape[1], dtype=torch.float32, device=hidden.device) if need_h else None
        grad_h_ent = torch.empty_like(grad_h_logp) if need_h and with_entropy else None
        for r0 in range(0, N, chunk_rows):
            r1 = min(r0 + chunk_rows, N)
            h = hidden[r0:r1].float()  # [R, H]
            y = targets[r0:r1]
            w_y = weight.index_select(0, y).float()  # [R, H]
            z_y = (h * w_y).sum(1)
            if bias is not None:
                z_y = z_y + bias.index_select(0, y).float()
            z_y = z_y * inv_t  # the target logits   [R]
            if with_entropy:
                stats = _stream_vocab_with_entropy(h, weight, bias, inv_t, vocab_block, need_h)
            else:
                stats = _stream_vocab(h, weight, bias, inv_t, vocab_block, need_h, z_y)
            m, s, t, acc_w, acc_zw = stats  # sums of exp(z_j - m) (z_j, W_j, z_j W_j) over the vocabulary
            ref_m[r0:r1], log_s[r0:r1] = m, torch.log(s)
            logp[r0:r1] = (z_y - m) - log_s[r0:r1]
            mean_z = None
            if with_entropy:
                mean_z = t / s  # E_p[z]
                entropy[r0:r1] = (m - mean_z) + log_s[r0:r1]  # log Z - E_p[z]
            if need_h:
                mean_w = acc_w / s[:, None]  # E_p[W]   [R, H]
                grad_h_logp[r0:r1] = (w_y - mean_w) * inv_t
                if with_entropy:
                    grad_h_ent[r0:r1] = (mean_z[:, None] * mean_w - acc_zw / s[:, None]) * inv_t
        ctx.save_for_backward(hidden, weight, bias, targets, ref_m, log_s, entropy, grad_h_logp, grad_h_ent)
        ctx.config = (temperature, with_entropy, chunk_rows, vocab_block)
        return logp, (entropy if with_entropy else logp.new_zeros(0))

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        return fused_backward(ctx, g_logp, g_entropy, _head_grads)


# The two vocabulary streams of the forward. Both return (m, s, t, acc_w, acc_zw) for a chunk of R rows: a reference
# value m [R] and, relative to it, s = sum_j exp(z_j - m), t = sum_j exp(z_j - m) z_j (entropy only),
# acc_w = sum_j exp(z_j - m) W_j and acc_zw = sum_j exp(z_j - m) z_j W_j ([R, H], when the hidden states need a
# gradient), so log Z = m + log s, E_p[z] = t / s, E_p[W] = acc_w / s.

def _stream_vocab(h, weight, bias, inv_t, vocab_block, need_h, z_y):
    """Without entropy. The reference starts at the target logit (a value the row holds, so exp(z - m) of its
    largest logit only overflows if the target's probability is below e^-88) and the offset is folded into the
    tile's matmul: a tile costs one matmul, one in-place exp and one sum. A tile that would overflow (or push
    s past 1e13) is redone against its true maximum, the online-softmax way."""
    R, V = h.shape[0], weight.shape[0]
    m = z_y.clone()
    s = torch.zeros(R, device=h.device)
    acc_w = torch.zeros_like(h) if need_h else None
    for v0 in range(0, V, vocab_block):
        v1 = min(v0 + vocab_block, V)
        w = weight[v0:v1].float()  # [Vb, H]
        if bias is None:
            e = torch.addmm(-m[:, None], h, w.T, alpha=inv_t)  # z - m   [R, Vb]
        else:
            e = torch.addmm(bias[v0:v1].float(), h, w.T).mul_(inv_t).sub_(m[:, None])
        e = e.exp_()
        tile_sum = e.sum(1)
        if not bool(((s + tile_sum) < 1e13).all()):  # (also false for inf / NaN)
            z = _tile_logits(h, w, bias, v0, v1, inv_t)
            m_new = torch.maximum(torch.maximum(m, z.amax(dim=1)), m + torch.log(s.clamp(min=1.0)))
            scale = torch.exp(m - m_new)
            e = z.sub_(m_new[:, None]).exp_()
            tile_sum = e.sum(1)
            s.mul_(scale)
            if need_h:
                acc_w.mul_(scale[:, None])
            m = m_new
        s.add_(tile_sum)
        if need_h:
            acc_w.addmm_(e, w)
    return m, s, None, acc_w, None


def _stream_vocab_with_entropy(h, weight, bias, inv_t, vocab_block, need_h):
    """With entropy: the classic online softmax (running maximum), also summing exp(z - m) z (and its W)."""
    R, V = h.shape[0], weight.shape[0]
    m = torch.full((R,), -math.inf, device=h.device)  # running max of z   [R]
    s = torch.zeros(R, device=h.device)
    t = torch.zeros(R, device=h.device)
    acc_w = torch.zeros_like(h) if need_h else None
    acc_zw = torch.zeros_like(h) if need_h else None
    for v0 in range(0, V, vocab_block):
        v1 = min(v0 + vocab_block, V)
        w = weight[v0:v1].float()  # [Vb, H]
        z = _tile_logits(h, w, bias, v0, v1, inv_t)  # [R, Vb]
        m_new = torch.maximum(m, z.amax(dim=1))
        scale = torch.exp(m - m_new)  # rescales what was summed under the old max   [R]
        e = torch.exp(z - m_new[:, None])  # [R, Vb]
        ez = z.mul_(e)  # z is not needed after this
        t.mul_(scale).add_(ez.sum(1))
        s.mul_(scale).add_(e.sum(1))
        if need_h:
            acc_w.mul_(scale[:, None]).addmm_(e, w)
            acc_zw.mul_(scale[:, None]).addmm_(ez, w)
        m = m_new
    return m, s, t, acc_w, acc_zw


def fused_backward(ctx, g_logp, g_entropy, head_grads):
    """The backward both backends share: the hidden-state gradient from the per-row vectors the forward saved, and,
    when the head is trainable, `head_grads(hidden, weight, bias, targets, ref_m, log_s, entropy, g_logp, g_ent,
    inv_t, chunk_rows, block, need_w, need_b) -> (grad_weight, grad_bias)`, the backend's own tile recompute."""
    backward_once(ctx)
    hidden, weight, bias, targets, ref_m, log_s, entropy, grad_h_logp, grad_h_ent = ctx.saved_tensors
    temperature, with_entropy, chunk_rows, block = ctx.config
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    g_logp = g_logp.float().contiguous()
    g_ent = g_entropy.float().contiguous() if with_entropy else None
    grad_hidden = hidden_grad(g_logp, g_ent, grad_h_logp, grad_h_ent, hidden.dtype) if need_h else None
    grad_weight = grad_bias = None
    if need_w or need_b:
        grad_weight, grad_bias = head_grads(hidden, weight, bias, targets, ref_m, log_s, entropy, g_logp, g_ent,
                                            1.0 / temperature, chunk_rows, block, need_w, need_b)
    return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def backward_once(ctx) -> None:
    """The saved per-row gradients are scaled in place by the backward (a second [N, H] fp32 buffer would be the
    op's largest temporary at long contexts: 32k tokens x 4096 hidden = 512 MB), so the graph is walked back once;
    a second backward (retain_graph=True) is this error, checked before autograd's own version check."""
    if getattr(ctx, "backward_done", False):
        raise RuntimeError(
            "fused_token_logprobs: a second backward through the same forward (retain_graph=True) is not supported "
            "(its saved per-row gradients are scaled in place); run the forward again, or use model.fused_logprob=off")
    ctx.backward_done = True


def hidden_grad(g_logp, g_ent, grad_h_logp, grad_h_ent, dtype):
    """dL/dh = g_logp * dlogp/dh + g_H * dH/dh, from the per-row vectors the forward accumulated [N, H], in place."""
    grad = grad_h_logp.mul_(g_logp[:, None])
    if g_ent is not None:
        grad.addcmul_(grad_h_ent, g_ent[:, None])
    return grad.to(dtype)


def _tile_logits(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, v0: int, v1: int, inv_t: float):
    """z = (h @ w.T + b[v0:v1]) / T for one tile, fp32 [R, Vb]."""
    z = h @ w.T if bias is None else torch.addmm(bias[v0:v1].float(), h, w.T)
    return z.mul_(inv_t) if inv_t != 1.0 else z


def _head_grads(hidden, weight, bias, targets, ref_m, log_s, entropy, g_logp, g_ent, inv_t, chunk_rows,
                vocab_block, need_w, need_b):
    """Gradients of the LM-head weight [V, H] and bias [V]: each tile's logits are recomputed (nothing of size
    N x V was kept) and contracted with the rows' hidden states.

    With dL/dz_ij = c_i (1[j = y_i] - p_ij) / T (no entropy term) and p_ij = exp(z_ij - m_i) / s_i, the target part
    is a scatter of c_i h_i / T onto the rows y_i, done once, and the rest is -exp(z_ij - m_i) (c_i / (T s_i)): the
    offset folded into the tile's matmul, one in-place exp, and the per-row factor applied to h. Three passes over a
    tile instead of five."""
    N, V = hidden.shape[0], weight.shape[0]
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_b = torch.zeros(V, dtype=torch.float32, device=weight.device) if need_b else None
    for r0 in range(0, N, chunk_rows):
        r1 = min(r0 + chunk_rows, N)
        h = hidden[r0:r1].float()
        y = targets[r0:r1]
        m = ref_m[r0:r1, None]  # [R, 1]
        gl = g_logp[r0:r1, None] * inv_t  # the 1/T of dz/d(h W^T) folded into the per-row factors   [R, 1]
        if g_ent is None:
            k = gl * torch.exp(-log_s[r0:r1, None])  # c_i / (T s_i)   [R, 1]
            k_h = k * h  # [R, H]
            for v0 in range(0, V, vocab_block):
                v1 = min(v0 + vocab_block, V)
                w = weight[v0:v1].float()
                if bias is None:
                    e = torch.addmm(-m, h, w.T, alpha=inv_t)  # z - m   [R, Vb]
                else:
                    e = torch.addmm(bias[v0:v1].float(), h, w.T).mul_(inv_t).sub_(m)
                e.exp_()  # s_i p_ij
                if need_w:
                    grad_w[v0:v1].addmm_(e.T, k_h, alpha=-1.0)
                if need_b:
                    grad_b[v0:v1].sub_(e.T @ k[:, 0])
            if need_w:
                grad_w.index_add_(0, y, gl * h)  # + c_i h_i / T on the target rows
            if need_b:
                grad_b.index_add_(0, y, gl[:, 0])
            continue
        ge = g_ent[r0:r1, None] * inv_t
        for v0 in range(0, V, vocab_block):
            v1 = min(v0 + vocab_block, V)
            z = _tile_logits(h, weight[v0:v1].float(), bias, v0, v1, inv_t)  # [R, Vb]
            log_p = z.sub_(m).sub_(log_s[r0:r1, None])  # in place: z is no longer needed
            p = torch.exp(log_p)
            grad_z = log_p.add_(entropy[r0:r1, None]).mul_(p).mul_(-ge)  # dH/dz = -p (log p + H)
            grad_z.addcmul_(p, gl, value=-1.0)  # dlogp/dz = 1[j = y] - p (the target part below)
            hit = (y >= v0) & (y < v1)  # targets inside this vocabulary block
            if bool(hit.any()):
                rows = hit.nonzero().squeeze(1)
                grad_z[rows, y[rows] - v0] += gl[rows, 0]
            if need_w:
                grad_w[v0:v1].addmm_(grad_z.T, h)
            if need_b:
                grad_b[v0:v1] += grad_z.sum(0)
    return (grad_w.to(weight.dtype) if need_w else None), (grad_b.to(bias.dtype) if need_b else None)


def _validate(hidden, weight, targets, bias, temperature, mask, backend, chunk_rows, vocab_block) -> None:
    problems = []
    if backend not in BACKENDS:
        problems.append(f"backend must be one of {BACKENDS}, got {backend!r}")
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        problems.append(f"hidden [..., H] and weight [V, H] must share H, got hidden {tuple(hidden.shape)} and "
                        f"weight {tuple(weight.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        problems.append(f"targets must have hidden's leading shape {tuple(hidden.shape[:-1])}, got "
                        f"{tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        problems.append(f"targets must be integer token ids (int64), got {targets.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        problems.append(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(targets.shape):
        problems.append(f"mask must have targets' shape {tuple(targets.shape)}, got {tuple(mask.shape)}")
    if not (temperature > 0 and math.isfinite(temperature)):
        problems.append(f"temperature must be a positive finite number, got {temperature!r}")
    for name, value in (("chunk_rows", chunk_rows), ("vocab_block", vocab_block)):
        if value is not None and value < 1:
            problems.append(f"{name} must be >= 1 (or None for the backend's default), got {value}")
    if problems:
        raise FusedLogProbError("fused log-prob: " + "; ".join(problems))


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
