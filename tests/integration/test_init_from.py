"""`init_from=`: a new run starts from the weights (and architecture, tokenizer) of a checkpoint or HF dir."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import load_checkpoint, model_state_dict

pytestmark = pytest.mark.slow


def common(cache_dir: Path, logs: Path) -> list[str]:
    return [f"paths.cache_dir={cache_dir}", f"paths.log_dir={logs}", "callbacks.progress_bar=null", "callbacks.samples=null"]


@pytest.fixture(scope="module")
def source(cli, cache_dir, tmp_path_factory) -> Path:
    logs = tmp_path_factory.mktemp("init_logs")
    run_dir = logs / "debug" / "runs" / "src"
    proc = cli("train.py", "debug=fast", "trainer.max_steps=3", f"hydra.run.dir={run_dir}", *common(cache_dir, logs))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir / "checkpoints" / "last.ckpt"


def frozen_run(cli, cache_dir: Path, tmp_path: Path, init_from: Path) -> dict[str, torch.Tensor]:
    """Train with lr=0 (AdamW then changes nothing, decay included): the end weights are the start weights."""
    run_dir = tmp_path / "run"
    proc = cli(
        "train.py", "debug=fast", "trainer.max_steps=2", "model=gpt-micro",  # model group is replaced by the source's
        "optimizer.lr=0", "scheduler=constant", f"init_from={init_from}", f"hydra.run.dir={run_dir}",
        *common(cache_dir, tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return model_state_dict(load_checkpoint(run_dir / "checkpoints" / "last.ckpt"))


def test_init_from_lmforge_checkpoint_starts_from_its_weights(cli, cache_dir, tmp_path, source):
    start = model_state_dict(load_checkpoint(source))
    end = frozen_run(cli, cache_dir, tmp_path, source)
    assert start.keys() == end.keys()
    for k in start:
        assert torch.equal(start[k], end[k]), k


def test_hf_export_import_round_trip_and_init_from_hf_dir(cli, cache_dir, tmp_path, source, root):
    hf_dir, imported = tmp_path / "hf", tmp_path / "imported.ckpt"
    for args in (["--ckpt", str(source), "--out", str(hf_dir)], ["--hf", str(hf_dir), "--out", str(imported)]):
        proc = subprocess.run([sys.executable, str(root / "scripts" / "convert_hf.py"), *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
    start = model_state_dict(load_checkpoint(source))
    back = model_state_dict(load_checkpoint(imported))
    for k in start:
        assert torch.equal(start[k], back[k]), k
    end = frozen_run(cli, cache_dir, tmp_path / "from_hf", hf_dir)
    for k in start:
        assert torch.equal(start[k], end[k]), k
    proc = cli("generate.py", f"ckpt_path={imported}", "max_new_tokens=5", "temperature=0", f"hydra.run.dir={tmp_path / 'gen'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ROMEO" in proc.stdout or "--- sample 0 ---" in proc.stdout


def test_init_from_missing_path_is_one_clear_line(cli, cache_dir, tmp_path):
    proc = cli("train.py", "debug=fast", "init_from=/nonexistent/model", f"hydra.run.dir={tmp_path}", *common(cache_dir, tmp_path))
    assert proc.returncode != 0
    assert "init_from='/nonexistent/model' does not exist" in proc.stderr and "Traceback" not in proc.stderr
