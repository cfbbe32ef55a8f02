"""`init_from=`: a new run starts from the weights (and architecture, tokenizer) of a checkpoint or HF dir.

Runs train.py's code path in-process (`train_in_process`) and scripts/convert_hf.py's `main`: the CLI's own
error formatting is covered by test_bad_input, and each subprocess would add ~5 s of imports.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import load_script, train_in_process

from lmforge.checkpoint import load_checkpoint, model_state_dict
from lmforge.errors import CheckpointError

pytestmark = pytest.mark.slow


def common(cache_dir: Path, logs: Path) -> list[str]:
    return [f"paths.cache_dir={cache_dir}", f"paths.log_dir={logs}", "callbacks.progress_bar=null", "callbacks.samples=null"]


@pytest.fixture(scope="module")
def source(cache_dir, tmp_path_factory) -> Path:
    logs = tmp_path_factory.mktemp("init_logs")
    run_dir = logs / "debug" / "runs" / "src"
    train_in_process(["debug=fast", "trainer.max_steps=3", *common(cache_dir, logs)], run_dir)
    return run_dir / "checkpoints" / "last.ckpt"


def frozen_run(cache_dir: Path, tmp_path: Path, init_from: Path) -> dict[str, torch.Tensor]:
    """Train with lr=0 (AdamW then changes nothing, decay included): the end weights are the start weights."""
    run_dir = tmp_path / "run"
    train_in_process(["debug=fast", "trainer.max_steps=2", "model=gpt-micro",  # model group is replaced by the source's
                      "optimizer.lr=0", "scheduler=constant", f"init_from={init_from}", *common(cache_dir, tmp_path)], run_dir)
    return model_state_dict(load_checkpoint(run_dir / "checkpoints" / "last.ckpt"))


def convert_hf(*args: str) -> int:
    return load_script("convert_hf").main(list(args))


def test_init_from_lmforge_checkpoint_starts_from_its_weights(cache_dir, tmp_path, source):
    start = model_state_dict(load_checkpoint(source))
    end = frozen_run(cache_dir, tmp_path, source)
    assert start.keys() == end.keys()
    for k in start:
        assert torch.equal(start[k], end[k]), k


def test_hf_export_import_round_trip_and_init_from_hf_dir(cli, cache_dir, tmp_path, source):
    hf_dir, imported = tmp_path / "hf", tmp_path / "imported.ckpt"
    assert convert_hf("--ckpt", str(source), "--out", str(hf_dir)) == 0
    assert convert_hf("--hf", str(hf_dir), "--out", str(imported)) == 0
    start = model_state_dict(load_checkpoint(source))
    back = model_state_dict(load_checkpoint(imported))
    for k in start:
        assert torch.equal(start[k], back[k]), k
    end = frozen_run(cache_dir, tmp_path / "from_hf", hf_dir)
    for k in start:
        assert torch.equal(start[k], end[k]), k
    proc = cli("generate.py", f"ckpt_path={imported}", "max_new_tokens=5", "temperature=0", f"hydra.run.dir={tmp_path / 'gen'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ROMEO" in proc.stdout or "--- sample 0 ---" in proc.stdout


def test_init_from_missing_path_names_the_key(cache_dir, tmp_path):
    with pytest.raises(CheckpointError, match="init_from='/nonexistent/model' does not exist"):
        train_in_process(["debug=fast", "init_from=/nonexistent/model", *common(cache_dir, tmp_path)], tmp_path / "run")
