"""Tokenizer kinds besides byte-level BPE: WordPiece, Unigram (SentencePiece-style), and pretrained HF ones.

Both trained kinds are built to be lossless (decode(encode(text)) == text for any UTF-8), so that
bits-per-byte stays exact and comparable with BPE:

* WordPiece runs on GPT-2's byte-level alphabet (a space is part of the next word, as `Ġ`), with `##` marking
  continuation pieces; every byte gets a `##` form as well, so no input needs [UNK]. `#` is cut into
  single-character pre-tokens, so a vocab string starting with `##` can only be a continuation.
* Unigram marks spaces with `▁` inside pieces (Metaspace, no dummy prefix) and falls back to `<0xNN>` byte
  pieces for characters its vocab lacks, as Llama's SentencePiece model does. `▁` in the input text itself
  comes back as a space (as with SentencePiece).

`PretrainedTokenizerSpec` loads a `tokenizer.json` (an HF model dir, or one written by
scripts/train_tokenizer.py) from disk; its special-token roles come from the config or from the dir's
tokenizer_config.json / special_tokens_map.json.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.data.tokenizer import DEFAULT_SPECIALS, Tokenizer, TokenizerSpec
from lmforge.errors import ConfigError, DataError

log = logging.getLogger("lmforge")

UNK = "<|unk|>"
WORDPIECE_PREFIX = "##"
MAX_WORD_CHARS = 1000  # longer pre-tokens (e.g. 1000 '=' in a row) become [UNK] (WordPiece is quadratic in them)


def _with_unk(special_tokens: dict[str, str] | None) -> dict[str, str]:
    specials = dict(special_tokens or DEFAULT_SPECIALS)
    specials.setdefault("unk", UNK)
    return specials


class WordPieceTokenizerSpec(TokenizerSpec):
    """Byte-level WordPiece (BERT's algorithm, lossless here)."""

    kind = "wordpiece"
    min_vocab_bytes = 512  # each byte as a word start and as a `##` continuation

    def __init__(self, vocab_size: int = 4096, min_frequency: int = 2, special_tokens: dict[str, str] | None = None,
                 n_sentinels: int = 0, train_max_bytes: int | None = None) -> None:
        super().__init__(vocab_size, _with_unk(special_tokens), n_sentinels, train_max_bytes)
        self.min_frequency = int(min_frequency)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "mf": self.min_frequency}

    def train(self, texts: Iterable[str]) -> Tokenizer:
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        hf = HFTokenizer(models.WordPiece(unk_token=self.special_tokens["unk"], continuing_subword_prefix=WORDPIECE_PREFIX))
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split("#", behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        hf.decoder = decoders.Sequence([decoders.Replace(Regex(f"^{WORDPIECE_PREFIX}"), ""), decoders.ByteLevel()])
        trainer = trainers.WordPieceTrainer(
            vocab_size=self.vocab_size - len(alphabet), min_frequency=self.min_frequency, special_tokens=self.special_list(),
            initial_alphabet=alphabet, continuing_subword_prefix=WORDPIECE_PREFIX, show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        vocab = hf.get_vocab(with_added_tokens=False)
        for ch in sorted(alphabet):  # every byte as a continuation too: nothing needs [UNK]
            vocab.setdefault(WORDPIECE_PREFIX + ch, len(vocab))
        hf.model = models.WordPiece(vocab, unk_token=self.special_tokens["unk"], continuing_subword_prefix=WORDPIECE_PREFIX,
                                    max_input_chars_per_word=MAX_WORD_CHARS)
        return Tokenizer(hf, self.special_tokens)


class UnigramTokenizerSpec(TokenizerSpec):
    """Unigram LM (SentencePiece's default algorithm) with `▁` for spaces and byte fallback."""

    kind = "unigram"

    def __init__(self, vocab_size: int = 4096, max_piece_length: int = 16, special_tokens: dict[str, str] | None = None,
                 n_sentinels: int = 0, train_max_bytes: int | None = None) -> None:
        super().__init__(vocab_size, _with_unk(special_tokens), n_sentinels, train_max_bytes)
        self.max_piece_length = int(max_piece_length)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "mpl": self.max_piece_length}

    def train(self, texts: Iterable[str]) -> Tokenizer:
        hf = HFTokenizer(models.Unigram())
        hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
        hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
        trainer = trainers.UnigramTrainer(
            vocab_size=self.vocab_size - 256 - 16, special_tokens=self.special_list(), unk_token=self.special_tokens["unk"],
            max_piece_length=self.max_piece_length, show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        model = json.loads(hf.to_str())["model"]
        floor = round(min(score for _, score in model["vocab"]) - 1.0, 8)
        specials = set(self.special_tokens.values())
        # Raw text like "<|eos|>" must never come out as a special id (those are inserted by code only): special
        # pieces get a prohibitive score, and every character they are spelled with gets a piece of its own, so
        # the lattice always has a cheaper path. Scores are rounded so they survive tokenizer.json round trips.
        pieces = [(p, -1e4 if p in specials else round(score, 8)) for p, score in model["vocab"]]
        have = {p for p, _ in pieces}
        chars = sorted({ch for t in specials for ch in t} - have)
        pieces += [(ch, floor) for ch in chars]
        pieces += [(f"<0x{b:02X}>", floor) for b in range(256) if f"<0x{b:02X}>" not in have]
        extra = len(pieces) - self.vocab_size  # the trainer may overshoot: drop its least likely pieces
        if extra > 0:
            candidates = [i for i, (p, _) in enumerate(pieces) if p not in specials and len(p) > 1 and not p.startswith("<0x")]
            dropped = set(sorted(candidates, key=lambda i: pieces[i][1])[:extra])
            pieces = [p for i, p in enumerate(pieces) if i not in dropped]
        unk_id = [p for p, _ in pieces].index(self.special_tokens["unk"])
        hf.model = models.Unigram(pieces, unk_id=unk_id, byte_fallback=True)
        return Tokenizer(hf, self.special_tokens)


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json holds a special token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class PretrainedTokenizerSpec(TokenizerSpec):
    """A tokenizer loaded from disk: an HF model dir / tokenizer.json, or an lmforge tokenizer file. No training."""

    kind = "pretrained"

    def __init__(self, path: str, special_tokens: dict[str, str] | None = None) -> None:
        self.path = Path(path).expanduser()
        self.explicit = dict(special_tokens) if special_tokens else None
        self.vocab_size, self.n_sentinels, self.train_max_bytes = 0, 0, None
        self.special_tokens = self.explicit or {}

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path)}

    def _file(self) -> Path:
        file = self.path / "tokenizer.json" if self.path.is_dir() else self.path
        if not file.is_file():
            raise DataError(f"tokenizer.path={str(self.path)!r}: no tokenizer.json there. Fix: point tokenizer.path at a directory "
                            "holding tokenizer.json (an HF model dir, or scripts/train_tokenizer.py's output) or at the file itself")
        return file

    def _roles(self, folder: Path, hf: HFTokenizer) -> dict[str, str]:
        if self.explicit:
            return self.explicit
        roles: dict[str, str] = {}
        config = folder / "tokenizer_config.json"
        saved = json.loads(config.read_text(encoding="utf-8")).get("lmforge_special_roles") if config.is_file() else None
        if saved:  # written by Tokenizer.save_pretrained: every role, sentinels and chat tokens included
            return dict(saved)
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            cfg = folder / name
            if cfg.is_file():
                data = json.loads(cfg.read_text(encoding="utf-8"))
                for role in ("eos", "bos", "pad", "unk", "mask"):
                    token = _token_text(data.get(f"{role}_token"))
                    if token and hf.token_to_id(token) is not None:
                        roles.setdefault(role, token)
        if "eos" not in roles:
            raise ConfigError("tokenizer.special_tokens", f"cannot tell which token of {folder} ends a document (no eos_token in its "
                              "tokenizer_config.json)", 'name the roles, e.g. tokenizer.special_tokens={eos: "</s>", bos: "<s>", pad: "<pad>"}')
        for role in ("bos", "pad"):
            if role not in roles:
                log.info("tokenizer %s has no %s token: using eos %r for it", folder, role, roles["eos"])
                roles[role] = roles["eos"]
        return roles

    def load(self) -> Tokenizer:
        file = self._file()
        text = file.read_text(encoding="utf-8")
        if '"lmforge_specials"' in text[:200]:
            tok = Tokenizer.from_json(text)
            if self.explicit:
                tok.add_special_tokens(self.explicit)
            return tok
        hf = HFTokenizer.from_str(text)
        roles = self._roles(file.parent, hf)
        missing = {r: t for r, t in roles.items() if hf.token_to_id(t) is None}
        if missing and not self.explicit:
            raise DataError(f"{file} lacks the special tokens {missing}. Fix: name existing tokens in tokenizer.special_tokens")
        if missing:
            hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing.values())])
            log.info("added special tokens %s to the pretrained tokenizer %s", sorted(missing.values()), file)
        return Tokenizer(hf, roles)

    def train(self, texts: Iterable[str]) -> Tokenizer:
        return self.load()

    def load_or_train(self, texts: Iterable[str], corpus_fingerprint: str, cache_dir: str | Path) -> Tokenizer:
        return self.load()  # nothing to train or cache: the texts are never read
