"""Deterministic, rank-sharded, exactly resumable order of training blocks.

Why not `DataLoader(shuffle=True)`: its order comes from the global RNG at the moment the iterator is made,
so a resumed run cannot replay it. Here the order of epoch `e` is a pure function of (seed, e): a permutation
drawn from `numpy.random.default_rng([seed, e])`, cut into `world_size` interleaved, disjoint, equal slices
(rank r takes global positions r, r + W, r + 2W, ...; the < W leftover blocks of an epoch are dropped).

`ResumableLoader` counts the batches it has *handed out* (in the main process, so worker prefetching cannot
skew it) and exposes `state_dict` / `load_state_dict`: Lightning's fit loop stores that state in every
checkpoint (`loops.fit_loop.state_dict.combined_loader`) and gives it back on `ckpt_path=...` before the
first batch, so the resumed run continues at exactly the next batch the interrupted run would have drawn.
The loader keeps its own epoch count (Lightning's may already have moved on when a run stopped mid-epoch).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lmforge.errors import DataError

log = logging.getLogger("lmforge")

STATE_VERSION = 1


def epoch_order(n_items: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The global order of one epoch: the same for every rank and every run with this seed."""
    if not shuffle:
        return np.arange(n_items, dtype=np.int64)
    return np.random.default_rng([int(seed) & 0xFFFF_FFFF, int(epoch)]).permutation(n_items)


class ResumableSampler(DistributedSampler):
    """This rank's slice of epoch `epoch`'s order, starting `start` samples in.

    A `DistributedSampler` subclass so that Lightning does not wrap it in its own distributed sampler
    (it only leaves samplers of that type alone); `epoch` and `start` are set by `ResumableLoader`.
    """

    def __init__(self, n_items: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        super().__init__(range(n_items), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=int(seed), drop_last=True)
        self.n_items = n_items
        self.num_samples = n_items // world_size  # equal slices; the < world_size leftovers of an epoch are dropped
        self.total_size = self.num_samples * world_size
        self.start = 0

    def indices(self, epoch: int) -> np.ndarray:
        """Every index this rank sees in `epoch`, in order (disjoint from the other ranks' slices)."""
        return epoch_order(self.n_items, self.seed, epoch, self.shuffle)[: self.total_size][self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices(self.epoch)[self.start :].tolist())

    def __len__(self) -> int:
        return self.num_samples  # a full epoch: Lightning counts resumed batches against this length


def pin_for(trainer: Any) -> bool:
    """Page-locked batches when the trainer runs on CUDA: Lightning then copies them with non_blocking=True, which
    from pinned memory is queued behind the GPU's work like a kernel; from pageable memory the copy is staged by the
    host and may wait for the queue (a per-step pause in the GPU's work). Elsewhere pinning buys nothing."""
    device = getattr(getattr(trainer, "strategy", None), "root_device", None)
    return isinstance(device, torch.device) and device.type == "cuda"


class ResumableLoader(DataLoader):
    """A DataLoader over a `ResumableSampler` whose position survives checkpoints (drop_last batches)."""

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, batch_size: int, fingerprint: str = "", **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **kwargs)
        self.fingerprint = fingerprint
        self.epoch = 0
        self.position = 0  # samples of this rank's slice handed out in `epoch`

    def __iter__(self) -> Iterator[Any]:
        return self._batches()  # a generator: nothing moves until the first batch is asked for

    def _batches(self) -> Iterator[Any]:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        if self.position + self.batch_size > sampler.num_samples:  # no full batch left: next epoch
            self.epoch, self.position = self.epoch + 1, 0
        sampler.epoch, sampler.start = self.epoch, self.position
        for batch in super().__iter__():
            self.position += self.batch_size
            yield batch

    def state_dict(self) -> dict[str, Any]:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        return {
            "version": STATE_VERSION, "epoch": self.epoch, "global_position": self.position * sampler.num_replicas,
            "seed": sampler.seed, "n_items": sampler.n_items, "shuffle": sampler.shuffle,
            "world_size": sampler.num_replicas, "batch_size": self.batch_size, "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where the checkpointed run stopped; refuse if that run read other data."""
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        saved = (state.get("fingerprint"), state.get("n_items"))
        if saved != (self.fingerprint, sampler.n_items):
            raise DataError(
                f"the checkpoint's data position is for other training data ({saved[1]} blocks, data hash {saved[0]}; "
                f"this run has {sampler.n_items} blocks, data hash {self.fingerprint}): resuming would not continue the "
                "same batches. Fix: resume with the data, tokenizer and data.block_size the run was started with, or "
                "start a new run from these weights with init_from=<ckpt> instead of ckpt_path"
            )
        if state.get("seed") != sampler.seed or state.get("shuffle") != sampler.shuffle:
            raise DataError(
                f"the checkpoint's data order used seed={state.get('seed')} shuffle={state.get('shuffle')}, this run "
                f"seed={sampler.seed} shuffle={sampler.shuffle}. Fix: resume with the same seed (and data.shuffle), "
                "or start a new run with init_from=<ckpt>"
            )
        if (state.get("world_size"), state.get("batch_size")) != (sampler.num_replicas, self.batch_size) and sampler.rank == 0:
            log.warning(  # once per run, not once per rank
                "resuming with world_size=%d batch_size=%d (checkpoint: %s, %s): the data position is carried over "
                "as a global sample count, so the order stays the same but batch boundaries move",
                sampler.num_replicas, self.batch_size, state.get("world_size"), state.get("batch_size"),
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["global_position"]) // sampler.num_replicas
