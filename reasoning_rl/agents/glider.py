"""GLIDER's model and losses (arXiv 2505.19761, NJU-RL/GLIDER): one LoRA backbone with two prompt roles, a critic
head on its hidden states, the TD target with a Polyak-averaged target critic, and the advantage-weighted actor.

    high level   prompt HIGH_PROMPT(task, observation)      -> completion " <sub-task>" <eos>
    low level    prompt LOW_PROMPT(sub-task, observation)   -> completion " <primitive action>" <eos>
    flat policy  prompt FLAT_PROMPT(task, observation)      -> completion " <primitive action>" <eos>  (baseline)

Critic (`CriticHeads`): Q(s, g) = MLP(h at the action's end token, i.e. the eos after the sub-task text) and a
state value V(s) = MLP(h at the prompt's last token), on the shared backbone. `offline_rl.critic_trains_backbone`
lets the critic's loss reach the LoRA through h(s, g) (the features then learn what the value needs; off, the heads
fit the actor's features as they are). Losses, per batch of transitions
(s, g, r, s', g', d):

    y      = r + gamma * (1 - d) * Q_target(s', g')                          (td_target)
    L_Q    = mean (Q(s, g) - y)^2
    L_V    = mean (V(s) - Q_target(s, g))^2        (V = the data policy's expected Q: in-sample, no sampling)
    target <- (1 - tau) * target + tau * online    (polyak_update, tau = 0.2, after every critic step)

Actor, `actor.weighting` (the two readings of GLIDER):

    awac        w = min(exp((Q_target(s, g) - V(s)) / lambda), w_max)   -- the paper's docstring (AWAC)
    q_weighted  w = Q_target(s, g)                                       -- the released code: -mean(Q * log pi)
    L_actor = -mean(w * log pi(g | s)),  log pi = sum of the completion's token log-probs (fp32), w detached.

The low level is behaviour-cloned (w = 1) on sub-task-relabelled segments (`reasoning_rl.agents.data`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

HIGH_PROMPT = "plan: {task}\n{obs}\n>"
LOW_PROMPT = "do: {subgoal}\n{obs}\n>"
FLAT_PROMPT = "act: {task}\n{obs}\n>"


def high_prompt(task: str, obs: str) -> str:
    return HIGH_PROMPT.format(task=task, obs=obs)


def low_prompt(subgoal: str, obs: str) -> str:
    return LOW_PROMPT.format(subgoal=subgoal, obs=obs)


def flat_prompt(task: str, obs: str) -> str:
    return FLAT_PROMPT.format(task=task, obs=obs)


# ------------------------------------------------------------------------------------------------
# critic
# ------------------------------------------------------------------------------------------------


class CriticHeads(nn.Module):
    """Q(s, g) and V(s) heads: hidden -> hidden -> 1 MLPs (fp32) on the backbone's last hidden states."""

    def __init__(self, hidden_size: int, width: int = 128):
        super().__init__()
        self.q = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                               nn.Linear(width, 1))
        self.v = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                               nn.Linear(width, 1))

    def forward(self, h_action: torch.Tensor, h_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # h_action, h_state: [B, H] -> Q [B], V [B]
        return self.q(h_action.float()).squeeze(-1), self.v(h_state.float()).squeeze(-1)


@torch.no_grad()
def polyak_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """target <- (1 - tau) * target + tau * online, parameter by parameter."""
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.lerp_(o.detach(), tau)


def td_target(reward: torch.Tensor, done: torch.Tensor, q_next: torch.Tensor, gamma: float) -> torch.Tensor:
    """y = r + gamma * (1 - d) * Q_target(s', g'); all [B], fp32."""
    return reward.float() + gamma * (1.0 - done.float()) * q_next.float()


def actor_weights(weighting: str, q: torch.Tensor, v: torch.Tensor, lam: float, max_weight: float) -> torch.Tensor:
    """Per-sample weights of the actor's log-likelihood (detached): see the module docstring."""
    if weighting == "awac":
        return torch.exp((q - v).float() / lam).clamp(max=max_weight).detach()
    if weighting == "q_weighted":
        return q.float().detach()
    raise ValueError(f"actor.weighting={weighting!r}: choose awac (the paper's docstring) or q_weighted (the code)")


# ------------------------------------------------------------------------------------------------
# encoding and the forward pass
# ------------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    input_ids: torch.Tensor  # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T]
    label_mask: torch.Tensor  # [B, T] 1 at completion tokens (the action text and its eos)
    action_end: torch.Tensor  # [B] index of the eos ending the action
    state_end: torch.Tensor  # [B] index of the prompt's last token


def encode(tokenizer, prompts: list[str], completions: list[str], max_length: int) -> Encoded:
    """prompt + " " + completion + eos per row, right-padded; a prompt too long keeps its end (the observation)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows, ends = [], []
    for p, c in zip(prompts, completions, strict=True):
        pi = tokenizer(p, add_special_tokens=False).input_ids
        ci = tokenizer(" " + c, add_special_tokens=False).input_ids + [eos]
        pi = pi[-max(1, max_length - len(ci)):]
        rows.append((pi, ci))
        ends.append(len(pi))
    T = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    attn = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        attn[i, :n] = 1
        labels[i, len(p):n] = 1
    lengths = attn.sum(1)
    return Encoded(ids, attn, labels, lengths - 1, torch.tensor(ends) - 1)


def forward(model, batch: Encoded) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log pi(completion | prompt) [B] summed over the completion's tokens in fp32, h at the action's end [B, H],
    h at the state's end [B, H])."""
    device = next(model.parameters()).device
    ids, attn = batch.input_ids.to(device), batch.attention_mask.to(device)
    out = model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    logits = out.logits[:, :-1].float()  # [B, T-1, V] predicts tokens 1..T-1
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, T-1]
    mask = batch.label_mask[:, 1:].to(device).float()
    seq_logp = (logp * mask).sum(-1)  # [B]
    hidden = out.hidden_states[-1]  # [B, T, H]
    rows = torch.arange(ids.shape[0], device=device)
    return seq_logp, hidden[rows, batch.action_end.to(device)], hidden[rows, batch.state_end.to(device)]


