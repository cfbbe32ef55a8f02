"""Compare runs without W&B: one row per run, the config keys that differ between them, and final metrics.

    python scripts/compare_runs.py logs/scaling_ladder/multiruns/2026-11-23_10-00-00   # a multirun's jobs
    python scripts/compare_runs.py "logs/train/runs/2026-11-2*" --sort val/bpb
    python scripts/compare_runs.py logs/train --metrics val/bpb perf/tokens_per_sec --markdown
    python scripts/compare_runs.py logs/a logs/b --json

Runs are dirs holding the config.yaml that train.py saves (a parent dir is searched). Metrics come from
metrics.json (the final full validation), falling back to the last logged values of csv/metrics.csv for a
run that did not finish. Paths, Hydra's own settings and other per-run noise are left out of the diff.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmforge.utils.runs import final_metrics, find_run_dirs, flatten, load_config  # noqa: E402

DEFAULT_METRICS = ["val/loss", "val/bpb", "val/ppl"]
# Differ between any two runs without saying anything about them.
IGNORED = [
    "paths.*",
    "hydra.*",
    "*.dirpath",
    "*.save_dir",
    "*.default_root_dir",
    "*.output_dir",
    "*.cache_dir",
    "ckpt_path",
    "logger.*.version",
    "logger.*.id",
    "logger.*.name",
]
MISSING = "—"


def differing_keys(configs: list[dict[str, Any]], ignore: list[str]) -> list[str]:
    """Dotted keys whose value is not the same in every run, in the order they first appear. A key absent
    from a run counts as null: configs saved before a key was added then do not differ from ones where it
    is null."""
    flat = [flatten(c) for c in configs]
    keys: dict[str, None] = {}
    for f in flat:
        keys.update(dict.fromkeys(f))
    out = []
    for key in keys:
        if any(fnmatch.fnmatchcase(key, pattern) for pattern in ignore):
            continue
        values = {json.dumps(f.get(key), sort_keys=True, default=str) for f in flat}
        if len(values) > 1:
            out.append(key)
    return out


def short_path(run_dir: Path) -> str:
    """The part after logs/ (task/runs/<ts>), else the last three components."""
    parts = run_dir.parts
    return "/".join(parts[parts.index("logs") + 1 :]) if "logs" in parts else "/".join(parts[-3:])


def compare(
    run_dirs: list[Path],
    metrics: list[str],
    ignore: list[str],
    sort: str | None = None,
    descending: bool = False,
    keys: list[str] | None = None,
) -> tuple[list[str], list[dict[str, Any]]]:
    """(config keys shown, one row per run: {key: value} + {metric: value} + run). The keys are `keys`
    (shown even when equal everywhere), then the ones that differ between runs."""
    configs = [load_config(d) for d in run_dirs]
    keys = list(keys or [])
    keys += [k for k in (differing_keys(configs, ignore) if len(configs) > 1 else []) if k not in keys]
    rows = []
    for run_dir, cfg in zip(run_dirs, configs):
        flat = flatten(cfg)
        values = final_metrics(run_dir)
        row: dict[str, Any] = {k: flat.get(k, MISSING) for k in keys}
        row.update({m: values.get(m) for m in metrics})
        finished = (run_dir / "metrics.json").is_file()
        row["run"] = short_path(run_dir) + ("" if finished else " (unfinished)")
        rows.append(row)
    if sort:

        def sort_key(row: dict[str, Any]) -> tuple[int, float, str]:
            """Numbers first (descending with --desc), then other values as text, missing values last."""
            value = row.get(sort)
            if value is None or value == MISSING or (isinstance(value, float) and math.isnan(value)):
                return (2, 0.0, "")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return (0, -value if descending else value, "")
            return (1, 0.0, json.dumps(value, default=str))

        rows.sort(key=sort_key)
    return keys, rows


def fmt(value: Any, metric: bool = False) -> str:
    """Metrics to 4 decimals; config values as written (lists as JSON, null as a dash)."""
    if value is None:
        return MISSING
    if metric and isinstance(value, float):
        return f"{value:.4f}" if 1e-3 <= abs(value) < 1e5 else f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _cell(key: str, value: Any, metrics: list[str]) -> str:
    """Table cells: a `_target_` class path shortened to its name (the full path is in --json, --markdown)."""
    text = fmt(value, key in metrics)
    return text.rsplit(".", 1)[-1] if key.endswith("_target_") and isinstance(value, str) else text


def to_markdown(rows: list[dict[str, Any]], metrics: list[str]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += [
        "| " + " | ".join(fmt(r[c], c in metrics).replace("|", "\\|") for c in cols) + " |" for r in rows
    ]
    return "\n".join(lines)


def print_table(
    rows: list[dict[str, Any]], keys: list[str], metrics: list[str], layout: str = "auto"
) -> None:
    """Runs as rows; or, when that is wider than the console (many differing keys), runs as columns."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 160))
    cols = list(rows[0])
    cells = [[_cell(c, r[c], metrics) for c in cols] for r in rows]
    width = sum(max(len(c), *(len(r[i]) for r in cells)) + 3 for i, c in enumerate(cols))
    title = f"{len(rows)} runs: {len(keys)} config keys shown"
    if layout == "columns" or (layout == "auto" and width > console.width):
        table = Table(title=title)
        table.add_column("key / metric", style="bold", no_wrap=True, min_width=min(40, max(map(len, cols))))
        names = [r["run"] for r in rows]
        prefix = os.path.commonpath(names) if len(names) > 1 and all("/" in n for n in names) else ""
        for name in names:
            table.add_column(name[len(prefix) :].lstrip("/") or name, justify="right", overflow="fold")
        for i, c in enumerate(cols[:-1]):  # the run is the header
            table.add_row(
                c,
                *(cell[i] for cell in cells),
                style="bold" if c in metrics else None,
                end_section=c == cols[len(keys) - 1] if keys else False,
            )
    else:
        table = Table(title=title)
        for c in cols:
            table.add_column(
                c, justify="right" if c in metrics else "left", style="bold" if c in metrics else None
            )
        for cell in cells:
            table.add_row(*cell)
    console.print(table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run dirs, globs, or parent dirs to search for config.yaml")
    ap.add_argument(
        "--metrics", nargs="+", default=DEFAULT_METRICS, help=f"default: {' '.join(DEFAULT_METRICS)}"
    )
    ap.add_argument("--sort", help="a metric or config key to sort by (ascending)")
    ap.add_argument("--desc", action="store_true", help="sort descending")
    ap.add_argument(
        "--ignore", nargs="*", default=[], help="more key patterns to leave out (fnmatch, e.g. 'callbacks.*')"
    )
    ap.add_argument(
        "--layout",
        choices=("auto", "rows", "columns"),
        default="auto",
        help="runs as rows or as columns (auto: columns when rows are wider than the console)",
    )
    ap.add_argument("--keys", nargs="*", default=[], help="config keys to show even when equal in all runs")
    out = ap.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="rows as JSON")
    out.add_argument("--markdown", action="store_true", help="a Markdown table (for READMEs and PRs)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    run_dirs = find_run_dirs(args.runs)
    if not run_dirs:
        raise SystemExit(f"no run dirs (with config.yaml) under {' '.join(args.runs)}")
    keys, rows = compare(run_dirs, args.metrics, IGNORED + args.ignore, args.sort, args.desc, args.keys)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    elif args.markdown:
        print(to_markdown(rows, args.metrics))
    else:
        print_table(rows, keys, args.metrics, args.layout)
    return rows


if __name__ == "__main__":
    main()
