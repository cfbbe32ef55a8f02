"""GPT's fused q|k|v projection under tensor parallelism, split by attention head.

The fused weight stacks three parts, q | k | v, each ordered head by head: (3·C, C). Plain column
parallelism would give rank 0 the first 3C/tp rows, which for tp=2 are all of q and half of k, not whole
heads. Attention needs each rank to hold the q, k and v rows of the same heads.

The weight (and bias) is stored like any column-parallel weight: a DTensor `Shard(0)` over the TP mesh. So
FSDP2 on top, the sharded checkpoints (DCP), consolidation, HF export and resuming at another TP size all
see the unchanged (3·C, C) layout. Each forward all-gathers it over TP and keeps this rank's heads' rows
of every part. The gradient goes back as a reduce-scatter: each rank's partial gradient covers only its own
heads' rows.

Cost per block and step: an all-gather of 3C² (tp−1)/tp weights and a reduce-scatter of their gradient.
The alternative, moving the projection's outputs between ranks, costs 3C (tp−1)/tp per token, so it is
dearer whenever a micro-batch holds more than C tokens, which is every training shape.
Megatron and litgpt avoid both costs by interleaving the fused rows per head, which would change
the checkpoint layout.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmforge.kernels.linear import Linear, linear


def grad_all_reduced(t: torch.Tensor, tp_mesh: Any) -> torch.Tensor:
    """`t` itself in forward; in backward the TP ranks' gradients of it are summed (all-reduce). For a tensor every
    rank holds whole but computes only its part from: each rank's gradient covers that part only."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    return DTensor.from_local(t, tp_mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


def _this_rank_rows(param: Any, parts: int) -> torch.Tensor:
    """The rows of this rank's heads in each of the `parts` stacked parts of a TP-sharded (Shard(0)) `param`,
    as a plain tensor; autograd sums the per-rank partial gradients back into the shards (reduce-scatter)."""
    from torch.distributed.tensor import Partial, Replicate

    mesh = param.device_mesh
    whole = param.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])
    return whole.unflatten(0, (parts, mesh.size(), -1))[:, mesh.get_local_rank()].flatten(0, 1)


class HeadParallelLinear(Linear):
    """A fused projection of `parts` stacked per-head parts whose parameters are TP-sharded `Shard(0)`
    DTensors; its forward computes only this rank's heads' output columns: (…, parts · out / tp)."""

    parts: int = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x is the same on every rank, but each rank's gradient of it covers only its own heads: they are summed
        # (all-reduce) in backward, as a column-parallel input's are
        x = grad_all_reduced(x, self.weight.device_mesh)
        bias = None if self.bias is None else _this_rank_rows(self.bias, self.parts)
        return linear(x, _this_rank_rows(self.weight, self.parts), bias)


def shard_by_head(module: nn.Linear, tp_mesh: Any, parts: int = 3) -> None:
    """Turn a plain fused Linear (q | k | v stacked on its output dim) into a `HeadParallelLinear` over
    `tp_mesh`, in place: its parameters become `Shard(0)` DTensors and keep their names (and so their
    state-dict keys). Works on meta tensors too (meta-device initialisation)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    out = module.weight.shape[0]
    if out % (parts * tp_mesh.size()):
        raise ValueError(f"{out} fused output rows do not split into {parts} parts over {tp_mesh.size()} ranks")
    for name, param in list(module.named_parameters(recurse=False)):
        module.register_parameter(name, nn.Parameter(distribute_tensor(param, tp_mesh, [Shard(0)]),
                                                     requires_grad=param.requires_grad))
    module.__class__ = HeadParallelLinear  # the same module (hooks, names), computing only this rank's heads
    module.parts = parts
