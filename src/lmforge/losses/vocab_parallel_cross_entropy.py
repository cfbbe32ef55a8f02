"""Cross-entropy over vocab-sharded logits (tensor parallelism's loss parallelism), without gathering them.

Why: under `strategy=fsdp_tp` the LM head is column-parallel over the vocabulary, so each TP rank computes
and holds only its V/tp slice of the logits (for a 128K vocabulary the head is the largest GEMM of a 1B
model and the logits its largest activation). Gathering them to compute the loss would undo both savings.
The decoders' own loss never builds those logits (`linear_cross_entropy.py` runs its chunks on the head's
shard); this module is for logits that already exist vocab-sharded (a head that path cannot fuse) and for
gathering them where whole logits are wanted. torch's `loss_parallel()` computes log-softmax and NLL on the shards with three small all-reduces per call
(max, sum of exponentials, target logit), but its context has to be active in backward as well, which
Lightning's `loss.backward()` knows nothing about. `_VocabParallelCrossEntropy` scopes it: forward builds
the loss graph on a detached leaf inside the context, backward replays that graph inside the context again
and hands the shard gradient on, so the loss is an ordinary autograd node to every caller.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def is_vocab_sharded(logits: torch.Tensor) -> bool:
    """True for a DTensor whose last (vocabulary) dimension is sharded, as the vocab-parallel head returns."""
    if type(logits) is torch.Tensor or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(logits, DTensor):
        return False
    last = logits.ndim - 1
    return any(isinstance(p, Shard) and p.dim in (-1, last) for p in logits.placements)


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """Whole logits as a plain tensor (all-gather over the TP group where vocab-sharded; a no-op otherwise).

    For callers that read logits (sampling, DPO/RL log-probs, metrics): differentiable, so gradients flow back
    to the shards."""
    return logits.full_tensor() if is_vocab_sharded(logits) else logits


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        from torch.distributed.tensor.parallel import loss_parallel

        leaf = logits.detach().requires_grad_(logits.requires_grad)
        with torch.enable_grad(), loss_parallel():
            loss = F.cross_entropy(leaf.float(), targets, ignore_index=ignore_index, reduction="sum")
        ctx.leaf, ctx.loss = leaf, loss  # the inner graph, replayed once in backward
        return loss.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        from torch.distributed.tensor.parallel import loss_parallel

        leaf, loss = ctx.leaf, ctx.loss
        del ctx.leaf, ctx.loss  # free the shards' log-softmax as soon as it has been used
        if not leaf.requires_grad:
            return None, None, None
        with loss_parallel():
            torch.autograd.backward(loss, grad)
        return leaf.grad, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Summed fp32 cross-entropy of `targets` (N,) under vocab-sharded `logits` (N, V), as a plain scalar that
    every TP rank holds; equal to `F.cross_entropy(full_logits, targets, reduction="sum")`."""
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"vocab_parallel_cross_entropy wants logits (N, V) and targets (N,), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    return _VocabParallelCrossEntropy.apply(logits, targets, ignore_index).to_local()
