"""Rotary position embeddings (Su et al., 2021) and the context-extension variants of their frequencies.

RoPE rotates each (i, i + d/2) pair of query/key channels by the angle position · inv_freq[i], so that
q·k depends on the positions only through their difference. Context extension only changes `inv_freq`
(and, for YaRN, scales cos/sin):

  * ``linear``  – position interpolation (Chen et al., 2023): every frequency divided by `factor`.
  * ``dynamic`` – NTK-aware scaling: the base θ grows with the current length once it exceeds
    `original_max_seq_len` (Hugging Face's "dynamic"); below that it is plain RoPE.
  * ``yarn``    – YaRN (Peng et al., 2023): per-frequency blend of interpolation and extrapolation,
    plus an attention temperature applied to cos/sin.
  * ``llama3``  – Llama 3.1's piecewise rescaling of low / medium / high frequencies.

The math follows the Hugging Face implementation term by term (same float32 operations in the same
order), because logits are tested against it. One deliberate difference: HF's "dynamic" caches the
largest length it has seen and keeps those frequencies for later, shorter calls; here every forward uses
the length of its own `position_ids`, so a forward's output never depends on earlier calls.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lmforge.errors import ConfigError

ROPE_SCALING_TYPES = ("linear", "dynamic", "yarn", "llama3")
# type -> (required keys, optional keys) besides `type`
_SCALING_KEYS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "linear": (frozenset({"factor"}), frozenset()),
    "dynamic": (frozenset({"factor"}), frozenset({"original_max_seq_len"})),
    "yarn": (
        frozenset({"factor"}),
        frozenset({"original_max_seq_len", "beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate"}),
    ),
    "llama3": (frozenset({"factor", "original_max_seq_len", "low_freq_factor", "high_freq_factor"}), frozenset()),
}


def check_rope_scaling(scaling: Mapping[str, Any] | None) -> None:
    """ConfigError naming `model.rope_scaling[.key]` for an unknown type, a missing or unknown key, a bad factor."""
    if scaling is None:
        return
    if not isinstance(scaling, Mapping):
        raise ConfigError("model.rope_scaling", f"must be null or a mapping, got {scaling!r}", "e.g. {type: linear, factor: 2.0}")
    kind = scaling.get("type")
    if kind not in _SCALING_KEYS:
        raise ConfigError("model.rope_scaling.type", f"unknown RoPE scaling {kind!r}", f"use one of {ROPE_SCALING_TYPES}")
    required, optional = _SCALING_KEYS[kind]
    missing = sorted(required - set(scaling))
    if missing:
        raise ConfigError(f"model.rope_scaling.{missing[0]}", f"is required for type={kind}", f"set model.rope_scaling.{missing[0]}")
    unknown = sorted(set(scaling) - required - optional - {"type"})
    if unknown:
        raise ConfigError(f"model.rope_scaling.{unknown[0]}", f"is not a key of type={kind}", f"use only {sorted(required | optional)}")
    for key in ("factor", "original_max_seq_len", "low_freq_factor", "high_freq_factor"):
        value = scaling.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ConfigError(f"model.rope_scaling.{key}", f"must be a positive number, got {value!r}", f"set model.rope_scaling.{key}=<number > 0>")
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ConfigError("model.rope_scaling.high_freq_factor", "must exceed low_freq_factor", "e.g. low_freq_factor=1, high_freq_factor=4")


def _plain_inv_freq(dim: int, theta: float | torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """θ^(-2i/d) for i < d/2, in float32."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


def _yarn_inv_freq(dim: int, theta: float, s: Mapping[str, Any], max_seq_len: int, device: torch.device | None) -> tuple[torch.Tensor, float]:
    """YaRN: high frequencies (many rotations within the original context) keep their value, low ones are
    interpolated by `factor`, with a linear ramp in between; cos/sin are scaled by the attention factor."""
    factor = float(s["factor"])
    original = s.get("original_max_seq_len") or max_seq_len

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def channel_of(rotations: float) -> float:  # the channel that turns `rotations` times over `original` positions
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = channel_of(beta_fast), channel_of(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    keep = 1 - ramp  # share of the original (extrapolated) frequency per channel
    pos_freqs = theta ** (torch.arange(0, dim, 2, device=device).float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq, float(attention_factor)


def _llama3_inv_freq(dim: int, theta: float, s: Mapping[str, Any], device: torch.device | None) -> torch.Tensor:
    """Llama 3.1: wavelengths longer than original/low_freq_factor are divided by `factor`, shorter than
    original/high_freq_factor kept, and the band in between interpolated smoothly."""
    inv_freq = _plain_inv_freq(dim, theta, device)
    factor, low_f, high_f = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    original = s["original_max_seq_len"]
    low_freq_wavelen, high_freq_wavelen = original / low_f, original / high_f
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low_f) / (high_f - low_f)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_inv_freq(
    dim: int,
    theta: float,
    scaling: Mapping[str, Any] | None,
    max_seq_len: int,
    seq_len: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, float]:
    """(inv_freq (dim/2,) float32, cos/sin scale). `seq_len` (a 0-d tensor) is only read by "dynamic"."""
    kind = None if scaling is None else scaling["type"]
    if kind is None:
        return _plain_inv_freq(dim, theta, device), 1.0
    if kind == "linear":
        return _plain_inv_freq(dim, theta, device) / scaling["factor"], 1.0
    if kind == "dynamic":
        original = scaling.get("original_max_seq_len") or max_seq_len
        if seq_len is None:
            return _plain_inv_freq(dim, theta, device), 1.0
        length = torch.clamp(seq_len, min=original)  # below the original length: plain RoPE
        factor = scaling["factor"]
        base = theta * ((factor * length / original) - (factor - 1)) ** (dim / (dim - 2))
        return _plain_inv_freq(dim, base, device), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(dim, theta, scaling, max_seq_len, device)
    if kind == "llama3":
        return _llama3_inv_freq(dim, theta, scaling, device), 1.0
    raise ValueError(f"unknown RoPE scaling type {kind!r}")  # configs are checked before this point


class RotaryEmbedding(nn.Module):
    """position_ids -> (cos, sin), each (B or 1, T, head_dim), shared by every layer of a forward.

    Holds no state: the frequencies are recomputed (head_dim/2 numbers) on the input's device each call, so
    meta-device init, `.to(bf16)` and checkpoint loading can never leave stale or low-precision copies.
    """

    def __init__(self, head_dim: int, theta: float, scaling: Mapping[str, Any] | None, max_seq_len: int) -> None:
        super().__init__()
        self.head_dim, self.theta, self.max_seq_len = head_dim, theta, max_seq_len
        self.scaling = dict(scaling) if scaling is not None else None

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        dynamic = self.scaling is not None and self.scaling["type"] == "dynamic"
        seq_len = position_ids.max() + 1 if dynamic else None
        inv_freq, attention_factor = rope_inv_freq(
            self.head_dim, self.theta, self.scaling, self.max_seq_len, seq_len, position_ids.device
        )
        angles = position_ids[..., None].float() * inv_freq  # (B, T, head_dim/2), float32
        angles = torch.cat((angles, angles), dim=-1)
        return (angles.cos() * attention_factor).to(dtype), (angles.sin() * attention_factor).to(dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}, scaling={self.scaling}"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension: a 90° turn of each channel pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, H, T, D) and k (B, H_kv, T, D) by their positions' angles; cos/sin are (B, T, D)."""
    cos, sin = cos[:, None], sin[:, None]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
