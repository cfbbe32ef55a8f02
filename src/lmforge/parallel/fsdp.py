"""FSDP2 (`fully_shard`) applied per transformer block and on the root, as torchtitan does.

Each block is one FSDP unit: its parameters are all-gathered just before its forward (and backward) and
freed after, so peak memory holds one block's full weights plus every block's 1/world shard. The last block
is not resharded after forward: the root's backward needs it straight away. `param_dtype=bfloat16` keeps
the sharded master weights and the optimizer in fp32 while compute and all-gathers run in bf16;
`reduce_dtype=float32` sums gradients in fp32 (exact across many ranks).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.models.activation_checkpointing import transformer_blocks

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(key: str, value: Any) -> torch.dtype | None:
    """YAML spelling of a dtype (null = leave as is)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if str(value) not in DTYPES:
        raise ConfigError(key, f"unknown dtype {value!r}", f"use one of {', '.join(sorted(DTYPES))} or null")
    return DTYPES[str(value)]


def apply_fsdp(
    model: nn.Module,
    mesh: Any,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
) -> int:
    """Shard `model` over the 1-D data-parallel `mesh`; returns the number of per-block FSDP units."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {"mesh": mesh}
    if param_dtype is not None or reduce_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    blocks = transformer_blocks(model)
    for index, block in enumerate(blocks):
        fully_shard(block, reshard_after_forward=reshard_after_forward and index < len(blocks) - 1, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    return len(blocks)
