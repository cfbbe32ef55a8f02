"""Test-only: Lightning's DeepSpeed strategy on one CPU process with gloo, so CI exercises lmforge's ZeRO path.

Lightning refuses DeepSpeed without CUDA (`setup_environment`) and hands DeepSpeed the CUDA device index
(None on CPU); DeepSpeed itself runs on CPU (its CPU accelerator) with a gloo process group. This subclass
changes only those three places, nothing in how the engine shards, steps, clips or checkpoints, which are the
code paths the tests check. Its shared-memory all-reduce op would be JIT-compiled (~60 s) at start-up; one
process never communicates, so it is marked unavailable.
"""

from __future__ import annotations

import argparse
from typing import Any

from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy

from lmforge.parallel.zero import ZeroStrategy


class GlooZero(ZeroStrategy):
    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's CUDA-only check

    def setup_distributed(self) -> None:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__ = {**deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm": False}
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _get_process_group_backend(self) -> str:
        return "gloo"

    def _setup_model_and_optimizer(self, model: Any, optimizer: Any, lr_scheduler: Any = None) -> tuple[Any, Any]:
        import deepspeed

        engine, optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad], optimizer=optimizer,
            lr_scheduler=lr_scheduler, dist_init_required=False,
        )
        return engine, optimizer
