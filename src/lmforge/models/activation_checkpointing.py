"""Activation checkpointing as a policy: recompute a block's activations in backward instead of storing them.

`every_n` = 1 checkpoints every transformer block ("full"), 2 every other block, … (torchtitan's selective
per-layer policy): memory falls roughly by the share of blocks checkpointed, at the cost of one more forward of
those blocks. The block's `forward` is wrapped in place (non-reentrant `torch.utils.checkpoint`), so parameter
names and state-dict keys do not change — checkpoints load with or without it — and it composes with FSDP2
(`fully_shard` per block) and `torch.compile`. Only applied in training mode: generation and eval run as usual.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.errors import ConfigError


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every block of every `blocks` ModuleList (decoders, BERT, and both stacks of T5)."""
    return [block for name, module in model.named_modules() if name.split(".")[-1] == "blocks" and isinstance(module, nn.ModuleList)
            for block in module]


def apply_activation_checkpointing(model: nn.Module, every_n: int) -> int:
    """Checkpoint blocks 0, n, 2n, … of each stack; returns how many were wrapped. `every_n` 0 = off."""
    if isinstance(every_n, bool) or not isinstance(every_n, int) or every_n < 0:
        raise ConfigError("stage.activation_checkpointing", f"must be an integer >= 0, got {every_n!r}",
                          "use 0 (off), 1 (every block) or n (every n-th block)")
    if every_n == 0:
        return 0
    wrapped = 0
    for index, block in enumerate(transformer_blocks(model)):
        if index % every_n == 0 and not getattr(block, "_lmforge_checkpointed", False):
            block.forward = _checkpointed(block, block.forward)
            block._lmforge_checkpointed = True
            wrapped += 1
    return wrapped


def _checkpointed(block: nn.Module, forward: Any) -> Any:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not (block.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run
