"""Grouped-query attention (Ainslie et al., 2023) with separate q/k/v/o projections and two backends.

`n_kv_head` key/value heads are shared by groups of n_head / n_kv_head query heads: n_kv_head = n_head is
ordinary multi-head attention, n_kv_head = 1 multi-query attention. Fewer K/V heads shrink the KV cache
and the K/V projections without changing anything else.

`sdpa` calls torch's fused kernels (with `enable_gqa`, so K/V are never materialised per query head);
`eager` spells the softmax out and is the readable reference. Both take the same mask: None (plain
causal), a boolean (B or 1, 1, T, T) mask (True = may attend), or a float (B or 1, H, T, T) additive mask
(e.g. ALiBi biases with -inf where attention is not allowed). With a `KVCache` the keys/values of the new
tokens (after RoPE: the cache stores rotated keys) are stored as n_kv_head heads and attention runs over all
cached tokens; the mask then has past + T key columns.

`capture_weights = True` (set per instance) runs the eager math whatever the backend and keeps the float32
softmax weights, detached and per query head, in `last_weights` (B, n_head, T, T_k); see attention.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.kernels.linear import Linear
from lmforge.models.layers.attention import KVPrefixHook
from lmforge.models.layers.attention_backends import attend
from lmforge.models.layers.kv_cache import KVCache
from lmforge.models.layers.masks import causal_tril
from lmforge.models.layers.rope import apply_rotary


class GroupedQueryAttention(nn.Module):
    kv_prefix: KVPrefixHook | None = None  # set per instance by prefix tuning (lmforge.peft.prefix)
    capture_weights: bool = False  # set per instance: eager math + `last_weights` (see module doc)
    last_weights: torch.Tensor | None = None

    def __init__(
        self, n_embd: int, n_head: int, n_kv_head: int, head_dim: int, dropout: float = 0.0, bias: bool = False, backend: str = "sdpa"
    ) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.dropout, self.backend = dropout, backend
        self.q_proj = Linear(n_embd, n_head * head_dim, bias=bias)
        self.k_proj = Linear(n_embd, n_kv_head * head_dim, bias=bias)
        self.v_proj = Linear(n_embd, n_kv_head * head_dim, bias=bias)
        self.o_proj = Linear(n_head * head_dim, n_embd, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """x: (B, T, C); rope: (cos, sin) from `RotaryEmbedding` or None (e.g. ALiBi); mask: see module doc;
        cache: where this layer (`layer`) stores its keys/values, or None."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if self.kv_prefix is not None:
            k, v, mask = self.kv_prefix(k, v, mask, T)
        if mask is not None and mask.is_floating_point():
            mask = mask.to(q.dtype)  # SDPA wants a float mask in the query's dtype (bf16 under autocast)
        p = self.dropout if self.training else 0.0
        if self.backend != "eager" and not self.capture_weights:  # sdpa, flex, flash_attn (layers/attention_backends.py)
            y = attend(self.backend, q, k, v, mask, p, enable_gqa=self.n_kv_head != self.n_head)
        else:
            y = self._eager(q, k, v, mask, p)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))

    def _eager(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, p: float) -> torch.Tensor:
        group = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # kv head j serves queries j·g .. j·g+g-1
        scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        if mask is None:
            mask = causal_tril(q.size(-2), k.size(-2), q.device)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        weights = scores.softmax(dim=-1, dtype=torch.float32)
        if self.capture_weights:
            self.last_weights = weights.detach()
        weights = F.dropout(weights.to(q.dtype), p=p, training=p > 0)
        return weights @ v
