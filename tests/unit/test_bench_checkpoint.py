"""scripts/bench_checkpoint.py: its runs compose into valid train.py configs, and what training waited for is read
back from the log lines the strategies write (synchronous, staged, waited for at the next save)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from conftest import CONF, ROOT
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(ROOT / "scripts"))
from bench_checkpoint import cell_overrides, markdown, read_saves  # noqa: E402

from lmforge.preflight import preflight  # noqa: E402


def test_runs_compose_and_pass_preflight(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    args = argparse.Namespace(model="llama-tiny", size="large", precision="32-true", steps=12, every=3, batch=2, block=64, extra=[])
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for strategy, async_save in (("fsdp:1", True), ("ddp:2", False), ("fsdp_tp:2", True)):
            overrides = [o for o in cell_overrides(strategy, async_save, args, tmp_path / "run") if not o.startswith("hydra.")]
            cfg = compose(config_name="train", overrides=overrides)
            preflight(cfg)
            assert cfg.strategy.async_save is async_save and cfg.callbacks.checkpoint.save_last == "link"
            assert cfg.model.n_embd == 1024 and cfg.callbacks.checkpoint.every_n_train_steps == 3


def test_saves_and_waits_are_read_from_the_log() -> None:
    sync = ("[..][lmforge][INFO] - checkpoint best.ckpt: written in 2.50 s, training blocked throughout\n"
            "[..][lmforge][INFO] - checkpoint best.ckpt: written in 3.50 s, training blocked throughout\n")
    assert read_saves(sync) == {"saves": 2, "blocked_total_s": 6.0, "blocked_per_save_s": 3.0, "waited_for_writes_s": 0, "write_s": 3.0}
    background = ("checkpoint best.ckpt: training blocked 0.20 s to stage it; written in the background\n"
                  "checkpoint best.ckpt written in the background in 4.00 s\n"
                  "checkpoint best.ckpt: training blocked 0.10 s to stage it; written in the background\n"
                  "checkpoint best.ckpt written in the background in 2.00 s (training waited 1.50 s for it)\n"  # sharded
                  "checkpoint last.ckpt: training waited 0.40 s for it\n")  # ddp
    saves = read_saves(background)
    assert saves == {"saves": 2, "blocked_total_s": 2.2, "blocked_per_save_s": 0.15, "waited_for_writes_s": 1.9, "write_s": 3.0}
    assert read_saves("")["saves"] == 0
    assert markdown([{"strategy": "fsdp:1", "async_save": True, **saves, "status": "ok"}]).splitlines()[2].startswith("| fsdp:1 | True |")
