"""Policy-gradient losses for RL post-training: GAE, KL penalties, PPO (policy + value) and GRPO.

Tensors are (B, T) over completion tokens with a 0/1 `mask` (1 = a generated token that counts). The
formulas follow TRL's PPOTrainer / GRPOTrainer so numbers are comparable with TRL runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from lmforge.losses.logprobs import masked_mean

KL_KINDS = ("k1", "k2", "k3", "abs")
SCALE_REWARDS = ("group", "batch", "none")
GRPO_NORMALIZATIONS = ("token", "sequence")


class PPOPolicyLossOutput(NamedTuple):
    """Clipped surrogate loss (differentiable) with detached diagnostics; unpacks as a 3-tuple."""

    loss: Tensor
    clipfrac: Tensor  # fraction of counted tokens where the clipped term was the active one
    approx_kl: Tensor  # masked mean of ½(logp − old_logp)², the k2 estimate of KL(old ‖ new)


class PPOValueLossOutput(NamedTuple):
    """Clipped value loss (differentiable) with the detached fraction of clipped tokens; unpacks as a 2-tuple."""

    loss: Tensor
    clipfrac: Tensor


@dataclass
class GRPOLossOutput:
    """GRPO loss (differentiable) with detached diagnostics."""

    loss: Tensor
    clipfrac: Tensor  # fraction of counted tokens whose ratio was clipped in the direction of A
    kl: Tensor  # masked mean of the k3 estimate of KL(π ‖ ref), 0 without ref_logp


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016) over (B, T) response tokens → (advantages, returns).

    δ_t = r_t + γ·V_{t+1} − V_t and A_t = δ_t + γλ·A_{t+1}, where V_{t+1} and A_{t+1} count only if token
    t+1 is valid: the last valid token's next value is 0 (the episode ends) and nothing leaks back across
    right padding. The mask is assumed contiguous per row (left or right padding, no holes: a hole ends the
    episode). Masked positions get advantage 0 and return 0; returns = advantages + values elsewhere (the
    value-function targets). Inputs are detached: advantages and returns are constants for the loss.
    """
    keep = mask != 0
    zero = torch.zeros_like(values)
    rewards = torch.where(keep, rewards.detach(), zero)  # padding may hold garbage; never let it in
    values = torch.where(keep, values.detach(), zero)
    next_keep = torch.cat([keep[:, 1:], torch.zeros_like(keep[:, :1])], dim=1).to(values.dtype)
    advantages = torch.zeros_like(values)
    next_adv = zero[:, 0]
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else zero[:, 0]
        delta = rewards[:, t] + gamma * next_keep[:, t] * next_value - values[:, t]
        adv = delta + gamma * lam * next_keep[:, t] * next_adv
        next_adv = torch.where(keep[:, t], adv, zero[:, 0])
        advantages[:, t] = next_adv
    returns = torch.where(keep, advantages + values, zero)
    return advantages, returns


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimate of KL(π ‖ ref) from log-probs of tokens sampled from π (Schulman, "Approximating KL").

    k1 = logp − ref (unbiased, high variance, can be negative); k2 = ½(logp − ref)² (biased, low variance);
    k3 = e^{ref − logp} − (ref − logp) − 1 (unbiased, low variance, always ≥ 0: GRPO's penalty);
    abs = |logp − ref|.
    """
    diff = logp - ref_logp
    if kind == "k1":
        return diff
    if kind == "k2":
        return 0.5 * diff**2
    if kind == "k3":
        return torch.exp(-diff) + diff - 1
    if kind == "abs":
        return diff.abs()
    raise ValueError(
        f"stage.kl_penalty: unknown KL estimator {kind!r}. Fix: use one of {', '.join(KL_KINDS)}"
    )


def _per_token(advantages: Tensor, like: Tensor) -> Tensor:
    """(B,) sequence-level advantages broadcast over tokens; (B, T) passes through."""
    return advantages.unsqueeze(-1) if advantages.dim() == like.dim() - 1 else advantages


def ppo_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> PPOPolicyLossOutput:
    """PPO clipped surrogate (Schulman et al. 2017): masked_mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))), ρ = π/π_old.

    The max of the two negated objectives is the pessimistic bound that stops a step from moving the ratio far
    from 1 in the direction the advantage rewards. `advantages` may be (B, T) or (B,).
    """
    adv = _per_token(advantages, logp)
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(0.5 * log_ratio.float() ** 2, mask)
    return PPOPolicyLossOutput(loss=loss, clipfrac=clipfrac, approx_kl=approx_kl)


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_value: float = 0.2
) -> PPOValueLossOutput:
    """Clipped value loss, TRL PPOTrainer: ½·masked_mean(max((V − R)², (clip(V, V_old ± c) − R)²)).

    Clipping the new value to within c of the rollout's value keeps the critic from jumping on one batch.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_value, clip_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), mask)
    return PPOValueLossOutput(loss=loss, clipfrac=clipfrac)


