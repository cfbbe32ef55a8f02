"""W&B down must not lose a run: an unreachable server at start-up falls back to offline logging in the run dir."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import train_in_process

pytestmark = pytest.mark.slow


def test_unreachable_wandb_server_falls_back_to_offline(monkeypatch, cache_dir: Path, tmp_path: Path, caplog):
    for key in ("WANDB_MODE", "WANDB_DISABLED"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)  # a key: lmforge tries online
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        metrics = train_in_process(
            ["debug=fast", "tokenizer=byte", "logger=wandb", "trainer.max_steps=2", "callbacks.progress_bar=null",
             "callbacks.samples=null", f"paths.cache_dir={cache_dir}"],
            tmp_path,
        )
    assert "val/loss" in metrics or "train/loss" in metrics  # training ran to the end
    assert any("W&B unreachable" in r.getMessage() and "wandb sync" in r.getMessage() for r in caplog.records)
    assert list((tmp_path / "wandb").glob("offline-run-*")), list(tmp_path.rglob("*"))[:20]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
