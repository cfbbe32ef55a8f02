"""Reading finished run dirs (logs/<task>/runs/<ts>/, logs/<task>/multiruns/<ts>/<n>/) without W&B:
the saved config.yaml, the final metrics.json, else the last logged values of csv/metrics.csv."""

from __future__ import annotations

import csv
import glob
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

NOT_RUNS = {".hydra", "wandb"}  # Hydra's and W&B's own copies of config.yaml live in these


def find_run_dirs(patterns: Iterable[str | Path]) -> list[Path]:
    """Run dirs (holding config.yaml) from dirs, globs or parents (searched recursively), sorted, unique."""
    found: dict[Path, None] = {}
    for pattern in patterns:
        matches = [Path(p) for p in sorted(glob.glob(str(pattern)))] or [Path(pattern)]
        for path in matches:
            if (path / "config.yaml").is_file():
                found[path.resolve()] = None
            elif path.is_dir():
                for cfg in sorted(path.rglob("config.yaml")):
                    if not NOT_RUNS.intersection(cfg.parts):
                        found[cfg.parent.resolve()] = None
    return sorted(found)


def load_config(run_dir: Path) -> dict[str, Any]:
    """The resolved config the run saved (what actually ran)."""
    return yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}


def final_metrics(run_dir: Path) -> dict[str, float]:
    """metrics.json (written when a run ends: the full final validation), completed by the last non-empty
    value of each column of csv/metrics.csv (also for a run that was stopped before it wrote metrics.json)."""
    run_dir = Path(run_dir)
    out: dict[str, float] = {}
    for path in sorted(run_dir.glob("csv/**/metrics.csv")) or sorted(run_dir.glob("**/metrics.csv")):
        with path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                for key, value in row.items():
                    if key and value not in (None, ""):
                        try:
                            out[key] = float(value)
                        except ValueError:
                            pass
        break
    metrics_json = run_dir / "metrics.json"
    if metrics_json.is_file():
        out.update(
            {
                k: float(v)
                for k, v in json.loads(metrics_json.read_text()).items()
                if isinstance(v, (int, float))
            }
        )
    return out


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out
