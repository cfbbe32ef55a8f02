"""LightningDataModule: corpus (or mixture) → cleaning → token shards → packed blocks → resumable batches.

The tokenizer is trained on this module's (cleaned) corpus by `run.py` and handed back with `set_tokenizer`
before `prepare_data`; tokens are cached by hash of corpus, cleaning and tokenizer (`shards.py`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from lmforge.data.clean import CleanConfig, CleanedCorpus
from lmforge.data.corpus import Corpus
from lmforge.data.mixture import MixtureCorpus
from lmforge.data.packed import PackedBlocks, collate_document_blocks
from lmforge.data.sampler import ResumableLoader, ResumableSampler, pin_for
from lmforge.data.shards import DEFAULT_SHARD_TOKENS, TokenShards, cache_folder, load_or_build
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import ConfigError, DataError

log = logging.getLogger("lmforge")


def build_corpus(
    corpus: Corpus | None, mixture: Mapping[str, Any] | None, mixture_stopping: str, clean: Mapping[str, Any] | None, cache_dir: str | Path
) -> Corpus:
    """The corpus this module reads: one source or a weighted mixture, seen through the cleaner if configured."""
    if mixture:
        if corpus is not None:
            raise ConfigError("data.corpus", "is set together with data.mixture", "set data.corpus=null when mixing sources with data.mixture")
        corpus = MixtureCorpus(mixture, mixture_stopping)
    if corpus is None:
        raise ConfigError("data.corpus", "is not set", "choose a data config (data=shakespeare, data=text_files, data=hf_dataset) or set data.mixture")
    if clean:
        try:
            config = CleanConfig(**dict(clean))
        except TypeError as err:
            raise ConfigError("data.clean", str(err).replace("__init__() ", ""), f"use only the keys of {sorted(CleanConfig.__dataclass_fields__)}") from None
        cleaned = CleanedCorpus(corpus, config)
        cleaned.report_path = Path(cache_dir) / "clean" / cleaned.fingerprint() / "report.json"
        corpus = cleaned
    return corpus


class PackedTextDataModule(L.LightningDataModule):
    """Train on shuffled fixed-length blocks; validate on every block of the val split (tail included).

    The train order is `ResumableSampler`'s: deterministic per (seed, epoch), disjoint across data-parallel
    ranks, and checkpointed (exact mid-epoch resume). `document_mask` adds per-document positions and
    attention masks to every batch (clm only).
    """

    def __init__(
        self,
        corpus: Corpus | None = None,
        tokenizer: Tokenizer | None = None,
        block_size: int = 64,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        cache_dir: str | Path = ".cache/lmforge",
        seed: int | None = 0,
        shuffle: bool = True,
        document_mask: bool = False,
        clean: Mapping[str, Any] | None = None,
        mixture: Mapping[str, Any] | None = None,
        mixture_stopping: str = "first_exhausted",
        tokens_dir: str | None = None,
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        num_proc: int = 1,
    ) -> None:
        super().__init__()
        for key, value in (("block_size", block_size), ("batch_size", batch_size), ("num_proc", num_proc), ("shard_tokens", shard_tokens)):
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"data.{key}", f"must be a positive integer, got {value!r}", f"set data.{key}=<int > 0>")
        self.corpus = build_corpus(corpus, mixture, mixture_stopping, clean, cache_dir)
        self.tokenizer = tokenizer
        self.block_size, self.batch_size = block_size, batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.cache_dir = num_workers, cache_dir
        self.seed, self.shuffle, self.document_mask = int(seed or 0), shuffle, document_mask
        self.tokens_dir, self.shard_tokens, self.num_proc = tokens_dir, shard_tokens, num_proc
        self.train_set: PackedBlocks | None = None
        self.val_set: PackedBlocks | None = None
        self._shards: dict[str, TokenShards] = {}
        self._corpus_fp: str | None = None

    def set_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Called once the tokenizer is final (trained on `self.corpus`, objective specials added)."""
        self.tokenizer = tokenizer

    # --- tokens ----------------------------------------------------------------------------------------
    def _tok(self) -> Tokenizer:
        if self.tokenizer is None:
            raise RuntimeError("PackedTextDataModule needs a tokenizer: pass it or call set_tokenizer() first")
        return self.tokenizer

    def shards(self, split: str) -> TokenShards:
        """The split's token shards: `tokens_dir/<split>` if given, else the cache (built on first use)."""
        if split in self._shards:
            return self._shards[split]
        tok = self._tok()
        if self.tokens_dir:
            shards = TokenShards(Path(self.tokens_dir) / split, tok.fingerprint())
        else:
            if self._corpus_fp is None:
                self._corpus_fp = self.corpus.fingerprint()
            folder = cache_folder(self.cache_dir, self._corpus_fp, tok.fingerprint(), split)
            texts = (d.text for d in self.corpus.iter_documents(split))
            shards = load_or_build(texts, tok, folder, source=self._corpus_fp, shard_tokens=self.shard_tokens, num_proc=self.num_proc)
        self._shards[split] = shards
        return shards

    def prepare_data(self) -> None:
        """Rank 0 tokenizes once; other ranks then read the cached shards in `setup`."""
        for split in ("train", "val"):
            self.shards(split)

    def _blocks(self, split: str, include_tail: bool) -> PackedBlocks:
        shards = self.shards(split)
        tok = self._tok()
        try:
            return PackedBlocks(shards.tokens, self.block_size, tok.pad_id, include_tail=include_tail,
                                eos_id=tok.eos_id if self.document_mask else None)
        except ValueError:
            raise DataError(f"the {split} split has {shards.n_tokens} tokens ({shards.manifest['n_docs']} documents), fewer than "
                            f"one block of data.block_size+1={self.block_size + 1}. Fix: add data to the source, or lower data.block_size") from None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = self._blocks("train", include_tail=False)
        if self.val_set is None:
            self.val_set = self._blocks("val", include_tail=True)

    # --- loaders ---------------------------------------------------------------------------------------
    def _collate(self) -> Any:
        return collate_document_blocks if self.document_mask else None

    def data_fingerprint(self) -> str:
        """What the train order depends on besides seed: tokens (source + tokenizer) and block size."""
        m = self.shards("train").manifest
        return hashlib.sha256(f"{m['source']}|{m['tokenizer']}|{m['n_tokens']}|{self.block_size}".encode()).hexdigest()[:16]

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup('fit') first"
        trainer = getattr(self, "trainer", None)
        dist = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {}
        world, rank = int(dist.get("num_replicas", 1)), int(dist.get("rank", 0))
        per_rank = len(self.train_set) // world
        if per_rank < self.batch_size:
            raise DataError(f"the train split gives {len(self.train_set)} blocks of {self.block_size} tokens, {per_rank} per rank "
                            f"over {world} rank(s): fewer than one batch of data.batch_size={self.batch_size}. Fix: add data or lower "
                            "data.batch_size / data.block_size")
        sampler = ResumableSampler(len(self.train_set), seed=self.seed, shuffle=self.shuffle, rank=rank, world_size=world)
        return ResumableLoader(
            self.train_set, sampler, self.batch_size, fingerprint=self.data_fingerprint(), collate_fn=self._collate(),
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0, pin_memory=pin_for(trainer),
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return DataLoader(self.val_set, batch_size=self.val_batch_size, shuffle=False, num_workers=self.num_workers, collate_fn=self._collate())

    def ordered_dataloader(self, split: str, batch_size: int | None = None) -> DataLoader:
        """Every block of `split` once, in order, tail included (how validation reads val): `eval.py split=...`."""
        blocks = self.val_set if split == "val" and self.val_set is not None else self._blocks(split, include_tail=True)
        return DataLoader(blocks, batch_size=batch_size or self.val_batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=self._collate())
