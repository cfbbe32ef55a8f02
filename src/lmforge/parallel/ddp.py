"""`strategy=ddp`: Lightning's DDPStrategy, plus `async_save` (checkpoint files written in the background).

A DDP checkpoint is one file, the whole model and optimizer state, written by rank 0 while every rank waits at the
barrier after it: for a billion-parameter model 13-18 GB, tens of seconds per save. With `async_save=true`, rank
0 copies the checkpoint to host memory (`stage_to_host`: every tensor copied, the rest deep-copied, so later steps
cannot change what is written) and a thread writes it through the trainer's CheckpointIO (`AtomicCheckpointIO`:
temp file, fsync, rename, so the file appears whole or not at all). The write in flight lands before the next save,
at the end of fit (teardown) and before a preemption exit (`finish_checkpoint`); every rank then waits at a barrier,
so no rank looks for the file before rank 0 has renamed it into place. Saves outside a running fit and SLURM's requeue
save (`hpc_ckpt_*`) are written before returning, as without the flag.
"""

from __future__ import annotations

import copy
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning_utilities.core.apply_func import apply_to_collection

from lmforge.parallel.async_checkpoint import log_landed, log_staged, log_written, saves_in_background

log = logging.getLogger("lmforge")


def stage_to_host(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A copy of `checkpoint` sharing nothing with it: tensors copied to CPU memory, everything else deep-copied."""
    memo: dict[int, Any] = {}

    def host_copy(t: torch.Tensor) -> torch.Tensor:
        memo[id(t)] = t.detach().to("cpu", copy=True)
        return t

    apply_to_collection(checkpoint, torch.Tensor, host_copy)
    return copy.deepcopy(checkpoint, memo)  # tensors come from the memo: already copied


class DataParallelStrategy(DDPStrategy):
    def __init__(self, async_save: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.async_save = bool(async_save)
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future | None = None  # rank 0's write in flight
        self._pending_name = ""
        self._in_flight = False  # on every rank: a background save was started and has not been waited for
        self._failed = False

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        self.finish_checkpoint()
        if not saves_in_background(self, filepath):
            t0 = time.perf_counter()
            super().save_checkpoint(checkpoint, filepath, storage_options)
            if self.is_global_zero:
                log_written(filepath, time.perf_counter() - t0)
            return
        self._in_flight = True
        if self.is_global_zero:
            t0 = time.perf_counter()
            staged = stage_to_host(checkpoint)
            if self._writer is None:
                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmforge-ckpt")
            self._pending, self._pending_name = self._writer.submit(self._write, staged, filepath, storage_options), Path(str(filepath)).name
            log_staged(filepath, time.perf_counter() - t0)

    def _write(self, staged: dict[str, Any], filepath: Any, storage_options: Any) -> float:
        """The writer thread's job; returns the seconds the write took."""
        t0 = time.perf_counter()
        self.checkpoint_io.save_checkpoint(staged, filepath, storage_options=storage_options)
        return time.perf_counter() - t0

    def finish_checkpoint(self) -> None:
        """Wait for a background save to land; collective when one was started (every rank calls it then)."""
        if not self._in_flight:
            return
        self._in_flight = False
        pending, self._pending = self._pending, None
        error: BaseException | None = None
        if pending is not None:
            t0 = time.perf_counter()
            try:
                log_landed(self._pending_name, pending.result(), time.perf_counter() - t0)
            except Exception as err:  # AtomicCheckpointIO's CheckpointError: the previous file is intact
                error = err
        self.barrier("lmforge_ckpt_landed")  # rank 0 renamed it into place: no rank looks for it before
        if error is not None:
            raise error

    def on_exception(self, exception: BaseException) -> None:
        self._failed = True  # the run is failing: teardown must neither wait at a collective nor raise a second error
        super().on_exception(exception)

    def teardown(self) -> None:
        """The last save lands. After an exception: no collective (another rank may never get here), and a failed
        write is logged, not raised over the error that ends the run."""
        try:
            if self._failed:
                pending, self._pending, self._in_flight = self._pending, None, False
                if pending is not None:
                    try:
                        pending.result()
                    except Exception as err:
                        log.error("%s", err)
            else:
                self.finish_checkpoint()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None
            self._failed = False
            super().teardown()
