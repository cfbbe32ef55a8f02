"""LightningDataModule: packed blocks of a tokenized corpus. The tokenizer is built before and passed in."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from lmforge.data.corpus import Corpus
from lmforge.data.packed import PackedBlocks, tokenize_split
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import ConfigError


class PackedTextDataModule(L.LightningDataModule):
    """Train on shuffled fixed-length blocks; validate on every block of the val split (tail included)."""

    def __init__(
        self,
        corpus: Corpus,
        tokenizer: Tokenizer,
        block_size: int = 64,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        cache_dir: str | Path = ".cache/lmforge",
    ) -> None:
        super().__init__()
        for key, value in (("block_size", block_size), ("batch_size", batch_size)):
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"data.{key}", f"must be a positive integer, got {value!r}", f"set data.{key}=<int > 0>")
        self.corpus, self.tokenizer = corpus, tokenizer
        self.block_size, self.batch_size = block_size, batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.cache_dir = num_workers, cache_dir
        self.train_set: PackedBlocks | None = None
        self.val_set: PackedBlocks | None = None

    def prepare_data(self) -> None:
        """Rank 0 tokenizes once; other ranks then read the cached memmaps in `setup`."""
        for split in ("train", "val"):
            tokenize_split(self.corpus, self.tokenizer, split, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        pad = self.tokenizer.pad_id
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = PackedBlocks(tokenize_split(self.corpus, self.tokenizer, "train", self.cache_dir), self.block_size, pad)
        if self.val_set is None:
            val = tokenize_split(self.corpus, self.tokenizer, "val", self.cache_dir)
            self.val_set = PackedBlocks(val, self.block_size, pad, include_tail=True)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0, pin_memory=False,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.val_batch_size, shuffle=False, num_workers=self.num_workers)
