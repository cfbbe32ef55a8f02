"""`callbacks.throughput.PerfMonitor` driven by hand with a real model and wall-clock sleeps: tokens/s counts every
data-parallel rank's tokens (not tensor-parallel ones twice), `perf/data_wait_frac` is the share of time spent between
steps (a validation gap is not counted), tokens/s is the wall-clock rate of the steps and the waits between them, and
the memory metrics are there."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from lmforge.callbacks.throughput import PerfMonitor, data_parallel_size
from lmforge.models import build

BATCH, BLOCK, STEP_S, WAIT_S = 2, 16, 0.04, 0.04


def drive(monitor: PerfMonitor, steps: int, validate_before: int | None = None) -> list[dict]:
    """Run `steps` fake training steps (each STEP_S long, WAIT_S apart), logging every step."""
    logged: list[dict] = []
    model = build({"family": "llama", "vocab_size": 97, "n_layer": 1, "n_head": 2, "n_embd": 16, "max_seq_len": BLOCK, "n_kv_head": 1})
    module = SimpleNamespace(model=model, device=torch.device("cpu"), log_dict=lambda metrics, **_: logged.append(metrics))
    trainer = SimpleNamespace(world_size=1, log_every_n_steps=1, datamodule=SimpleNamespace(block_size=BLOCK),
                              strategy=SimpleNamespace(), global_step=0)
    monitor.on_train_start(trainer, module)
    batch = {"input_ids": torch.zeros(BATCH, BLOCK, dtype=torch.long)}
    for step in range(steps):
        if step == validate_before:
            monitor.on_validation_start(trainer, module)
            time.sleep(10 * WAIT_S)  # a long validation: not data wait
        monitor.on_train_batch_start(trainer, module, batch, step)
        time.sleep(STEP_S)
        trainer.global_step = step + 1
        monitor.on_train_batch_end(trainer, module, None, batch, step)
        time.sleep(WAIT_S)
    return logged


def test_data_wait_fraction_is_the_time_between_steps_and_skips_validation() -> None:
    logged = drive(PerfMonitor(window_size=2), steps=6, validate_before=3)
    waits = [m.get("perf/data_wait_frac") for m in logged]
    # none before the first step nor across the validation (logged every step here, so nothing to report there)
    assert [w is None for w in waits] == [True, False, False, True, False, False]
    expected = WAIT_S / (WAIT_S + STEP_S)
    assert [waits[i] for i in (1, 2, 4, 5)] == pytest.approx([expected] * 4, abs=0.15)  # counting the 0.4 s gap: ~0.9
    last = logged[-1]
    # wall-clock rate: the steps and the waits between them, not the validation gap (sleeps only overshoot;
    # counting steps alone would double it, counting the 0.4 s validation would cut it by a third)
    assert BATCH * BLOCK / (1.3 * (STEP_S + WAIT_S)) < last["perf/tokens_per_sec"] <= 1.01 * BATCH * BLOCK / (STEP_S + WAIT_S)
    assert last["perf/max_memory_gb"] > 0 and "perf/max_reserved_gb" not in last  # peak RSS on CPU; reserved is CUDA's


def test_tokens_per_second_counts_data_parallel_ranks_only() -> None:
    class Mesh:  # Lightning's (data_parallel, tensor_parallel) device mesh, as far as the callback reads it
        mesh_dim_names = ("data_parallel", "tensor_parallel")

        def __getitem__(self, name: str) -> SimpleNamespace:
            return SimpleNamespace(size=lambda: {"data_parallel": 4, "tensor_parallel": 2}[name])

    tp = SimpleNamespace(world_size=8, strategy=SimpleNamespace(_device_mesh=Mesh()))
    assert data_parallel_size(tp) == 4  # TP 2 x DP 4: each batch is seen by 2 ranks
    assert data_parallel_size(SimpleNamespace(world_size=3, strategy=SimpleNamespace())) == 3
