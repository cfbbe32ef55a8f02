"""Causal language modelling: predict token t+1 from tokens ≤ t."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.objectives.base import IGNORE_INDEX, LossOutput, Objective, decoder_nll


class CausalLM(Objective):
    """Cross-entropy over next-token targets. Batches carry pre-shifted `targets` (IGNORE_INDEX = skip)."""

    name = "clm"
    supported_kinds = ("decoder",)

    def __init__(self, ignore_index: int = IGNORE_INDEX, fused_loss: bool = True) -> None:
        self.ignore_index = ignore_index
        self.fused_loss = fused_loss  # chunked head + cross-entropy in the model's forward (no full logits)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        extra = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}  # packed documents (data.document_mask)
        return decoder_nll(
            model, batch["input_ids"], batch["targets"], self.ignore_index, self.fused_loss, attention_mask=batch.get("attention_mask"), **extra
        )
