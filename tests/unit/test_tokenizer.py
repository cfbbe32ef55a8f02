"""Byte-level BPE: exact round trips, byte counts for bits-per-byte, persistence and the training cache."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest

from lmforge.data.corpus import ShakespeareCorpus
from lmforge.data.tokenizer import DEFAULT_SPECIALS, BPETokenizerSpec, Tokenizer
from lmforge.errors import ConfigError

VOCAB = 512

TRICKY = [
    "",
    " ",
    "  leading and trailing  ",
    "\t\ttabs\n\n\r\nCRLF\r",
    "café naïve é e\u0301 (combining)",
    "日本語のテキスト",
    "👍🏽 🇯🇵 👨\u200d👩\u200d👧",
    "\x00\x01\x7f control",
    "\u200b\ufeff\u00a0nbsp",
    "Ω≈ç√∫ ∑ 𝔘𝔫𝔦",
    "O Romeo, Romeo! wherefore art thou Romeo?\n",
]

UNICODE = "é 日本 🙂 naïve — “quotes”"


@pytest.fixture(scope="module")
def corpus() -> ShakespeareCorpus:
    return ShakespeareCorpus()


@pytest.fixture(scope="module")
def train_texts(corpus: ShakespeareCorpus) -> list[str]:
    return [d.text for d in corpus.documents("train")[:3]]


@pytest.fixture(scope="module")
def tok(train_texts: list[str]) -> Tokenizer:
    return BPETokenizerSpec(vocab_size=VOCAB).train(train_texts)


@pytest.fixture(scope="module")
def val_text(corpus: ShakespeareCorpus) -> str:
    docs = corpus.documents("val")
    assert len(docs) == 2
    return "".join(d.text for d in docs)


def test_vocab_size_is_what_was_asked(tok: Tokenizer) -> None:
    assert tok.vocab_size == VOCAB
    assert tok.token_byte_lengths().shape == (VOCAB,)


def test_roundtrip_full_val_text(tok: Tokenizer, val_text: str) -> None:
    ids = tok.encode(val_text)
    assert len(ids) < len(val_text.encode("utf-8"))  # BPE merges actually compress
    assert tok.decode(ids) == val_text


@pytest.mark.parametrize("text", TRICKY)
def test_roundtrip_tricky_strings(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_encode_batch_matches_encode(tok: Tokenizer) -> None:
    assert tok.encode_batch(TRICKY) == [tok.encode(t) for t in TRICKY]


def test_token_bytes_sum_to_utf8_length_of_val_text(tok: Tokenizer, val_text: str) -> None:
    lengths = tok.token_byte_lengths()
    ids = np.asarray(tok.encode(val_text))
    assert int(lengths[ids].sum()) == len(val_text.encode("utf-8"))


@pytest.mark.parametrize("text", [UNICODE, *TRICKY])
def test_token_bytes_sum_to_utf8_length_unicode(tok: Tokenizer, text: str) -> None:
    lengths = tok.token_byte_lengths()
    ids = np.asarray(tok.encode(text), dtype=np.int64)
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))


def test_token_bytes_match_gpt2_byte_table(tok: Tokenizer, val_text: str) -> None:
    """Independent reference: GPT-2's byte<->char table from transformers maps each token to its raw bytes."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    char_to_byte = {c: b for b, c in bytes_to_unicode().items()}
    special = {tok.eos_id, tok.bos_id, tok.pad_id}
    raw = {i: bytes(char_to_byte[ch] for ch in t) for t, i in tok.hf.get_vocab().items() if i not in special}
    lengths = tok.token_byte_lengths()
    assert {i: int(lengths[i]) for i in raw} == {i: len(b) for i, b in raw.items()}
    assert sum(len(b) == 1 for b in raw.values()) == 256  # every byte has its own token
    # the bytes of the tokens, concatenated, are the text's UTF-8 bytes
    sample = val_text[:5000] + UNICODE
    assert b"".join(raw[i] for i in tok.encode(sample)) == sample.encode("utf-8")


