"""Weight decay only where it regularises: ≥2-D weights (matmuls, embeddings), never biases or norms."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def true_ndim(p: torch.Tensor) -> int:
    """Dimensions of the parameter as the model defines it: DeepSpeed ZeRO-3 partitions parameters at construction
    and leaves each an empty 1-D placeholder (the real shape in `ds_shape`), which would put every matrix in the
    no-decay group (and leave the decay group empty, which DeepSpeed then drops under the LR scheduler's feet)."""
    return len(p.ds_shape) if hasattr(p, "ds_shape") else p.ndim


def true_numel(p: torch.Tensor) -> int:
    """Elements of the parameter as the model defines it (ZeRO-3: `ds_numel`, its placeholder has none)."""
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


def decay_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    seen: set[int] = set()
    for p in model.parameters():  # parameters() already de-duplicates tied weights
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if true_ndim(p) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def muon_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Three groups for Muon + AdamW: hidden matrices (Muon), embeddings and LM head (AdamW, decayed),
    vectors (AdamW, no decay). Muon orthogonalises updates of linear maps; an embedding table or the
    output layer is not one, so they stay on AdamW (as in the Muon and Moonlight papers)."""
    table_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    head = getattr(model, "lm_head", None)
    if head is not None:
        table_ids |= {id(p) for p in head.parameters()}
    matrices, tables, vectors = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if true_ndim(p) < 2:
            vectors.append(p)
        elif id(p) in table_ids:
            tables.append(p)
        else:
            matrices.append(p)
    return [
        {"params": matrices, "weight_decay": weight_decay, "use_muon": True},
        {"params": tables, "weight_decay": weight_decay, "use_muon": False},
        {"params": vectors, "weight_decay": 0.0, "use_muon": False},
    ]
