"""Token shards on disk: fixed-size uint16/uint32 memmaps, a document index and a manifest.

A split is tokenized once into a folder:

    manifest.json        format version, dtype, tokenizer + source hashes, token/doc counts, per-shard sha256
    00000.bin 00001.bin  raw token ids, `shard_tokens` each (the last one shorter); documents are joined by
                         EOS and may continue into the next shard, so a shard is a plain slice of the stream
    00000.idx ...        int64 end offsets (exclusive, within the shard) of the documents that end in it

The manifest is written last (atomically), so a folder without one is an interrupted build and is rebuilt.
A manifest whose tokenizer hash differs from the run's tokenizer is a stale cache: the automatic cache
(keyed by corpus + tokenizer hash) rebuilds it, an explicit `data.tokens_dir` is refused with the fix.

Tokenisation runs on `num_proc` processes (each with its own copy of the tokenizer); documents are sent in
~1 MB chunks and written back in order, so the result does not depend on `num_proc`. With num_proc=1 HF
tokenizers' own thread pool parallelises `encode_batch` inside the process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import DataError
from lmforge.utils.io import atomic_write_text

log = logging.getLogger("lmforge")

FORMAT = "lmforge-token-shards"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
DEFAULT_SHARD_TOKENS = 2**26  # 128 MB per uint16 shard
CHUNK_BYTES = 1 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


# --- encoding (also run inside worker processes) --------------------------------------------------------

_WORKER: dict[str, Any] = {}


def encode_texts(tokenizer: Any, texts: list[str], eos_id: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(flat ids with EOS after every document, per-document lengths incl. EOS)."""
    encoded = tokenizer.encode_batch(texts)
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    offset = 0
    for ids in encoded:
        flat[offset : offset + len(ids)] = ids
        offset += len(ids)
        flat[offset] = eos_id
        offset += 1
    return flat, lengths


def _init_worker(tokenizer_json: str, eos_id: int, dtype: str) -> None:
    from lmforge.data.tokenizer import Tokenizer

    _WORKER.update(tokenizer=Tokenizer.from_json(tokenizer_json), eos_id=eos_id, dtype=np.dtype(dtype))


def _encode_in_worker(chunk: tuple[list[str], int]) -> tuple[np.ndarray, np.ndarray, int]:
    texts, n_bytes = chunk
    flat, lengths = encode_texts(_WORKER["tokenizer"], texts, _WORKER["eos_id"], _WORKER["dtype"])
    return flat, lengths, n_bytes


@contextlib.contextmanager
def _worker_pool(num_proc: int, tokenizer: Any, dtype: np.dtype) -> Iterator[Any]:
    """Worker processes with their own tokenizer. Forked where possible (~50 ms, vs seconds to spawn), with HF
    tokenizers' thread pool off in the children (the processes are the parallelism; a fork after its threads
    ran would otherwise warn and could deadlock); the parent's setting is restored afterwards."""
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with mp.get_context(method).Pool(num_proc, initializer=_init_worker,
                                         initargs=(tokenizer.to_json(), tokenizer.eos_id, dtype.name)) as pool:
            yield pool
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def _chunks(texts: Iterable[str], chunk_bytes: int) -> Iterator[tuple[list[str], int]]:
    """Documents grouped into ~chunk_bytes of UTF-8 (a longer document is a chunk of its own)."""
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text.encode("utf-8"))
        if size >= chunk_bytes:
            yield batch, size
            batch, size = [], 0
    if batch:
        yield batch, size


# --- writing --------------------------------------------------------------------------------------------

@dataclass
class _Shard:
    path: Path
    n_tokens: int = 0
    doc_ends: list[int] | None = None

    def __post_init__(self) -> None:
        self.fh = self.path.open("wb")
        self.sha = hashlib.sha256()
        self.doc_ends = []

    def write(self, tokens: np.ndarray) -> None:
        data = tokens.tobytes()
        self.fh.write(data)
        self.sha.update(data)
        self.n_tokens += tokens.size

    def close(self) -> dict[str, Any]:
        self.fh.close()
        np.asarray(self.doc_ends, dtype=np.int64).tofile(self.path.with_suffix(".idx"))
        return {"file": self.path.name, "n_tokens": self.n_tokens, "n_docs": len(self.doc_ends), "sha256": self.sha.hexdigest()}


