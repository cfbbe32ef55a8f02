"""Pairwise preference losses: Bradley–Terry for reward models, DPO / IPO / robust DPO for policies.

Both compare a chosen and a rejected completion of the same prompt. Definitions follow TRL's RewardTrainer
and DPOTrainer exactly, so runs are comparable with TRL's numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

DPO_LOSS_TYPES = ("sigmoid", "ipo", "robust")


@dataclass
class PreferenceLossOutput:
    """Reward-model loss (scalar, differentiable) and detached metrics."""

    loss: Tensor
    accuracy: Tensor  # fraction of pairs with r_chosen > r_rejected
    margin_mean: Tensor  # mean of r_chosen − r_rejected


@dataclass
class DPOLossOutput:
    """DPO loss per pair and its mean, with TRL's detached implicit-reward metrics."""

    losses: Tensor  # (B,)
    loss: Tensor  # scalar = losses.mean()
    chosen_rewards: Tensor  # (B,) beta·(π_c − ref_c), detached
    rejected_rewards: Tensor  # (B,) beta·(π_r − ref_r), detached
    margin: Tensor  # mean(chosen_rewards − rejected_rewards)
    accuracy: Tensor  # mean(chosen_rewards > rejected_rewards)


def bradley_terry_loss(
    r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | float | None = None
) -> PreferenceLossOutput:
    """mean(−log σ(r_c − r_r − margin)): the Bradley–Terry negative log-likelihood of the human preference.

    `margin` (scalar or (B,)) is Llama-2's preference-strength margin (Touvron et al. 2023, eq. 2), as in TRL's
    RewardTrainer: a clearly preferred pair must be separated by at least that much before the loss flattens.
    """
    diff = r_chosen - r_rejected
    shifted = diff if margin is None else diff - margin
    loss = -F.logsigmoid(shifted).mean()
    with torch.no_grad():
        accuracy = (diff > 0).float().mean()
        margin_mean = diff.float().mean()
    return PreferenceLossOutput(loss=loss, accuracy=accuracy, margin_mean=margin_mean)


def _check_loss_type(loss_type: str) -> None:
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(
            f"stage.loss_type: unknown DPO loss type {loss_type!r}. Fix: use one of {', '.join(DPO_LOSS_TYPES)}"
        )


def dpo_uses_average_logps(loss_type: str) -> bool:
    """True when the loss expects log-probs averaged over completion tokens (IPO, as TRL), else summed."""
    _check_loss_type(loss_type)
    return loss_type == "ipo"


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> DPOLossOutput:
    """Direct Preference Optimisation over (B,) sequence log-probs, TRL DPOTrainer's `dpo_loss`.

    logits = (π_c − π_r) − (ref_c − ref_r), the policy's log-odds gain over the reference. Loss types:
      * "sigmoid" (Rafailov et al. 2023), with ε = label_smoothing the conservative cDPO mix:
        −log σ(β·logits)(1−ε) − log σ(−β·logits)·ε
      * "ipo" (Azar et al. 2023): (logits − 1/(2β))², a squared loss that does not push the margin to ∞.
        As TRL, IPO expects log-probs *averaged* over completion tokens: call `sequence_logprobs(...,
        average=dpo_uses_average_logps(loss_type))`. label_smoothing is ignored.
      * "robust" (Chowdhury et al. 2024), unbiased under label-flip rate ε < 0.5:
        (−log σ(β·logits)(1−ε) + log σ(−β·logits)·ε) / (1 − 2ε)
    """
    _check_loss_type(loss_type)
    if beta <= 0:
        raise ValueError(f"stage.beta: must be > 0, got {beta}. Fix: use e.g. 0.1")
    eps = label_smoothing
    if not 0.0 <= eps <= 0.5:
        raise ValueError(f"stage.label_smoothing: must be in [0, 0.5], got {eps}. Fix: use e.g. 0.0 or 0.1")
    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:  # robust
        if eps >= 0.5:
            raise ValueError(
                f"stage.label_smoothing: robust DPO divides by 1 − 2ε, so ε must be < 0.5, got {eps}. "
                "Fix: use e.g. 0.1"
            )
        losses = (-F.logsigmoid(beta * logits) * (1 - eps) + F.logsigmoid(-beta * logits) * eps) / (
            1 - 2 * eps
        )
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return DPOLossOutput(
        losses=losses,
        loss=losses.mean(),
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        margin=(chosen_rewards - rejected_rewards).mean(),
        accuracy=(chosen_rewards > rejected_rewards).float().mean(),
    )
