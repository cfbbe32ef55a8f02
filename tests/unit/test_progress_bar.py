"""The progress bar reads train/loss on logging steps only, and no training metric is a Lightning progress-bar
metric: Lightning converts those to Python numbers every step, a wait for the GPU (CPU runs show the same calls)."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import lightning as L
import torch
from conftest import CountedLoss
from lightning.pytorch.callbacks import RichProgressBar
from torch.utils.data import DataLoader

from lmforge.callbacks.progress import LossProgressBar
from lmforge.objectives.clm import CausalLM
from lmforge.stages.base import LMStage


class Loss(CountedLoss):  # its own count
    reads = 0


def test_bar_reads_the_loss_on_logging_steps_and_shows_the_last_value_between(monkeypatch) -> None:
    monkeypatch.setattr(RichProgressBar, "get_metrics", lambda self, trainer, module: {})
    bar = LossProgressBar()
    trainer = SimpleNamespace(training=True, global_step=0, log_every_n_steps=5, callback_metrics={})
    shown = {}
    for step in range(1, 11):
        trainer.global_step = step
        trainer.callback_metrics["train/loss"] = Loss(float(step))
        shown[step] = bar.get_metrics(trainer, None)
    assert Loss.reads == 2  # steps 5 and 10
    assert "train/loss" not in shown[4] and shown[7] == {"train/loss": 5.0, "at_step": 5} and shown[10]["train/loss"] == 10.0


def test_training_logs_no_progress_bar_metric(tmp_path) -> None:
    stage = LMStage({"n_layer": 1, "n_head": 2, "n_embd": 16, "max_seq_len": 8, "vocab_size": 32}, CausalLM(),
                    optimizer=partial(torch.optim.AdamW, lr=1e-2))
    ids = torch.randint(0, 32, (3, 4, 9), generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[LossProgressBar()], default_root_dir=tmp_path, limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(stage, train_dataloaders=DataLoader([{"input_ids": x[:, :-1], "targets": x[:, 1:]} for x in ids], batch_size=None))
    assert "train/loss" in trainer.callback_metrics and not any(k.startswith("train/") for k in trainer.progress_bar_metrics)


def test_bar_names_the_epoch_without_a_negative_bound_when_steps_end_the_run() -> None:
    bar = LossProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1)  # max_steps ends the run: Lightning's own bar said "Epoch 0/-2"
    assert bar._get_train_description(0).strip() == "Epoch 0"
    bar._trainer = SimpleNamespace(max_epochs=10)
    assert bar._get_train_description(3).strip() == "Epoch 3/9"
