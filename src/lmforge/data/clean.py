"""Document cleaning: normalise, strip markup, filter junk, drop duplicates, and count what each step did.

Steps run in this order, each switched by its key in `data.clean` (null / false = off):

    nfc                    Unicode NFC (one encoding per visible character: é vs e + ◌́)
    strip_html             markup to text (tags dropped, block tags become line breaks, entities decoded,
                           <script>/<style> bodies removed); only documents that contain a tag are parsed
    normalize_whitespace   CRLF/CR -> LF, exotic spaces -> ' ', zero-width chars dropped, runs of spaces
                           inside a line -> one (indentation and tabs kept), trailing spaces cut,
                           runs of blank lines -> one, leading/trailing blank space stripped
    min_chars / max_chars  length filter (characters)
    max_symbol_ratio       drop documents whose share of characters that are neither letters, digits nor
                           whitespace exceeds it (boilerplate, tables of symbols, binary junk)
    max_dup_line_frac      drop documents whose duplicated lines (a line seen before in the same document)
                           make up more than this share of the characters (Gopher's repetition filter)
    exact_dedup            drop documents identical after NFKC + case folding + whitespace collapsing
    near_dedup             drop documents with MinHash-estimated Jaccard >= near_dedup_threshold to a kept one
    decontaminate          dedup train against val: a train document duplicating a val one is dropped

Every step records documents and bytes (UTF-8) in / changed / dropped / out; `CleanedCorpus` writes that
report as JSON (`<cache_dir>/clean/<hash>/report.json`) after each full pass over a split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from html import unescape
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from lmforge.data.corpus import Corpus, Document
from lmforge.data.dedup import ExactDeduper, NearDeduper
from lmforge.errors import ConfigError
from lmforge.utils.io import atomic_write_text

log = logging.getLogger("lmforge")

CLEAN_VERSION = 1


# --- transforms ---------------------------------------------------------------------------------------

_TAG = re.compile(r"<(?:[a-zA-Z][a-zA-Z0-9-]*|/[a-zA-Z][a-zA-Z0-9-]*|!--|!DOCTYPE)[^>]*>", re.IGNORECASE)
_BLOCK_TAGS = {"p", "div", "br", "li", "ul", "ol", "tr", "table", "h1", "h2", "h3", "h4", "h5", "h6", "pre",
               "blockquote", "section", "article", "header", "footer", "title", "hr", "dd", "dt"}
_SKIP_TAGS = {"script", "style", "noscript", "template", "head"}


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP_TAGS:
            self.skipping += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            self.skipping = max(0, self.skipping - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)


def strip_html(text: str) -> str:
    """Visible text of an HTML/XML document; text without any tag is returned as is."""
    if not _TAG.search(text):
        return text
    parser = _TextExtractor()
    parser.feed(text)
    parser.close()
    return unescape("".join(parser.parts))


_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))
_EXOTIC_SPACE = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+")
_TRAILING = re.compile(r"[ ]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")
_SPACE_RUNS = re.compile(r"(?<=\S) {2,}")  # inside a line; indentation is kept


def normalize_whitespace(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").translate(_ZERO_WIDTH)
    text = _EXOTIC_SPACE.sub(" ", text)
    text = _SPACE_RUNS.sub(" ", text)
    text = _TRAILING.sub("\n", text)
    return _BLANK_RUNS.sub("\n\n", text).strip()


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


# --- quality measures ---------------------------------------------------------------------------------

_SYMBOL = re.compile(r"[^\w\s]|_")


def symbol_ratio(text: str) -> float:
    """Share of characters that are neither letters, digits nor whitespace."""
    return len(_SYMBOL.findall(text)) / len(text) if text else 0.0


def dup_line_char_frac(text: str) -> float:
    """Share of the characters of non-blank lines that sit in a line already seen in the document."""
    seen: set[str] = set()
    dup = total = 0
    for line in text.split("\n"):
        line = line.strip()
        if not line:
            continue
        total += len(line)
        if line in seen:
            dup += len(line)
        else:
            seen.add(line)
    return dup / total if total else 0.0


# --- the pipeline -------------------------------------------------------------------------------------

@dataclass
class StepStats:
    name: str
    docs_in: int = 0
    docs_changed: int = 0
    docs_dropped: int = 0
    bytes_in: int = 0
    bytes_dropped: int = 0
    bytes_out: int = 0

    @property
    def docs_out(self) -> int:
        return self.docs_in - self.docs_dropped


@dataclass
class CleanConfig:
    """`data.clean`: which steps run and their thresholds (see the module docstring)."""

    nfc: bool = True
    strip_html: bool = False
    normalize_whitespace: bool = True
    min_chars: int = 1
    max_chars: int | None = None
    max_symbol_ratio: float | None = 0.3
    max_dup_line_frac: float | None = 0.3
    exact_dedup: bool = True
    near_dedup: bool = False
    near_dedup_threshold: float = 0.8
    near_dedup_num_perm: int = 128
    near_dedup_ngram: int = 5
    decontaminate: bool = True

    def __post_init__(self) -> None:
        for key in ("max_symbol_ratio", "max_dup_line_frac"):
            value = getattr(self, key)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"data.clean.{key}", f"must be in [0, 1] or null, got {value}", f"set data.clean.{key}=0.3 or null")
        if not 0.0 < self.near_dedup_threshold < 1.0:
            raise ConfigError("data.clean.near_dedup_threshold", f"must be in (0, 1), got {self.near_dedup_threshold}", "use e.g. 0.8")
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ConfigError("data.clean.max_chars", f"{self.max_chars} is below min_chars={self.min_chars}", "raise max_chars or set it to null")

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps({"v": CLEAN_VERSION, **asdict(self)}, sort_keys=True).encode()).hexdigest()[:16]


Step = tuple[str, str, Callable[[str], Any]]  # (name, kind: map | filter | dedup, function)


@dataclass
class DedupState:
    """Shared by the passes of one cleaning run: val seeds it so that train copies of val documents drop."""

    exact: ExactDeduper | None = None
    near: NearDeduper | None = None


@dataclass
class Cleaner:
    config: CleanConfig = field(default_factory=CleanConfig)

    def new_state(self) -> DedupState:
        c = self.config
        return DedupState(
            exact=ExactDeduper() if c.exact_dedup else None,
            near=NearDeduper(c.near_dedup_threshold, c.near_dedup_num_perm, c.near_dedup_ngram) if c.near_dedup else None,
        )

    def steps(self, state: DedupState) -> list[Step]:
        c = self.config
        steps: list[Step] = []
        if c.nfc:
            steps.append(("nfc", "map", nfc))
        if c.strip_html:
            steps.append(("strip_html", "map", strip_html))
        if c.normalize_whitespace:
            steps.append(("normalize_whitespace", "map", normalize_whitespace))
        if c.min_chars or c.max_chars is not None:
            steps.append(("length", "filter", lambda t: len(t) >= c.min_chars and (c.max_chars is None or len(t) <= c.max_chars)))
        if c.max_symbol_ratio is not None:
            steps.append(("symbol_ratio", "filter", lambda t: symbol_ratio(t) <= c.max_symbol_ratio))
        if c.max_dup_line_frac is not None:
            steps.append(("dup_lines", "filter", lambda t: dup_line_char_frac(t) <= c.max_dup_line_frac))
        if state.exact is not None:
            steps.append(("exact_dedup", "filter", lambda t: not state.exact.seen(t)))
        if state.near is not None:
            steps.append(("near_dedup", "filter", lambda t: not state.near.seen(t)))
        return steps

    def run(self, docs: Iterator[Document], state: DedupState, stats: list[StepStats]) -> Iterator[Document]:
        """Clean a stream of documents, updating `stats` (one entry per step, in order) as it goes."""
        steps = self.steps(state)
        if not stats:
            stats.extend(StepStats(name) for name, _, _ in steps)
        for doc in docs:
            text = doc.text
            size = len(text.encode("utf-8"))
            kept = True
            for (_, kind, fn), st in zip(steps, stats):
                st.docs_in += 1
                st.bytes_in += size
                if kind == "map":
                    new = fn(text)
                    if new != text:
                        st.docs_changed += 1
                        text, size = new, len(new.encode("utf-8"))
                elif not fn(text):
                    st.docs_dropped += 1
                    st.bytes_dropped += size
                    kept = False
                    break
                st.bytes_out += size
            if kept:
                yield Document(doc.name, text)


def report_dict(stats: list[StepStats]) -> dict[str, Any]:
    steps = [{**asdict(s), "docs_out": s.docs_out} for s in stats]
    first, last = (steps[0], steps[-1]) if steps else ({}, {})
    return {"docs_in": first.get("docs_in", 0), "bytes_in": first.get("bytes_in", 0),
            "docs_out": last.get("docs_out", 0), "bytes_out": last.get("bytes_out", 0), "steps": steps}


class CleanedCorpus(Corpus):
    """Another corpus seen through a `Cleaner`, lazily (streaming corpora stay streaming)."""

    def __init__(self, corpus: Corpus, config: CleanConfig, report_path: str | Path | None = None) -> None:
        self.inner, self.cleaner = corpus, Cleaner(config)
        self.report_path = Path(report_path) if report_path is not None else None
        self.reports: dict[str, dict[str, Any]] = {}

    def iter_documents(self, split: str) -> Iterator[Document]:
        state = self.cleaner.new_state()
        if split == "train" and self.cleaner.config.decontaminate:
            for _ in self.cleaner.run(self.inner.iter_documents("val"), state, []):
                continue  # val passes first so its documents are "seen"
        stats: list[StepStats] = []
        yield from self.cleaner.run(self.inner.iter_documents(split), state, stats)
        self.reports[split] = report_dict(stats)
        self._write_report()

    def documents(self, split: str) -> list[Document]:
        return list(self.iter_documents(split))

    def fingerprint(self) -> str:
        return hashlib.sha256(f"clean|{self.inner.fingerprint()}|{self.cleaner.config.fingerprint()}".encode()).hexdigest()[:16]

    def _write_report(self) -> None:
        if self.report_path is None:
            return
        report = json.loads(self.report_path.read_text()) if self.report_path.is_file() else {}
        report.update(self.reports)
        report["config"] = asdict(self.cleaner.config)
        atomic_write_text(self.report_path, json.dumps(report, indent=1))
        for split, r in self.reports.items():
            log.info("clean %s: %d -> %d docs, %.2f -> %.2f MB (%s); report: %s", split, r["docs_in"], r["docs_out"],
                     r["bytes_in"] / 1e6, r["bytes_out"] / 1e6,
                     ", ".join(f"{s['name']} -{s['docs_dropped']}" for s in r["steps"] if s["docs_dropped"]) or "nothing dropped",
                     self.report_path)
