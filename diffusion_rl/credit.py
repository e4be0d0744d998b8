"""Step-level credit assignment: per-trajectory advantages [N] -> per-step advantages [N, T].

Tensor-only: nothing here knows about models, pipelines or accelerate. The trainer records, in the
no-grad sampling pass, the similarities of every step's x0 prediction to the final latent, builds a
:class:`CreditContext` and asks a credit assigner for advantages in **true sampling order**; the
trainer alone applies the per-sample time shuffle afterwards (the same permutation as timesteps,
latents and log-probs).

Notation: T sampling steps, k = 0..T-1 in sampling order (k = 0 acts on pure noise);
x̂0^(k) = the x0 prediction at step k; x^(T) = the final latent (decoded and rewarded);
A_n = the per-trajectory (stage-1) advantage of trajectory n.

Built-in assigners (``make_credit``):

- ``sparse``  DDPO (Black et al. 2023, arXiv 2305.13301): R[n, k] = A_n at every step.
- ``uniform`` UCA: c_k = 1/T, reward-to-go R[n, k] = A_n * (T - k)/T, by TRUE step index (CoCA's own
              ``train_uca.py`` indexes after the time shuffle, which lands the weights on random steps).
- ``coca``    CoCA (Liao et al. 2025, "Step-level Reward for Free in RL-based T2I Diffusion Model
              Fine-tuning", arXiv 2505.19196; code Lil-Shake/CoCA): contributions from the similarity
              gains of x̂0^(k) to x^(T), reward-to-go, then per-prompt standardisation (stage 2).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "SUM_EPS",
    "COS_EPS",
    "STAGE2_MODES",
    "CREDIT_KINDS",
    "SELECT_MODES",
    "trajectory_similarities",
    "coca_contributions",
    "reward_to_go",
    "CreditContext",
    "CreditResult",
    "CreditAssigner",
    "SparseCredit",
    "UniformCredit",
    "CoCACredit",
    "make_credit",
    "as_credit_assigner",
    "credit_shares",
    "select_steps",
]

# A trajectory whose similarity gains sum to |Σ_j g_j| = |m_{K-1} - s_0| < SUM_EPS has no usable
# contribution profile (c = g / (w Σg) would explode): it falls back to uniform 1/T and is counted
# as "degenerate". CoCA has no such guard. In practice Σg = 1 - s_0 - (small) ≈ 1.
SUM_EPS = 1e-8
# Lower bound on ||a||·||b|| in the cosine (torch.nn.functional.cosine_similarity's 1e-8), so an
# all-zero latent gives similarity 0 instead of NaN.
COS_EPS = 1e-8

STAGE2_MODES = ("paper", "batch", "running", "global", "none")
SELECT_MODES = ("all", "random", "credit")


# --------------------------------------------------------------------------------------------
# Contributions (CoCA §9.1-9.4)
# --------------------------------------------------------------------------------------------


def trajectory_similarities(pred_x0: Tensor, final_latent: Tensor) -> Tensor:
    """s_k = cos(flatten(x̂0^(k)), flatten(x^(T))) for k < T, and s_T = 1.

    ``pred_x0`` [B, T, *latent] and ``final_latent`` [B, *latent] of any dtype; computed in fp32
    (at least) because sampling may run in fp16 and early x̂0 have large norms.
    Returns fp32 [B, T + 1].
    """
    if pred_x0.dim() < 3:
        raise ValueError(
            f"pred_x0 must be [B, T, *latent], got shape {tuple(pred_x0.shape)}; stack the per-step x0 "
            "predictions along dim 1."
        )
    if pred_x0.shape[:1] + pred_x0.shape[2:] != final_latent.shape:
        raise ValueError(
            f"pred_x0 {tuple(pred_x0.shape)} and final_latent {tuple(final_latent.shape)} disagree: expected "
            f"final_latent of shape {tuple(pred_x0.shape[:1] + pred_x0.shape[2:])} ([B, *latent])."
        )
    B, T = pred_x0.shape[:2]
    dtype = torch.promote_types(pred_x0.dtype, torch.float32)
    x0 = pred_x0.detach().to(dtype).reshape(B, T, -1)  # [B, T, D]
    xT = final_latent.detach().to(dtype).reshape(B, 1, -1)  # [B, 1, D]
    dot = (x0 * xT).sum(-1)  # [B, T]
    norms = x0.norm(dim=-1) * xT.norm(dim=-1)  # [B, T]
    s = dot / norms.clamp(min=COS_EPS)  # [B, T]
    ones = torch.ones(B, 1, dtype=dtype, device=s.device)  # s_T = cos(x^(T), x^(T)) = 1
    return torch.cat([s, ones], dim=1).to(torch.float32)  # [B, T + 1]


def coca_contributions(similarities: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """CoCA contributions c [B, T] from similarities s [B, T + 1] (§9.2 of the reference).

    With w = ``window`` and K = T / w windows:

        m_j = (1/w) Σ_{u=1..w} s_{j·w+u}            mean of the POST-step similarities of window j
        g_0 = m_0 - s_0,   g_j = m_j - m_{j-1}       gains;  Σ_j g_j = m_{K-1} - s_0 (telescopes)
        c_k = g_{⌊k/w⌋} / (w · Σ_j g_j)              so Σ_k c_k = 1

    Step k's window covers the similarities after steps j·w .. j·w+w-1, so c_k describes the change
    caused by step k. Negative gains stay negative (nothing clips them). Rows with |Σ g| < SUM_EPS
    (or a non-finite sum) fall back to uniform 1/T and are flagged in ``degenerate`` [B] bool.
    Computed in (at least) fp32; returns (c fp32 [B, T], degenerate bool [B]).
    """
    if similarities.dim() != 2 or similarities.shape[1] < 2:
        raise ValueError(
            f"similarities must be [B, T + 1] with T >= 1, got shape {tuple(similarities.shape)}; "
            "use trajectory_similarities()."
        )
    T = similarities.shape[1] - 1
    if window < 1 or T % window != 0:
        raise ValueError(
            f"T = {T} sampling steps is not divisible by window = {window}; choose a window that divides "
            f"the number of steps (divisors of {T}: {[d for d in range(1, T + 1) if T % d == 0]})."
        )
    B, K = similarities.shape[0], T // window
    dtype = torch.promote_types(similarities.dtype, torch.float32)
    s = similarities.detach().to(dtype)  # [B, T + 1]
    m = s[:, 1:].reshape(B, K, window).mean(dim=-1)  # [B, K] window means of post-step similarities
    prev = torch.cat([s[:, :1], m[:, :-1]], dim=1)  # [B, K]: s_0, m_0, ..., m_{K-2}
    g = m - prev  # [B, K] gains
    total = g.sum(dim=1, keepdim=True)  # [B, 1] = m_{K-1} - s_0
    degenerate = ~torch.isfinite(total[:, 0]) | (total[:, 0].abs() < SUM_EPS)  # [B]
    safe_total = torch.where(degenerate[:, None], torch.ones_like(total), total)
    c = (g / (window * safe_total)).repeat_interleave(window, dim=1)  # [B, T]
    c = torch.where(degenerate[:, None], torch.full_like(c, 1.0 / T), c)
    return c.to(torch.float32), degenerate


def reward_to_go(c: Tensor) -> Tensor:
    """C[:, k] = Σ_{j >= k} c[:, j] (γ = 1): reverse cumulative sum over the step axis of [N, T]."""
    return c.flip(-1).cumsum(-1).flip(-1)


# --------------------------------------------------------------------------------------------
# The credit interface
# --------------------------------------------------------------------------------------------


@dataclass
class CreditContext:
    """Everything a credit assigner may use; all per-step tensors in TRUE sampling order."""

    advantages: Tensor  # [N] fp32 stage-1 advantages, already clipped; 0 for unscorable samples
    similarities: Tensor  # [N, T + 1] fp32, from trajectory_similarities
    timesteps: Tensor  # [N, T] scheduler timesteps in sampling order
    prompts: list[str]  # [N]
    valid: Tensor  # [N] bool; False = unscorable, its step advantages must be exactly 0

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[1])


@dataclass
class CreditResult:
    step_advantages: Tensor  # [N, T] fp32 in TRUE sampling order
    contributions: Tensor  # [N, T] fp32, each row sums to 1
    info: dict = field(default_factory=dict)  # scalars / short strings for logging


@runtime_checkable
class CreditAssigner(Protocol):
    """``assigner(ctx) -> CreditResult``; stateful assigners checkpoint through state_dict()."""

    name: str

    def __call__(self, ctx: CreditContext) -> CreditResult: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def _check_context(ctx: CreditContext) -> tuple[int, int]:
    N = ctx.advantages.shape[0]
    if ctx.advantages.dim() != 1:
        raise ValueError(f"ctx.advantages must be [N], got shape {tuple(ctx.advantages.shape)}.")
    if ctx.timesteps.dim() != 2 or ctx.timesteps.shape[0] != N:
        raise ValueError(f"ctx.timesteps must be [N={N}, T], got shape {tuple(ctx.timesteps.shape)}.")
    T = ctx.timesteps.shape[1]
    if tuple(ctx.similarities.shape) != (N, T + 1):
        raise ValueError(
            f"ctx.similarities must be [N, T + 1] = ({N}, {T + 1}), got {tuple(ctx.similarities.shape)}; "
            "include s_T = 1 (trajectory_similarities does)."
        )
    if tuple(ctx.valid.shape) != (N,) or ctx.valid.dtype != torch.bool:
        raise ValueError(
            f"ctx.valid must be a bool tensor [N={N}], got {ctx.valid.dtype} {tuple(ctx.valid.shape)}."
        )
    if len(ctx.prompts) != N:
        raise ValueError(f"ctx.prompts has {len(ctx.prompts)} entries for N = {N} trajectories.")
    return N, T


def _zero_invalid(step_adv: Tensor, valid: Tensor) -> Tensor:
    """Unscorable rows -> exactly 0 (``where``, so even a NaN there cannot survive)."""
    return torch.where(valid.to(step_adv.device)[:, None], step_adv, torch.zeros((), dtype=step_adv.dtype))


class _Stateless:
    """Credit assigners without buffers: nothing to checkpoint."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SparseCredit(_Stateless):
    """DDPO's credit: R[n, k] = A_n at every step (c_k = 1/T reported as contributions)."""

    name = "sparse"

    def __call__(self, ctx: CreditContext) -> CreditResult:
        N, T = _check_context(ctx)
        adv = ctx.advantages.detach().to(torch.float32)  # [N]
        step_adv = _zero_invalid(adv[:, None].expand(N, T).clone(), ctx.valid)  # [N, T]
        contrib = torch.full((N, T), 1.0 / T, dtype=torch.float32, device=adv.device)
        return CreditResult(step_adv, contrib, {"credit": self.name})


