"""`strategy=fsdp` / `strategy=fsdp_tp`: Lightning's `ModelParallelStrategy` with the sharding options as config.

Lightning builds the device mesh and the process group, moves batches, and saves/loads sharded checkpoints
(torch distributed checkpoint: a directory, one file per rank, no gather on rank 0); the stage's
`configure_model` applies tensor parallel and FSDP2 on `self.device_mesh` using the options kept here
(`lmforge.parallel.plan.ParallelPlan`). What this subclass adds:

* `data_parallel_size: auto` = world size / tensor_parallel_size (Lightning's `auto` means "number of
  nodes", i.e. pure tensor parallel inside a node — the opposite of what `strategy=fsdp` should do);
* HSDP: `data_parallel_replicate_size` > 1 splits the data-parallel ranks into that many replica groups
  (`fsdp_mesh`, a 2-D (replicate, shard) view of Lightning's mesh) that each shard the model and replicate it;
* `accumulation_sync`: which gradient traffic the micro-batches before the last of an accumulated step skip
  (Lightning only knows DDP's `no_sync`, so FSDP would otherwise reduce every micro-batch);
* checkpoints written atomically: to `<name>.partial`, then swapped in, so a kill mid-save leaves the
  previous checkpoint whole (`ckpt_path=last` never sees a half-written directory);
* `async_save`: saves during fit written in the background (`lmforge.parallel.async_checkpoint`), training
  stalled only while the shards are copied to host memory;
* a single-file checkpoint (from `auto` / `ddp`) resumes with its optimizer state matched by position, as torch
  matches it (`lmforge.parallel.full_checkpoint`; Lightning's reader paired AdamW's moments with other parameters).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.strategies import ModelParallelStrategy

from lmforge.errors import ConfigError
from lmforge.parallel.async_checkpoint import (
    AsyncShardedSaver,
    log_staged,
    log_written,
    saves_in_background,
)
from lmforge.parallel.atomic_save import prepare_partial, remove_checkpoint_path, save_directory_atomically
from lmforge.parallel.fsdp import check_accumulation_sync, hold_gradient_sync, hybrid_shard_mesh
from lmforge.parallel.full_checkpoint import load_full_checkpoint


class ShardedStrategy(ModelParallelStrategy):
    def __init__(
        self,
        tensor_parallel_size: int = 1,
        data_parallel_size: int | Literal["auto"] = "auto",
        data_parallel_replicate_size: int = 1,
        accumulation_sync: str = "every_microbatch",
        sequence_parallel: bool = False,
        loss_parallel: bool = True,
        param_dtype: str | None = "auto",
        reduce_dtype: str | None = "float32",
        reshard_after_forward: bool = True,
        cpu_offload: bool = False,
        meta_init: bool = True,
        save_distributed_checkpoint: bool = True,
        async_save: bool = False,
        process_group_backend: str | None = None,
        timeout_minutes: float = 30.0,
    ) -> None:
        if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
            raise ConfigError("strategy.tensor_parallel_size", f"must be an integer >= 1, got {tensor_parallel_size!r}",
                              "use 1 (FSDP only) or a divisor of the devices per node")
        if isinstance(data_parallel_replicate_size, bool) or not isinstance(data_parallel_replicate_size, int) or data_parallel_replicate_size < 1:
            raise ConfigError("strategy.data_parallel_replicate_size", f"must be an integer >= 1, got {data_parallel_replicate_size!r}",
                              "use 1 (shard over every data-parallel rank) or the number of replica groups, e.g. trainer.num_nodes")
        check_accumulation_sync(accumulation_sync, data_parallel_replicate_size)
        if async_save and not save_distributed_checkpoint:
            raise ConfigError("strategy.async_save", "needs sharded checkpoints (strategy.save_distributed_checkpoint=true)",
                              "set strategy.save_distributed_checkpoint=true, or strategy.async_save=false for one consolidated file")
        super().__init__(
            data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint, process_group_backend=process_group_backend,
            timeout=timedelta(minutes=timeout_minutes),
        )
        self.sequence_parallel, self.loss_parallel = sequence_parallel, loss_parallel
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        self.reshard_after_forward, self.cpu_offload, self.meta_init = reshard_after_forward, cpu_offload, meta_init
        self.data_parallel_replicate_size, self.accumulation_sync = data_parallel_replicate_size, accumulation_sync
        self.fsdp_mesh: Any = None  # set in setup_environment: the mesh `fully_shard` gets
        self.async_save = bool(async_save)
        self._async_saver = AsyncShardedSaver()
        self._failed = False

    def setup_environment(self) -> None:
        world = self.num_nodes * self.num_processes
        tp = int(self._tensor_parallel_size)
        if world % tp:
            raise ConfigError("strategy.tensor_parallel_size", f"{tp} does not divide the world size {world} (devices x nodes)",
                              "choose trainer.devices (x trainer.num_nodes) as a multiple of the tensor-parallel size")
        if self._data_parallel_size == "auto":
            self._data_parallel_size = world // tp
        replicate, dp = self.data_parallel_replicate_size, int(self._data_parallel_size)
        if dp % replicate:
            raise ConfigError("strategy.data_parallel_replicate_size", f"{replicate} does not divide the {dp} data-parallel ranks",
                              "choose a divisor, usually trainer.num_nodes (shard inside a node, replicate across nodes)")
        super().setup_environment()
        self.fsdp_mesh = hybrid_shard_mesh(self.device_mesh, replicate)

    @contextmanager
    def block_backward_sync(self) -> Iterator[None]:
        """Lightning enters this around every micro-batch but the last of an accumulated step."""
        with hold_gradient_sync(self.lightning_module, self.accumulation_sync):
            yield

    def compute_param_dtype(self) -> str | None:
        """`auto`: bf16 compute when the trainer runs bf16 (fp32 sharded master weights stay for the optimizer)."""
        if self.param_dtype != "auto":
            return self.param_dtype
        return "bfloat16" if str(self.precision_plugin.precision).startswith("bf16") else None

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        self.finish_checkpoint()  # the one in flight lands first (the same path may be saved again)
        if not saves_in_background(self, filepath):
            t0 = time.perf_counter()
            save_directory_atomically(self, filepath, lambda partial: super(ShardedStrategy, self).save_checkpoint(checkpoint, partial, storage_options))
            if self.global_rank == 0:
                log_written(filepath, time.perf_counter() - t0)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}")
        path, partial = prepare_partial(self, filepath)
        state = {"state_dict": checkpoint.pop("state_dict")}  # the layout Lightning's synchronous save writes
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        blocked = self._async_saver.start(state, partial, path, self.global_rank, meta=checkpoint, timeout=self._timeout)
        if self.global_rank == 0:
            log_staged(path, blocked)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if not path.is_file():  # a sharded directory: Lightning's DCP reader
            return super().load_checkpoint(path, weights_only=weights_only)
        return load_full_checkpoint(path, self.model, self.optimizers, strict=self.lightning_module.strict_loading)

    def finish_checkpoint(self) -> None:
        """Wait for a background save to land (swapped into place); a no-op when none is in flight. Collective."""
        if self._async_saver.finish(self.global_rank):
            self.barrier("lmforge_ckpt_landed")  # rank 0 swapped it in: no rank looks for it before (save_final_last does)

    def on_exception(self, exception: BaseException) -> None:
        self._failed = True  # the run is failing: teardown must neither wait at a collective nor raise a second error
        super().on_exception(exception)

    def teardown(self) -> None:
        try:
            landed = self._async_saver.close(self.global_rank, raise_errors=not self._failed)
            if landed and not self._failed:  # after an exception another rank may never get here: no collective then
                self.barrier("lmforge_ckpt_landed")
        finally:
            self._failed = False
            super().teardown()

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.global_rank == 0:
            remove_checkpoint_path(filepath)
