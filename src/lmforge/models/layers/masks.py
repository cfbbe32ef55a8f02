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
    past_len: int = 0,
) -> torch.Tensor | None:
    """Boolean (B or 1, 1, T, past_len + T) mask or None (plain causal / full attention, no padding).

    For a padding mask the diagonal is always allowed so that a padded query never has an empty row
    (softmax of nothing is NaN); outputs at padded positions are meaningless and ignored by the losses.
    `sliding_window=w` lets query i see keys i-w < j ≤ i (Mistral's convention).

    `past_len` > 0 is incremental decoding with a KV cache: the T queries sit at indices past_len ..
    past_len + T - 1 and the keys are all past_len + T tokens; a (B, T) padding mask must then cover the
    keys, (B, past_len + T) (the Hugging Face convention). None is still returned when nothing needs masking:
    a single new token without padding or window sees every stored key (attention layers take `is_causal`
    only for more than one query, see `is_causal_query`).
    """
    total = past_len + seq_len
    if attention_mask is None and sliding_window is None and (past_len == 0 or seq_len == 1):
        return None
    i = torch.arange(past_len, total, device=device)[:, None]
    j = torch.arange(total, device=device)[None, :]
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask.to(device=device, dtype=torch.bool)
        return mask if sliding_window is None else mask & (i - j < sliding_window)  # packed docs keep the window
    if attention_mask is not None and attention_mask.size(-1) != total:
        raise ValueError(
            f"attention_mask covers {attention_mask.size(-1)} tokens; with {past_len} cached and {seq_len} new "
            f"it must cover all {total} keys"
        )
    allowed = (j <= i) if causal else torch.ones(seq_len, total, dtype=torch.bool, device=device)
    if sliding_window is not None:
        allowed = allowed & (i - j < sliding_window)
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = (allowed & attention_mask[:, None, None, :].to(device=device, dtype=torch.bool)) | (i == j)[None, None]
    return allowed


def is_causal_query(mask: torch.Tensor | None, q_len: int) -> bool:
    """The `is_causal` flag for SDPA: only when there is no explicit mask and more than one query.

    With one query (a decode step) every key is visible; SDPA's `is_causal` aligns the triangle to the
    top-left corner, which would wrongly hide all keys but the first."""
    return mask is None and q_len > 1


def causal_tril(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """(q_len, k_len) boolean causal mask for the last q_len of k_len positions (bottom-right aligned)."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)


def prefix_lm_mask(prefix_lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B, 1, T, T): bidirectional inside each row's prefix [0, p), causal after it."""
    i = torch.arange(seq_len, device=prefix_lengths.device)[:, None]
    j = torch.arange(seq_len, device=prefix_lengths.device)[None, :]
    return ((j <= i)[None] | (j[None] < prefix_lengths[:, None, None]))[:, None]
