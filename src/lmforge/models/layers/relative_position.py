"""T5's relative position bias: a learned scalar per head and per bucket of the key-query distance.

Instead of position embeddings, T5 adds `bias[h, bucket(j - i)]` to every attention score. Buckets are exact
for small distances and logarithmically wider up to `max_distance` (everything further shares the last
bucket), which is why T5 runs on sequences longer than it was trained on. The encoder's buckets are
bidirectional (half of them for keys after the query); the decoder's only see the past.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """Bucket index in [0, num_buckets) of each `key_position - query_position` (Mesh TensorFlow's rule).

    The float expression is evaluated in the reference's exact order, so bucket edges agree bit for bit.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets  # keys after the query: upper half
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)  # future keys (masked anyway) fall in bucket 0
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # clamped so that log() never sees 0; only the `not is_small` entries, all >= max_exact, are used
    far = distance.clamp(min=max_exact).float()
    log_bucket = (
        max_exact
        + (torch.log(far / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)).long()
    )
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, log_bucket)


class RelativePositionBias(nn.Module):
    """`forward(q_len, k_len, query_offset=0) -> (1, n_head, q_len, k_len)`: the additive attention bias of a
    whole stack. `query_offset` places the queries at positions offset .. offset + q_len - 1 (the new tokens of
    a cached decode step, after `offset` stored ones); keys are at 0 .. k_len - 1."""

    def __init__(self, n_head: int, num_buckets: int, max_distance: int, bidirectional: bool) -> None:
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.relative_attention_bias = nn.Embedding(num_buckets, n_head)

    def forward(self, q_len: int, k_len: int, query_offset: int = 0) -> torch.Tensor:
        device = self.relative_attention_bias.weight.device
        query = torch.arange(query_offset, query_offset + q_len, dtype=torch.long, device=device)[:, None]
        key = torch.arange(k_len, dtype=torch.long, device=device)[None, :]
        bucket = relative_position_bucket(
            key - query, self.bidirectional, self.num_buckets, self.max_distance
        )
        return self.relative_attention_bias(bucket).permute(2, 0, 1).unsqueeze(0)
