"""Two processes (DDP over gloo on CPU) write one run: one run dir, one metrics CSV, one metrics.json — the
classic Hydra + DDP pain is duplicated output dirs and logs. Runs a post-training stage (SFT) to show the
stages run under the same strategies as pre-training."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_two_process_ddp_writes_one_run_dir_and_logs_from_rank_zero(cli, cache_dir: Path, tmp_path: Path):
    logs = tmp_path / "logs"
    proc = cli(
        "train.py", "debug=fast", "stage=sft", "data=sft_shakespeare", "tokenizer=byte", "data.max_examples=64", "data.batch_size=4",
        "strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.max_steps=4", "trainer.val_check_interval=2",
        "callbacks.progress_bar=null", "callbacks.samples=null", f"paths.cache_dir={cache_dir}", f"paths.log_dir={logs}",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((logs / "debug" / "runs").iterdir())
    assert len(runs) == 1, runs  # rank 1 reused rank 0's run dir
    run = runs[0]
    assert [p.name for p in run.rglob("metrics.csv")] == ["metrics.csv"]
    with (run / "csv" / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps == sorted(set(steps)) and steps  # each step logged once, not once per rank
    metrics = json.loads((run / "metrics.json").read_text())
    assert "val/loss" in metrics
    assert (run / "checkpoints" / "last.ckpt").is_file()
