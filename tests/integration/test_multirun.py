"""Hydra multirun: one run dir per job under logs/<task>/multiruns/<ts>/<n>/, each a complete run."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_multirun_writes_one_dir_per_job(cli, cache_dir, tmp_path):
    logs = tmp_path / "logs"
    proc = cli("train.py", "-m", "debug=fast", "trainer.max_steps=3", "optimizer.lr=1e-3,3e-3", f"paths.log_dir={logs}",
               f"paths.cache_dir={cache_dir}", "callbacks.progress_bar=null", "~callbacks.samples")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweeps = list((logs / "debug" / "multiruns").iterdir())
    assert len(sweeps) == 1
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    lrs = []
    for job in jobs:
        assert (job / "checkpoints" / "last.ckpt").is_file() and (job / "csv" / "metrics.csv").is_file()
        assert "val/bpb" in json.loads((job / "metrics.json").read_text())
        lrs.append([line for line in (job / "config.yaml").read_text().splitlines() if line.strip().startswith("lr:")][0])
    assert lrs[0] != lrs[1]


def test_a_ddp_sweep_keeps_every_rank_in_the_one_sweep_dir(cli, cache_dir, tmp_path):
    """Lightning starts rank 1 by re-running the command line, `-m` included: it re-runs the sweep in step with rank 0.
    Its Hydra used to name a sweep dir of its own timestamp (a second multiruns/<ts>/ holding only rank 1's logs) and
    to rewrite the sweep's multirun.yaml; now rank 1 writes into rank 0's job dirs and the record stays rank 0's."""
    logs = tmp_path / "logs"
    proc = cli("train.py", "-m", "debug=fast", "trainer.max_steps=2", "optimizer.lr=1e-3,3e-3", "strategy=ddp", "trainer.devices=2",
               "trainer.accelerator=cpu", f"paths.log_dir={logs}", f"paths.cache_dir={cache_dir}", "callbacks.progress_bar=null",
               "~callbacks.samples", "validate_full_at_end=false", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweeps = list((logs / "debug" / "multiruns").iterdir())
    assert len(sweeps) == 1, sweeps
    for job in ("0", "1"):
        assert (sweeps[0] / job / "metrics.json").is_file() and (sweeps[0] / job / "train_ddp_process_1.log").is_file()
    record = (sweeps[0] / "multirun.yaml").read_text()
    assert "optimizer.lr=1e-3,3e-3" in record and "train_ddp_process" not in record
