"""Prefix language modelling (as in UniLM / T5's "prefix LM" / PaLM's UL2 S-denoiser) for decoder families.

Each row is split at a random point p: tokens [0, p) form a prefix that attends bidirectionally, tokens
from p on are predicted causally, and only they carry loss. The model sees one (B, 1, T, T) boolean mask
(`prefix_lm_mask`), so every decoder family and attention backend that takes 4-D masks supports it.

val/loss, val/ppl and val/bpb are therefore over the suffix tokens only (a harder subset than CLM's:
the first suffix token has no left context from its own segment), so they are not comparable to CLM's.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.models.layers.masks import prefix_lm_mask
from lmforge.objectives.base import IGNORE_INDEX, LossOutput, Objective, batch_generator, decoder_nll


class PrefixLM(Objective):
    """Bidirectional prefix of random length, causal suffix, loss on the suffix only."""

    name = "prefix_lm"
    supported_kinds = ("decoder",)

    def __init__(self, min_prefix: int = 1, max_prefix_fraction: float = 0.5, ignore_index: int = IGNORE_INDEX, fused_loss: bool = True) -> None:
        if min_prefix < 1:
            raise ValueError(f"objective.min_prefix must be >= 1, got {min_prefix}")
        if not 0.0 < max_prefix_fraction < 1.0:
            raise ValueError(f"objective.max_prefix_fraction must be in (0, 1), got {max_prefix_fraction}")
        self.min_prefix, self.max_prefix_fraction, self.ignore_index = min_prefix, max_prefix_fraction, ignore_index
        self.fused_loss = fused_loss  # chunked head + cross-entropy in the model's forward (no full logits)

    def prefix_lengths(self, input_ids: torch.Tensor, targets: torch.Tensor, training: bool) -> torch.Tensor:
        """p per row, uniform in [min_prefix, max_prefix_fraction · n_real] (n_real excludes the val tail's padding)."""
        n_real = (targets != self.ignore_index).sum(dim=1) + 1  # tokens of the row that are text
        hi = (n_real.float() * self.max_prefix_fraction).floor().long().clamp(min=self.min_prefix)
        generator = None if training else batch_generator(input_ids, salt=0x5EED)
        u = torch.rand(input_ids.size(0), device=input_ids.device, generator=generator)
        return self.min_prefix + (u * (hi - self.min_prefix + 1).float()).floor().long()

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        input_ids, targets = batch["input_ids"], batch["targets"]
        T = input_ids.size(1)
        p = self.prefix_lengths(input_ids, targets, model.training)
        mask = prefix_lm_mask(p, T)
        if batch.get("attention_mask") is not None:  # padded keys stay hidden (diagonal kept: no empty rows)
            keys = batch["attention_mask"].bool()[:, None, None, :]
            mask = (mask & keys) | torch.eye(T, dtype=torch.bool, device=mask.device)
        # position t predicts token t+1; the first predicted token is token p, i.e. position p-1
        in_suffix = torch.arange(T, device=input_ids.device)[None, :] >= (p - 1)[:, None]
        suffix_targets = targets.masked_fill(~in_suffix, self.ignore_index)
        return decoder_nll(model, input_ids, suffix_targets, self.ignore_index, self.fused_loss, attention_mask=mask)
