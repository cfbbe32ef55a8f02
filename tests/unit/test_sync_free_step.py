"""A training step never reads a tensor back to the host outside logging steps: with the default fused AdamW, the
skip checks and clipping run on the device, and the throughput monitor, divergence guard and progress bar wait for
logging steps. On a GPU every such read is a wait for the whole queue; here, on CPU, the same calls are counted."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lmforge.callbacks.progress import LossProgressBar
from lmforge.callbacks.throughput import PerfMonitor
from lmforge.objectives.clm import CausalLM
from lmforge.optim.adamw import AdamW
from lmforge.stages.base import LMStage
from lmforge.sweeps import DivergenceGuard

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])  # bf16-true: the fused AdamW on bf16 weights
def test_host_reads_happen_on_logging_steps_only(precision: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    stage = LMStage({"family": "llama", "n_layer": 1, "n_head": 2, "n_embd": 16, "max_seq_len": 8, "vocab_size": 32},
                    CausalLM(), optimizer=partial(AdamW, lr=1e-2), loss_spike_warmup=2)
    ids = torch.randint(0, 32, (12, 4, 9), generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(accelerator="cpu", max_steps=12, logger=L.pytorch.loggers.CSVLogger(tmp_path), log_every_n_steps=4,
                        gradient_clip_val=1.0, precision=precision, enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[PerfMonitor(window_size=4), DivergenceGuard(), LossProgressBar()], default_root_dir=tmp_path)
    steps: list[int] = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args, _original=original, **kwargs):
            if trainer.training and not torch.compiler.is_compiling():
                steps.append(trainer.global_step)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    trainer.fit(stage, train_dataloaders=DataLoader([{"input_ids": x[:, :-1], "targets": x[:, 1:]} for x in ids], batch_size=None))
    monkeypatch.undo()
    assert stage.step_checks is not None and trainer.global_step == 12
    assert torch.isfinite(trainer.callback_metrics["train/loss"]) and next(stage.parameters()).dtype == (
        torch.bfloat16 if precision == "bf16-true" else torch.float32)
    assert steps and {s for s in steps if s > 0} <= {4, 8, 12}  # steps 1-3, 5-7, 9-11 never wait for the device