class UniformCredit(_Stateless):
    """UCA by TRUE step index: c_k = 1/T, R[n, k] = A_n · C_{>=k} = A_n · (T - k)/T.

    Early steps get the full advantage, the last step A_n / T. Indexing happens here, before the
    trainer's time shuffle, which fixes the bug in CoCA's ``train_uca.py`` (weights applied by the
    loop index after the shuffle). No stage 2.
    """

    name = "uniform"

    def __call__(self, ctx: CreditContext) -> CreditResult:
        N, T = _check_context(ctx)
        adv = ctx.advantages.detach().to(torch.float32)  # [N]
        k = torch.arange(T, dtype=torch.float32, device=adv.device)  # [T]
        to_go = (T - k) / T  # [T] reward-to-go of c_k = 1/T
        step_adv = _zero_invalid(adv[:, None] * to_go[None, :], ctx.valid)  # [N, T]
        contrib = torch.full((N, T), 1.0 / T, dtype=torch.float32, device=adv.device)
        return CreditResult(step_adv, contrib, {"credit": self.name})


def _pop_mean_std(x: Tensor) -> tuple[float, float]:
    """Mean and population std (ddof = 0, ``np.std``) of all entries, in float64."""
    x = x.to(torch.float64)
    mu = x.mean()
    return float(mu), float(((x - mu) ** 2).mean().sqrt())


