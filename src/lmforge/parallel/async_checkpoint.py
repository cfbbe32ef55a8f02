"""Sharded checkpoints written in the background (`strategy.async_save=true` under fsdp / fsdp_tp; ddp's single
file: `parallel/ddp.py`): a save stalls training only while each rank copies its shards to host memory, not while
they are written.

Why: a synchronous torch-distributed-checkpoint save holds every rank for the whole write: seconds to minutes per
save for a billion-parameter model's weights and AdamW state on a shared filesystem, the GPUs idle all along.
How: DCP's `async_save` stages (deep-copies) this rank's shards to host memory on the calling thread, so later
optimizer steps cannot change what is written, then a thread plans and writes them on a gloo process group of its
own: the writer's collectives must never interleave with training's on the default group (NCCL has no CPU path
at all).

The atomic swap of `save_directory_atomically` (`<name>.partial` → `<name>`) is kept, done once the write is
complete everywhere. DCP's save ends with rank 0 writing `.metadata` after every rank reported its files written,
so once rank 0's future is done all shards are on disk and rank 0 swaps alone; the strategy then holds the other
ranks at a barrier until it has (they may look for the checkpoint next). That happens at the next save, at the end of
fit (teardown; after an exception without the barrier), or when asked (`finish_checkpoint`, the preemption callback's
save). A crash before the swap leaves `.partial` and the previous checkpoint whole.
"""

from __future__ import annotations

import logging
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import CheckpointError
from lmforge.parallel.atomic_save import swap_into_place

log = logging.getLogger("lmforge")


def _cause(err: BaseException) -> str:
    """The ranks' own errors, not DCP's wrapper with its tracebacks."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        return "; ".join(f"rank {rank}: {pair[0]!r}" for rank, pair in sorted(failures.items()))
    return repr(err)


def saves_in_background(strategy: Any, filepath: Any) -> bool:
    """`strategy.async_save` applies to saves during a running fit only (teardown lands them). Saves after fit, after an
    interruption and SLURM's requeue save (`hpc_ckpt_*`: the job ends right after) are written before returning."""
    if not getattr(strategy, "async_save", False) or Path(str(filepath)).name.startswith("hpc_ckpt"):
        return False
    from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus

    trainer = getattr(strategy.lightning_module, "_trainer", None)
    return trainer is not None and trainer.state.fn == TrainerFn.FITTING and trainer.state.status == TrainerStatus.RUNNING


def log_written(filepath: Any, seconds: float) -> None:
    """What a synchronous save cost (`scripts/bench_checkpoint.py` reads these lines back)."""
    log.info("checkpoint %s: written in %.2f s, training blocked throughout", Path(str(filepath)).name, seconds)


def log_staged(filepath: Any, seconds: float) -> None:
    """What a background save cost training up front: the copy to host memory."""
    log.info("checkpoint %s: training blocked %.2f s to stage it; written in the background", Path(str(filepath)).name, seconds)


def log_landed(filepath: Any, seconds: float, waited: float) -> None:
    """A background save landed after `seconds`; `waited`: how long training was held for it at the end."""
    log.info("checkpoint %s written in the background in %.2f s%s", Path(str(filepath)).name, seconds,
             f" (training waited {waited:.2f} s for it)" if waited >= 0.01 else "")


@dataclass
class _Pending:
    future: Future
    path: Path
    partial: Path
    started: float


class AsyncShardedSaver:
    """One background DCP save in flight at a time; `start` finishes the previous one first."""

    def __init__(self, pinned_staging: bool | None = None) -> None:
        self.pinned_staging = torch.cuda.is_available() if pinned_staging is None else pinned_staging
        self._pending: _Pending | None = None
        self._group: Any = None
        self._stager: Any = None

    @property
    def pending_path(self) -> Path | None:
        return self._pending.path if self._pending is not None else None

    def _process_group(self, timeout: Any) -> Any:
        """A gloo group for the writer thread, made on first use (every rank saves together, so all call this)."""
        import torch.distributed as dist

        if self._group is None and dist.is_available() and dist.is_initialized():
            self._group = dist.new_group(backend="gloo", timeout=timeout) if timeout is not None else dist.new_group(backend="gloo")
        return self._group

    def start(self, state: dict[str, Any], partial: Path, path: Path, rank: int, meta: dict[str, Any] | None = None,
              timeout: Any = None) -> float:
        """Stage `state` (tensors and DTensors) and write it to `partial` in the background; rank 0 also writes `meta`
        (a plain `torch.save`, small) to `partial/meta.pt` now. Returns the seconds this call blocked."""
        from torch.distributed.checkpoint import async_save
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        t0 = time.perf_counter()
        self.finish(rank)
        group = self._process_group(timeout)
        if self._stager is None:  # kept across saves: with pinned memory its host buffers are reused
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=self.pinned_staging, use_shared_memory=False,
                                                        use_async_staging=False, use_non_blocking_copy=False))
        partial.mkdir(parents=True, exist_ok=True)
        future = async_save(state, checkpoint_id=str(partial), process_group=group, async_stager=self._stager)
        if rank == 0 and meta is not None:
            from lmforge.parallel.sharded_checkpoint import META_FILE

            torch.save(meta, partial / META_FILE)
        self._pending = _Pending(future, path, partial, time.perf_counter())
        return time.perf_counter() - t0

    def finish(self, rank: int, raise_errors: bool = True) -> bool:
        """Wait for the save in flight, if any; rank 0 swaps it into place. True when one landed: the caller then
        holds the other ranks at a barrier until rank 0 has swapped (they may look for the checkpoint next).
        A failed write leaves the previous checkpoint whole and raises (or, `raise_errors=False`, after another
        error already ends the run, logs)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return False
        t0 = time.perf_counter()
        try:
            pending.future.result()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # DCP's CheckpointException is a BaseException
            if rank == 0:
                shutil.rmtree(pending.partial, ignore_errors=True)
            kept = f"the previous {pending.path.name} is intact" if pending.path.exists() else f"no {pending.path.name} was written"
            error = CheckpointError(
                f"the background write of checkpoint {str(pending.path)!r} failed ({_cause(err)}); {kept}. Fix: free space on that disk or "
                "point callbacks.checkpoint.dirpath elsewhere (or set strategy.async_save=false), then resume with ckpt_path=last.")
            if raise_errors:
                raise error from err
            log.error("%s", error)
            return False
        if rank == 0:
            swap_into_place(pending.partial, pending.path)
            log_landed(pending.path, time.perf_counter() - pending.started, time.perf_counter() - t0)
        return True

    def close(self, rank: int, raise_errors: bool = True) -> bool:
        """End of fit: the last save lands (`finish`'s result), the stager's buffers and the writer's group are released."""
        try:
            return self.finish(rank, raise_errors)
        finally:
            if self._stager is not None:
                self._stager.close()
                self._stager = None
            if self._group is not None:
                import torch.distributed as dist

                if dist.is_initialized():
                    dist.destroy_process_group(self._group)
                self._group = None
