"""NaN/Inf steps are skipped, not applied: weights stay as they were, `skipped_steps` counts them, and past
`stage.max_skipped_steps` the run stops with TrainingDivergedError while its last good checkpoint stays loadable.

A real Lightning loop (CPU, a 1-layer 16-wide model, 4×8 tokens per batch), in-process: about a second per case.
"""

from __future__ import annotations

import dataclasses
import logging
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lmforge.checkpoint import load_checkpoint
from lmforge.checkpoint_io import AtomicCheckpointIO
from lmforge.errors import LmforgeError, TrainingDivergedError
from lmforge.objectives.clm import CausalLM
from lmforge.optim.schedulers import cosine_warmup
from lmforge.stages.base import LMStage

MODEL = {"n_layer": 1, "n_head": 2, "n_embd": 16, "max_seq_len": 8, "vocab_size": 32}


class NaNOn(CausalLM):
    """The real CLM loss, replaced by NaN on the chosen steps (a bad batch, an overflow), or multiplied by 20
    on the spike steps (a bad batch that is finite)."""

    def __init__(self, steps: set[int], spike_steps: set[int] = frozenset()) -> None:
        super().__init__()
        self.steps, self.spike_steps = steps, spike_steps
        self.stage: Any = None

    def __call__(self, model, batch):
        out = super().__call__(model, batch)
        if self.stage.trainer.global_step in self.steps:
            return dataclasses.replace(out, loss=out.loss * float("nan"))
        if self.stage.trainer.global_step in self.spike_steps:
            return dataclasses.replace(out, loss=out.loss * 20.0)
        return out


class InfGradOn(L.Callback):
    """A finite loss whose gradient overflows: one grad entry set to inf after backward on the chosen steps."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step in self.steps:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")


class Snapshots(L.Callback):
    """Weights and LR after every optimizer step, keyed by the step that produced them."""

    def __init__(self) -> None:
        self.weights: dict[int, torch.Tensor] = {}
        self.lrs: dict[int, float] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.weights[trainer.global_step - 1] = torch.cat([p.detach().flatten().clone() for p in pl_module.parameters()])
        self.lrs[trainer.global_step - 1] = trainer.optimizers[0].param_groups[0]["lr"]


def batches(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32, (n, 4, 9), generator=g)
    return [{"input_ids": x[:, :-1], "targets": x[:, 1:]} for x in ids]


def fit(tmp_path: Path, max_steps: int, nan_steps=(), inf_steps=(), max_skipped: int | None = 10, spike_steps=(),
        ckpt_path: Path | None = None, fused: bool = False, clip: float = 1.0, on_device: bool | None = None) -> tuple[LMStage, Snapshots]:
    """fused=True: the fused AdamW takes found_inf/grad_scale, so the checks run on the device (stages/step_checks.py);
    fused=False: torch's loop AdamW, checked on the host."""
    L.seed_everything(0, verbose=False)
    objective = NaNOn(set(nan_steps), set(spike_steps))
    stage = LMStage(MODEL, objective, optimizer=partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1, fused=fused),
                    scheduler=partial(cosine_warmup, warmup_steps=2, min_lr=1e-4), max_skipped_steps=max_skipped,
                    loss_spike_warmup=3)
    objective.stage = stage
    snaps = Snapshots()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[InfGradOn(set(inf_steps)), snaps, ckpt], plugins=[AtomicCheckpointIO()], gradient_clip_val=clip,
                        default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=0)
    try:
        trainer.fit(stage, train_dataloaders=DataLoader(batches(max_steps), batch_size=None), ckpt_path=ckpt_path, weights_only=True)
    finally:
        stage.last_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert (stage.step_checks is not None) == (fused if on_device is None else on_device)
    return stage, snaps


BOTH = pytest.mark.parametrize("fused", [False, True], ids=["host", "device"])


@BOTH
def test_nan_loss_and_inf_grad_steps_leave_weights_unchanged_and_are_counted(tmp_path: Path, fused: bool) -> None:
    stage, snaps = fit(tmp_path, max_steps=6, nan_steps={2}, inf_steps={4}, fused=fused)
    w = snaps.weights
    assert torch.equal(w[2], w[1]) and torch.equal(w[4], w[3])  # skipped: not a single weight moved
    assert not torch.equal(w[3], w[2]) and not torch.equal(w[5], w[4])  # the steps around them trained
    assert all(torch.isfinite(v).all() for v in w.values())
    assert stage.skipped_steps == 2 and stage.last_metrics["train/skipped_steps"] == 2.0
    assert len(snaps.lrs) == 6 and snaps.lrs[5] < snaps.lrs[2]  # the schedule kept stepping through the skips
    assert load_checkpoint(tmp_path / "ckpt" / "last.ckpt")["global_step"] == 6


