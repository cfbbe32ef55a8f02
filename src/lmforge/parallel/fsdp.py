"""FSDP2 (`fully_shard`) applied per transformer block and on the root, as torchtitan does.

Each block is one FSDP unit: its parameters are all-gathered just before its forward (and backward) and
freed after, so peak memory holds one block's full weights plus every block's 1/world shard. The last block
is not resharded after forward: the root's backward needs it straight away. `param_dtype=bfloat16` keeps
the sharded master weights and the optimizer in fp32 while compute and all-gathers run in bf16;
`reduce_dtype=float32` sums gradients in fp32 (exact across many ranks).

HSDP (`strategy.data_parallel_replicate_size` > 1) passes a 2-D (replicate, shard) mesh instead: parameters
are sharded inside each replica group (a node, on NVLink) and replicated across groups, so the per-block
all-gathers never leave the group and only gradients cross it (a reduce-scatter inside, an all-reduce across).
`hold_gradient_sync` is what gradient accumulation does between micro-batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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
    """Shard `model` over the data-parallel `mesh` (1-D: FSDP; 2-D (replicate, shard): HSDP); returns the
    number of per-block FSDP units."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {"mesh": mesh}
    if param_dtype is not None or reduce_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    if cpu_offload:
        # pinned host memory makes the copies to the GPU asynchronous; pinning needs an accelerator (a CPU mesh has none)
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=mesh.device_type != "cpu")
    blocks = transformer_blocks(model)
    for index, block in enumerate(blocks):
        fully_shard(block, reshard_after_forward=reshard_after_forward and index < len(blocks) - 1, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    return len(blocks)


def hybrid_shard_mesh(mesh: Any, replicate: int) -> Any:
    """The mesh `fully_shard` gets from Lightning's (data_parallel, tensor_parallel) `mesh`: its data-parallel
    dim, split into (replicate, shard) when `replicate` > 1 (HSDP). Rank r's replica group is r // shard, so with
    `replicate` = number of nodes each node is one group. Collective: every rank must call it."""
    if replicate == 1:
        return mesh["data_parallel"]
    dp = mesh["data_parallel"].size()
    return mesh._unflatten("data_parallel", (replicate, dp // replicate), ("dp_replicate", "dp_shard"))["dp_replicate", "dp_shard"]


# strategy.accumulation_sync: what a micro-batch that is not the last of an accumulated step communicates.
ACCUMULATION_SYNC = {
    "every_microbatch": None,  # reduce-scatter (and HSDP's all-reduce) each micro-batch: only sharded grads are kept
    "intra_replica": "set_requires_all_reduce",  # HSDP: reduce-scatter inside the replica group, all-reduce once at the end
    "last_microbatch": "set_requires_gradient_sync",  # nothing until the last: unsharded grads held (DDP-size grad memory)
}


def check_accumulation_sync(mode: str, replicate: int) -> None:
    if mode not in ACCUMULATION_SYNC:
        raise ConfigError("strategy.accumulation_sync", f"unknown mode {mode!r}", f"use one of {', '.join(ACCUMULATION_SYNC)}")
    if mode == "intra_replica" and replicate == 1:
        raise ConfigError("strategy.accumulation_sync", "intra_replica defers HSDP's all-reduce across replica groups, "
                          "but strategy.data_parallel_replicate_size is 1 (plain FSDP has none)",
                          "set strategy.data_parallel_replicate_size (e.g. to trainer.num_nodes), or use every_microbatch or last_microbatch")


def fsdp_units(module: nn.Module) -> list[nn.Module]:
    """The FSDP2 units (`fully_shard`-ed modules) under `module`, itself included; none where torch.distributed is absent."""
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextmanager
def hold_gradient_sync(module: nn.Module, mode: str) -> Iterator[None]:
    """Around the forward + backward of a micro-batch that is not the last of an accumulated step: defer the
    gradient communication `mode` names (see ACCUMULATION_SYNC) on every FSDP unit under `module`. FSDP keeps
    what it did not reduce and sends it with the last micro-batch's gradients, so the step's gradients do not change."""
    setter = ACCUMULATION_SYNC[mode]
    units = fsdp_units(module) if setter else []
    for unit in units:
        getattr(unit, setter)(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            getattr(unit, setter)(True, recurse=False)
