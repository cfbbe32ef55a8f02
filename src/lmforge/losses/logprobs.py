"""Per-token log-probabilities, entropies and masked reductions: the shared arithmetic of post-training losses.

Every RL / preference loss reads log p(completion token) from the model's logits and reduces over the
completion tokens only. These helpers do that once, in float32 (bf16 log-softmax loses the small
differences that DPO / PPO ratios are made of), without materialising a full float32 copy of a
low-precision (B, T, V) logits tensor: those are converted one sequence at a time (as TRL's
`selective_log_softmax`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmforge.objectives.base import IGNORE_INDEX

_FULL_PRECISION = (torch.float32, torch.float64)


def token_logprobs(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """log p(targets[b, t] | logits[b, t]) as float32 (B, T); exactly 0.0 where targets == ignore_index.

    Ignored targets are replaced by token 0 before the gather (a -100 index would fail or read garbage), and
    the result is zeroed with `where`, so those positions never carry NaN into a sum or a gradient.
    """
    keep = targets != ignore_index
    index = torch.where(keep, targets, torch.zeros_like(targets)).unsqueeze(-1)
    if logits.dtype in _FULL_PRECISION:
        # gather − logsumexp: no (B, T, V) log-softmax tensor is allocated.
        picked = logits.gather(-1, index).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        picked = picked.float()
    else:
        # bf16 / fp16: upcast one row at a time, so the float32 peak is (T, V), not (B, T, V).
        picked = torch.stack(
            [row.float().log_softmax(-1).gather(-1, idx).squeeze(-1) for row, idx in zip(logits, index)]
        )
    return torch.where(keep, picked, torch.zeros_like(picked))


def sequence_logprobs(
    logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX, average: bool = False
) -> Tensor:
    """log p(completion) per sequence (B,): the sum over counted tokens, or their mean when `average`.

    Prompt and padding targets are `ignore_index`, so only completion tokens count. DPO uses the sum; IPO
    (and length-normalised variants) the mean. A sequence with no counted token gets 0.
    """
    return sequence_total(token_logprobs(logits, targets, ignore_index), targets, ignore_index, average)


def sequence_total(token_logps: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX, average: bool = False) -> Tensor:
    """Per-token log-probs (B, T), 0 where ignored -> per sequence (B,): their sum, or mean over counted tokens."""
    total = token_logps.sum(-1)
    if average:
        return total / (targets != ignore_index).sum(-1).clamp(min=1)
    return total


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) per position (B, T), float32: −Σ p·log p with log p = log_softmax(l).

    Equal to TRL's logsumexp(l) − Σ p·l, but that form subtracts two O(max logit) numbers and loses ~1e-6
    in float32; log_softmax is computed stably, so this matches torch.distributions.Categorical to ~1e-7.
    -inf logits (masked vocab) are clamped to the most negative float first (as Categorical does), so
    p·log p is 0·finite = 0 rather than 0·inf = NaN.
    """

    def one(x: Tensor) -> Tensor:
        logp = x.float().clamp(min=torch.finfo(torch.float32).min).log_softmax(-1)
        return -(logp.exp() * logp).sum(-1)

    if logits.dtype in _FULL_PRECISION or logits.dim() < 3:
        return one(logits)
    return torch.stack([one(row) for row in logits])  # low precision: float32 copy one row at a time


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ x over positions where mask is nonzero (mask is 0/1 or bool). Masked-out x may be NaN/inf: ignored."""
    keep = mask != 0
    picked = torch.where(keep, x, torch.zeros_like(x))
    return picked.sum() if dim is None else picked.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over positions where mask is nonzero. An empty mask gives 0 (the count is clamped to 1)."""
    count = (mask != 0).sum() if dim is None else (mask != 0).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over masked entries; `unbiased` applies Bessel's n/(n−1) correction (TRL's `masked_var`).

    Raises ValueError with fewer than 2 counted entries when unbiased (the correction divides by n−1 = 0).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = int((mask != 0).sum())
        if n < 2:
            raise ValueError(f"masked_var: need at least 2 masked entries for the unbiased variance, got {n}")
        var = var * (n / (n - 1))
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(x − mean) / sqrt(var + 1e-8) with mean and unbiased (Bessel-corrected) var over masked entries only.

    As TRL's `masked_whiten`: padding must not shift the statistics that normalise PPO advantages. With
    `shift_mean=False` the mean is added back (only the scale changes). Masked-out positions are set to 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(mask != 0, out, torch.zeros_like(out))
