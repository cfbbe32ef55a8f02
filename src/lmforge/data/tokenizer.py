"""Tokenizers via HF `tokenizers`: byte-level BPE trained on the train split, cached by content hash.

Byte-level BPE round-trips any UTF-8 text exactly and lets us count the bytes each token stands for, which
is what bits-per-byte needs (a metric comparable across tokenizers).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.errors import ConfigError, DataError
from lmforge.utils.io import atomic_write_text

DEFAULT_SPECIALS = {"eos": "<|eos|>", "bos": "<|bos|>", "pad": "<|pad|>"}


@cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte→printable-char table, inverted: each char of a byte-level token is one byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the special ids the rest of lmforge needs."""

    def __init__(self, hf: HFTokenizer, specials: dict[str, str] | None = None) -> None:
        self.hf = hf
        # raw text that happens to contain "<|eos|>" is text, not a document break (no injected specials);
        # special ids are only ever inserted by code (packing, chat templates)
        self.hf.encode_special_tokens = True
        self.specials = dict(specials or DEFAULT_SPECIALS)
        for role, token in self.specials.items():
            if hf.token_to_id(token) is None:
                raise DataError(f"tokenizer has no {role} token {token!r}. Fix: retrain it with that special token or set tokenizer.special_tokens.{role}.")

    # --- ids ---------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def special_id(self, role: str) -> int:
        if role not in self.specials:
            raise DataError(f"tokenizer has no special token for role {role!r} (it has {sorted(self.specials)}). Fix: add it with Tokenizer.add_special_tokens.")
        return self.hf.token_to_id(self.specials[role])

    def add_special_tokens(self, roles: dict[str, str]) -> list[str]:
        """Give roles (e.g. {"mask": "<|mask|>"}) to special tokens, appending those the vocab lacks.

        Objectives call this before the model is built (its vocab is the tokenizer's size), the way HF
        appends T5's sentinels: existing ids never move, so text tokenizes exactly as before.
        Returns the tokens that were new.
        """
        for role, token in roles.items():
            if self.specials.get(role, token) != token:
                raise DataError(f"special role {role!r} is already {self.specials[role]!r}, not {token!r}. Fix: use the tokenizer's token for it.")
        new = [t for t in dict.fromkeys(roles.values()) if self.hf.token_to_id(t) is None]
        if new:
            self.hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
        self.specials.update(roles)
        return new

    @property
    def eos_id(self) -> int:
        return self.special_id("eos")

    @property
    def bos_id(self) -> int:
        return self.special_id("bos")

    @property
    def pad_id(self) -> int:
        return self.special_id("pad")

    # --- text <-> ids ------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each id stands for (0 for special tokens): the denominator of bits-per-byte."""
        alphabet = _byte_level_alphabet()
        special = set(self.specials.values())
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token, idx in self.hf.get_vocab(with_added_tokens=True).items():
            if token in special:
                continue
            if all(ch in alphabet for ch in token):
                lengths[idx] = len(token)
            else:  # not byte-level (e.g. a WordPiece vocab): fall back to the decoded text
                lengths[idx] = len(self.hf.decode([idx]).encode("utf-8"))
        return lengths

    # --- persistence -------------------------------------------------------------------------------
    def to_json(self) -> str:
        """The full tokenizer (HF tokenizer.json) plus our special roles, as one string for checkpoints."""
        return json.dumps({"lmforge_specials": self.specials, "tokenizer": json.loads(self.hf.to_str())})

    @classmethod
    def from_json(cls, blob: str) -> Tokenizer:
        data = json.loads(blob)
        if "lmforge_specials" in data:
            return cls(HFTokenizer.from_str(json.dumps(data["tokenizer"])), data["lmforge_specials"])
        return cls(HFTokenizer.from_str(blob))

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer file {path} does not exist. Fix: train one (scripts/train_tokenizer.py) or fix the path.")
        return cls.from_json(path.read_text(encoding="utf-8"))

    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


class BPETokenizerSpec:
    """Settings of a byte-level BPE tokenizer, and training it on a corpus (cached by hash)."""

    def __init__(self, vocab_size: int = 4096, min_frequency: int = 2, special_tokens: dict[str, str] | None = None) -> None:
        if vocab_size < 256 + len(special_tokens or DEFAULT_SPECIALS):
            raise ConfigError("tokenizer.vocab_size", f"{vocab_size} is below the 256 byte tokens + specials", "set tokenizer.vocab_size>=512")
        if vocab_size > 2**32 - 1:
            raise ConfigError("tokenizer.vocab_size", f"{vocab_size} does not fit uint32 token storage", "use a smaller vocab")
        self.vocab_size = int(vocab_size)
        self.min_frequency = int(min_frequency)
        self.special_tokens = dict(special_tokens or DEFAULT_SPECIALS)

    def cache_key(self, corpus_fingerprint: str) -> str:
        spec = json.dumps({"kind": "bpe", "v": self.vocab_size, "mf": self.min_frequency, "sp": self.special_tokens, "c": corpus_fingerprint}, sort_keys=True)
        return hashlib.sha256(spec.encode()).hexdigest()[:16]

    def train(self, texts: Iterable[str]) -> Tokenizer:
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=self.vocab_size,
            min_frequency=self.min_frequency,
            special_tokens=list(self.special_tokens.values()),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return Tokenizer(hf, self.special_tokens)

    def load_or_train(self, texts: Sequence[str], corpus_fingerprint: str, cache_dir: str | Path) -> Tokenizer:
        """Reuse `<cache_dir>/tokenizers/<hash>/tokenizer.json` when corpus and settings are unchanged."""
        path = Path(cache_dir) / "tokenizers" / self.cache_key(corpus_fingerprint) / "tokenizer.json"
        if path.is_file():
            return Tokenizer.load(path)
        tok = self.train(texts)
        tok.save(path)
        return tok
