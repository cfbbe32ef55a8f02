"""Batch shapes for a model compiled for static shapes (tensor parallelism: DTensor's sharding propagation fails on
symbolic sizes, so stages compile with `dynamic=False` there).

Why it matters: each new batch length is then a recompile, and once dynamo has compiled `recompile_limit` (8)
variants of a function it runs every further shape eagerly, for the rest of the run. Padded post-training batches
(SFT, preference pairs, prompts) make nearly every batch a new length unless `data.pad_to_multiple_of` bounds them;
with it, the lengths are known and the limit is raised to fit them all.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger("lmforge")
# batch sizes a length can come with: the train batch, the validation batch and a last, short validation batch
BATCH_SIZES_PER_LENGTH = 3


def suggested_multiple(longest: int) -> int:
    """A `pad_to_multiple_of` giving at most 4 lengths: longest / 4 rounded up to a multiple of 8 (GPU tiles)."""
    quarter = -(-longest // 4)
    return max(8, -(-quarter // 8) * 8)


def fit_recompile_limit(datamodule: Any) -> dict[str, int] | None:
    """Warn when `datamodule`'s batches can take any length (naming the key and a value), or raise dynamo's recompile
    limit to the shapes its padded batches can take. Data without padded batches (packed pre-training blocks: one
    shape) is left alone. Returns what it set, for the log."""
    lengths = getattr(datamodule, "batch_lengths", None)
    if lengths is None:
        return None
    n = lengths()
    if n is None:
        log.warning(
            "compiled for static shapes under tensor parallelism, every new batch length is a recompile (and after "
            "dynamo's recompile limit of %d, eager): set data.pad_to_multiple_of=%d to bound the lengths",
            torch._dynamo.config.recompile_limit, suggested_multiple(datamodule.longest_batch()),
        )
        return None
    shapes = BATCH_SIZES_PER_LENGTH * n
    if shapes > torch._dynamo.config.recompile_limit:
        torch._dynamo.config.recompile_limit = shapes  # process-wide: only ever raised
    return {"batch_lengths": n, "recompile_limit": int(torch._dynamo.config.recompile_limit)}
