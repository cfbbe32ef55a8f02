"""Checkpoint writes that never leave a half-written file behind.

Lightning's TorchCheckpointIO opens the target and streams into it: a kill or a full disk mid-write truncates
`last.ckpt`, the one file a resume needs. Here the bytes go to a temp file in the same directory, are fsynced,
and only then renamed over the target (atomic on POSIX), so the previous checkpoint survives any failure.

Reading: a sharded checkpoint directory (strategy=fsdp / fsdp_tp) resumes here too, under `auto` or `ddp`: it is
read whole, its optimizer state renumbered into torch's layout (`parallel/sharded_checkpoint.py`). Lightning's own
reader stopped with `IsADirectoryError`. A DeepSpeed ZeRO directory is refused with the fix: its optimizer state is
partitioned DeepSpeed's way and resumes under a deepspeed_* strategy only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lmforge.errors import CheckpointError
from lmforge.parallel.sharded_checkpoint import is_sharded_checkpoint, read_resumable_checkpoint
from lmforge.parallel.zero_checkpoint import is_zero_checkpoint
from lmforge.utils.io import _atomic_write


def _write(checkpoint: dict[str, Any], fh: IO[bytes]) -> None:
    """The serialisation step, separate so tests can make it fail half-way (a full disk)."""
    torch.save(checkpoint, fh)


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO with temp file + fsync + os.replace for local paths (remote URLs: Lightning's own), which
    also reads sharded checkpoint directories."""

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        if "://" not in str(path) and Path(path).is_dir():
            if is_zero_checkpoint(path):
                raise CheckpointError(
                    f"ckpt_path={str(path)!r} is a DeepSpeed ZeRO checkpoint: it resumes under a deepspeed_* strategy only. Fix: resume "
                    f"with the strategy that wrote it, or start from its weights under this one with init_from={str(path)!r} "
                    "(fresh optimizer state)."
                )
            if is_sharded_checkpoint(path):
                return read_resumable_checkpoint(path)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}")
        path = Path(path)
        try:
            _atomic_write(path, lambda fh: _write(checkpoint, fh))
        except OSError as err:
            kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
            raise CheckpointError(
                f"could not write checkpoint {str(path)!r} ({err.strerror or err}); {kept}. "
                "Fix: free space on that disk or point callbacks.checkpoint.dirpath elsewhere, then resume with ckpt_path=last."
            ) from err