def test_specials_zero_length_and_distinct(tok: Tokenizer) -> None:
    ids = [tok.eos_id, tok.bos_id, tok.pad_id]
    assert len(set(ids)) == 3
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.token_byte_lengths()[ids].tolist() == [0, 0, 0]
    for role, text in DEFAULT_SPECIALS.items():
        assert tok.special_id(role) == tok.hf.token_to_id(text)
    # specials vanish on decode by default and are kept when asked
    assert tok.decode([tok.eos_id]) == ""
    assert tok.decode([tok.eos_id], skip_special_tokens=False) == DEFAULT_SPECIALS["eos"]


def test_json_roundtrip_identical_encodings(tok: Tokenizer, val_text: str) -> None:
    back = Tokenizer.from_json(tok.to_json())
    assert back.specials == tok.specials
    assert back.vocab_size == tok.vocab_size
    assert (back.eos_id, back.bos_id, back.pad_id) == (tok.eos_id, tok.bos_id, tok.pad_id)
    sample = val_text[:20000]
    assert back.encode(sample) == tok.encode(sample)
    assert back.encode_batch(TRICKY) == tok.encode_batch(TRICKY)
    np.testing.assert_array_equal(back.token_byte_lengths(), tok.token_byte_lengths())
    assert back.fingerprint() == tok.fingerprint()


def test_save_load_roundtrip(tok: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "tok.json"
    tok.save(path)
    back = Tokenizer.load(path)
    assert back.encode(UNICODE) == tok.encode(UNICODE)
    assert back.fingerprint() == tok.fingerprint()


def test_load_or_train_caches(train_texts: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = BPETokenizerSpec(vocab_size=VOCAB)
    calls = []
    real_train = BPETokenizerSpec.train

    def counting_train(self: BPETokenizerSpec, texts: Iterable[str]) -> Tokenizer:
        calls.append(1)
        return real_train(self, texts)

    monkeypatch.setattr(BPETokenizerSpec, "train", counting_train)
    first = spec.load_or_train(train_texts, "fp-a", tmp_path)
    assert len(calls) == 1
    path = tmp_path / "tokenizers" / spec.cache_key("fp-a") / "tokenizer.json"
    assert path.is_file()
    mtime = path.stat().st_mtime_ns

    def boom(self: BPETokenizerSpec, texts: Iterable[str]) -> Tokenizer:
        raise AssertionError("load_or_train retrained despite a cached tokenizer")

    monkeypatch.setattr(BPETokenizerSpec, "train", boom)
    second = spec.load_or_train(train_texts, "fp-a", tmp_path)
    assert path.stat().st_mtime_ns == mtime
    assert second.to_json() == first.to_json()
    assert second.encode(UNICODE) == first.encode(UNICODE)

    # a different corpus fingerprint is a different key -> it must train (and here, raise)
    assert spec.cache_key("fp-b") != spec.cache_key("fp-a")
    with pytest.raises(AssertionError, match="retrained"):
        spec.load_or_train(train_texts, "fp-b", tmp_path)


def test_cache_key_depends_on_settings() -> None:
    a = BPETokenizerSpec(vocab_size=VOCAB).cache_key("fp")
    assert a == BPETokenizerSpec(vocab_size=VOCAB).cache_key("fp")  # deterministic
    assert a != BPETokenizerSpec(vocab_size=VOCAB + 1).cache_key("fp")
    assert a != BPETokenizerSpec(vocab_size=VOCAB, min_frequency=3).cache_key("fp")
    assert a != BPETokenizerSpec(vocab_size=VOCAB).cache_key("fp2")


@pytest.mark.parametrize("vocab_size", [0, 100, 258])
def test_vocab_too_small_raises(vocab_size: int) -> None:
    with pytest.raises(ConfigError, match=r"tokenizer\.vocab_size") as info:
        BPETokenizerSpec(vocab_size=vocab_size)
    assert info.value.key == "tokenizer.vocab_size"


def test_smallest_legal_vocab_accepted() -> None:
    assert BPETokenizerSpec(vocab_size=256 + len(DEFAULT_SPECIALS)).vocab_size == 259
