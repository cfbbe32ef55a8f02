"""Chosen/rejected batches as one forward: both halves stacked into (2B, T) rows, right-padded to one length."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.objectives.base import IGNORE_INDEX


def _pad_to(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return F.pad(x, (0, length - x.size(1)), value=value)


def stack_pairs(batch: dict[str, torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, targets) of shape (2B, T): rows [0, B) chosen, [B, 2B) rejected.

    One forward over both halves halves the kernel launches and keeps chosen and rejected in the same
    numerics (the same batch statistics in any norm, the same autocast)."""
    length = max(batch["chosen_input_ids"].size(1), batch["rejected_input_ids"].size(1))
    ids = torch.cat([_pad_to(batch[f"{side}_input_ids"], length, pad_id) for side in ("chosen", "rejected")])
    mask = torch.cat([_pad_to(batch[f"{side}_attention_mask"], length, 0) for side in ("chosen", "rejected")])
    targets = torch.cat([_pad_to(batch[f"{side}_targets"], length, IGNORE_INDEX) for side in ("chosen", "rejected")])
    return ids, mask, targets
