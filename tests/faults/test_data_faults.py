"""Bad data fails with the file (and line) and the fix, or with on_error=skip is counted — never silent garbage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.data.chat import CHATML_SPECIALS
from lmforge.data.corpus import TextFilesCorpus
from lmforge.data.records import load_jsonl
from lmforge.data.shards import TokenShards, load_or_build
from lmforge.data.tokenizer import ByteTokenizerSpec
from lmforge.errors import DataError


@pytest.fixture()
def tok():
    return ByteTokenizerSpec().train(iter([""]))


def shards(tmp_path: Path, tok) -> Path:
    folder = tmp_path / "tokens"
    load_or_build(iter(["hello world " * 50, "second document " * 40]), tok, folder, source="s", shard_tokens=256)
    return folder


def test_stale_token_cache_from_another_tokenizer_is_refused(tmp_path, tok):
    folder = shards(tmp_path, tok)
    other = ByteTokenizerSpec().train(iter([""]))
    other.add_special_tokens(CHATML_SPECIALS)  # same bytes, two more ids: a different tokenizer
    with pytest.raises(DataError, match="was tokenized with tokenizer .* ids would mean other tokens. Fix: rebuild"):
        TokenShards(folder, other.fingerprint())


def test_truncated_shard_is_detected_with_the_fix(tmp_path, tok):
    folder = shards(tmp_path, tok)
    shard = sorted(p for p in folder.iterdir() if p.suffix != ".json")[0]
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(DataError, match="is missing or truncated"):
        TokenShards(folder, tok.fingerprint())


def test_interrupted_build_without_manifest_is_refused(tmp_path):
    (tmp_path / "half").mkdir()
    np.zeros(8, dtype=np.uint16).tofile(tmp_path / "half" / "shard_00000.bin")
    with pytest.raises(DataError, match="holds no token shards .*never built or interrupted"):
        TokenShards(tmp_path / "half")


def test_non_utf8_file_names_the_byte_or_is_skipped_and_counted(tmp_path):
    (tmp_path / "good.txt").write_text("fine text\n" * 5)
    (tmp_path / "good2.txt").write_text("more fine text\n" * 5)
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1\n")
    with pytest.raises(DataError, match=r"bad\.txt.*0xe9.*not UTF-8.*on_error=skip"):
        TextFilesCorpus(str(tmp_path / "*.txt"), val_every=2)
    corpus = TextFilesCorpus(str(tmp_path / "*.txt"), val_every=2, on_error="skip")
    assert corpus.read_stats.files_skipped == {"not UTF-8": 1} and corpus.read_stats.files_read == 2
    assert all("good" in d.name for split in ("train", "val") for d in corpus.documents(split))


def test_jsonl_line_that_is_not_json_names_file_and_line(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"sft\.jsonl:2"):
        load_jsonl(str(path), "sft", "fail", None)
    assert len(load_jsonl(str(path), "sft", "skip", None)) == 1


def test_record_with_a_missing_key_names_file_line_and_key(tmp_path):
    path = tmp_path / "pref.jsonl"
    path.write_text(json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    with pytest.raises(DataError, match=r"pref\.jsonl:1.*rejected"):
        load_jsonl(str(path), "preference", "fail", None)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="matches no file"):
        TextFilesCorpus(str(tmp_path / "nothing" / "*.txt"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError):
        load_jsonl(str(empty), "sft", "fail", None)