class ShardWriter:
    """Appends EOS-joined documents to fixed-size shards; `close()` writes the manifest."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int = DEFAULT_SHARD_TOKENS) -> None:
        if shard_tokens < 1:
            raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}. Fix: set shard_tokens to e.g. {DEFAULT_SHARD_TOKENS}")
        self.folder, self.dtype, self.shard_tokens = folder, np.dtype(dtype), int(shard_tokens)
        folder.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict[str, Any]] = []
        self.current: _Shard | None = None
        self.n_tokens = self.n_docs = 0

    def _shard(self) -> _Shard:
        if self.current is None or self.current.n_tokens >= self.shard_tokens:
            if self.current is not None:
                self.shards.append(self.current.close())
            self.current = _Shard(self.folder / f"{len(self.shards):05d}.bin")
        return self.current

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents (`flat` = their ids joined, EOS included; `lengths` = tokens per document)."""
        ends = iter(np.cumsum(lengths).tolist())
        next_end = next(ends, None)
        pos = 0
        while pos < flat.size:
            shard = self._shard()
            take = min(flat.size - pos, self.shard_tokens - shard.n_tokens)
            base = shard.n_tokens - pos  # shard offset of stream position `pos`
            shard.write(flat[pos : pos + take])
            pos += take
            while next_end is not None and next_end <= pos:
                shard.doc_ends.append(next_end + base)
                next_end = next(ends, None)
        self.n_tokens += int(flat.size)
        self.n_docs += int(lengths.size)

    def close(self, meta: dict[str, Any]) -> dict[str, Any]:
        if self.current is not None:
            self.shards.append(self.current.close())
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "dtype": self.dtype.name, "shard_tokens": self.shard_tokens,
                    "n_tokens": self.n_tokens, "n_docs": self.n_docs, **meta, "shards": self.shards}
        atomic_write_text(self.folder / MANIFEST, json.dumps(manifest, indent=1))
        return manifest