class CoCACredit:
    """CoCA: contribution-based credit with per-prompt step-return standardisation.

    Per trajectory n (reference §9.2-9.5; Liao et al. 2025, arXiv 2505.19196; Lil-Shake/CoCA):

        c      = coca_contributions(s, window)                        [N, T], Σ_k c_k = 1
        C_{>=k} = Σ_{j>=k} c_j                                        (reward_to_go, γ = 1)
        R[n,k] = A_n · (α + (1 - α) · C_{n,>=k})                      α = 1 -> DDPO, α = 0 -> CoCA
        Â[n,k] = (R[n,k] - μ_p) / (σ_p + eps)                          stage 2, per prompt p (below)
        Â      = clamp(Â, -adv_clip, adv_clip);  unscorable rows -> exactly 0

    Stage-2 options (``stage2``), side by side. All stds are population stds (``np.std``);
    unscorable rows never enter a statistic or a buffer.

    ==========  ===================================================================================
    ``paper``   The published statistics exactly (``update_temporal_rewards``). Per prompt, append
                TWO entries to a ``deque(maxlen=buffer_size)``: the array of per-row means over
                time μ_row, then the array of per-row stds σ_row. While the deque holds
                < ``min_count`` *entries*, μ, σ = mean/std of the whole current R matrix (all
                prompts, all steps). Afterwards μ = mean(μ_row of the OLDEST pair, deque[0]) and
                σ = sqrt(mean(μ_row₀² + σ_row₀²) - μ²) from that same pair (the pooled std of one
                old batch). Flaws: (a) once full it uses a batch ~buffer_size/2 - 1 updates stale,
                never the buffer average that was probably intended; (b) the buffer counts arrays,
                not samples (16 entries = 8 updates whatever their size); (c) A is ≈ zero-mean per
                prompt, so μ ≈ 0 and the net effect is a rescale by 1/RMS(C) ≈ 1/0.6 ≈ 1.7×:
                early-step advantages become ≈ 1.7·A. Compare against DDPO only after controlling
                for this change of effective step size. Needs an even ``buffer_size`` (else the
                oldest entry is a std-array and the pairs are misread).
    ``batch``   μ_p, σ_p over this prompt's rows × T in the CURRENT batch only: fresh statistics,
                no state; noisy when a prompt has few rows per batch.
    ``running`` Per prompt, a ``deque(maxlen=buffer_size)`` of per-TRAJECTORY (mean, var) over
                time, counted in samples; μ_p, σ_p are the exact pooled mean/std over all buffered
                trajectories (current batch included). Until a prompt has ``min_count``
                trajectories, the whole current batch's statistics are used (as in stage 1).
                Fixes (a) and (b); like every standardisation it still rescales.
    ``global``  μ, σ over the whole current R matrix (all valid rows × T, all prompts): what the published
                code does when per-prompt stat tracking is off (``advantage.per_prompt_stat_tracking=false``),
                the stage-1 batch standardisation carried over to the step returns.
    ``none``    Â = R (skip stage 2): keeps the scale of A, so α = 1 reproduces ``SparseCredit``.
    ==========  ===================================================================================

    ``info`` logs which stage 2 ran (``stage2``), the number of degenerate rows (fallback to
    uniform c), and the fraction of prompts that used buffered statistics. Stateful: the buffers
    round-trip exactly through ``state_dict()`` / ``load_state_dict()`` (JSON-serialisable).
    """

    name = "coca"

    def __init__(
        self,
        window: int = 5,
        alpha: float = 0.0,
        stage2: str = "paper",
        buffer_size: int = 32,
        min_count: int = 16,
        eps: float = 1e-6,
        adv_clip: float | None = 5.0,
    ) -> None:
        if stage2 not in STAGE2_MODES:
            raise ValueError(f"unknown stage2 {stage2!r}; choose one of {STAGE2_MODES}.")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}; CoCA uses 5.")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (1 = DDPO, 0 = pure CoCA), got {alpha}.")
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"buffer_size and min_count must be >= 1, got {buffer_size}, {min_count}.")
        if stage2 == "paper" and buffer_size % 2:
            raise ValueError(
                f"stage2='paper' stores (mean, std) array pairs, so buffer_size must be even, got {buffer_size}; "
                f"use {buffer_size + 1} (CoCA: 32)."
            )
        if adv_clip is not None and not adv_clip > 0:
            raise ValueError(f"adv_clip must be > 0 or None, got {adv_clip}.")
        self.window = int(window)
        self.alpha = float(alpha)
        self.stage2 = stage2
        self.buffer_size = int(buffer_size)
        self.min_count = int(min_count)
        self.eps = float(eps)
        self.adv_clip = adv_clip
        # paper:   prompt -> deque of arrays (list[float]), alternating μ_row, σ_row
        # running: prompt -> deque of [mean, var] per trajectory
        self.buffers: dict[str, deque[list[float]]] = {}

    # ---- stage 2 ----
    def _stage2(self, R: Tensor, prompts: list[str], valid: Tensor) -> tuple[Tensor, float]:
        """Standardise R [N, T] per prompt over valid rows; returns (Â, frac of prompts on buffer stats)."""
        if self.stage2 == "none":
            return R, 0.0
        Rd = R.to(torch.float64)  # [N, T]
        out = Rd.clone()
        rows_of: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            if bool(valid[i]):
                rows_of.setdefault(p, []).append(i)
        if not rows_of:
            return R, 0.0
        all_rows = [i for rows in rows_of.values() for i in rows]
        batch_mu, batch_sigma = _pop_mean_std(Rd[all_rows])  # whole gathered batch, valid rows
        if self.stage2 == "global":
            out[all_rows] = (Rd[all_rows] - batch_mu) / (batch_sigma + self.eps)
            return out.to(R.dtype), 0.0
        n_buffered = 0
        for prompt, rows in rows_of.items():
            Rp = Rd[rows]  # [n_p, T]
            row_mu = Rp.mean(dim=1)  # [n_p]
            row_sigma = ((Rp - row_mu[:, None]) ** 2).mean(dim=1).sqrt()  # [n_p]
            if self.stage2 == "batch":
                mu, sigma = _pop_mean_std(Rp)
            elif self.stage2 == "paper":
                buf = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
                buf.append(row_mu.tolist())
                buf.append(row_sigma.tolist())
                if len(buf) < self.min_count:
                    mu, sigma = batch_mu, batch_sigma
                else:
                    mu_0 = torch.tensor(buf[0], dtype=torch.float64)  # oldest mean-array
                    sigma_0 = torch.tensor(buf[1], dtype=torch.float64)  # its std-array
                    mu = float(mu_0.mean())
                    sigma = math.sqrt(max(float((mu_0**2 + sigma_0**2).mean()) - mu**2, 0.0))
                    n_buffered += 1
            else:  # running
                buf = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
                buf.extend([[float(a), float(b) ** 2] for a, b in zip(row_mu, row_sigma, strict=True)])
                if len(buf) < self.min_count:
                    mu, sigma = batch_mu, batch_sigma
                else:
                    stats = torch.tensor(list(buf), dtype=torch.float64)  # [n, 2] = (mean, var)
                    mu = float(stats[:, 0].mean())
                    second = float((stats[:, 1] + stats[:, 0] ** 2).mean())  # E[R²] pooled
                    sigma = math.sqrt(max(second - mu**2, 0.0))
                    n_buffered += 1
            out[rows] = (Rp - mu) / (sigma + self.eps)
        return out.to(R.dtype), n_buffered / len(rows_of)

    def __call__(self, ctx: CreditContext) -> CreditResult:
        N, T = _check_context(ctx)
        c, degenerate = coca_contributions(ctx.similarities, self.window)  # [N, T], [N]
        adv = ctx.advantages.detach().to(torch.float32)  # [N]
        R = adv[:, None] * (self.alpha + (1.0 - self.alpha) * reward_to_go(c))  # [N, T]
        valid = ctx.valid.to(R.device)
        A_hat, frac_buffered = self._stage2(R, list(ctx.prompts), valid)
        if self.adv_clip is not None:
            A_hat = A_hat.clamp(-self.adv_clip, self.adv_clip)
        A_hat = _zero_invalid(A_hat, valid)
        info = {
            "credit": self.name,
            "stage2": self.stage2,
            "degenerate": int((degenerate & valid).sum()),
            "stage2_frac_buffered": float(frac_buffered),
        }
        return CreditResult(A_hat.to(torch.float32), c, info)

    def state_dict(self) -> dict:
        return {
            "stage2": self.stage2,
            "buffer_size": self.buffer_size,
            "buffers": {p: [list(e) for e in b] for p, b in self.buffers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if (
            state.get("stage2", self.stage2) != self.stage2
            or state.get("buffer_size", self.buffer_size) != self.buffer_size
        ):
            raise ValueError(
                f"CoCA state was saved with stage2={state.get('stage2')!r}, buffer_size={state.get('buffer_size')}; "
                f"this assigner has stage2={self.stage2!r}, buffer_size={self.buffer_size}. Resume with the same settings."
            )
        self.buffers = {
            str(p): deque(([float(x) for x in e] for e in entries), maxlen=self.buffer_size)
            for p, entries in state.get("buffers", {}).items()
        }


# --------------------------------------------------------------------------------------------
# Factory, user callables, logging, step selection
# --------------------------------------------------------------------------------------------

CREDIT_KINDS: dict[str, type] = {"sparse": SparseCredit, "uniform": UniformCredit, "coca": CoCACredit}


def make_credit(kind: str, **options) -> CreditAssigner:
    """Build a built-in assigner: ``"sparse"`` | ``"uniform"`` | ``"coca"`` (options -> CoCACredit)."""
    if kind not in CREDIT_KINDS:
        raise ValueError(f"unknown credit kind {kind!r}; choose one of {sorted(CREDIT_KINDS)}.")
    if kind != "coca" and options:
        raise ValueError(f"credit kind {kind!r} takes no options, got {sorted(options)}.")
    return CREDIT_KINDS[kind](**options)


class _FunctionCredit:
    """A user callable ``fn(ctx) -> Tensor [N, T] | CreditResult`` behind the CreditAssigner contract."""

    def __init__(self, fn: Callable[[CreditContext], Tensor | CreditResult]) -> None:
        self.fn = fn
        self.name = getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__

    def __call__(self, ctx: CreditContext) -> CreditResult:
        N, T = _check_context(ctx)
        out = self.fn(ctx)
        where = f"credit function {self.name!r}"
        if isinstance(out, CreditResult):
            step_adv, contrib, info = out.step_advantages, out.contributions, dict(out.info)
        elif isinstance(out, Tensor):
            step_adv, contrib, info = out, None, {}
        else:
            raise TypeError(
                f"{where} returned {type(out).__name__}; return a Tensor [N, T] or a CreditResult."
            )
        if tuple(step_adv.shape) != (N, T):
            raise ValueError(
                f"{where} returned step advantages of shape {tuple(step_adv.shape)}; expected [N, T] = ({N}, {T}) "
                "in true sampling order."
            )
        if step_adv.dtype != torch.float32:
            raise ValueError(
                f"{where} returned dtype {step_adv.dtype}; expected torch.float32 (return .float())."
            )
        if not bool(torch.isfinite(step_adv).all()):
            raise ValueError(
                f"{where} returned non-finite step advantages (NaN/inf); mask them to 0 instead."
            )
        if contrib is None:
            contrib = torch.full((N, T), 1.0 / T, dtype=torch.float32, device=step_adv.device)
        elif tuple(contrib.shape) != (N, T):
            raise ValueError(
                f"{where} returned contributions of shape {tuple(contrib.shape)}; expected ({N}, {T})."
            )
        info.setdefault("credit", self.name)
        return CreditResult(_zero_invalid(step_adv, ctx.valid), contrib.to(torch.float32), info)

    def state_dict(self) -> dict:
        return self.fn.state_dict() if hasattr(self.fn, "state_dict") else {}

    def load_state_dict(self, state: dict) -> None:
        if hasattr(self.fn, "load_state_dict"):
            self.fn.load_state_dict(state)


def as_credit_assigner(fn: Callable[[CreditContext], Tensor | CreditResult]) -> CreditAssigner:
    """Wrap a user callable ``fn(ctx) -> Tensor [N, T] | CreditResult`` as a CreditAssigner.

    The output is validated on every call (shape [N, T], float32, finite) and errors name the
    function. Unscorable rows are forced to exactly 0; a bare tensor gets uniform 1/T contributions.
    ``state_dict``/``load_state_dict`` delegate to ``fn`` when it has them.
    """
    if not callable(fn):
        raise TypeError(
            f"as_credit_assigner needs a callable fn(ctx) -> Tensor [N, T], got {type(fn).__name__}."
        )
    return _FunctionCredit(fn)


def credit_shares(contributions: Tensor) -> dict[str, float]:
    """Mean share of credit mass in the first / middle / last third of the steps (for logging).

    Thirds follow ``torch.tensor_split`` (sizes differ by at most one when 3 ∤ T). For CoCA's typical
    sigmoid profile most mass sits in the middle third; for uniform credit each share is ≈ 1/3.
    """
    if contributions.dim() != 2:
        raise ValueError(f"contributions must be [N, T], got shape {tuple(contributions.shape)}.")
    c = contributions.detach().to(torch.float64)
    parts = torch.tensor_split(c, 3, dim=1)
    return {
        name: float(p.sum(dim=1).mean()) for name, p in zip(("first", "middle", "last"), parts, strict=True)
    }


def select_steps(step_advantages: Tensor, k: int, mode: str, generator: torch.Generator) -> Tensor:
    """Choose k of T steps per trajectory to train on; returns LongTensor [N, k] of TRUE step indices.

    - ``all``    every step once (k must equal T);
    - ``random`` k distinct steps uniformly at random per row (DDPO's ``timestep_fraction``);
    - ``credit`` the k steps with the largest |Â[n, k]| per row, i.e. those holding the top share of
                 credit mass (ties broken toward the earlier step). With CoCA the last steps have
                 C_{>=k} ≈ 0, so their backward passes buy nothing.

    The k indices of each row are then randomly permuted (DDPO's per-sample time shuffle) with
    ``generator``, so a seeded generator makes the result reproducible. Gather per-step tensors with
    ``x.gather(1, idx)``; advantages ride along with the same ``idx``.
    """
    if mode not in SELECT_MODES:
        raise ValueError(f"unknown step-selection mode {mode!r}; choose one of {SELECT_MODES}.")
    if step_advantages.dim() != 2:
        raise ValueError(f"step_advantages must be [N, T], got shape {tuple(step_advantages.shape)}.")
    N, T = step_advantages.shape
    if not 1 <= k <= T:
        raise ValueError(f"k must be in [1, T = {T}], got {k}.")
    if mode == "all" and k != T:
        raise ValueError(
            f"mode='all' trains every step, so k must equal T = {T}, got {k}; use 'random' or 'credit'."
        )
    gdev = generator.device
    if mode == "all":
        chosen = torch.arange(T, device=gdev).expand(N, T)  # [N, T]
    elif mode == "random":
        chosen = torch.rand(N, T, generator=generator, device=gdev).argsort(dim=1)[:, :k]  # [N, k]
    else:
        mag = step_advantages.detach().abs().to(device=gdev, dtype=torch.float64)
        chosen = mag.argsort(dim=1, descending=True, stable=True)[:, :k]  # [N, k]
    perm = torch.rand(N, k, generator=generator, device=gdev).argsort(dim=1)  # [N, k] time shuffle
    return chosen.gather(1, perm).to(device=step_advantages.device, dtype=torch.long)
