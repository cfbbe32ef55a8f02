"""Causal language modelling: predict token t+1 from tokens ≤ t."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.objectives.base import LossOutput

IGNORE_INDEX = -100


class CausalLM:
    """Cross-entropy over next-token targets. Batches carry pre-shifted `targets` (IGNORE_INDEX = skip)."""

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        self.ignore_index = ignore_index

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
        targets = batch["targets"]
        # fp32 log-softmax: bf16 logits lose ~3 digits, visible in the loss of a well-trained model
        nll_sum = F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=self.ignore_index, reduction="sum"
        )
        n_tokens = (targets != self.ignore_index).sum()
        return LossOutput(loss=nll_sum / n_tokens.clamp(min=1), nll_sum=nll_sum.detach(), n_tokens=n_tokens, targets=targets)