@BOTH
def test_too_many_skipped_steps_stop_with_a_clear_error_and_keep_the_last_checkpoint(tmp_path: Path, fused: bool) -> None:
    with pytest.raises(TrainingDivergedError) as err:
        fit(tmp_path, max_steps=8, nan_steps={3, 4, 5}, max_skipped=2, fused=fused)
    msg = str(err.value)
    assert isinstance(err.value, LmforgeError)
    assert "3 steps skipped for a non-finite loss or gradient norm" in msg
    assert "(last at step 5: loss=nan)" in msg and "stage.max_skipped_steps=2" in msg and "Fix: lower optimizer.lr" in msg
    ckpt = load_checkpoint(tmp_path / "ckpt" / "last.ckpt")  # nothing lost: the last good state is on disk
    assert ckpt["global_step"] == 5  # written after step 4, the second (tolerated) skip


@BOTH
def test_skipped_steps_count_across_a_resume(tmp_path: Path, fused: bool) -> None:
    """The skip counter is checkpointed: one skip before the resume and one after exceed max_skipped_steps=1."""
    stage, _ = fit(tmp_path, max_steps=4, nan_steps={1}, max_skipped=1, fused=fused)
    assert stage.skipped_steps == 1
    assert load_checkpoint(tmp_path / "ckpt" / "last.ckpt")["lmforge_train_state"]["skipped_steps"] == 1
    with pytest.raises(TrainingDivergedError, match=r"2 steps skipped .*\(last at step 5: loss=nan\)"):
        fit(tmp_path, max_steps=8, nan_steps={5}, max_skipped=1, ckpt_path=tmp_path / "ckpt" / "last.ckpt", fused=fused)


@BOTH
def test_loss_spike_is_warned_counted_and_checkpointed(tmp_path: Path, caplog, fused: bool) -> None:
    """A finite loss 20x its level is a spike (warning naming step and loss, train/loss_spikes); the NaN step is
    skipped and left out of the statistics; the detector state and count are in the checkpoint and come back."""
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        stage, _ = fit(tmp_path, max_steps=10, nan_steps={5}, spike_steps={7}, fused=fused)
    spikes = [r.getMessage() for r in caplog.records if "loss spike" in r.getMessage()]
    assert len(spikes) == 1 and spikes[0].startswith("step 7: loss spike: train/loss=") and "std above its moving mean" in spikes[0]
    assert stage.spike_detector.spikes == 1 and stage.last_metrics["train/loss_spikes"] == 1.0
    assert stage.spike_detector.count == 9  # 10 steps, the skipped NaN step not counted
    state = load_checkpoint(tmp_path / "ckpt" / "last.ckpt")["lmforge_train_state"]
    assert state["skipped_steps"] == 1 and state["loss_spikes"] == stage.spike_detector.state_dict()
    resumed = LMStage(MODEL, CausalLM(), loss_spike_warmup=3)
    resumed.on_load_checkpoint(load_checkpoint(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.skipped_steps == 1 and resumed.spike_detector.state_dict() == stage.spike_detector.state_dict()


def test_device_checks_clip_and_skip_as_the_host_path_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same fused AdamW run twice, its checks on the device (found_inf, grad_scale) and forced onto the host
    (grads dropped, foreach clip): the same weights after every step, skips included, with clipping active."""
    device, device_snaps = fit(tmp_path / "device", max_steps=6, nan_steps={2}, inf_steps={4}, fused=True, clip=0.05)
    monkeypatch.setattr("lmforge.stages.base.takes_device_checks", lambda optimizer: False)
    host, host_snaps = fit(tmp_path / "host", max_steps=6, nan_steps={2}, inf_steps={4}, fused=True, clip=0.05, on_device=False)
    assert device.skipped_steps == host.skipped_steps == 2
    assert device.last_metrics["train/grad_norm"] > 0.05  # the clip was binding
    for step in range(6):
        torch.testing.assert_close(device_snaps.weights[step], host_snaps.weights[step], rtol=1e-5, atol=1e-6)  # division vs multiplication: ~1 ulp
