"""PEFT weights under tensor parallelism: LoRA, bottleneck adapters and prefixes split with the model they adapt.

Why: the TP plan shards the base Linears, but a PEFT method adds weights around them whose inputs or outputs are
then sharded too. Left alone they either crash (torch's `ColwiseParallel` only knows `nn.Linear`, not peft's
LoRA wrapper) or compute the wrong gradient (a replicated weight that sees only this rank's part of the data).

LoRA, y = W x + s · B A x, on a
  * column-parallel W (output features split): B is split the same way (`ColwiseParallel`), A stays whole on
    every rank. B's input gradient is all-reduced as W's is, so A's gradient is the full one on every rank.
  * row-parallel W (input features split): A is split on its input features like W (`RowwiseParallel`: its
    r-wide output is all-reduced, B·T·r numbers, or reduce-scattered to sequence shards under sequence
    parallelism), B stays whole. Under sequence parallelism B sees this rank's rows only, so it becomes a
    replicated DTensor (`SequenceParallel`) whose gradient is summed over the TP ranks, as a norm's is.
  * GPT's fused q|k|v W (split by head, `head_parallel.py`): B is split by head the same way.
Bottleneck adapters after a block's attention / MLP see that sublayer's output: whole rows (plain replicated
weights) or, under sequence parallelism, this rank's rows (`SequenceParallel`, as above). Adapters elsewhere
would see a column shard of a Linear's output and are refused. Prefixes: each rank prepends its heads' slice of
the prefix keys/values, and their gradients are all-reduced over TP (each rank's covers its heads only).

Every weight keeps its name and full shape, so the adapter file, sharded checkpoints and merging see the
single-device layout. LoRA dropout: every TP rank has the same seed and makes the same calls, so a whole input gets
the same mask on every rank (A stays the same everywhere); the input shards of a row-parallel projection each get
that one mask pattern, a different draw from a single device's (as under data parallelism, masks depend on the split).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.peft.lora import lora_adapter_names

SUBLAYERS = ("attn", "mlp")  # a block's sublayers whose outputs are whole-width (or sequence-sharded) rows


def base_linear(module: nn.Module) -> nn.Module:
    """The Linear a LoRA layer wraps, or the module itself."""
    return module.base_layer if lora_adapter_names(module) else module


def with_lora(block: nn.Module, plan: dict[str, Any]) -> dict[str, Any]:
    """`plan` (module path -> style) with each LoRA-wrapped Linear's entry split into its base Linear's and its
    A / B matrices' (see the module doc)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    expanded: dict[str, Any] = {}
    for path, style in plan.items():
        adapters = lora_adapter_names(block.get_submodule(path)) if isinstance(style, ColwiseParallel | RowwiseParallel) else []
        if not adapters:
            expanded[path] = style
            continue
        expanded[f"{path}.base_layer"] = style
        for name in adapters:
            if isinstance(style, ColwiseParallel):
                expanded[f"{path}.lora_B.{name}"] = ColwiseParallel()
                continue
            (layout,) = style.output_layouts  # Replicate, or Shard(1) under sequence parallelism
            expanded[f"{path}.lora_A.{name}"] = RowwiseParallel(output_layouts=layout)
            if isinstance(layout, Shard):
                expanded[f"{path}.lora_B.{name}"] = SequenceParallel(sequence_dim=layout.dim, use_local_output=True)
    return expanded


def check_adapters(model: nn.Module, blocks: list[nn.Module]) -> None:
    """ConfigError for a bottleneck adapter anywhere but after a block's attention or MLP (it would see a column
    or vocabulary shard), raised before anything is sharded."""
    from lmforge.peft.adapter import BottleneckAdapter

    allowed = {id(getattr(getattr(block, sub, None), "adapter", None)) for block in blocks for sub in SUBLAYERS}
    for name, module in model.named_modules():
        if isinstance(module, BottleneckAdapter) and id(module) not in allowed:
            raise ConfigError("peft.targets", f"the bottleneck adapter {name} would see a tensor-parallel shard of its "
                              "module's output", "under tensor parallelism put adapters after the blocks' sublayers: "
                              "peft.targets=[attention, mlp]")


def adapter_plan(block: nn.Module, sequence_parallel: bool) -> dict[str, Any]:
    """Styles for the bottleneck adapters after `block`'s sublayers (`check_adapters` has vetted them): under
    sequence parallelism a dense sublayer hands its adapter this rank's rows."""
    from torch.distributed.tensor.parallel import SequenceParallel

    from lmforge.peft.adapter import BottleneckAdapter

    plan: dict[str, Any] = {}
    if not sequence_parallel:  # whole rows: plain replicated adapters compute the right gradients
        return plan
    for sub in SUBLAYERS:
        sublayer = getattr(block, sub, None)
        # a mixture of experts hands back whole rows: they are cut into this rank's by a hook that runs after the adapter's
        experts = isinstance(getattr(sublayer, "experts", None), nn.ModuleList)
        if isinstance(getattr(sublayer, "adapter", None), BottleneckAdapter) and not experts:
            for linear in ("down", "up"):  # SequenceParallel replicates a leaf module's own parameters
                plan[f"{sub}.adapter.{linear}"] = SequenceParallel(use_local_output=True)
    return plan


def shard_lora_by_head(module: nn.Module, tp_mesh: Any) -> None:
    """GPT's fused qkv under TP, LoRA-wrapped or not: the base Linear and every LoRA B split by head."""
    from lmforge.parallel.head_parallel import shard_by_head

    shard_by_head(base_linear(module), tp_mesh)
    for name in lora_adapter_names(module):
        shard_by_head(module.lora_B[name], tp_mesh)


def this_rank_heads(t: torch.Tensor, tp_mesh: Any, dim: int = 0) -> torch.Tensor:
    """This rank's slice of a tensor every TP rank computed whole (heads on `dim`); in backward the ranks'
    gradients, each covering its own slice, are all-reduced into the whole tensor's."""
    from lmforge.parallel.head_parallel import grad_all_reduced

    return grad_all_reduced(t, tp_mesh).chunk(tp_mesh.size(), dim=dim)[tp_mesh.get_local_rank()]


def shard_prefix(model: nn.Module, tp_mesh: Any) -> None:
    """A prefix encoder (not in any block plan) computes this rank's heads only."""
    from lmforge.peft.prefix import prefix_encoder

    encoder = prefix_encoder(model)
    if encoder is not None:  # its kv heads are the attention's, which the plans checked divide over the TP ranks
        encoder.tp_mesh = tp_mesh