def weighted_nll(seq_logp: torch.Tensor, weights: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    """-mean(w * log pi) with log pi per sequence, divided by the mean completion length (a per-token scale)."""
    w = torch.ones_like(seq_logp) if weights is None else weights.to(seq_logp.device)
    return -(w * seq_logp).mean() / tokens.float().mean().clamp(min=1.0)


def critic_losses(model, heads: CriticHeads, target: CriticHeads, tokenizer, batch: dict, gamma: float,
                  max_length: int, train_backbone: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """L_Q + L_V on a batch of transitions {prompt, action, reward, done, next_prompt, next_action} (lists).
    `train_backbone`: the loss also reaches the shared backbone (its LoRA) through h(s, g); the next-state side
    (the target's input) never carries a gradient."""
    with torch.set_grad_enabled(train_backbone and torch.is_grad_enabled()):
        enc = encode(tokenizer, batch["prompt"], batch["action"], max_length)
        _, h_act, h_state = forward(model, enc)  # [B, H] each
    q, v = heads(h_act, h_state)  # [B]
    with torch.no_grad():
        nxt = encode(tokenizer, batch["next_prompt"], batch["next_action"], max_length)
        _, h_act_next, h_state_next = forward(model, nxt)
        q_next, _ = target(h_act_next, h_state_next)
        q_now_target, _ = target(h_act.detach(), h_state.detach())
        y = td_target(torch.tensor(batch["reward"]), torch.tensor(batch["done"]), q_next.cpu(), gamma).to(q.device)
    loss_q = F.mse_loss(q, y)
    loss_v = F.mse_loss(v, q_now_target)
    return loss_q + loss_v, {"loss/critic_q": loss_q.item(), "loss/critic_v": loss_v.item(),
                             "reason/q_mean": q.mean().item(), "reason/td_target_mean": y.mean().item()}


def actor_loss(model, heads_target: CriticHeads, heads: CriticHeads, tokenizer, prompts: list[str],
               actions: list[str], weighting: str | None, lam: float, max_weight: float,
               max_length: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Advantage-weighted (or, `weighting=None`, plain BC) log-likelihood of `actions` given `prompts`."""
    enc = encode(tokenizer, prompts, actions, max_length)
    seq_logp, h_act, h_state = forward(model, enc)
    weights, info = None, {}
    if weighting is not None:
        with torch.no_grad():
            q, _ = heads_target(h_act.detach(), h_state.detach())
            _, v = heads(h_act.detach(), h_state.detach())
        weights = actor_weights(weighting, q, v, lam, max_weight)
        info = {"reason/actor_weight_mean": weights.mean().item(), "reason/actor_weight_max": weights.max().item(),
                "reason/advantage_mean": (q - v).mean().item()}
    loss = weighted_nll(seq_logp, weights, enc.label_mask.sum(1))
    return loss, {**info, "reason/logp_mean": seq_logp.mean().item()}
