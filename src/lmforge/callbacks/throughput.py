"""Tokens/s, TFLOP/s, MFU and peak memory under `perf/*`.

Uses Lightning's `Throughput` for the windowed rates, with lmforge's own FLOPs formula and device peak table
(Lightning's ThroughputMonitor logs `device/*` names and its peak table misses recent GPUs). The rates are
wall-clock rates of training, data loading included (as torchtitan reports them); validation and checkpoint
writes are left out of the window.

The GPU is waited for only on logging steps (and before a validation or checkpoint): Lightning's
ThroughputMonitor synchronises before and after every step, which empties the GPU's queue twice a step so that
it idles while the host prepares the next one. The window between two synchronised steps is timed exactly.

`perf/data_wait_frac`: the share of host wall time between the end of one training step and the start of the next
(fetching and collating the batch, moving it to the device, loop bookkeeping) since the last log. On CPU an upper
bound on the time the model waits for data; on a GPU the host works ahead of it, so the GPU idles for only the
part of that time its queue does not cover. Validation and checkpoint gaps are not counted.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput

from lmforge.flops import device_peak_flops, model_flops_per_token
from lmforge.models.counting import build_on_meta
from lmforge.utils.logging_steps import logging_step
from lmforge.utils.memory import peak_rss_gb


def max_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return peak_rss_gb() or 0.0


def cuda_memory_stats(device: torch.device) -> dict[str, float]:
    """Reserved memory (what the caching allocator holds) and allocation retries (cudaMalloc failed, cache
    flushed, retried: a sign of fragmentation and the step before an OOM) on CUDA; nothing elsewhere."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    return {"perf/max_reserved_gb": stats.get("reserved_bytes.all.peak", 0) / 1e9,
            "perf/alloc_retries": float(stats.get("num_alloc_retries", 0))}


def data_parallel_size(trainer: L.Trainer) -> int:
    """Ranks that see different batches: the world size, or its data-parallel part under tensor parallel
    (TP ranks share a batch; Lightning's ThroughputMonitor multiplies by the whole world size)."""
    mesh = getattr(trainer.strategy, "_device_mesh", None)
    if mesh is not None and mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names:
        return mesh["data_parallel"].size()
    return trainer.world_size


def run_flops_per_token(trainer: L.Trainer, pl_module: L.LightningModule) -> float:
    """Training FLOPs per token of this run's model at its sequence length (the data's block size, else the model's
    context): `flops.model_flops_per_token`, what perf/mfu and the model summary use."""
    data = trainer.datamodule
    seq_len = getattr(data, "block_size", None) or getattr(data, "max_length", None) or pl_module.model.config.max_seq_len
    model = getattr(pl_module.model, "backbone", pl_module.model)
    if any(hasattr(p, "ds_numel") for p in model.parameters()):  # ZeRO-3 leaves empty placeholders: count the config
        model = build_on_meta(pl_module.model_cfg)
    return model_flops_per_token(model, seq_len)


class PerfMonitor(L.Callback):
    def __init__(self, window_size: int = 20, log_every_n_steps: int | None = None, peak_flops: float | None = None) -> None:
        self.window_size = window_size
        self.log_every_n_steps = log_every_n_steps
        self.peak_flops = peak_flops
        self._throughput: Throughput | None = None
        self._flops_per_token = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        peak = self.peak_flops or device_peak_flops(pl_module.device)
        self._log_every = self.log_every_n_steps or trainer.log_every_n_steps
        # Throughput is fed only at the synchronised log steps: a window of k entries spans k - 1 log intervals
        intervals = max(1, math.ceil(self.window_size / max(self._log_every, 1)))
        self._throughput = Throughput(available_flops=peak, world_size=trainer.world_size, window_size=intervals + 1)
        self._flops_per_token = run_flops_per_token(trainer, pl_module)
        self._elapsed, self._batches, self._samples, self._tokens, self._tokens_at_update = 0.0, 0, 0, 0, 0
        self._throughput.update(time=0.0, batches=0, samples=0, lengths=0, flops=0)
        self._prev_end: float | None = None  # end of the previous training step (None after validation or a checkpoint)
        self._wait = self._busy = 0.0  # since the last log: time between steps / inside steps

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._t0 = time.perf_counter()
        if self._prev_end is not None:
            self._wait += self._t0 - self._prev_end
            self._elapsed += self._t0 - self._prev_end

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._gap(pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._gap(pl_module)

    def _gap(self, pl_module: L.LightningModule) -> None:
        """Validation and checkpoint writes are not training time: the steps queued so far are timed up to here,
        and the time until the next step starts is left out."""
        if self._prev_end is not None:
            self._sync(pl_module)
            now = time.perf_counter()
            self._elapsed += now - self._prev_end
            self._busy += now - self._prev_end
        self._prev_end = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        on_log = logging_step(trainer, self._log_every)
        if on_log:  # the only wait for the GPU: the window's host time then covers every step queued in it
            self._sync(pl_module)
        now = time.perf_counter()
        self._elapsed += now - self._t0
        self._busy += now - self._t0
        self._prev_end = now
        id_keys = [k for k in batch if k.endswith("input_ids")]  # preference batches: chosen_ + rejected_input_ids
        self._batches += 1
        self._samples += int(batch[id_keys[0]].size(0)) if id_keys else 0
        self._tokens += sum(int(batch[k].numel()) for k in id_keys)
        if not on_log:
            return
        assert self._throughput is not None
        self._throughput.update(
            time=self._elapsed, batches=self._batches, samples=self._samples, lengths=self._tokens,
            flops=int(self._flops_per_token * (self._tokens - self._tokens_at_update)),
        )
        self._tokens_at_update = self._tokens
        m = self._throughput.compute()
        metrics = {"perf/max_memory_gb": max_memory_gb(pl_module.device), **cuda_memory_stats(pl_module.device)}
        world = data_parallel_size(trainer)
        if "device/items_per_sec" in m:
            metrics["perf/tokens_per_sec"] = m["device/items_per_sec"] * world
            metrics["perf/samples_per_sec"] = m["device/samples_per_sec"] * world
        if "device/flops_per_sec" in m:
            metrics["perf/tflops"] = m["device/flops_per_sec"] / 1e12
        if "device/mfu" in m:
            metrics["perf/mfu"] = m["device/mfu"]
        if self._wait > 0.0:
            metrics["perf/data_wait_frac"] = self._wait / (self._wait + self._busy)
        self._wait = self._busy = 0.0
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)