def write_shards(
    texts: Iterable[str],
    tokenizer: Any,
    folder: str | Path,
    *,
    source: str = "",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    num_proc: int = 1,
    progress: Any = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> dict[str, Any]:
    """Tokenize `texts` into shards under `folder` (built beside it, then moved in place). Returns the manifest.

    `progress(n_bytes)` is called after each chunk (rich progress bars in scripts/prepare_data.py).
    """
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    dtype = token_dtype(tokenizer.vocab_size)
    writer = ShardWriter(tmp, dtype, shard_tokens)
    t0, n_bytes = time.perf_counter(), 0
    chunks = _chunks(texts, chunk_bytes)
    try:
        if num_proc > 1:
            with _worker_pool(num_proc, tokenizer, dtype) as pool:
                for flat, lengths, size in pool.imap(_encode_in_worker, chunks):
                    writer.add(flat, lengths)
                    n_bytes += size
                    if progress is not None:
                        progress(size)
        else:
            for texts_chunk, size in chunks:
                writer.add(*encode_texts(tokenizer, texts_chunk, tokenizer.eos_id, dtype))
                n_bytes += size
                if progress is not None:
                    progress(size)
        seconds = time.perf_counter() - t0
        manifest = writer.close({
            "tokenizer": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
            "source": source, "n_bytes": n_bytes, "seconds": round(seconds, 3), "num_proc": num_proc,
        })
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    log.info("tokenized %s: %d docs, %.1f MB -> %d tokens in %d shard(s), %.1fs (%.1f MB/s)", folder, manifest["n_docs"],
             n_bytes / 1e6, manifest["n_tokens"], len(manifest["shards"]), seconds, n_bytes / 1e6 / max(seconds, 1e-9))
    return manifest


# --- reading --------------------------------------------------------------------------------------------

class ConcatTokens:
    """Several shard memmaps seen as one 1-D array (slicing only): what PackedBlocks reads blocks from."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts
        self.starts = np.cumsum([0] + [p.size for p in parts])
        self.size = int(self.starts[-1])
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(self.size)
        if step != 1:
            raise IndexError("ConcatTokens supports contiguous slices only")
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        out = []
        while start < stop:
            offset = start - int(self.starts[first])
            take = min(stop - start, self.parts[first].size - offset)
            out.append(self.parts[first][offset : offset + take])
            start += take
            first += 1
        if len(out) == 1:
            return out[0]
        return np.concatenate(out) if out else np.empty(0, dtype=self.dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = np.concatenate(self.parts) if self.parts else np.empty(0)
        return arr if dtype is None else arr.astype(dtype)


class TokenShards:
    """A split's shards opened read-only, checked against their manifest."""

    def __init__(self, folder: str | Path, tokenizer_fingerprint: str | None = None, verify_hashes: bool = False) -> None:
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        if manifest is None:
            raise DataError(f"{self.folder} holds no token shards ({MANIFEST} missing: never built or interrupted). "
                            "Fix: build it with scripts/prepare_data.py or point data.tokens_dir at a prepared folder")
        if tokenizer_fingerprint is not None and manifest["tokenizer"] != tokenizer_fingerprint:
            raise DataError(f"{self.folder} was tokenized with tokenizer {manifest['tokenizer']}, this run's tokenizer is "
                            f"{tokenizer_fingerprint}: its ids would mean other tokens. Fix: rebuild it with scripts/prepare_data.py "
                            f"and this tokenizer config, or load the tokenizer it was built with (tokenizer=pretrained "
                            f"tokenizer.path={self.folder.parent}/tokenizer.json)")
        self.manifest = manifest
        self.dtype = np.dtype(manifest["dtype"])
        self.parts: list[np.ndarray] = []
        for shard in manifest["shards"]:
            path = self.folder / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["n_tokens"] * self.dtype.itemsize:
                raise DataError(f"{path} is missing or truncated (manifest says {shard['n_tokens']} tokens). "
                                "Fix: delete the folder and rebuild it (scripts/prepare_data.py)")
            if verify_hashes and _sha256(path) != shard["sha256"]:
                raise DataError(f"{path} does not match its manifest hash (changed on disk). Fix: delete the folder and rebuild it")
            self.parts.append(np.memmap(path, dtype=self.dtype, mode="r", shape=(shard["n_tokens"],)))

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def tokens(self) -> np.ndarray | ConcatTokens:
        """The whole split as one stream: the memmap itself when there is one shard (the common, fastest case)."""
        return self.parts[0] if len(self.parts) == 1 else ConcatTokens(self.parts)

    def doc_ends(self) -> np.ndarray:
        """Global exclusive end offset of every document (its EOS is the token before)."""
        ends, base = [], 0
        for shard in self.manifest["shards"]:
            ends.append(np.fromfile(self.folder / Path(shard["file"]).with_suffix(".idx"), dtype=np.int64) + base)
            base += shard["n_tokens"]
        return np.concatenate(ends) if ends else np.empty(0, dtype=np.int64)

    def document(self, i: int) -> np.ndarray:
        """Token ids of document `i`, without its EOS."""
        ends = self.doc_ends()
        start = int(ends[i - 1]) if i > 0 else 0
        return np.asarray(self.tokens[start : int(ends[i]) - 1])


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        return None
    return manifest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def cache_folder(cache_dir: str | Path, source_fingerprint: str, tokenizer_fingerprint: str, split: str) -> Path:
    """`<cache_dir>/tokens/<hash of format, corpus, tokenizer>/<split>`: any change gets a fresh folder."""
    key = hashlib.sha256(f"{FORMAT_VERSION}|{source_fingerprint}|{tokenizer_fingerprint}".encode()).hexdigest()[:16]
    return Path(cache_dir) / "tokens" / key / split


def load_or_build(
    texts: Iterable[str] | None,
    tokenizer: Any,
    folder: Path,
    *,
    source: str,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    num_proc: int = 1,
    progress: Any = None,
) -> TokenShards:
    """Open the cached shards of a split, (re)building them when missing, interrupted or stale."""
    manifest = read_manifest(folder)
    if manifest is not None and manifest["tokenizer"] == tokenizer.fingerprint() and manifest.get("source") == source:
        try:
            return TokenShards(folder, tokenizer.fingerprint())
        except DataError as err:
            log.warning("rebuilding the token cache: %s", err)
    elif manifest is not None:
        log.warning("token cache %s is stale (other tokenizer or source): rebuilding", folder)
    if texts is None:
        raise DataError(f"{folder} has no usable token shards and no source to build them from")
    write_shards(texts, tokenizer, folder, source=source, shard_tokens=shard_tokens, num_proc=num_proc, progress=progress)
    return TokenShards(folder, tokenizer.fingerprint())


def tokenize_split(corpus: Any, tokenizer: Any, split: str, cache_dir: str | Path, **kwargs: Any) -> np.ndarray | ConcatTokens:
    """The token stream of one split of a corpus (documents joined by EOS), built once into the cache."""
    source = corpus.fingerprint()
    texts = (d.text for d in corpus.iter_documents(split))
    return load_or_build(texts, tokenizer, cache_folder(cache_dir, source, tokenizer.fingerprint(), split), source=source, **kwargs).tokens
