"""How every benchmark mode reports: a rich table on the console, rows appended to logs/benchmark/results.jsonl,
so a README figure can be traced to the run (and machine) that produced it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def print_rows(rows: Sequence[dict[str, Any]], title: str, vertical: bool = False) -> None:
    """One table of rows (columns = the first row's keys), or with `vertical` one key/value table per row."""
    from rich.console import Console
    from rich.table import Table

    if not rows:
        return
    if vertical:
        for row in rows:
            table = Table(title=f"{title}: {row.get('bench', '')}")
            table.add_column("key")
            table.add_column("value")
            for key, value in row.items():
                table.add_row(key, str(value))
            Console().print(table)
        return
    table = Table(title=title)
    for key in rows[0]:
        table.add_column(key)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    Console().print(table)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table of `columns` (missing or None values blank): the README's tables are pasted from these."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def append_results(rows: Sequence[dict[str, Any]], root: Path) -> None:
    out = root / "logs" / "benchmark" / "results.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
