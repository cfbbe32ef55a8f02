"""scripts/compare_runs.py on fake run dirs: differing keys, final metrics, sorting, output formats."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from conftest import load_script

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compare_runs() -> ModuleType:
    return load_script("compare_runs")


def _run(
    root: Path, name: str, lr: float, n_layer: int, metrics: dict[str, float] | None, csv: str | None = None
) -> Path:
    run = root / "logs" / "exp" / "runs" / name
    run.mkdir(parents=True)
    cfg: dict[str, Any] = {
        "task_name": "exp",
        "seed": 1337,
        "paths": {"output_dir": str(run)},  # differs per run, but is noise
        "model": {"family": "llama", "n_layer": n_layer, "n_embd": 128},
        "optimizer": {"lr": lr, "betas": [0.9, 0.99]},
        "trainer": {"max_steps": 100, "default_root_dir": str(run)},
        "hydra": {"job": {"num": name}},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    if csv is not None:
        (run / "csv").mkdir()
        (run / "csv" / "metrics.csv").write_text(csv)
    return run


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    _run(tmp_path, "a", 1e-3, 4, {"val/loss": 4.2, "val/bpb": 2.10, "val/ppl": 66.7})
    _run(tmp_path, "b", 3e-3, 4, {"val/loss": 4.0, "val/bpb": 2.00, "val/ppl": 54.6})
    # unfinished: no metrics.json, the CSV's last logged values stand in
    _run(
        tmp_path, "c", 3e-3, 2, None, csv="step,train/loss,val/loss,val/bpb\n9,5.0,,\n10,,4.5,2.3\n19,4.8,,\n"
    )
    return tmp_path / "logs" / "exp"


def test_differing_keys_and_metrics(compare_runs: ModuleType, runs: Path) -> None:
    rows = compare_runs.main([str(runs), "--json"])
    assert len(rows) == 3
    config_keys = [k for k in rows[0] if k not in ("val/loss", "val/bpb", "val/ppl", "run")]
    assert config_keys == ["model.n_layer", "optimizer.lr"]  # paths, hydra and dirs are left out
    by_run = {r["run"]: r for r in rows}
    assert by_run["exp/runs/a"]["optimizer.lr"] == 1e-3 and by_run["exp/runs/a"]["val/bpb"] == 2.10
    unfinished = by_run["exp/runs/c (unfinished)"]
    assert unfinished["model.n_layer"] == 2
    assert unfinished["val/loss"] == 4.5 and unfinished["val/ppl"] is None


def test_sort_metrics_and_keys(compare_runs: ModuleType, runs: Path) -> None:
    rows = compare_runs.main(
        [str(runs / "runs" / "*"), "--sort", "val/bpb", "--metrics", "val/bpb", "--json"]
    )
    assert [r["run"] for r in rows] == ["exp/runs/b", "exp/runs/a", "exp/runs/c (unfinished)"]
    assert "val/loss" not in rows[0]
    rows = compare_runs.main([str(runs), "--sort", "val/bpb", "--desc", "--keys", "seed", "--json"])
    assert [r["val/bpb"] for r in rows] == [2.3, 2.10, 2.00]
    assert list(rows[0])[0] == "seed" and rows[0]["seed"] == 1337


def test_markdown_and_table(compare_runs: ModuleType, runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    compare_runs.main([str(runs / "runs" / "a"), str(runs / "runs" / "b"), "--markdown"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "| optimizer.lr | val/loss | val/bpb | val/ppl | run |"
    assert out[2].startswith("| 0.001 | 4.2000 | 2.1000 | 66.7000 | exp/runs/a")
    for layout in ("rows", "columns"):
        compare_runs.main([str(runs), "--layout", layout])
        text = capsys.readouterr().out
        assert "optimizer.lr" in text and "model.n_layer" in text and "2.1000" in text


def test_no_runs(compare_runs: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        compare_runs.main([str(tmp_path)])
