"""Duplicate removal: exact (hash of normalised text) and near-duplicate (MinHash LSH via `datasketch`).

Exact: two documents are the same when their texts match after NFKC, case folding and collapsing all
whitespace: a 16-byte BLAKE2b of that form is kept per document seen (~100 bytes of RAM each in a set).

Near: each document becomes a MinHash of its word n-gram shingles (`ngram` words, `num_perm`
permutations); datasketch's LSH index proposes candidates with estimated Jaccard similarity above
`threshold`, and a candidate counts only if the estimate computed from the two signatures confirms it (LSH
banding alone lets some false positives through). The first document of a near-duplicate cluster is kept.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np

_SPACE = re.compile(r"\s+")


def normalized_key(text: str) -> bytes:
    """The identity of a document for exact dedup: insensitive to case, Unicode form and whitespace."""
    norm = _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()
    return hashlib.blake2b(norm.encode("utf-8"), digest_size=16).digest()


class ExactDeduper:
    """Remembers normalised-text hashes; `seen(text)` is True for the second and later copies."""

    def __init__(self) -> None:
        self.keys: set[bytes] = set()

    def seen(self, text: str) -> bool:
        key = normalized_key(text)
        if key in self.keys:
            return True
        self.keys.add(key)
        return False


def _hash32(data: bytes) -> int:
    import xxhash

    return xxhash.xxh32_intdigest(data)


def shingles(text: str, ngram: int) -> list[bytes]:
    """Word n-grams of the case-folded text (a document shorter than `ngram` words is one shingle)."""
    words = text.casefold().split()
    if len(words) <= ngram:
        return [" ".join(words).encode("utf-8")]
    return [" ".join(words[i : i + ngram]).encode("utf-8") for i in range(len(words) - ngram + 1)]


class NearDeduper:
    """MinHash LSH over word shingles; `seen(text)` is True when a kept document is ~`threshold` similar."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seed: int = 1) -> None:
        from datasketch import MinHash, MinHashLSH

        if not 0.0 < threshold < 1.0:
            raise ValueError(f"near-dup threshold must be in (0, 1), got {threshold}")
        self.threshold, self.num_perm, self.ngram, self.seed = threshold, num_perm, ngram, seed
        self._minhash = MinHash
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.signatures: dict[str, np.ndarray] = {}

    def signature(self, text: str) -> object:
        mh = self._minhash(num_perm=self.num_perm, seed=self.seed, hashfunc=_hash32)
        mh.update_batch(shingles(text, self.ngram))
        return mh

    def seen(self, text: str) -> bool:
        mh = self.signature(text)
        for key in self.lsh.query(mh):
            if float(np.mean(self.signatures[key] == mh.hashvalues)) >= self.threshold:
                return True
        key = str(len(self.signatures))
        self.lsh.insert(key, mh)
        self.signatures[key] = mh.hashvalues
        return False