def group_advantages(
    rewards: Tensor, group_size: int, scale_rewards: str = "group", eps: float = 1e-4
) -> Tensor:
    """GRPO's critic-free advantages (Shao et al. 2024): each reward minus its group's mean, / (std + eps).

    Rows i·G … i·G+G−1 are the G completions of prompt i. The std is Bessel-corrected (torch.std, as TRL):
    over the group ("group", original GRPO), over the whole batch ("batch", as TRL's scale_rewards="batch",
    less biased toward easy/hard prompts), or not used ("none", Dr. GRPO). Returns a detached (N,) tensor.
    """
    n = rewards.shape[0]
    if group_size < 2 or n % group_size != 0:
        raise ValueError(
            f"stage.num_generations: group size {group_size} must be ≥ 2 and divide the {n} rewards. "
            "Fix: set num_generations ≥ 2 and make the rollout batch a multiple of it"
        )
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(
            f"stage.scale_rewards: unknown {scale_rewards!r}. Fix: use one of {', '.join(SCALE_REWARDS)}"
        )
    rewards = rewards.detach()
    grouped = rewards.view(-1, group_size)
    centered = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1)
    elif scale_rewards == "batch":
        std = rewards.std()
    else:
        return centered
    return centered / (std + eps)


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    beta: float = 0.0,
    ref_logp: Tensor | None = None,
    normalization: str = "token",
) -> GRPOLossOutput:
    """GRPO clipped objective (Shao et al. 2024) as TRL's GRPOTrainer, with DAPO's options (Yu et al. 2025).

    Per token: −min(ρ·A, clip(ρ, 1−ε, 1+ε_high)·A) + β·k3(logp, ref_logp), ρ = exp(logp − old_logp), A the
    sequence's (N,) advantage. ε_high > ε is DAPO's "clip-higher" (defaults to ε). With num_iterations = 1
    pass old_logp = logp.detach() (ρ = 1, gradient unchanged). Normalisation: "token" = Σ over all counted
    tokens / their count (DAPO, TRL "dapo"/"bnpo": long answers are not down-weighted); "sequence" = mean
    over each sequence's tokens, then over sequences (original GRPO).
    """
    if normalization not in GRPO_NORMALIZATIONS:
        raise ValueError(
            f"stage.loss_normalization: unknown {normalization!r}. "
            f"Fix: use one of {', '.join(GRPO_NORMALIZATIONS)}"
        )
    if beta > 0 and ref_logp is None:
        raise ValueError(
            "stage.beta: beta > 0 needs ref_logp (the reference model's log-probs). Fix: pass them"
        )
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    adv = _per_token(advantages, logp)
    ratio = torch.exp(logp - old_logp)
    clipped_ratio = torch.clamp(ratio, 1 - clip_eps, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped_ratio * adv)
    kl_tok = kl_penalty(logp, ref_logp, "k3") if ref_logp is not None else None
    if beta > 0:
        per_token = per_token + beta * kl_tok
    if normalization == "token":
        loss = masked_mean(per_token, mask)
    else:
        loss = masked_mean(per_token, mask, dim=-1).mean()
    with torch.no_grad():
        low = (ratio < 1 - clip_eps) & (adv < 0)
        high = (ratio > 1 + eps_high) & (adv > 0)
        clipfrac = masked_mean((low | high).float(), mask)
        kl = masked_mean(kl_tok, mask) if kl_tok is not None else torch.zeros((), device=logp.device)
    return GRPOLossOutput(loss=loss, clipfrac=clipfrac, kl=kl)
