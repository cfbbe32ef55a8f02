"""Tensor parallelism (Megatron-style) for the decoder families with separate Q/K/V projections.

Per block, on the tensor-parallel mesh: Q, K, V and the MLP's input projections are column-parallel (each
rank holds a slice of the heads / hidden units, so attention runs on local heads with no communication),
the attention output and the MLP's down projection are row-parallel (one all-reduce each in forward and in
backward). Embeddings, norms and the LM head stay replicated across the TP group (FSDP still shards them
over the data-parallel mesh). Mixtral's experts are split the same way, expert by expert; the router stays
replicated. GPT fuses Q, K and V in one matrix and BERT/T5 are encoders: they are refused with a clear
error rather than sharded wrongly.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lmforge.errors import ConfigError
from lmforge.models.activation_checkpointing import transformer_blocks


def _mlp_plan(mlp: nn.Module, prefix: str) -> dict[str, Any]:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")):  # SwiGLU
        return {f"{prefix}.gate_proj": ColwiseParallel(), f"{prefix}.up_proj": ColwiseParallel(), f"{prefix}.down_proj": RowwiseParallel()}
    experts = getattr(mlp, "experts", None)
    if isinstance(experts, nn.ModuleList):  # MoE: each expert is a SwiGLU
        plan: dict[str, Any] = {}
        for index, expert in enumerate(experts):
            plan.update(_mlp_plan(expert, f"{prefix}.experts.{index}"))
        return plan
    raise ConfigError("strategy.tensor_parallel_size", f"no tensor-parallel plan for the MLP {type(mlp).__name__}",
                      "use tensor_parallel_size=1 for this model")


def apply_tensor_parallel(model: nn.Module, tp_mesh: Any) -> int:
    """Shard every block of `model` over `tp_mesh` in place; returns the number of blocks sharded."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = tp_mesh.size()
    family = getattr(getattr(model, "config", None), "family", type(model).__name__)
    blocks = transformer_blocks(model)
    for block in blocks:
        attn = getattr(block, "attn", None)
        if attn is None or not all(hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise ConfigError(
                "strategy.tensor_parallel_size",
                f"tensor parallelism needs separate q/k/v projections (model.family=llama or mixtral); {family} has none",
                "use strategy=fsdp (tensor_parallel_size=1) for this family",
            )
        if attn.n_head % tp or attn.n_kv_head % tp:
            raise ConfigError(
                "strategy.tensor_parallel_size",
                f"{tp} does not divide n_head={attn.n_head} and n_kv_head={attn.n_kv_head}",
                "choose a tensor_parallel_size that divides the number of key/value heads",
            )
        plan = {"attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(), "attn.v_proj": ColwiseParallel(),
                "attn.o_proj": RowwiseParallel(), **_mlp_plan(block.mlp, "mlp")}
        parallelize_module(block, tp_mesh, plan)
        attn.n_head, attn.n_kv_head = attn.n_head // tp, attn.n_kv_head // tp  # this rank's heads
    return len(blocks)
