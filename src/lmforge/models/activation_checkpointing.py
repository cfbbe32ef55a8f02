"""Activation checkpointing as a policy: recompute a block's activations in backward instead of storing them.

`every_n` = 1 (or `full`) checkpoints every transformer block, 2 every other block, … (torchtitan's selective
per-layer policy): memory falls roughly by the share of blocks checkpointed, at the cost of one more forward of
those blocks. `"selective"` (torchtitan's selective *op* policy) checkpoints every block but keeps the outputs
of the matmuls and of attention, recomputing only the cheap element-wise ops (norms, activations, RoPE,
residual adds): most of full checkpointing's memory saving on activations of pointwise ops, little recompute. The block's `forward` is wrapped in place (non-reentrant `torch.utils.checkpoint`), so parameter
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
from lmforge.kernels.linear import ONEDNN_AVAILABLE


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every block of every `blocks` ModuleList (decoders, BERT, and both stacks of T5)."""
    return [block for name, module in model.named_modules() if name.split(".")[-1] == "blocks" and isinstance(module, nn.ModuleList)
            for block in module]


# Ops whose outputs the selective policy keeps: the expensive ones to recompute.
SAVED_OPS = {op for name in ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                             "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention")
             if (op := getattr(getattr(torch.ops.aten, name, None), "default", None)) is not None}
if ONEDNN_AVAILABLE:  # float32 CPU linears (kernels/linear.py)
    SAVED_OPS.add(torch.ops.mkldnn._linear_pointwise.default)


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


POLICY_NAMES = {"none": 0, "off": 0, "full": 1, "selective": "selective"}  # the policies by name: none / full / selective


def checkpoint_policy(value: int | str | None) -> int | str:
    """`stage.activation_checkpointing` as 0 (off), n (every n-th block) or "selective"; names `none`/`off` and
    `full` are 0 and 1. Anything else is a ConfigError naming the key (preflight calls this before any work)."""
    if value is None:
        return 0
    if isinstance(value, str) and value.lower() in POLICY_NAMES:
        return POLICY_NAMES[value.lower()]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError("stage.activation_checkpointing", f"must be none, full, selective or an integer >= 0, got {value!r}",
                          "use none (off), full (every block), n (every n-th block) or selective (every block, keeping matmul outputs)")
    return value


def apply_activation_checkpointing(model: nn.Module, every_n: int | str) -> int:
    """Checkpoint blocks 0, n, 2n, … of each stack (or every block, selectively); returns how many were wrapped.
    `every_n` 0 / none = off, full = 1 (see `checkpoint_policy`)."""
    every_n = checkpoint_policy(every_n)
    selective = every_n == "selective"
    if every_n == 0:
        return 0
    step = 1 if selective else int(every_n)
    wrapped = 0
    for index, block in enumerate(transformer_blocks(model)):
        if index % step == 0 and not getattr(block, "_lmforge_checkpointed", False):
            block.forward = _checkpointed(block, block.forward, selective)
            block._lmforge_checkpointed = True
            wrapped += 1
    return wrapped


def _checkpointed(block: nn.Module, forward: Any, selective: bool = False) -> Any:
    context = None
    if selective:
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        context = functools.partial(create_selective_checkpoint_contexts, _selective_policy)

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not (block.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        if context is not None:
            return checkpoint(forward, *args, use_reentrant=False, context_fn=context, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run
