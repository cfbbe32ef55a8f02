"""Reading documents out of local files (.txt .md .jsonl .parquet), with an explicit policy for bad files.

Bad input is never silently trained on: with `on_error=fail` (the default) the first unreadable file or
row stops the run with its path and the fix; with `on_error=skip` it is left out, counted by reason in
`ReadStats`, and the counts are logged as a warning.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import ConfigError, DataError

log = logging.getLogger("lmforge")

ON_ERROR = ("fail", "skip")
TEXT_SUFFIXES = (".txt", ".md", ".text", ".markdown", ".rst")
ROW_SUFFIXES = (".jsonl", ".parquet")


@dataclass
class ReadStats:
    """Files and rows read or skipped, by reason; the first few skipped paths are kept for the message."""

    files_read: int = 0
    files_skipped: Counter = field(default_factory=Counter)
    rows_skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def skip_file(self, reason: str, where: str) -> None:
        self.files_skipped[reason] += 1
        self._example(f"{where} ({reason})")

    def skip_row(self, reason: str, where: str) -> None:
        self.rows_skipped[reason] += 1
        self._example(f"{where} ({reason})")

    def _example(self, text: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(text)

    def summary(self) -> str:
        parts = [f"{self.files_read} files read"]
        parts += [f"{n} files skipped: {r}" for r, n in sorted(self.files_skipped.items())]
        parts += [f"{n} rows skipped: {r}" for r, n in sorted(self.rows_skipped.items())]
        return ", ".join(parts)

    def warn_if_skipped(self, key: str) -> None:
        if self.files_skipped or self.rows_skipped:
            log.warning("%s: skipped bad input (%s), e.g. %s", key, self.summary(), "; ".join(self.examples))

    def to_dict(self) -> dict[str, object]:
        return {"files_read": self.files_read, "files_skipped": dict(self.files_skipped),
                "rows_skipped": dict(self.rows_skipped), "examples": list(self.examples)}


class FileReader:
    """Documents of one file: a whole .txt/.md file, or one per row of .jsonl/.parquet (`text_field`)."""

    def __init__(self, text_field: str = "text", on_error: str = "fail", stats: ReadStats | None = None, key: str = "data.corpus") -> None:
        if on_error not in ON_ERROR:
            raise ConfigError(f"{key}.on_error", f"{on_error!r} is not one of {ON_ERROR}", f"set {key}.on_error=fail or skip")
        self.text_field, self.on_error, self.key = text_field, on_error, key
        self.stats = stats if stats is not None else ReadStats()

    def read(self, path: Path) -> list[str]:
        """All documents of `path` ([] when the file is skipped)."""
        try:
            if path.suffix == ".jsonl":
                docs = list(self._jsonl(path))
            elif path.suffix == ".parquet":
                docs = list(self._parquet(path))
            else:
                docs = [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as err:
            return self._bad_file(path, "not UTF-8", f"byte {err.object[err.start]:#04x} at offset {err.start} is not UTF-8. "
                                  f"Fix: convert it (e.g. `iconv -f latin1 -t utf-8`), remove it, or set {self.key}.on_error=skip")
        except OSError as err:
            return self._bad_file(path, "unreadable", f"cannot be read ({err.strerror or err}). Fix: check the file and its "
                                  f"permissions, remove it, or set {self.key}.on_error=skip")
        self.stats.files_read += 1
        return docs

    def _bad_file(self, path: Path, reason: str, detail: str) -> list[str]:
        if self.on_error == "fail":
            raise DataError(f"{path}: {detail}")
        self.stats.skip_file(reason, str(path))
        return []

    def _bad_row(self, where: str, reason: str, detail: str) -> None:
        if self.on_error == "fail":
            raise DataError(f"{where}: {detail}")
        self.stats.skip_row(reason, where)

    def _jsonl(self, path: Path) -> Iterator[str]:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    self._bad_row(f"{path}:{lineno}", "not valid JSON", f"not valid JSON ({err.msg}). Fix the line or remove it, or set {self.key}.on_error=skip.")
                    continue
                if not isinstance(row, dict) or self.text_field not in row:
                    self._bad_row(f"{path}:{lineno}", f"no field {self.text_field!r}", f"no field {self.text_field!r}. "
                                  f"Set {self.key}.text_field to the field holding the text, or {self.key}.on_error=skip.")
                    continue
                value = row[self.text_field]
                if not isinstance(value, str):
                    self._bad_row(f"{path}:{lineno}", "text not a string", f"field {self.text_field!r} is {type(value).__name__}, not text. "
                                  f"Fix the row, or set {self.key}.on_error=skip.")
                    continue
                yield value

    def _parquet(self, path: Path) -> Iterator[str]:
        import pyarrow.parquet as pq

        try:
            file = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises its own ArrowInvalid for non-parquet bytes
            raise OSError(f"not a parquet file ({err})") from None
        columns = file.schema_arrow.names
        if self.text_field not in columns:
            raise DataError(f"{path}: no column {self.text_field!r} (columns: {columns}). Fix: set {self.key}.text_field to the text column")
        row = 0
        for batch in file.iter_batches(columns=[self.text_field], batch_size=4096):
            for value in batch.column(0).to_pylist():
                row += 1
                if value is None:
                    self._bad_row(f"{path}: row {row}", "null text", f"column {self.text_field!r} is null. Fix the row, or set {self.key}.on_error=skip.")
                    continue
                yield str(value)
