"""Data layer: corpora and their splits, the tokenized memmap cache, packed blocks and the DataModule."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data.corpus import Corpus, Document, ShakespeareCorpus, TextFilesCorpus
from lmforge.data.datamodule import PackedTextDataModule
from lmforge.data.packed import IGNORE_INDEX, PackedBlocks, token_dtype, tokenize_split
from lmforge.data.tokenizer import BPETokenizerSpec, Tokenizer
from lmforge.errors import ConfigError, DataError

# --- ShakespeareCorpus ------------------------------------------------------------------------------

VAL_PLAYS = {"tragedies/hamlet.md", "romances/the-tempest.md"}


@pytest.fixture(scope="module")
def shakespeare() -> ShakespeareCorpus:
    return ShakespeareCorpus()


def test_shakespeare_split(shakespeare: ShakespeareCorpus) -> None:
    train = shakespeare.documents("train")
    val = shakespeare.documents("val")
    assert len(train) + len(val) == 38
    assert len(train) == 36
    assert {d.name for d in val} == VAL_PLAYS
    assert len(val) == 2
    assert not {d.name for d in train} & {d.name for d in val}
    assert len({d.name for d in train}) == 36  # no duplicates
    assert "macbeth" in {Path(d.name).stem for d in train}
    assert all(len(d.text) > 10_000 for d in train + val)  # whole plays, not fragments
    assert "Hamlet" in next(d.text for d in val if d.name == "tragedies/hamlet.md")


def test_shakespeare_unknown_split(shakespeare: ShakespeareCorpus) -> None:
    with pytest.raises(ConfigError) as info:
        shakespeare.documents("test")
    assert info.value.key == "split"


def test_shakespeare_fingerprint_stable(shakespeare: ShakespeareCorpus) -> None:
    fp = shakespeare.fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert ShakespeareCorpus().fingerprint() == fp
    other = ShakespeareCorpus(val_plays=("tragedies/macbeth.md",))
    assert other.fingerprint() != fp  # same texts, different split -> different caches
    assert [d.name for d in other.documents("val")] == ["tragedies/macbeth.md"]


def test_shakespeare_bad_val_plays() -> None:
    with pytest.raises(ConfigError, match="not-a-play") as info:
        ShakespeareCorpus(val_plays=("tragedies/hamlet.md", "tragedies/not-a-play.md"))
    assert info.value.key == "data.corpus.val_plays"


def test_fingerprint_depends_on_text_and_name() -> None:
    base = Corpus({"train": [Document("a", "x")], "val": [Document("b", "y")]})
    assert base.fingerprint() == Corpus({"train": [Document("a", "x")], "val": [Document("b", "y")]}).fingerprint()
    assert base.fingerprint() != Corpus({"train": [Document("a", "x!")], "val": [Document("b", "y")]}).fingerprint()
    assert base.fingerprint() != Corpus({"train": [Document("a2", "x")], "val": [Document("b", "y")]}).fingerprint()
    assert base.fingerprint() != Corpus({"train": [Document("b", "y")], "val": [Document("a", "x")]}).fingerprint()


# --- TextFilesCorpus --------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_text_files_one_doc_per_file(tmp_path: Path) -> None:
    texts = {f"d{i}.txt" if i % 2 else f"d{i}.md": f"document {i}\nline two é\n" for i in range(7)}
    for name, text in texts.items():
        _write(tmp_path / "raw" / name, text)
    _write(tmp_path / "raw" / "ignored.csv", "not matched")
    c = TextFilesCorpus(str(tmp_path / "raw" / "*.*[dt]"), val_every=3)
    all_names = sorted(str(tmp_path / "raw" / n) for n in texts)
    # sorted by path, every 3rd (indices 2, 5) held out
    assert [d.name for d in c.documents("val")] == [f"{all_names[i]}#0" for i in (2, 5)]
    assert [d.name for d in c.documents("train")] == [f"{all_names[i]}#0" for i in (0, 1, 3, 4, 6)]
    for d in c.documents("train") + c.documents("val"):
        assert d.text == texts[Path(d.name.split("#")[0]).name]


def test_text_files_jsonl_one_doc_per_line(tmp_path: Path) -> None:
    rows = [{"body": f"row {i}", "id": i} for i in range(5)]
    lines = [json.dumps(r) for r in rows]
    lines.insert(2, "   ")  # blank lines are skipped
    _write(tmp_path / "a.jsonl", "\n".join(lines) + "\n")
    _write(tmp_path / "v.jsonl", json.dumps({"body": "held out"}) + "\n")
    c = TextFilesCorpus(str(tmp_path / "a.jsonl"), val_glob=str(tmp_path / "v.jsonl"), text_field="body")
    assert [d.text for d in c.documents("train")] == [f"row {i}" for i in range(5)]
    assert [d.name for d in c.documents("train")] == [f"{tmp_path / 'a.jsonl'}#{i}" for i in range(5)]
    assert [d.text for d in c.documents("val")] == ["held out"]


def test_text_files_val_every_over_jsonl_rows(tmp_path: Path) -> None:
    _write(tmp_path / "a.jsonl", "\n".join(json.dumps({"text": str(i)}) for i in range(10)))
    c = TextFilesCorpus(str(tmp_path / "*.jsonl"), val_every=4)
    assert [d.text for d in c.documents("val")] == ["3", "7"]
    assert [d.text for d in c.documents("train")] == ["0", "1", "2", "4", "5", "6", "8", "9"]


def test_text_files_recursive_glob(tmp_path: Path) -> None:
    for i in range(4):
        _write(tmp_path / "deep" / f"l{i}" / f"{i}.txt", f"t{i}")
    c = TextFilesCorpus(str(tmp_path / "**" / "*.txt"), val_every=2)
    assert sorted(d.text for d in c.documents("train") + c.documents("val")) == ["t0", "t1", "t2", "t3"]
    assert len(c.documents("val")) == 2


def test_text_files_val_glob_keeps_all_train(tmp_path: Path) -> None:
    for i in range(3):
        _write(tmp_path / "train" / f"{i}.txt", f"train {i}")
    _write(tmp_path / "val" / "v.txt", "val")
    c = TextFilesCorpus(str(tmp_path / "train" / "*.txt"), val_glob=str(tmp_path / "val" / "*.txt"), val_every=2)
    assert [d.text for d in c.documents("train")] == ["train 0", "train 1", "train 2"]
    assert [d.text for d in c.documents("val")] == ["val"]


@pytest.mark.parametrize("pattern", ["nothing/*.txt", "missing_dir/**/*.md"])
def test_text_files_no_match_raises_naming_key(tmp_path: Path, pattern: str) -> None:
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match=r"data\.corpus\.train_glob") as info:
        TextFilesCorpus(str(tmp_path / pattern))
    assert "matches no file" in str(info.value)


def test_text_files_val_glob_no_match_names_val_key(tmp_path: Path) -> None:
    _write(tmp_path / "a.txt", "a")
    with pytest.raises(DataError, match=r"data\.corpus\.val_glob"):
        TextFilesCorpus(str(tmp_path / "a.txt"), val_glob=str(tmp_path / "none" / "*.txt"))


def test_text_files_empty_glob_is_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        TextFilesCorpus("")
    assert info.value.key == "data.corpus.train_glob"


def test_text_files_single_doc_cannot_hold_out(tmp_path: Path) -> None:
    _write(tmp_path / "a.txt", "a")
    with pytest.raises(DataError, match=r"data\.corpus\.train_glob"):
        TextFilesCorpus(str(tmp_path / "a.txt"))


def test_text_files_bad_val_every(tmp_path: Path) -> None:
    _write(tmp_path / "a.txt", "a")
    _write(tmp_path / "b.txt", "b")
    with pytest.raises(ConfigError) as info:
        TextFilesCorpus(str(tmp_path / "*.txt"), val_every=1)
    assert info.value.key == "data.corpus.val_every"


def test_jsonl_missing_field_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "rows.jsonl", '{"text": "ok"}\n\n{"body": "wrong field"}\n')
    with pytest.raises(DataError) as info:
        TextFilesCorpus(str(path), val_glob=str(path))
    msg = str(info.value)
    assert f"{path}:3" in msg  # blank line 2 still counts toward the line number
    assert "'text'" in msg and "data.corpus.text_field" in msg


def test_jsonl_bad_json_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "rows.jsonl", '{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match="not valid JSON") as info:
        TextFilesCorpus(str(path), val_glob=str(path))
    assert f"{path}:2" in str(info.value)


# --- PackedBlocks -----------------------------------------------------------------------------------

PAD = 99


def _collect(ds: PackedBlocks) -> tuple[list[dict[str, torch.Tensor]], np.ndarray]:
    items = [ds[i] for i in range(len(ds))]
    targets = torch.cat([it["targets"] for it in items])
    return items, targets[targets != IGNORE_INDEX].numpy()


@pytest.mark.parametrize("n_tokens,block", [(2, 1), (2, 4), (17, 4), (21, 4), (100, 7), (64, 64), (65, 64)])
def test_packed_tail_covers_every_target_once(n_tokens: int, block: int) -> None:
    tokens = (np.arange(n_tokens, dtype=np.int64) * 7 + 3) % 50  # distinct-ish, nonzero pattern
    ds = PackedBlocks(tokens.astype(np.uint16), block, PAD, include_tail=True)
    assert len(ds) == -(-(n_tokens - 1) // block)
    items, kept = _collect(ds)
    np.testing.assert_array_equal(kept, tokens[1:])
    for i, it in enumerate(items):
        assert it["input_ids"].shape == (block,) and it["targets"].shape == (block,)
        assert it["input_ids"].dtype == torch.int64 and it["targets"].dtype == torch.int64
        for j in range(block):
            g = i * block + j  # global target position is g + 1
            if g + 1 < n_tokens:
                assert it["targets"][j] == tokens[g + 1]
                assert it["input_ids"][j] == tokens[g]  # the token just before the target
            else:
                assert it["targets"][j] == IGNORE_INDEX
                assert it["input_ids"][j] == PAD
    n_pad = len(ds) * block - (n_tokens - 1)
    assert sum(int((it["targets"] == IGNORE_INDEX).sum()) for it in items) == n_pad


def test_packed_inputs_are_full_prefix_context() -> None:
    tokens = np.arange(1, 12, dtype=np.uint16)  # 11 tokens, 10 targets
    ds = PackedBlocks(tokens, 4, PAD, include_tail=True)
    assert ds[0]["input_ids"].tolist() == [1, 2, 3, 4]
    assert ds[0]["targets"].tolist() == [2, 3, 4, 5]
    assert ds[1]["input_ids"].tolist() == [5, 6, 7, 8]
    assert ds[1]["targets"].tolist() == [6, 7, 8, 9]
    assert ds[2]["input_ids"].tolist() == [9, 10, PAD, PAD]
    assert ds[2]["targets"].tolist() == [10, 11, IGNORE_INDEX, IGNORE_INDEX]


def test_packed_without_tail_drops_remainder() -> None:
    tokens = np.arange(1, 12, dtype=np.uint16)  # 10 targets, block 4 -> 2 full blocks, 2 targets dropped
    ds = PackedBlocks(tokens, 4, PAD)
    assert len(ds) == 2
    _, kept = _collect(ds)
    np.testing.assert_array_equal(kept, tokens[1:9])
    assert all((ds[i]["targets"] != IGNORE_INDEX).all() for i in range(len(ds)))
    # exact multiple: nothing dropped, no tail block either way
    exact = np.arange(13, dtype=np.uint16)  # 12 targets
    assert len(PackedBlocks(exact, 4, PAD)) == len(PackedBlocks(exact, 4, PAD, include_tail=True)) == 3


def test_packed_too_short_raises() -> None:
    with pytest.raises(ValueError):
        PackedBlocks(np.array([1], dtype=np.uint16), 4, PAD, include_tail=True)
    with pytest.raises(ValueError, match="fewer than one block"):
        PackedBlocks(np.arange(4, dtype=np.uint16), 4, PAD)  # 3 targets < block 4


def test_packed_reads_uint32_values() -> None:
    tokens = np.array([70000, 2**32 - 1, 5, 65536], dtype=np.uint32)
    item = PackedBlocks(tokens, 3, PAD)[0]
    assert item["input_ids"].tolist() == [70000, 2**32 - 1, 5]
    assert item["targets"].tolist() == [2**32 - 1, 5, 65536]


@pytest.mark.parametrize(
    "vocab,dtype", [(2, np.uint16), (512, np.uint16), (2**16, np.uint16), (2**16 + 1, np.uint32), (200_000, np.uint32)]
)
def test_token_dtype(vocab: int, dtype: type) -> None:
    assert token_dtype(vocab) == np.dtype(dtype)
    assert np.iinfo(token_dtype(vocab)).max >= vocab - 1  # the largest id fits


# --- tokenize_split ---------------------------------------------------------------------------------


class StubTokenizer:
    """One id per character (ord), so expected streams are computable by hand."""

    def __init__(self, vocab_size: int, eos_id: int) -> None:
        self.vocab_size, self.eos_id, self.calls = vocab_size, eos_id, 0

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        self.calls += 1
        return [[ord(c) for c in t] for t in texts]

    def fingerprint(self) -> str:
        return f"stub-{self.vocab_size}-{self.eos_id}"


def _small_corpus() -> Corpus:
    return Corpus({"train": [Document("a", "ab"), Document("b", ""), Document("c", "xyz")], "val": [Document("v", "q")]})


def test_tokenize_split_eos_after_every_doc(tmp_path: Path) -> None:
    tok = StubTokenizer(vocab_size=300, eos_id=299)
    mm = tokenize_split(_small_corpus(), tok, "train", tmp_path)
    assert isinstance(mm, np.memmap) and mm.dtype == np.uint16
    assert mm.tolist() == [ord("a"), ord("b"), 299, 299, ord("x"), ord("y"), ord("z"), 299]
    assert tokenize_split(_small_corpus(), tok, "val", tmp_path).tolist() == [ord("q"), 299]
    bins = list(tmp_path.glob("tokens/*/train/*.bin"))
    assert len(bins) == 1
    meta = json.loads((bins[0].parent / "manifest.json").read_text())
    assert (meta["n_tokens"], meta["dtype"], meta["n_docs"]) == (8, "uint16", 3)
    assert bins[0].stat().st_size == 8 * 2


def test_tokenize_split_uint32_for_big_vocab(tmp_path: Path) -> None:
    tok = StubTokenizer(vocab_size=2**17, eos_id=2**17 - 1)
    mm = tokenize_split(_small_corpus(), tok, "train", tmp_path)
    assert mm.dtype == np.uint32
    assert mm.tolist()[2] == 2**17 - 1  # not truncated to 16 bits
    assert next(tmp_path.glob("tokens/*/train/*.bin")).stat().st_size == 8 * 4


def test_tokenize_split_cache_reused(tmp_path: Path) -> None:
    tok = StubTokenizer(vocab_size=300, eos_id=299)
    first = tokenize_split(_small_corpus(), tok, "train", tmp_path)
    assert tok.calls == 1
    path = Path(first.filename)
    stamp = path.stat().st_mtime_ns
    second = tokenize_split(_small_corpus(), tok, "train", tmp_path)
    assert tok.calls == 1  # not re-encoded
    assert Path(second.filename) == path and path.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(np.asarray(second), np.asarray(first))
    # a changed corpus or tokenizer gets a new cache entry
    changed = Corpus({"train": [Document("a", "abc")], "val": []})
    assert Path(tokenize_split(changed, tok, "train", tmp_path).filename) != path
    other_tok = StubTokenizer(vocab_size=301, eos_id=300)
    assert Path(tokenize_split(_small_corpus(), other_tok, "train", tmp_path).filename) != path
    assert len(list(tmp_path.glob("tokens/*/train/*.bin"))) == 3


def test_tokenize_split_memmap_is_read_only(tmp_path: Path) -> None:
    mm = tokenize_split(_small_corpus(), StubTokenizer(300, 299), "train", tmp_path)
    assert mm.mode == "r"
    with pytest.raises(ValueError):
        mm[0] = 1


# --- real tokenizer + DataModule --------------------------------------------------------------------


@pytest.fixture(scope="module")
def play_text(shakespeare: ShakespeareCorpus) -> str:
    return next(d.text for d in shakespeare.documents("train") if d.name == "tragedies/macbeth.md")[:60_000]


@pytest.fixture(scope="module")
def real_tok(play_text: str) -> Tokenizer:
    return BPETokenizerSpec(vocab_size=400).train([play_text])


def test_tokenize_split_with_real_tokenizer(tmp_path: Path, real_tok: Tokenizer, play_text: str) -> None:
    docs = [Document(f"d{i}", play_text[i * 3000 : (i + 1) * 3000]) for i in range(4)]
    corpus = Corpus({"train": docs, "val": docs[:1]})
    mm = tokenize_split(corpus, real_tok, "train", tmp_path)
    assert mm.dtype == np.uint16
    expected = [t for d in docs for t in (*real_tok.encode(d.text), real_tok.eos_id)]
    assert mm.tolist() == expected
    assert int((np.asarray(mm) == real_tok.eos_id).sum()) == 4
    assert real_tok.decode(mm.tolist()) == "".join(d.text for d in docs)  # EOS is skipped on decode


@pytest.fixture
def files_corpus(tmp_path: Path, play_text: str) -> TextFilesCorpus:
    for i in range(10):
        _write(tmp_path / "raw" / f"{i:02d}.txt", play_text[i * 5000 : (i + 1) * 5000])
    return TextFilesCorpus(str(tmp_path / "raw" / "*.txt"), val_every=5)


def test_datamodule_batches(tmp_path: Path, files_corpus: TextFilesCorpus, real_tok: Tokenizer) -> None:
    B, T = 4, 32
    dm = PackedTextDataModule(files_corpus, real_tok, block_size=T, batch_size=B, val_batch_size=3, cache_dir=tmp_path / "cache")
    dm.prepare_data()
    dm.setup("fit")
    train_tokens = tokenize_split(files_corpus, real_tok, "train", tmp_path / "cache")
    assert len(dm.train_set) == (train_tokens.size - 1) // T
    train_batches = list(dm.train_dataloader())
    assert len(train_batches) == len(dm.train_set) // B  # drop_last
    for b in train_batches:
        assert b["input_ids"].shape == (B, T) and b["targets"].shape == (B, T)
        assert (b["targets"] != IGNORE_INDEX).all()
        # next-token alignment inside every row
        assert torch.equal(b["input_ids"][:, 1:], b["targets"][:, :-1])

    val_tokens = np.asarray(tokenize_split(files_corpus, real_tok, "val", tmp_path / "cache"), dtype=np.int64)
    assert val_tokens.size == sum(len(real_tok.encode(d.text)) + 1 for d in files_corpus.documents("val"))
    val_batches = list(dm.val_dataloader())
    assert all(b["input_ids"].shape[0] <= 3 and b["input_ids"].shape[1] == T for b in val_batches)
    targets = torch.cat([b["targets"].reshape(-1) for b in val_batches])
    np.testing.assert_array_equal(targets[targets != IGNORE_INDEX].numpy(), val_tokens[1:])
    inputs = torch.cat([b["input_ids"].reshape(-1) for b in val_batches])
    assert (inputs[targets == IGNORE_INDEX] == real_tok.pad_id).all()


def test_datamodule_validate_stage_only_builds_val(tmp_path: Path, files_corpus: TextFilesCorpus, real_tok: Tokenizer) -> None:
    dm = PackedTextDataModule(files_corpus, real_tok, block_size=16, batch_size=2, cache_dir=tmp_path / "c")
    dm.setup("validate")
    assert dm.train_set is None and dm.val_set is not None
    assert dm.val_batch_size == 2


@pytest.mark.parametrize("key,kwargs", [
    ("data.batch_size", {"batch_size": 0}),
    ("data.batch_size", {"batch_size": -3}),
    ("data.batch_size", {"batch_size": 2.5}),
    ("data.block_size", {"block_size": 0}),
])
def test_datamodule_bad_sizes(real_tok: Tokenizer, key: str, kwargs: dict) -> None:
    corpus = Corpus({"train": [Document("a", "abc")], "val": [Document("b", "d")]})
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        PackedTextDataModule(corpus, real_tok, **kwargs)
    assert info.value.key == key


def test_cache_dir_untouched_until_prepare(tmp_path: Path, real_tok: Tokenizer) -> None:
    corpus = Corpus({"train": [Document("a", "abc def")], "val": [Document("b", "ghi")]})
    PackedTextDataModule(corpus, real_tok, block_size=2, batch_size=1, cache_dir=tmp_path / "c")
    assert not os.path.exists(tmp_path / "c")
