"""Hugging Face `datasets` as a corpus: a local directory (files or `save_to_disk`) or a Hub dataset, streamed or not.

With `streaming=true` nothing is downloaded or converted up front: documents are read lazily, so a corpus
larger than RAM (or disk) flows through cleaning and tokenisation into token shards. Without a validation
split, every `val_every`-th document of the train split is held out (and left out of train).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.data.corpus import SPLITS, Corpus, Document
from lmforge.errors import ConfigError, DataError


def _local_stats(path: str, data_files: Any) -> list[Any]:
    """(file, size, mtime) of the local files behind the dataset: a changed file changes the fingerprint."""
    roots = [path] if os.path.exists(path) else []
    if isinstance(data_files, str):
        roots.append(data_files)
    elif isinstance(data_files, (list, tuple)):
        roots += [f for f in data_files if isinstance(f, str)]
    elif isinstance(data_files, dict):
        for v in data_files.values():
            roots += [v] if isinstance(v, str) else list(v)
    stats = []
    for root in roots:
        files = sorted(Path(root).rglob("*")) if Path(root).is_dir() else [Path(p) for p in sorted(glob.glob(root))]
        for f in files:
            if f.is_file():
                st = f.stat()
                stats.append([str(f), st.st_size, st.st_mtime_ns])
    return stats


class HFDatasetCorpus(Corpus):
    """Documents from the `text_field` column of a `datasets` dataset; `split` names map onto train/val."""

    def __init__(
        self,
        path: str,
        name: str | None = None,
        data_files: Any = None,
        data_dir: str | None = None,
        text_field: str = "text",
        train_split: str = "train",
        val_split: str | None = "validation",
        val_every: int = 100,
        streaming: bool = False,
        max_documents: int | None = None,
        revision: str | None = None,
        cache_dir: str | None = None,
    ) -> None:
        if not path:
            raise ConfigError("data.corpus.path", "is empty", "set data.corpus.path to a local dataset dir or a Hub dataset name")
        if val_every < 2:
            raise ConfigError("data.corpus.val_every", f"must be >= 2, got {val_every}", "set data.corpus.val_every=100 or give data.corpus.val_split")
        self.path, self.name, self.data_files, self.data_dir = path, name, data_files, data_dir
        self.text_field, self.train_split, self.val_split, self.val_every = text_field, train_split, val_split, val_every
        self.streaming, self.max_documents, self.revision, self.cache_dir = streaming, max_documents, revision, cache_dir
        self._loaded: dict[str, Any] = {}
        self._has_val = val_split is not None and self._load(val_split, required=False) is not None
        self._load(train_split, required=True)

    # --- loading -----------------------------------------------------------------------------------
    def _saved_to_disk(self) -> bool:
        p = Path(self.path)
        return p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file())

    def _load(self, split: str, required: bool) -> Any:
        if split in self._loaded:
            return self._loaded[split]
        import datasets

        try:
            if self._saved_to_disk():
                loaded = datasets.load_from_disk(self.path)
                if isinstance(loaded, datasets.DatasetDict):
                    if split not in loaded:
                        raise ValueError(f"Unknown split {split!r}; available: {list(loaded)}")
                    loaded = loaded[split]
                elif split != self.train_split:
                    raise ValueError(f"Unknown split {split!r}: the saved dataset has a single split")
                ds = loaded.to_iterable_dataset() if self.streaming else loaded
            else:
                ds = datasets.load_dataset(
                    self.path, self.name, data_dir=self.data_dir, data_files=self.data_files, split=split,
                    streaming=self.streaming, revision=self.revision, cache_dir=self.cache_dir,
                )
        except (ValueError, KeyError) as err:
            if not required and ("split" in str(err).lower()):
                return None
            raise DataError(f"data.corpus: cannot load split {split!r} of dataset {self.path!r} ({err}). "
                            "Fix: set data.corpus.train_split/val_split to existing splits") from None
        except OSError as err:  # FileNotFoundError / DatasetNotFoundError, or ConnectionError when offline
            raise DataError(f"data.corpus.path={self.path!r}: no such local dataset and not reachable on the Hub ({err}). "
                            "Fix: point data.corpus.path at a dataset dir, or go online / pre-download it") from None
        self._loaded[split] = ds
        return ds

    # --- documents ---------------------------------------------------------------------------------
    def _texts(self, split: str) -> Iterator[str]:
        ds = self._load(split, required=True)
        for batch in ds.iter(batch_size=1024):
            if self.text_field not in batch:
                raise DataError(f"dataset {self.path!r} split {split!r} has no column {self.text_field!r} (columns: "
                                f"{sorted(batch)}). Fix: set data.corpus.text_field to the text column")
            for value in batch[self.text_field]:
                if not isinstance(value, str):
                    raise DataError(f"dataset {self.path!r} column {self.text_field!r} holds {type(value).__name__}, not text. "
                                    "Fix: set data.corpus.text_field to a string column")
                yield value

    def iter_documents(self, split: str) -> Iterator[Document]:
        if split not in SPLITS:
            raise ConfigError("split", f"unknown split {split!r}", f"use one of {SPLITS}")
        if self._has_val:
            source = self.val_split if split == "val" else self.train_split
            selected: Iterator[tuple[int, str]] = enumerate(self._texts(source))  # type: ignore[arg-type]
        else:  # hold out every val_every-th train document
            held = split == "val"
            selected = ((i, t) for i, t in enumerate(self._texts(self.train_split)) if ((i + 1) % self.val_every == 0) == held)
        for n, (i, text) in enumerate(selected):
            if self.max_documents is not None and n >= self.max_documents:
                return
            yield Document(f"{self.path}:{split}#{i}", text)

    def documents(self, split: str) -> list[Document]:
        return list(self.iter_documents(split))

    def fingerprint(self) -> str:
        """From the settings and the local files' sizes and mtimes (a Hub dataset: pin `revision`)."""
        spec = {"path": self.path, "name": self.name, "data_files": self.data_files, "data_dir": self.data_dir,
                "field": self.text_field, "splits": [self.train_split, self.val_split if self._has_val else None],
                "val_every": self.val_every, "max": self.max_documents, "rev": self.revision,
                "files": _local_stats(self.path, self.data_files)}
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
