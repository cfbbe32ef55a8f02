"""Preallocated key/value cache for incremental decoding: a new token attends to stored K/V instead of
re-running the whole prefix, so a decode step costs O(T) instead of O(T²).

Layout: per layer one (B, n_kv_head, max_len, head_dim) buffer for K and one for V. A buffer is allocated
once, at the first write of its layer, with the dtype and device of the keys written (so a model under
autocast, or one whose weights were quantised, stores what its attention actually computes); decoding then
only writes into it — no per-step `torch.cat`. Grouped-query models store their n_kv_head heads, never the
expanded n_head copies.

The protocol a model's forward follows (every family in `lmforge.models` does):

    past = cache.length                          # tokens already stored
    in layer i:  k, v = cache.update(i, k, v)    # writes at [past, past + T), returns views of [0, past + T)
    after the last layer:  cache.advance(T)

All rows of a batch share one length: left padding is the attention mask's business, not the cache's.
Sliding-window models (Mistral) keep a full-length buffer and apply the window in the attention mask
(`masks.build_attention_mask(..., past_len=)`): one code path, exact, at the memory of a full cache.

Decoding strategies edit the cache between steps: `reorder` (beam search: follow the surviving beams),
`crop` (speculative decoding: drop rejected draft tokens; the stale entries are simply overwritten later).
Encoder-decoder models (T5) also keep each decoder layer's cross-attention K/V, computed once from the
encoder output (`cross_kv` / `set_cross_kv`); beam reordering leaves them alone because all beams of one
input share its encoder output.
"""

from __future__ import annotations

from typing import Any

import torch


class KVCache:
    """K/V buffers of `n_layer` attention layers for `batch_size` sequences of up to `max_len` tokens."""

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, head_dim: int, max_len: int) -> None:
        if min(n_layer, batch_size, n_kv_head, head_dim, max_len) <= 0:
            raise ValueError(
                f"KVCache sizes must be positive, got n_layer={n_layer}, batch_size={batch_size}, "
                f"n_kv_head={n_kv_head}, head_dim={head_dim}, max_len={max_len}"
            )
        self.n_layer, self.batch_size, self.n_kv_head, self.head_dim, self.max_len = (
            n_layer, batch_size, n_kv_head, head_dim, max_len
        )
        self.length = 0
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer
        self.positions: torch.Tensor | None = None  # (B, max_len) position ids of the stored keys (ALiBi)
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layer
        # Values a model computes once per generation and reuses every step (e.g. RoPE cos/sin of every
        # position): they live as long as the sequences they belong to, never in the module.
        self.memo: dict[str, Any] = {}

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv_head, T, head_dim) of the current tokens; return all keys/values so far."""
        start = self.length
        end = start + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens do not fit in max_len={self.max_len}")
        keys = self.keys[layer]
        if keys is None:
            shape = (self.batch_size, self.n_kv_head, self.max_len, self.head_dim)
            if tuple(k.shape[:2]) != shape[:2] or k.size(3) != shape[3]:
                raise ValueError(f"keys of shape {tuple(k.shape)} do not fit a cache of {shape}")
            keys = self.keys[layer] = k.new_empty(shape)
            self.values[layer] = v.new_empty(shape)
        values = self.values[layer]
        # narrow() rather than slicing syntax: this runs once per layer per token, and Python indexing costs
        keys.narrow(2, start, end - start).copy_(k)
        values.narrow(2, start, end - start).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def advance(self, n: int) -> None:
        """Mark the n tokens written by the last forward as stored (called once per forward, after all layers)."""
        self.length += n

    def store_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Record the position ids of the current tokens; return those of every stored key, (B, past + T).

        Needed by position schemes that compare query and key positions inside the attention (ALiBi);
        RoPE bakes positions into the stored keys and does not call this."""
        if self.positions is None:
            self.positions = torch.zeros(self.batch_size, self.max_len, dtype=torch.long, device=position_ids.device)
        end = self.length + position_ids.size(-1)
        self.positions[:, self.length : end] = position_ids
        return self.positions[:, :end]

    def cross_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Cross-attention K/V of a decoder layer, or None before the first decoder step."""
        return self.cross[layer]

    def set_cross_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.cross[layer] = (k, v)

    def crop(self, length: int) -> None:
        """Forget every token from `length` on (speculative decoding's rejected drafts)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {length}")
        self.length = length

    def reorder(self, index: torch.Tensor) -> None:
        """Row b becomes old row index[b] (beam search). Cross-attention K/V are left as they are: beams of
        one input share its encoder output, and beams never move between inputs."""
        for store in (self.keys, self.values):
            for layer, buf in enumerate(store):
                if buf is not None:
                    store[layer] = buf.index_select(0, index.to(buf.device))
        if self.positions is not None:
            self.positions = self.positions.index_select(0, index.to(self.positions.device))

    def reset(self) -> None:
        """Empty the cache for a new batch of the same shape, keeping the buffers."""
        self.length = 0
        self.cross = [None] * self.n_layer

    def nbytes(self) -> int:
        """Bytes held by the K/V buffers allocated so far (the cross-attention K/V excluded)."""
        return sum(b.numel() * b.element_size() for store in (self.keys, self.values) for b in store if b is not None)
