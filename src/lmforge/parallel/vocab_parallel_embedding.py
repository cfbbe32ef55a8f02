"""A row-parallel (vocab-parallel) token embedding written with plain tensor ops and one DTensor redistribution.

Why not torch's `RowwiseParallel` on the `nn.Embedding`: its lookup returns a `MaskPartial` DTensor whose mask is
kept on the placement object between the lookup and the reduction. A whole-model `torch.compile` traces that
tensor under one fake mode and reads it back under another (torch 2.13: "Mixing fake modes NYI"), so a
tensor-parallel model could only be compiled block by block. Here the mask is an ordinary tensor of the
forward: rank r looks up the ids in its rows [start, start + rows), zeroes the others, and the partial sums are
all-reduced (or reduce-scattered to this rank's sequence rows under sequence parallelism). Same weights, same
placement (`Shard(0)`) and state-dict layout as before, so checkpoints and the tied LM head are unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def row_block(weight: Any) -> tuple[int, int]:
    """(first row, rows per rank) of this rank's block of a DTensor sharded by rows over a 1-D mesh: torch.chunk's
    split, which `Shard(0)` uses (ceil(V / n) rows per rank, the last ones fewer, possibly none)."""
    mesh, rows = weight.device_mesh, weight.shape[0]
    per_rank = -(-rows // mesh.size())
    return min(mesh.get_local_rank() * per_rank, rows), per_rank


class VocabParallelEmbedding(nn.Embedding):
    """What `parallel.tensor_parallel.shard_embedding` turns a model's `nn.Embedding` into, in place (it sets
    `tp_mesh`, `sequence_parallel` and shards `weight` on dim 0)."""

    tp_mesh: Any
    sequence_parallel: bool

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

        local = self.weight.to_local()  # this rank's vocabulary rows
        start, _ = row_block(self.weight)
        outside = (input_ids < start) | (input_ids >= start + local.shape[0])
        pad = self.padding_idx  # global row -> this rank's row (None where another rank holds it)
        pad = pad - start if pad is not None and start <= pad < start + local.shape[0] else None
        rows = F.embedding((input_ids - start).masked_fill(outside, 0), local, pad)
        partial = DTensor.from_local(rows.masked_fill(outside.unsqueeze(-1), 0.0), self.tp_mesh, [Partial()], run_check=False)
        return partial.redistribute(placements=[Shard(1) if self.sequence_parallel else Replicate()]).to_local()
