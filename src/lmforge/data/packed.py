"""Token streams on disk as np.memmap, cut into fixed-length blocks.

Each split is tokenized once into `<cache_dir>/tokens/<hash>/<split>.bin` (uint16 when the vocab fits,
else uint32), documents separated by EOS. The hash covers corpus, tokenizer and format, so a changed
corpus or tokenizer rebuilds the cache instead of silently reusing stale ids.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from lmforge.data.corpus import Corpus
from lmforge.data.tokenizer import Tokenizer
from lmforge.utils.io import atomic_write_bytes, atomic_write_text

IGNORE_INDEX = -100
FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokenize_split(corpus: Corpus, tokenizer: Tokenizer, split: str, cache_dir: str | Path) -> np.memmap:
    """Tokenize one split into a memmap (cached); returns it opened read-only."""
    key = hashlib.sha256(f"{FORMAT_VERSION}|{corpus.fingerprint()}|{tokenizer.fingerprint()}|{split}".encode()).hexdigest()[:16]
    folder = Path(cache_dir) / "tokens" / key
    path, meta_path = folder / f"{split}.bin", folder / f"{split}.json"
    dtype = token_dtype(tokenizer.vocab_size)
    if not (path.is_file() and meta_path.is_file()):
        docs = corpus.documents(split)
        ids = tokenizer.encode_batch([d.text for d in docs])
        flat = np.fromiter((t for doc in ids for t in (*doc, tokenizer.eos_id)), dtype=dtype)
        atomic_write_bytes(path, flat.tobytes())
        atomic_write_text(meta_path, json.dumps({"n_tokens": int(flat.size), "dtype": dtype.name, "n_docs": len(docs)}))
    meta = json.loads(meta_path.read_text())
    return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["n_tokens"],))


class PackedBlocks(Dataset):
    """Consecutive blocks of `block_size` inputs with next-token targets.

    Block i covers tokens [i·T, i·T + T]; its last target is the next block's first input, so every token
    after the first is predicted exactly once. With `include_tail`, the final partial block is padded and its
    padded targets set to IGNORE_INDEX: evaluation then covers the whole split.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, pad_id: int, include_tail: bool = False) -> None:
        if tokens.size < 2:
            raise ValueError("a split needs at least 2 tokens")
        self.tokens, self.block_size, self.pad_id = tokens, block_size, pad_id
        n_targets = tokens.size - 1
        self.n_blocks = -(-n_targets // block_size) if include_tail else n_targets // block_size
        if self.n_blocks == 0:
            raise ValueError(f"split has {tokens.size} tokens, fewer than one block of {block_size + 1}")

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = i * self.block_size
        chunk = torch.from_numpy(self.tokens[start : start + self.block_size + 1].astype(np.int64))
        inputs, targets = chunk[:-1], chunk[1:]
        short = self.block_size - inputs.numel()
        if short > 0:
            inputs = torch.cat([inputs, inputs.new_full((short,), self.pad_id)])
            targets = torch.cat([targets, targets.new_full((short,), IGNORE_INDEX)])
        return {"input_ids": inputs, "targets": targets}
