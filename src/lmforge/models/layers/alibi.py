"""ALiBi (Press et al., 2022): no position embeddings, a per-head linear penalty on attention distance.

Head h adds `-slope_h · (i - j)` to the score of query i on key j. The slopes form a geometric sequence
2^(-8/n), 2^(-16/n), ... for n heads; when n is not a power of two the first 2^⌊log2 n⌋ heads take that
sequence and the rest take every other term of the sequence for twice as many heads (the paper's recipe,
also HF Bloom's `build_alibi_tensor`). Nothing depends on a maximum length, so a model trained on short
sequences runs on longer ones (the paper's length extrapolation).
"""

from __future__ import annotations

import math

import torch

from lmforge.models.layers.masks import causal_tril


def alibi_slopes(n_head: int, device: torch.device | None = None) -> torch.Tensor:
    """(n_head,) float32 slopes, computed as float32 powers like Bloom's so both give identical values."""
    pow2 = 2 ** math.floor(math.log2(n_head))
    base = torch.tensor(2 ** (-8 / pow2), dtype=torch.float32, device=device)
    slopes = torch.pow(base, torch.arange(1, pow2 + 1, dtype=torch.int32, device=device))
    if pow2 != n_head:
        extra_base = torch.tensor(2 ** (-8 / (2 * pow2)), dtype=torch.float32, device=device)
        n_extra = n_head - pow2
        odd = torch.arange(1, 2 * n_extra + 1, 2, dtype=torch.int32, device=device)  # 1, 3, 5, ...
        slopes = torch.cat([slopes, torch.pow(extra_base, odd)])
    return slopes


def alibi_bias(slopes: torch.Tensor, position_ids: torch.Tensor, key_position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B or 1, H, T_q, T_k) float32 bias `slope_h · (pos_k - pos_q)`: 0 on the diagonal, negative to the past.

    Built from `position_ids` (not from array indices), so packed documents whose positions restart at 0
    get the same biases as if each were alone; left padding only shifts positions, which changes nothing.
    `key_position_ids` (default: the queries' own) are the positions of all keys, e.g. cached ones + new.
    """
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    if key_position_ids is None:
        key_position_ids = position_ids
    elif key_position_ids.dim() == 1:
        key_position_ids = key_position_ids[None]
    q_pos, k_pos = position_ids.float(), key_position_ids.float()
    distance = k_pos[:, None, None, :] - q_pos[:, None, :, None]  # (B, 1, T_q, T_k): pos_k - pos_q
    return slopes.to(q_pos.device)[None, :, None, None] * distance


def alibi_attention_mask(
    slopes: torch.Tensor,
    position_ids: torch.Tensor,
    allowed: torch.Tensor | None,
    dtype: torch.dtype,
    key_position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Additive float mask for attention: the ALiBi bias where `allowed`, -inf elsewhere.

    `allowed` is the boolean mask of `masks.build_attention_mask` (None = plain causal, bottom-right aligned
    when the keys outnumber the queries, as in a cached decode step). Attention layers add a float mask to
    the scores (SDPA does the same with a float `attn_mask`).
    """
    bias = alibi_bias(slopes, position_ids, key_position_ids)
    if allowed is None:
        allowed = causal_tril(bias.size(-2), bias.size(-1), bias.device)
    return bias.masked_fill(~allowed, float("-inf")).to(dtype)
