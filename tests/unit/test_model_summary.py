"""The start-of-fit model summary prints training FLOPs per token (lmforge.flops), not Lightning's "Total FLOPs: 0"."""

from __future__ import annotations

from functools import partial

import lightning as L
import rich
import torch
from rich.console import Console
from torch.utils.data import DataLoader

from lmforge.callbacks.model_summary import ModelSummary
from lmforge.flops import model_flops_per_token
from lmforge.objectives.clm import CausalLM
from lmforge.stages.base import LMStage


def test_summary_prints_the_training_flops_per_token_of_the_model(tmp_path, monkeypatch) -> None:
    console = Console(record=True, width=200)
    monkeypatch.setattr(rich, "get_console", lambda: console)
    stage = LMStage({"n_layer": 2, "n_head": 2, "n_embd": 16, "max_seq_len": 8, "vocab_size": 32}, CausalLM(),
                    optimizer=partial(torch.optim.AdamW, lr=1e-2))
    ids = torch.randint(0, 32, (2, 4, 9), generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[ModelSummary()], default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(stage, train_dataloaders=DataLoader([{"input_ids": x[:, :-1], "targets": x[:, 1:]} for x in ids], batch_size=None))
    text = console.export_text()
    expected = model_flops_per_token(stage.model, 8)  # no datamodule: the model's context, 8
    assert expected > 6 * stage.model.num_params(non_embedding=True)
    assert f"Training FLOPs per token (6N + 12·L·d·T): {L.pytorch.utilities.model_summary.get_human_readable_count(int(expected))}" in text
    assert "Total FLOPs" not in text and "FLOPs  " not in text  # Lightning's zero column and total are gone
    assert "│ model       │ GPT       │  7.2 K │ train │" in text and "Trainable params: 7.2 K" in text  # the rest is Lightning's
