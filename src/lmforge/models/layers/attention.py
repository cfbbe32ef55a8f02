"""Multi-head self-attention with a fused QKV projection and two backends.

`sdpa` (default) calls torch's scaled_dot_product_attention, which picks flash / memory-efficient / math
kernels per device; `eager` spells the softmax out and is the readable reference the tests compare against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def causal_padding_mask(attention_mask: torch.Tensor | None, seq_len: int, device: torch.device) -> torch.Tensor | None:
    """Boolean (B, 1, T, T) mask, True = may attend: causal AND key is not padding.

    The diagonal is always allowed so that a padded query never has an empty row (softmax of nothing is NaN);
    outputs at padded positions are meaningless either way and are ignored by the losses.
    Returns None when there is no padding, so SDPA can use its fused `is_causal` path.
    """
    if attention_mask is None:
        return None
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    keys = attention_mask[:, None, None, :].to(torch.bool)
    eye = torch.eye(seq_len, dtype=torch.bool, device=device)
    return (causal & keys) | eye


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention, GPT-2 layout: one Linear for Q, K, V and one output projection."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, backend: str = "sdpa") -> None:
        super().__init__()
        self.n_head = n_head
        self.head_dim = n_embd // n_head
        self.backend = backend
        self.dropout = dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, C); mask: optional bool (B, 1, T, T) from `causal_padding_mask`."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        if self.backend == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None)
        else:
            y = self._eager(q, k, v, mask, p)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.proj(y))

    def _eager(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, p: float) -> torch.Tensor:
        T = q.size(-2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        if mask is None:
            mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = F.dropout(scores.softmax(dim=-1), p=p, training=p > 0)
        return weights @ v
