"""scripts/bench_matrix.py: every cell's overrides compose into a valid train.py config (so a grid never dies on a
typo after an hour of runs), and perf windows are read back as the median after the warm-up window."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from conftest import CONF, ROOT
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(ROOT / "scripts"))
from bench_matrix import cell_overrides, markdown, read_perf  # noqa: E402

from lmforge.preflight import preflight  # noqa: E402


def test_cell_overrides_compose_and_pass_preflight(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    args = argparse.Namespace(steps=10, batch=4, block=64, window=5, peak_flops=None, extra=["tokenizer=byte"])
    cells = [("gpt-nano", "fsdp:2", "bf16-mixed", "sdpa", "per_block", "full"), ("llama-tiny", "fsdp_tp:2", "32-true", "flex", "false", "0"),
             ("llama-tiny", "ddp:2", "bf16-mixed", "eager", "true", "2"), ("gpt-nano", "ddp:2", "32-true", "sdpa", "false", "selective")]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for cell in cells:
            overrides = [o for o in cell_overrides(*cell, args, tmp_path / "run") if not o.startswith("hydra.")]
            cfg = compose(config_name="train", overrides=overrides)
            preflight(cfg)
            assert cfg.trainer.devices == 2 and cfg.callbacks.checkpoint is None and cfg.model.attn_backend == cell[3]
            assert str(cfg.stage.activation_checkpointing) == cell[5]


def test_read_perf_drops_the_warmup_window_and_takes_the_median(tmp_path: Path) -> None:
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text(
        "step,perf/tokens_per_sec,perf/mfu,train/loss\n0,,,5.0\n4,10.0,0.1,\n8,100.0,0.3,\n12,300.0,0.5,\n16,200.0,0.4,\n")
    perf = read_perf(tmp_path)
    assert perf["tokens_per_sec"] == 200.0 and perf["mfu"] == 0.4 and perf["max_memory_gb"] is None
    table = markdown([{"model": "gpt-nano", "strategy": "auto", "tokens_per_sec": 200.0, "status": "ok"}])
    assert table.splitlines()[2].startswith("| gpt-nano | auto |") and "| 200.0 |" in table
