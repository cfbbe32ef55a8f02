"""Language-modelling metrics from summed quantities, so they are exact over any number of batches/ranks."""

from __future__ import annotations

import math

import torch


def mean_loss(nll_sum: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """Token-weighted mean NLL in nats (not a mean of per-batch means)."""
    return nll_sum / n_tokens.clamp(min=1)


def perplexity(nll_sum: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    return torch.exp(mean_loss(nll_sum, n_tokens))


def bits_per_byte(nll_sum: torch.Tensor, n_bytes: torch.Tensor) -> torch.Tensor:
    """Total NLL converted to bits, divided by the UTF-8 bytes the predicted tokens stand for.

    Unlike per-token loss, this does not depend on the tokenizer, so runs with different vocabularies
    (or a character-level model) compare directly.
    """
    return nll_sum / math.log(2) / n_bytes.clamp(min=1)
