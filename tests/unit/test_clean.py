"""Cleaning steps on crafted inputs, dedup (exact, near, val decontamination) and the per-step report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.data.clean import (
    CleanConfig,
    CleanedCorpus,
    dup_line_char_frac,
    normalize_whitespace,
    strip_html,
    symbol_ratio,
)
from lmforge.data.corpus import Corpus, Document
from lmforge.data.dedup import ExactDeduper, NearDeduper, normalized_key
from lmforge.errors import ConfigError

OFF = dict(nfc=False, normalize_whitespace=False, min_chars=0, max_symbol_ratio=None, max_dup_line_frac=None,
           exact_dedup=False, decontaminate=False)

PROSE = ("Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds that "
         "lour'd upon our house in the deep bosom of the ocean buried. Now are our brows bound with victorious "
         "wreaths; our bruised arms hung up for monuments; our stern alarums changed to merry meetings, our "
         "dreadful marches to delightful measures.")


def clean(texts: list[str], val: list[str] | None = None, **config) -> tuple[list[str], dict]:
    corpus = Corpus({"train": [Document(f"d{i}", t) for i, t in enumerate(texts)],
                     "val": [Document(f"v{i}", t) for i, t in enumerate(val or [])]})
    cleaned = CleanedCorpus(corpus, CleanConfig(**{**OFF, **config}))
    out = [d.text for d in cleaned.iter_documents("train")]
    return out, cleaned.reports["train"]


def test_nfc_composes_characters() -> None:
    out, report = clean(["cafe\u0301", "café"], nfc=True)
    assert out == ["café", "café"]
    assert report["steps"][0] | {} == report["steps"][0] and report["steps"][0]["name"] == "nfc"
    assert report["steps"][0]["docs_changed"] == 1


def test_strip_html_keeps_visible_text_only() -> None:
    html = ("<!DOCTYPE html><html><head><title>t</title><style>p {color: red}</style></head><body>"
            "<h1>Act I</h1><p>To be, or <b>not</b> to be &amp; that&#39;s it</p><script>alert(1)</script>"
            "<ul><li>one</li><li>two</li></ul></body></html>")
    text = strip_html(html)
    assert "Act I" in text and "To be, or not to be & that's it" in text
    assert "alert" not in text and "color" not in text and "<" not in text
    assert text.index("one") < text.index("two") and "\n" in text[text.index("one"):text.index("two")]
    plain = "a < b and c > d, 3<4"
    assert strip_html(plain) == plain  # no tag: untouched
    out, report = clean([html, plain], strip_html=True)
    assert report["steps"][0]["docs_changed"] == 1 and out[1] == plain


def test_normalize_whitespace() -> None:
    text = "\ufeff  Line\u00a0one  with   gaps  \r\n\r\n\r\n\r\n    indented\tkept\u200b\rlast   "
    assert normalize_whitespace(text) == "Line one with gaps\n\n    indented\tkept\nlast"


def test_length_and_junk_filters() -> None:
    junk = "$$$ ### @@@ !!! %%% ^^^ &&& *** ((( )))"
    repetitive = "\n".join(["Buy now at our shop for the best price!"] * 8 + ["unique line"])
    docs = [PROSE, "too short", junk, repetitive]
    out, report = clean(docs, min_chars=20, max_symbol_ratio=0.3, max_dup_line_frac=0.3)
    assert out == [PROSE]
    steps = {s["name"]: s for s in report["steps"]}
    assert [steps[n]["docs_dropped"] for n in ("length", "symbol_ratio", "dup_lines")] == [1, 1, 1]
    assert steps["length"]["bytes_dropped"] == len(b"too short")
    assert report["docs_in"] == 4 and report["docs_out"] == 1
    assert report["bytes_out"] == len(PROSE.encode())
    assert symbol_ratio(junk) > 0.5 and symbol_ratio(PROSE) < 0.05
    assert dup_line_char_frac(repetitive) > 0.8 and dup_line_char_frac(PROSE) == 0.0
    out, _ = clean(docs, max_chars=50)
    assert out == ["too short", junk]


def test_exact_dedup_ignores_case_unicode_form_and_whitespace() -> None:
    variants = [PROSE, PROSE.upper(), "  " + PROSE.replace(" ", "\n"), PROSE + " Extra."]
    out, report = clean(variants, exact_dedup=True)
    assert out == [PROSE, PROSE + " Extra."]
    assert report["steps"][-1]["name"] == "exact_dedup" and report["steps"][-1]["docs_dropped"] == 2
    assert normalized_key("Café") == normalized_key("CAFE\u0301") and normalized_key("a b") != normalized_key("ab")
    dedup = ExactDeduper()
    assert [dedup.seen(t) for t in ("x", "X ", "y", "x")] == [False, True, False, True]


def test_near_dedup_drops_small_edits_keeps_different_text() -> None:
    edited = PROSE.replace("York", "Lancaster")  # one word: ~5 of ~55 word 5-grams change (Jaccard ~0.83)
    other = ("Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him. The evil "
             "that men do lives after them; the good is oft interred with their bones; so let it be with Caesar.")
    out, report = clean([PROSE, edited, other, other + " Amen."], near_dedup=True, near_dedup_threshold=0.7)
    assert out == [PROSE, other]
    assert report["steps"][-1]["name"] == "near_dedup" and report["steps"][-1]["docs_dropped"] == 2
    near = NearDeduper(threshold=0.9)
    assert not near.seen(PROSE) and not near.seen(edited)  # below 0.9: both kept


def test_decontamination_drops_train_copies_of_val() -> None:
    out, report = clean(["fresh text here", PROSE], val=[PROSE.lower()], exact_dedup=True, decontaminate=True)
    assert out == ["fresh text here"]
    out, _ = clean(["fresh text here", PROSE], val=[PROSE.lower()], exact_dedup=True, decontaminate=False)
    assert out == ["fresh text here", PROSE]


def test_report_written_and_fingerprint_follows_config(tmp_path: Path) -> None:
    corpus = Corpus({"train": [Document("a", "x  y"), Document("b", "x y")], "val": [Document("v", "z")]})
    cleaned = CleanedCorpus(corpus, CleanConfig(), tmp_path / "report.json")
    assert [d.text for d in cleaned.documents("train")] == ["x y"]
    assert [d.text for d in cleaned.documents("val")] == ["z"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) == {"train", "val", "config"}
    names = [s["name"] for s in report["train"]["steps"]]
    assert names == ["nfc", "normalize_whitespace", "length", "symbol_ratio", "dup_lines", "exact_dedup"]
    for s in report["train"]["steps"]:
        assert s["docs_out"] == s["docs_in"] - s["docs_dropped"]
        assert s["bytes_out"] <= s["bytes_in"] - s["bytes_dropped"] + 0  # transforms may shrink
    assert cleaned.fingerprint() != CleanedCorpus(corpus, CleanConfig(near_dedup=True)).fingerprint()
    assert cleaned.fingerprint() != corpus.fingerprint()
    assert cleaned.fingerprint() == CleanedCorpus(corpus, CleanConfig()).fingerprint()


@pytest.mark.parametrize("kwargs,key", [({"max_symbol_ratio": 1.5}, "data.clean.max_symbol_ratio"),
                                        ({"near_dedup_threshold": 1.0}, "data.clean.near_dedup_threshold"),
                                        ({"min_chars": 10, "max_chars": 5}, "data.clean.max_chars")])
def test_bad_clean_config_names_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        CleanConfig(**kwargs)
    assert info.value.key == key
