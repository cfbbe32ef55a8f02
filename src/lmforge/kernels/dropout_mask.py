"""Dropout keep-masks for CPU kernels: 16 random bits per element, four to each 64-bit draw.

Why: torch's CPU random ops draw from one serial generator, one 32-bit draw per element: `bernoulli_` takes
~51 ms for the 12.6M attention probabilities of a (8, 6, 512, 512) layer on two cores, as long as the whole
layer's attention without dropout. Drawing 64-bit words (`random_` over the full int64 range) and reading
each as four 16-bit numbers takes ~8 ms for the same mask.

The drop probability is p rounded to a multiple of 2⁻¹⁶ (`drop_probability`: 0.1 becomes 0.1000061), and
kept values are scaled by 1 / (1 − that), so the expectation of every output equals its input exactly, as in
`F.dropout`. The bits come from torch's CPU generator: `torch.manual_seed` reproduces a mask, and activation
checkpointing's recompute (which restores the generator state) redraws the same one.
"""

from __future__ import annotations

import math

import torch

LEVELS = 1 << 16  # 16 random bits per element


def drop_threshold(p: float) -> int:
    """Signed 16-bit threshold: an element is dropped when its bits (an int16) fall below it."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return -(LEVELS // 2) + round(p * LEVELS)


def drop_probability(p: float) -> float:
    """The probability the mask drops with: p rounded to a multiple of 2⁻¹⁶."""
    return (drop_threshold(p) + LEVELS // 2) / LEVELS


def random_bits(shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Uniform int16 values of `shape` from torch's CPU generator: one full-range 64-bit draw per four."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None)  # all 64 bits (the default skips the sign)
    return words.view(torch.int16)[:n].view(shape)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """Bool mask of `shape`, True where an element is kept (probability 1 − drop_probability(p))."""
    return random_bits(shape) >= drop_threshold(p)


def keep_scale(p: float) -> torch.Tensor:
    """1 / (1 − p) for the p the mask really drops with, as a 0-dim float32 tensor (one compiled kernel for every p)."""
    return torch.tensor(1.0 / (1.0 - drop_probability(p)), dtype=torch.float32)


def masked_scale(x: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x · keep · scale in float32, rounded once to x's dtype. `keep` is the mask as uint8 0/1 (`keep_mask(...).view(
    torch.uint8)`), multiplied in: inductor vectorises byte loads, not bool ones (2-5x slower kernels with a bool mask)."""
    return (x.float() * (keep.to(torch.float32) * scale)).to(x.dtype)
