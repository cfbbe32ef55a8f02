"""A logger failing mid-run (W&B's service gone, network down, disk full) must not end training: the call is
dropped with one warning naming the exception, counted, and the other loggers (CSV) still get every metric."""

from __future__ import annotations

import copy
import csv
import logging
import pickle
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import CONF
from hydra import compose, initialize_config_dir
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch.utils.data import DataLoader

from lmforge.objectives.clm import CausalLM
from lmforge.run import build_loggers, close_loggers
from lmforge.stages.base import LMStage
from lmforge.tracking import guard_logger

MODEL = {"n_layer": 1, "n_head": 2, "n_embd": 16, "max_seq_len": 8, "vocab_size": 32}


def test_wandb_log_metrics_failing_after_step_2_does_not_stop_training(monkeypatch, tmp_path: Path, caplog):
    """The loggers of `logger=wandb` as run.build_loggers makes them (a real WandbLogger, wandb.init in disabled
    mode: no server, no service process; and the CSV logger), on a tiny CPU training loop (~1 s)."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")
    original = WandbLogger.log_metrics
    calls: list[int | None] = []

    def network_gone_after_step_2(self, metrics, step=None):
        calls.append(step)
        if step is not None and step >= 2:
            raise ConnectionError("wandb: network is unreachable")
        return original(self, metrics, step)

    monkeypatch.setattr(WandbLogger, "log_metrics", network_gone_after_step_2)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["logger=wandb", f"paths.output_dir={tmp_path}"])
    loggers, _ = build_loggers(cfg, None)
    assert {type(lg).__name__ for lg in loggers} == {"CSVLogger", "WandbLogger"}
    L.seed_everything(0, verbose=False)
    stage = LMStage(MODEL, CausalLM(), optimizer=partial(torch.optim.AdamW, lr=1e-2))
    ids = torch.randint(0, 32, (6, 4, 9), generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(accelerator="cpu", max_steps=6, logger=loggers, log_every_n_steps=1, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, default_root_dir=tmp_path)
    try:
        with caplog.at_level(logging.WARNING, logger="lmforge"):
            trainer.fit(stage, train_dataloaders=DataLoader([{"input_ids": x[:, :-1], "targets": x[:, 1:]} for x in ids], batch_size=None))
            close_loggers(loggers)
    finally:  # wandb keeps its first settings (mode=disabled) in a process-wide singleton: later tests need a fresh one
        import wandb

        wandb.teardown()
    assert trainer.state.status.value == "finished" and trainer.global_step == 6
    assert sum(s is not None and s >= 2 for s in calls) >= 4  # W&B kept failing for the rest of the run
    with (tmp_path / "csv" / "metrics.csv").open() as fh:
        steps = sorted({int(row["step"]) for row in csv.DictReader(fh) if row.get("train/loss")})
    assert steps == list(range(6)), steps  # CSV has every step's train/loss
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("logger WandbLogger: log_metrics raised")]
    assert len(warnings) == 1 and "ConnectionError: wandb: network is unreachable" in warnings[0]
    summary = [r.getMessage() for r in caplog.records if "call(s) failed during this run" in r.getMessage()]
    assert summary and summary[0].startswith("logger WandbLogger:")


def test_guarded_logger_keeps_its_class_attributes_and_pickles(tmp_path: Path, caplog, monkeypatch):
    logger = guard_logger(CSVLogger(save_dir=str(tmp_path), name="csv", version=""))
    assert isinstance(logger, CSVLogger) and type(logger).__name__ == "CSVLogger"
    assert logger.save_dir == str(tmp_path) and logger.version == "" and logger.log_dir.rstrip("/").endswith("csv")
    assert logger.experiment is not None and guard_logger(logger) is logger
    def failing(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(CSVLogger, "log_hyperparams", failing)
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        assert logger.log_hyperparams({"a": 1}) is None
        logger.log_hyperparams({"a": 2})
    assert logger.lmforge_failures == 2
    assert [r.getMessage() for r in caplog.records].count(
        "logger CSVLogger: log_hyperparams raised OSError: [Errno 28] No space left on device. Training goes on and the other "
        "loggers (CSV) keep every metric; further failures of this logger are only counted") == 1
    for clone in (pickle.loads(pickle.dumps(logger)), copy.deepcopy(logger)):
        assert type(clone) is type(logger) and clone.save_dir == logger.save_dir and clone.lmforge_failures == 2
        assert clone.log_hyperparams({"a": 3}) is None  # still guarded


def test_keyboard_interrupt_is_not_swallowed(tmp_path: Path, monkeypatch):
    logger = guard_logger(CSVLogger(save_dir=str(tmp_path)))

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(CSVLogger, "log_metrics", interrupted)
    with pytest.raises(KeyboardInterrupt):
        logger.log_metrics({"x": 1.0}, step=0)
