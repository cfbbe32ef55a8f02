"""Attention masks shared by every family: one convention, boolean, True = may attend.

Models accept `attention_mask` as either
  * (B, T) padding mask, 1/True for real tokens (the Hugging Face convention), or
  * (B, 1, T, T) boolean mask, already complete (prefix-LM, document masks of packed data): used as is.
`None` means "no padding": attention layers then take their fused `is_causal` path.
"""

from __future__ import annotations

import torch


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    seq_len: int,
    device: torch.device,
    *,
    causal: bool = True,
    sliding_window: int | None = None,
) -> torch.Tensor | None:
    """Boolean (B or 1, 1, T, T) mask or None (plain causal / full attention, no padding).

    For a padding mask the diagonal is always allowed so that a padded query never has an empty row
    (softmax of nothing is NaN); outputs at padded positions are meaningless and ignored by the losses.
    `sliding_window=w` lets query i see keys i-w < j ≤ i (Mistral's convention).
    """
    if attention_mask is None and sliding_window is None:
        return None
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask.to(device=device, dtype=torch.bool)
        return mask if sliding_window is None else mask & (i - j < sliding_window)  # packed docs keep the window
    allowed = (j <= i) if causal else torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
    if sliding_window is not None:
        allowed = allowed & (i - j < sliding_window)
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = (allowed & attention_mask[:, None, None, :].to(device=device, dtype=torch.bool)) | (i == j)[None, None]
    return allowed


def prefix_lm_mask(prefix_lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B, 1, T, T): bidirectional inside each row's prefix [0, p), causal after it."""
    i = torch.arange(seq_len, device=prefix_lengths.device)[:, None]
    j = torch.arange(seq_len, device=prefix_lengths.device)[None, :]
    return ((j <= i)[None] | (j[None] < prefix_lengths[:, None, None]))[:, None]
