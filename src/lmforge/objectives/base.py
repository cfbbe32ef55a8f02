"""What every objective returns, so stages can log loss, perplexity and bits-per-byte uniformly."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossOutput:
    loss: torch.Tensor  # mean NLL over counted tokens (what backward sees)
    nll_sum: torch.Tensor  # summed NLL in nats, for token-weighted val/loss and val/bpb
    n_tokens: torch.Tensor  # number of counted target tokens
    targets: torch.Tensor  # (B, T) target ids, IGNORE_INDEX where not counted
