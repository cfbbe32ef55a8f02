"""Weight decay only where it regularises: ≥2-D weights (matmuls, embeddings), never biases or norms."""

from __future__ import annotations

from typing import Any

from torch import nn


def decay_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    seen: set[int] = set()
    for p in model.parameters():  # parameters() already de-duplicates tied weights
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
