"""LR schedules as LambdaLR factories, built by Hydra as partials and completed with the step count."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from lmforge.errors import ConfigError


def cosine_warmup_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio` at `total_steps`, flat after."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_warmup(optimizer: Optimizer, total_steps: int, warmup_steps: int = 100, min_lr: float = 0.0) -> LambdaLR:
    """Cosine schedule with linear warmup and a floor `min_lr` (absolute, like nanoGPT's)."""
    ratio = _floor_ratio(optimizer, min_lr, warmup_steps)
    return LambdaLR(optimizer, lambda s: cosine_warmup_factor(s, total_steps, warmup_steps, ratio))


def linear_warmup_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then linear decay to `min_ratio` at `total_steps` ("straight to zero" when 0)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * (1.0 - progress)


def linear_warmup(optimizer: Optimizer, total_steps: int, warmup_steps: int = 100, min_lr: float = 0.0) -> LambdaLR:
    """Linear warmup, then linear decay to the floor `min_lr` (absolute)."""
    ratio = _floor_ratio(optimizer, min_lr, warmup_steps)
    return LambdaLR(optimizer, lambda s: linear_warmup_factor(s, total_steps, warmup_steps, ratio))


def _floor_ratio(optimizer: Optimizer, min_lr: float, warmup_steps: int) -> float:
    base = optimizer.param_groups[0]["lr"]
    if min_lr > base:
        raise ConfigError("scheduler.min_lr", f"{min_lr} is above optimizer.lr={base}", "set scheduler.min_lr <= optimizer.lr (e.g. lr/10)")
    if warmup_steps < 0:
        raise ConfigError("scheduler.warmup_steps", f"must be >= 0, got {warmup_steps}", "set scheduler.warmup_steps=0 or more")
    return min_lr / base if base > 0 else 0.0


def constant(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0) -> LambdaLR:
    """Constant LR after an optional linear warmup."""
    return LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps > 0 else 1.0)
