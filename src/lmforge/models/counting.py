"""Parameter counts, and models built on the meta device to count them without memory or init work.

One definition for every report (run metadata, the scaling-law fit): N non-embedding excludes the token and
position tables and the LM head (Kaplan et al. 2020: "excluding all vocabulary and positional embeddings"; a head
tied to the token table is that table).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """torch.nn.init functions as no-ops: initialising meta tensors computes nothing, but the first call costs
    seconds (it imports torch._dynamo). The same trick as transformers' `no_init_weights`."""
    from torch.nn import init

    names = [n for n in dir(init) if n.endswith("_") and not n.startswith("_") and callable(getattr(init, n))]
    saved = {n: getattr(init, n) for n in names}
    try:
        for n in names:
            setattr(init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(init, n, fn)


def build_on_meta(model_cfg: Any) -> nn.Module:
    """The model's structure with no storage: for counting parameters of configs too large to build."""
    from lmforge.models import build

    with torch.device("meta"), skip_init():
        return build(model_cfg)


def param_counts(model: nn.Module) -> dict[str, int]:
    """Total, trainable and non-embedding parameters (tied weights counted once)."""
    params = {id(p): p for p in model.parameters()}.values()
    embedding = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Module):
        embedding |= {id(p) for p in head.parameters()}
    return {
        "params_total": sum(p.numel() for p in params),
        "params_trainable": sum(p.numel() for p in params if p.requires_grad),
        "params_non_embedding": sum(p.numel() for p in params if id(p) not in embedding),
    }
