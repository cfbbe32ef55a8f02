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
