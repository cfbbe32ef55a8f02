"""Sources: local files (txt/md/jsonl/parquet) with the bad-file policy, HF datasets (streaming too), mixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.data.corpus import Corpus, Document, TextFilesCorpus
from lmforge.data.datamodule import PackedTextDataModule, build_corpus
from lmforge.data.hf_dataset import HFDatasetCorpus
from lmforge.data.mixture import MixtureCorpus
from lmforge.errors import ConfigError, DataError


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def test_parquet_one_document_per_row(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": [f"row {i}" for i in range(6)], "id": list(range(6))}), tmp_path / "a.parquet")
    c = TextFilesCorpus(str(tmp_path / "*.parquet"), val_every=3, text_field="body")
    assert [d.text for d in c.documents("train")] == ["row 0", "row 1", "row 3", "row 4"]
    assert [d.text for d in c.documents("val")] == ["row 2", "row 5"]
    with pytest.raises(DataError, match=r"no column 'text'.*data.corpus.text_field"):
        TextFilesCorpus(str(tmp_path / "*.parquet"))


def test_non_utf8_file_fails_or_is_skipped_and_counted(tmp_path: Path, caplog) -> None:
    for i in range(4):
        write(tmp_path / f"{i}.txt", f"good document {i}")
    bad = write(tmp_path / "latin1.txt", "caf\xe9".encode("latin-1"))
    with pytest.raises(DataError) as info:
        TextFilesCorpus(str(tmp_path / "*.txt"), val_every=2)
    assert str(bad) in str(info.value) and "not UTF-8" in str(info.value) and "on_error=skip" in str(info.value)
    c = TextFilesCorpus(str(tmp_path / "*.txt"), val_every=2, on_error="skip")
    assert len(c.documents("train")) + len(c.documents("val")) == 4
    assert c.read_stats.files_skipped == {"not UTF-8": 1} and c.read_stats.files_read == 4
    assert "not UTF-8" in caplog.text


def test_unreadable_file_fails_or_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "a.txt", "fine")
    write(tmp_path / "b.txt", "fine too")
    locked = write(tmp_path / "c.txt", "secret")
    real = Path.read_text

    def read_text(self: Path, *args, **kwargs) -> str:  # as a file without read permission does (even for root)
        if self == locked:
            raise PermissionError(13, "Permission denied")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(DataError, match=r"c.txt: cannot be read \(Permission denied\)"):
        TextFilesCorpus(str(tmp_path / "*.txt"), val_every=2)
    c = TextFilesCorpus(str(tmp_path / "*.txt"), val_every=2, on_error="skip")
    assert c.read_stats.files_skipped == {"unreadable": 1}


def test_jsonl_rows_without_the_field_skipped_with_a_count(tmp_path: Path) -> None:
    rows = [{"text": "one"}, {"body": "no text"}, "not an object", {"text": 5}, {"text": "two"}]
    write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    write(tmp_path / "v.jsonl", json.dumps({"text": "val"}))
    c = TextFilesCorpus(str(tmp_path / "a.jsonl"), val_glob=str(tmp_path / "v.jsonl"), on_error="skip")
    assert [d.text for d in c.documents("train")] == ["one", "two"]
    assert sum(c.read_stats.rows_skipped.values()) == 4
    assert c.read_stats.rows_skipped["no field 'text'"] == 2


def test_empty_source_and_bad_policy(tmp_path: Path) -> None:
    write(tmp_path / "a.jsonl", json.dumps({"other": 1}) + "\n")
    write(tmp_path / "b.jsonl", json.dumps({"other": 2}) + "\n")
    with pytest.raises(DataError, match=r"gives 0 document.*rows skipped"):
        TextFilesCorpus(str(tmp_path / "*.jsonl"), on_error="skip")
    with pytest.raises(ConfigError) as info:
        TextFilesCorpus(str(tmp_path / "*.jsonl"), on_error="ignore")
    assert info.value.key == "data.corpus.on_error"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    write(root / "data" / "train.jsonl", "".join(json.dumps({"text": f"train document {i} " * 3}) + "\n" for i in range(40)))
    write(root / "data" / "validation.jsonl", "".join(json.dumps({"text": f"val document {i}"}) + "\n" for i in range(4)))
    write(root / "flat" / "all.jsonl", "".join(json.dumps({"content": f"doc {i}"}) + "\n" for i in range(30)))
    return root


@pytest.mark.parametrize("streaming", [True, False])
def test_hf_local_dataset_streaming_and_not(hf_dir: Path, tmp_path: Path, streaming: bool) -> None:
    c = HFDatasetCorpus(str(hf_dir / "data"), streaming=streaming, cache_dir=str(tmp_path / "hf"))
    if streaming:
        import datasets

        assert isinstance(c._load("train", True), datasets.IterableDataset)  # read lazily, never materialised
    train = [d.text for d in c.iter_documents("train")]
    assert len(train) == 40 and train[3] == "train document 3 " * 3
    assert [d.text for d in c.iter_documents("val")] == [f"val document {i}" for i in range(4)]
    assert c.fingerprint() == HFDatasetCorpus(str(hf_dir / "data"), streaming=not streaming, cache_dir=str(tmp_path / "hf")).fingerprint()


def test_hf_streaming_holds_out_val_and_trains_end_to_end(hf_dir: Path, tmp_path: Path) -> None:
    from lmforge.data.tokenizer import BPETokenizerSpec

    corpus = HFDatasetCorpus("json", data_files=str(hf_dir / "flat" / "all.jsonl"), text_field="content", val_split=None,
                             val_every=10, streaming=True, cache_dir=str(tmp_path / "hf"))
    assert [d.text for d in corpus.iter_documents("val")] == ["doc 9", "doc 19", "doc 29"]
    assert len(list(corpus.iter_documents("train"))) == 27
    tok = BPETokenizerSpec(vocab_size=300).train(d.text for d in corpus.iter_documents("train"))
    dm = PackedTextDataModule(corpus, tok, block_size=8, batch_size=2, cache_dir=tmp_path / "cache", num_proc=1)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 8)
    text = tok.decode(dm.train_set.tokens[: dm.train_set.tokens.size].tolist())
    assert text == "".join(f"doc {i}" for i in range(30) if (i + 1) % 10)


def test_hf_missing_column_and_path(hf_dir: Path, tmp_path: Path) -> None:
    c = HFDatasetCorpus(str(hf_dir / "data"), text_field="body", streaming=True, cache_dir=str(tmp_path / "hf"))
    with pytest.raises(DataError, match=r"no column 'body'.*data.corpus.text_field"):
        next(c.iter_documents("train"))
    with pytest.raises(DataError, match="train_split"):
        HFDatasetCorpus(str(hf_dir / "data"), train_split="nope", cache_dir=str(tmp_path / "hf"))


def _corpus(prefix: str, sizes: list[int]) -> Corpus:
    docs = [Document(f"{prefix}{i}", prefix * n) for i, n in enumerate(sizes)]
    return Corpus({"train": docs, "val": docs[:1]})


def test_mixture_follows_byte_weights_deterministically() -> None:
    a, b = _corpus("a", [10] * 100), _corpus("b", [30] * 100)
    mix = MixtureCorpus({"a": {"corpus": a, "weight": 3}, "b": {"corpus": b, "weight": 1}})
    docs = list(mix.iter_documents("train"))
    assert [d.name for d in docs] == [d.name for d in mix.iter_documents("train")]  # deterministic
    for n in (20, 60, len(docs)):  # every prefix has the 3:1 byte mix (within one document)
        bytes_a = sum(len(d.text) for d in docs[:n] if d.name.startswith("a/"))
        bytes_b = sum(len(d.text) for d in docs[:n] if d.name.startswith("b/"))
        assert abs(bytes_a - 3 * bytes_b) <= 3 * 30 + 10
    assert sum(d.name.startswith("a/") for d in docs) == 100  # first_exhausted: stops when `a` runs out
    assert mix.fingerprint() != MixtureCorpus({"a": {"corpus": a, "weight": 1}, "b": {"corpus": b, "weight": 1}}).fingerprint()


def test_mixture_all_exhausted_upsamples_the_small_source() -> None:
    big, small = _corpus("x", [10] * 50), _corpus("y", [10] * 5)
    mix = MixtureCorpus({"big": {"corpus": big, "weight": 1}, "small": {"corpus": small, "weight": 1}}, stopping="all_exhausted")
    docs = list(mix.iter_documents("train"))
    assert sum(d.name.startswith("big/") for d in docs) == 50
    assert sum(d.name.startswith("small/") for d in docs) in (50, 51)  # 10 passes over 5 documents
    assert any(d.name.endswith("@9") for d in docs)


def test_mixture_config_errors() -> None:
    a = _corpus("a", [1])
    with pytest.raises(ConfigError, match="data.mixture"):
        MixtureCorpus({})
    with pytest.raises(ConfigError) as info:
        MixtureCorpus({"a": {"corpus": a, "weight": -1}})
    assert info.value.key == "data.mixture.a.weight"
    with pytest.raises(ConfigError) as info:
        build_corpus(a, {"a": {"corpus": a}}, "first_exhausted", None, ".")
    assert info.value.key == "data.corpus"
    with pytest.raises(ConfigError) as info:
        build_corpus(a, None, "first_exhausted", {"nfc": True, "typo_step": 1}, ".")
    assert info.value.key == "data.clean" and "typo_step" in str(info.value)


@pytest.mark.parametrize("group", ["shakespeare", "text_files", "hf_dataset", "mixture"])
def test_data_configs_compose_and_instantiate(group: str, hf_dir: Path, tmp_path: Path) -> None:
    """Every conf/data option builds its datamodule and corpus from train.py's root config."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    root = Path(__file__).resolve().parents[2]
    write(tmp_path / "files" / "a.txt", "first file. " * 20)
    write(tmp_path / "files" / "b.txt", "second file. " * 20)
    extra = {
        "shakespeare": [],
        "text_files": [f"data.corpus.train_glob={tmp_path}/files/*.txt", "data.corpus.val_every=2"],
        "hf_dataset": [f"data.corpus.path={hf_dir}/data", "data.corpus.streaming=true", f"paths.cache_dir={tmp_path}"],
        "mixture": [f"data.mixture.files.corpus.train_glob={tmp_path}/files/*.txt", "data.mixture.files.corpus.val_every=2"],
    }[group]
    with initialize_config_dir(str(root / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"data={group}", f"paths.cache_dir={tmp_path}", *extra])
    dm = instantiate(cfg.data, _convert_="all")
    assert isinstance(dm, PackedTextDataModule) and dm.seed == 1337 and dm.tokenizer is None
    first = next(dm.corpus.iter_documents("train"))
    assert first.text
    if group != "shakespeare":
        assert type(dm.corpus).__name__ == "CleanedCorpus"  # data.clean defaults on for user data
    if group == "mixture":
        names = {d.name.split("/")[0] for d in dm.corpus.iter_documents("train")}
        assert names == {"shakespeare", "files"}
