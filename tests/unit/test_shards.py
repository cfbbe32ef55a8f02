"""Token shards: re-read equals the tokenised text, document index, manifest checks, stale caches, num_proc."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.data.corpus import Corpus, Document, ShakespeareCorpus
from lmforge.data.datamodule import PackedTextDataModule
from lmforge.data.shards import ConcatTokens, TokenShards, cache_folder, load_or_build, write_shards
from lmforge.data.tokenizer import BPETokenizerSpec, Tokenizer
from lmforge.errors import DataError


@pytest.fixture(scope="module")
def plays() -> list[str]:
    return [d.text for d in ShakespeareCorpus().documents("train")[:3]]


@pytest.fixture(scope="module")
def tok(plays: list[str]) -> Tokenizer:
    return BPETokenizerSpec(vocab_size=500).train(plays[:1])


@pytest.fixture(scope="module")
def docs(plays: list[str]) -> list[str]:
    """Documents of very different lengths, empty and unicode ones included."""
    cut = [p[i : i + n] for p in plays for i, n in ((0, 40_000), (50_000, 7), (60_000, 3000))]
    return [*cut, "", "é 日本 👍🏽\n", plays[2]]


def test_long_texts_are_encoded_exactly_as_whole(tok: Tokenizer, plays: list[str]) -> None:
    """encode_batch cuts long texts at safe points: the ids must equal HF's encoding of the whole text."""
    tricky = plays[0][:20_000].replace("\n", " \n  \n\n", 50) + "x\n\n\ny" * 500
    for text in [*plays, tricky]:
        assert tok.encode_batch([text])[0] == tok.hf.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("shard_tokens", [10**9, 5000, 997])
def test_shards_reread_equal_the_tokenized_text(tmp_path: Path, tok: Tokenizer, docs: list[str], shard_tokens: int) -> None:
    manifest = write_shards(docs, tok, tmp_path / "s", source="src", shard_tokens=shard_tokens, chunk_bytes=10_000)
    shards = TokenShards(tmp_path / "s", tok.fingerprint(), verify_hashes=True)
    expected = [tok.encode(t) for t in docs]
    flat = np.concatenate([np.array([*ids, tok.eos_id]) for ids in expected])
    np.testing.assert_array_equal(np.asarray(shards.tokens), flat)
    assert manifest["n_tokens"] == flat.size and manifest["n_docs"] == len(docs)
    n_shards = -(-flat.size // shard_tokens)
    assert len(manifest["shards"]) == n_shards
    assert all(s["n_tokens"] == shard_tokens for s in manifest["shards"][:-1])  # fixed size, last one shorter
    ends = shards.doc_ends()
    np.testing.assert_array_equal(ends, np.cumsum([len(ids) + 1 for ids in expected]))
    for i, ids in enumerate(expected):
        assert shards.document(i).tolist() == ids
        assert tok.decode(shards.document(i).tolist()) == docs[i]
    # slices across shard boundaries equal the flat stream
    for start in range(0, flat.size - 100, 2011):
        np.testing.assert_array_equal(shards.tokens[start : start + 100], flat[start : start + 100])
    assert shards.dtype == np.uint16 and manifest["tokenizer"] == tok.fingerprint() and manifest["source"] == "src"


def test_parallel_tokenisation_gives_identical_shards(tmp_path: Path, tok: Tokenizer, docs: list[str]) -> None:
    one = write_shards(docs, tok, tmp_path / "one", shard_tokens=4000, chunk_bytes=20_000)
    two = write_shards(docs, tok, tmp_path / "two", shard_tokens=4000, num_proc=2, chunk_bytes=20_000)
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]
    assert two["num_proc"] == 2


def test_concat_tokens_slices() -> None:
    parts = [np.arange(0, 5), np.arange(5, 6), np.arange(6, 20)]
    c = ConcatTokens(parts)
    flat = np.arange(20)
    for a in range(20):
        for b in range(a, 21):
            np.testing.assert_array_equal(c[a:b], flat[a:b])
    assert c.size == len(c) == 20
    with pytest.raises(IndexError):
        c[::2]


def test_stale_or_broken_cache_is_rebuilt(tmp_path: Path, tok: Tokenizer, docs: list[str], caplog) -> None:
    folder = cache_folder(tmp_path, "corpus-a", tok.fingerprint(), "train")
    first = load_or_build(iter(docs), tok, folder, source="corpus-a")
    reused = load_or_build(None, tok, folder, source="corpus-a")  # cached: no texts needed
    np.testing.assert_array_equal(np.asarray(reused.tokens), np.asarray(first.tokens))
    # truncate a shard behind the manifest's back: detected and rebuilt
    shard = folder / first.manifest["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated"):
        TokenShards(folder)
    rebuilt = load_or_build(iter(docs), tok, folder, source="corpus-a")
    np.testing.assert_array_equal(np.asarray(rebuilt.tokens), np.asarray(first.tokens))
    # an interrupted build (no manifest) is not trusted
    (folder / "manifest.json").unlink()
    with pytest.raises(DataError, match="manifest.json missing"):
        TokenShards(folder)
    # a manifest from another tokenizer in the same folder is stale: rebuilt with this one
    load_or_build(iter(docs), tok, folder, source="corpus-a")
    data = json.loads((folder / "manifest.json").read_text())
    data["tokenizer"] = "someone-else"
    (folder / "manifest.json").write_text(json.dumps(data))
    assert load_or_build(iter(docs), tok, folder, source="corpus-a").manifest["tokenizer"] == tok.fingerprint()


def test_prepared_dir_with_another_tokenizer_is_refused(tmp_path: Path, tok: Tokenizer, docs: list[str], plays: list[str]) -> None:
    corpus = Corpus({"train": [Document(str(i), t) for i, t in enumerate(docs)], "val": [Document("v", plays[1][:5000])]})
    for split in ("train", "val"):
        write_shards((d.text for d in corpus.documents(split)), tok, tmp_path / "prep" / split)
    other = BPETokenizerSpec(vocab_size=400).train(plays[:1])
    dm = PackedTextDataModule(corpus, other, block_size=16, batch_size=2, tokens_dir=str(tmp_path / "prep"), cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="tokenizer") as info:
        dm.setup("fit")
    assert "prepare_data.py" in str(info.value)
    dm = PackedTextDataModule(corpus, tok, block_size=16, batch_size=2, tokens_dir=str(tmp_path / "prep"), cache_dir=tmp_path / "c")
    dm.setup("fit")
    assert dm.train_set.tokens.size == sum(len(tok.encode(t)) + 1 for t in docs)
    assert not (tmp_path / "c").exists()  # nothing re-tokenized


def test_empty_source_is_a_clear_error(tmp_path: Path, tok: Tokenizer) -> None:
    corpus = Corpus({"train": [Document("a", "hi")], "val": [Document("b", "there you go")]})
    dm = PackedTextDataModule(corpus, tok, block_size=64, batch_size=2, cache_dir=tmp_path)
    with pytest.raises(DataError, match=r"train split has \d+ tokens .*data.block_size"):
        dm.setup("fit")
