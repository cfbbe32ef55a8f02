"""Multi-head self-attention with a fused QKV projection and selectable backends.

`sdpa` (default) calls torch's scaled_dot_product_attention, which picks flash / memory-efficient / math
kernels per device; `eager` spells the softmax out and is the readable reference the tests compare against;
`flex` and `flash_attn` are in layers/attention_backends.py.
With a `KVCache` (layers/kv_cache.py) the new tokens' keys/values are stored and attention runs over all
stored ones.

`capture_weights = True` (set per instance, e.g. by `lmforge.callbacks.attention_maps`) runs the eager math
whatever the backend and keeps the softmax weights, detached, in `last_weights` (B, H, T, T_k): for
inspection only; the default path pays one attribute check.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.kernels.dropout import Dropout
from lmforge.kernels.linear import Linear
from lmforge.models.layers.attention_backends import attend, attend_packed
from lmforge.models.layers.kv_cache import KVCache
from lmforge.models.layers.masks import build_attention_mask, causal_tril

# Prefix tuning's hook (lmforge.peft.prefix): (k, v, mask, q_len) -> (k, v, mask) with learned keys/values
# put before the tokens' ones. It runs after the cache update: the cache and token positions are untouched.
KVPrefixHook = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor | None, int],
    tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
]


def causal_padding_mask(
    attention_mask: torch.Tensor | None, seq_len: int, device: torch.device, past_len: int = 0
) -> torch.Tensor | None:
    """Causal AND not-padding boolean mask (True = may attend); see `masks.build_attention_mask`."""
    return build_attention_mask(attention_mask, seq_len, device, causal=True, past_len=past_len)


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention, GPT-2 layout: one Linear for Q, K, V and one output projection."""

    kv_prefix: KVPrefixHook | None = None  # set per instance by prefix tuning (lmforge.peft.prefix)
    capture_weights: bool = False  # set per instance: eager math + `last_weights` (see module doc)
    last_weights: torch.Tensor | None = None
    # Tensor parallelism (parallel/tensor_parallel.py) leaves n_head of this rank's heads, the model's heads
    # [head_offset, head_offset + n_head): ALiBi's per-head slopes are picked with it
    head_offset: int = 0

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, backend: str = "sdpa") -> None:
        super().__init__()
        self.n_head = n_head
        self.head_dim = n_embd // n_head
        self.backend = backend
        self.dropout = dropout
        self.qkv = Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = Dropout(dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        """x: (B, T, C); mask: optional bool (B, 1, T, T_k) from `causal_padding_mask` (True = attend), or a
        float (B or 1, H, T, T_k) mask added to the scores (ALiBi biases, -inf where not allowed).
        `cache`: store this layer's (`layer`) keys/values and attend over every cached token (T_k = past + T)."""
        qkv = self.qkv(x)
        p = self.dropout if self.training else 0.0
        y = None
        if cache is None and self.kv_prefix is None and not self.capture_weights:  # plain causal self-attention
            y = attend_packed(self.backend, qkv, self.n_head, mask, p)  # by a kernel taking the fused layout, if one does
        if y is None:
            y = self._split_and_attend(qkv, mask, cache, layer, p)
        y = self.proj(y)
        return self.resid_dropout(y) if self.training else y  # eval: skip a no-op module call per layer and step

    def _split_and_attend(self, qkv: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None, layer: int,
                          p: float) -> torch.Tensor:
        """(B, T, 3·C) fused projection -> per-head q, k, v (cached, prefixed) -> attention output (B, T, C)."""
        B, T, _ = qkv.shape
        q, k, v = qkv.view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if self.kv_prefix is not None:
            k, v, mask = self.kv_prefix(k, v, mask, T)
        if mask is not None and mask.is_floating_point():
            mask = mask.to(q.dtype)  # an additive mask (ALiBi) in the query's dtype, as SDPA wants
        if self.backend != "eager" and not self.capture_weights:  # sdpa, flex, flash_attn (layers/attention_backends.py)
            y = attend(self.backend, q, k, v, mask, p)
        else:
            y = self._eager(q, k, v, mask, p)
        return y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)

    def _eager(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, p: float) -> torch.Tensor:
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        if mask is None:
            mask = causal_tril(q.size(-2), k.size(-2), q.device)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        weights = scores.softmax(dim=-1)
        if self.capture_weights:
            self.last_weights = weights.detach()
        weights = F.dropout(weights, p=p, training=p > 0)
        return weights @ v
