"""A token stream cut into fixed-length blocks, optionally with document-boundary masks.

Documents are joined by EOS in the stream (see `shards.py`). Without masks a block simply attends across
documents (GPT-2 style packing: cheap and what the default run is calibrated on). With `document_mask`,
every block also carries `position_ids` that restart at each document and a (1, T, T) boolean
`attention_mask` (True = may attend) that keeps attention causal *and* inside one document.

Convention: an EOS token opens the next document's segment (it plays the role of a BOS). So the last
token of a document predicts EOS from its own document, and EOS predicts the next document's first token
from nothing but itself: no target is ever predicted from another document's tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from lmforge.data.shards import token_dtype, tokenize_split

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "PackedBlocks", "collate_document_blocks", "document_positions", "token_dtype", "tokenize_split"]


def document_positions(inputs: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(segment id, position in segment) of each input token; a segment starts at the block and at each EOS."""
    t = np.arange(inputs.size)
    is_start = inputs == eos_id
    segment = np.cumsum(is_start)
    last_start = np.maximum.accumulate(np.where(is_start, t, 0))
    return segment, t - last_start


def collate_document_blocks(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack blocks and turn their segment ids into a (B, 1, T, T) causal, same-document attention mask."""
    batch = default_collate(items)
    segment = batch.pop("segment_ids")
    T = segment.size(1)
    causal = torch.ones(T, T, dtype=torch.bool).tril_()
    batch["attention_mask"] = ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]
    return batch


class PackedBlocks(Dataset):
    """Consecutive blocks of `block_size` inputs with next-token targets.

    Block i covers tokens [i·T, i·T + T]; its last target is the next block's first input, so every token
    after the first is predicted exactly once. With `include_tail`, the final partial block is padded and its
    padded targets set to IGNORE_INDEX: evaluation then covers the whole split. With `eos_id` given (document
    masks), items also hold `position_ids` and `segment_ids`; batch them with `collate_document_blocks`.
    """

    def __init__(self, tokens: Any, block_size: int, pad_id: int, include_tail: bool = False, eos_id: int | None = None) -> None:
        if tokens.size < 2:
            raise ValueError("a split needs at least 2 tokens")
        self.tokens, self.block_size, self.pad_id, self.eos_id = tokens, block_size, pad_id, eos_id
        n_targets = tokens.size - 1
        self.n_blocks = -(-n_targets // block_size) if include_tail else n_targets // block_size
        if self.n_blocks == 0:
            raise ValueError(f"split has {tokens.size} tokens, fewer than one block of {block_size + 1}")

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = i * self.block_size
        raw = self.tokens[start : start + self.block_size + 1].astype(np.int64)
        chunk = torch.from_numpy(raw)
        inputs, targets = chunk[:-1], chunk[1:]
        short = self.block_size - inputs.numel()
        if short > 0:
            inputs = torch.cat([inputs, inputs.new_full((short,), self.pad_id)])
            targets = torch.cat([targets, targets.new_full((short,), IGNORE_INDEX)])
        item = {"input_ids": inputs, "targets": targets}
        if self.eos_id is not None:
            segment, position = document_positions(inputs.numpy(), self.eos_id)
            item["position_ids"] = torch.from_numpy(position)
            item["segment_ids"] = torch.from_numpy(segment)
        return item
