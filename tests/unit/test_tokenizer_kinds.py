"""Every tokenizer kind: exact round trips, exact byte counts (bits-per-byte), specials, HF-dir save/load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

from lmforge.data.corpus import ShakespeareCorpus
from lmforge.data.tokenizer import BPETokenizerSpec, ByteTokenizerSpec, Tokenizer, fertility
from lmforge.data.tokenizer_kinds import PretrainedTokenizerSpec, UnigramTokenizerSpec, WordPieceTokenizerSpec
from lmforge.errors import ConfigError, DataError

TRICKY = ["", " ", "  two  spaces  ", "\t\ttabs\n\n\r\nCRLF\r", "café naïve é e\u0301", "日本語のテキスト",
          "👍🏽 🇯🇵 👨\u200d👩\u200d👧", "\x00\x01\x7f control", "\u200b\ufeff\u00a0nbsp", "Ω≈ç√∫ 𝔘𝔫𝔦",
          "## Heading\n#hash ##y ### x#y", "<|eos|> raw text is not a special", "O Romeo, Romeo!\n"]
CHAT = {"im_start": "<|im_start|>", "im_end": "<|im_end|>"}
SPECIALS = {"eos": "<|eos|>", "bos": "<|bos|>", "pad": "<|pad|>", "unk": "<|unk|>", "mask": "<|mask|>", **CHAT}


@pytest.fixture(scope="module")
def texts() -> dict[str, list[str]]:
    c = ShakespeareCorpus()
    return {"train": [d.text for d in c.documents("train")[:2]], "val": [d.text[:30_000] for d in c.documents("val")]}


SPECS = {
    "bpe": lambda: BPETokenizerSpec(vocab_size=600, special_tokens=SPECIALS, n_sentinels=3),
    "wordpiece": lambda: WordPieceTokenizerSpec(vocab_size=900, special_tokens=SPECIALS, n_sentinels=3),
    "unigram": lambda: UnigramTokenizerSpec(vocab_size=700, special_tokens=SPECIALS, n_sentinels=3),
    "byte": lambda: ByteTokenizerSpec(special_tokens=SPECIALS, n_sentinels=3),
}


@pytest.fixture(scope="module")
def trained(texts) -> dict[str, Tokenizer]:
    return {kind: make().train(texts["train"]) for kind, make in SPECS.items()}


@pytest.mark.parametrize("kind", list(SPECS))
def test_round_trip_and_exact_bytes(trained, texts, kind: str) -> None:
    tok = trained[kind]
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (tok.vocab_size,)
    for text in [*TRICKY, *texts["val"]]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text, (kind, text[:40])
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert int(lengths[np.asarray(ids, dtype=np.int64)].sum()) == len(text.encode("utf-8")), (kind, text[:40])
    assert tok.encode_batch(TRICKY) == [tok.encode(t) for t in TRICKY]
    # long texts are encoded piecewise at safe cut points: ids identical to encoding them whole
    assert tok.encode_batch(texts["val"]) == [tok.hf.encode(t, add_special_tokens=False).ids for t in texts["val"]]


@pytest.mark.parametrize("kind", list(SPECS))
def test_special_tokens_every_role(trained, kind: str) -> None:
    tok = trained[kind]
    roles = {**SPECIALS, **{f"sentinel_{i}": f"<extra_id_{i}>" for i in range(3)}}
    ids = {role: tok.special_id(role) for role in roles}
    assert len(set(ids.values())) == len(roles)  # distinct ids
    assert all(tok.hf.id_to_token(i) == roles[r] for r, i in ids.items())
    assert tok.token_byte_lengths()[list(ids.values())].tolist() == [0] * len(roles)
    chat = [ids["im_start"], *tok.encode("user\nhi"), ids["im_end"]]
    assert tok.decode(chat, skip_special_tokens=False).startswith("<|im_start|>")
    assert tok.decode(chat) == "user\nhi"
    assert tok.encode("<|im_start|>") != [ids["im_start"]]  # raw text never becomes a special id
    assert tok.add_special_tokens({"sentinel_0": "<extra_id_0>"}) == []  # span objective finds its sentinels


def test_kinds_vocab_sizes_and_fertility(trained, texts) -> None:
    assert trained["bpe"].vocab_size == 600 and 650 <= trained["unigram"].vocab_size <= 700
    assert trained["wordpiece"].vocab_size <= 900 and trained["byte"].vocab_size == 256 + len(SPECIALS) + 3
    assert {k: t.kind for k, t in trained.items()} == {"bpe": "BPE", "wordpiece": "WordPiece", "unigram": "Unigram", "byte": "BPE"}
    fert = {k: fertility(t, texts["val"]) for k, t in trained.items()}
    words = sum(len(t.split()) for t in texts["val"])
    assert fert["byte"] == pytest.approx(sum(len(t.encode()) for t in texts["val"]) / words)
    assert all(1.0 < fert[k] < 0.6 * fert["byte"] for k in ("bpe", "wordpiece", "unigram"))  # ~3 vs ~6 at these tiny vocabs


@pytest.mark.parametrize("kind", ["wordpiece", "unigram"])
def test_save_pretrained_reloads_identically(trained, tmp_path: Path, kind: str) -> None:
    tok = trained[kind]
    tok.save_pretrained(tmp_path)
    back = PretrainedTokenizerSpec(str(tmp_path)).load_or_train([], "unused", tmp_path / "cache")
    assert back.specials == tok.specials and back.fingerprint() == tok.fingerprint()
    assert back.encode_batch(TRICKY) == tok.encode_batch(TRICKY)
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert hf.eos_token == "<|eos|>" and hf.pad_token == "<|pad|>"
    assert hf.decode(hf("café 日本 ## x", add_special_tokens=False)["input_ids"]) == "café 日本 ## x"


def _gpt2_like_dir(folder: Path, config: dict) -> Path:
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    from tokenizers import trainers

    hf.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    folder.mkdir(parents=True, exist_ok=True)
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_pretrained_hf_dir_roles_from_its_config(tmp_path: Path) -> None:
    folder = _gpt2_like_dir(tmp_path / "gpt2", {"eos_token": {"content": "<|endoftext|>"}, "bos_token": "<|endoftext|>"})
    tok = PretrainedTokenizerSpec(str(folder)).load()
    assert tok.eos_id == tok.bos_id == tok.pad_id == tok.hf.token_to_id("<|endoftext|>")  # pad falls back to eos
    assert tok.decode(tok.encode("hello wörld")) == "hello wörld"
    explicit = PretrainedTokenizerSpec(str(folder / "tokenizer.json"), {"eos": "<|endoftext|>", "bos": "<|endoftext|>", "pad": "<pad>"}).load()
    assert explicit.pad_id == tok.vocab_size and explicit.vocab_size == tok.vocab_size + 1  # a missing named token is appended


def test_pretrained_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="tokenizer.path"):
        PretrainedTokenizerSpec(str(tmp_path / "nothing")).load()
    folder = _gpt2_like_dir(tmp_path / "noeos", {})
    with pytest.raises(ConfigError) as info:
        PretrainedTokenizerSpec(str(folder)).load()
    assert info.value.key == "tokenizer.special_tokens"


def test_lossy_bert_style_wordpiece_counts_continuations_without_prefix() -> None:
    """An imported BERT-like vocab (whitespace dropped): "##ing" is 3 bytes, not 5."""
    vocab = {"[UNK]": 0, "[SEP]": 1, "play": 2, "##ing": 3, "##s": 4, "the": 5, "##": 6, "#": 7}
    hf = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    hf.normalizer = normalizers.BertNormalizer(lowercase=True)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.decoder = decoders.WordPiece()
    hf.add_special_tokens(["[SEP]"])
    tok = Tokenizer(hf, {"eos": "[SEP]", "bos": "[SEP]", "pad": "[SEP]"})
    lengths = tok.token_byte_lengths()
    assert lengths[[2, 3, 4, 5, 1, 7]].tolist() == [4, 3, 1, 3, 0, 1]
    ids = tok.encode("the playing plays")
    assert int(lengths[ids].sum()) == len("theplayingplays")  # the text's bytes minus the dropped spaces


@pytest.mark.parametrize("make,vocab", [(WordPieceTokenizerSpec, 500), (UnigramTokenizerSpec, 200), (BPETokenizerSpec, 100)])
def test_vocab_below_the_byte_floor_is_refused(make, vocab: int) -> None:
    with pytest.raises(ConfigError) as info:
        make(vocab_size=vocab)
    assert info.value.key == "tokenizer.vocab_size"


def test_eos_role_is_required() -> None:
    with pytest.raises(ConfigError) as info:
        BPETokenizerSpec(special_tokens={"bos": "<s>"})
    assert info.value.key == "tokenizer.special_tokens.eos"


def test_train_max_bytes_caps_the_training_text(texts, tmp_path: Path) -> None:
    spec = BPETokenizerSpec(vocab_size=400, train_max_bytes=1000)
    assert spec.cache_key("c") != BPETokenizerSpec(vocab_size=400).cache_key("c")
    seen = []

    def gen():
        for t in texts["train"]:
            seen.append(t)
            yield t

    tok = spec.load_or_train(gen(), "c", tmp_path)
    assert len(seen) == 1 and tok.vocab_size <= 400  # stopped after the first document crossed 1000 bytes


def test_train_tokenizer_script_writes_an_hf_dir_and_report(tmp_path: Path, texts) -> None:
    from conftest import load_script
    from hydra import compose, initialize_config_dir

    root = Path(__file__).resolve().parents[2]
    script = load_script("train_tokenizer")
    for i, chunk in enumerate(texts["train"][0][i * 20_000 : (i + 1) * 20_000] for i in range(4)):
        (tmp_path / f"{i}.txt").write_text(chunk, encoding="utf-8")
    overrides = ["tokenizer=unigram", "tokenizer.vocab_size=600", "+tokenizer.special_tokens.im_start='<|im_start|>'",
                 "data=text_files", f"data.corpus.train_glob={tmp_path}/*.txt", "data.corpus.val_every=4",
                 f"paths.cache_dir={tmp_path / 'cache'}", f"out={tmp_path / 'tok'}"]
    with initialize_config_dir(str(root / "conf"), version_base="1.3"):
        cfg = compose("train_tokenizer", overrides=overrides)
    report = script.train_tokenizer(cfg)
    assert report["kind"] == "Unigram" and report["val_round_trip_exact"] and 1.0 < report["val_fertility_tokens_per_word"] < 4
    tok = PretrainedTokenizerSpec(str(tmp_path / "tok")).load()
    assert tok.special_id("im_start") == tok.hf.token_to_id("<|im_start|>") and tok.fingerprint() == report["fingerprint"]
    assert json.loads((tmp_path / "tok" / "report.json").read_text())["vocab_size"] == tok.vocab_size
