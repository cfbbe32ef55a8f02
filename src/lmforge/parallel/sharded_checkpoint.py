"""Reading the sharded checkpoints `strategy=fsdp` writes, on one process, without a process group.

Lightning's `ModelParallelStrategy` saves a directory: `meta.pt` (loops, callbacks, lmforge metadata: a
plain `torch.save`) and torch-distributed-checkpoint shards (`.metadata` + one `__<rank>_0.distcp` per rank)
holding `state_dict.<param>` and `optimizer_0.*`. Consolidation reads the model weights only (never the
optimizer state, twice their size) into full tensors, whatever world size or TP layout wrote them. Both
files are read with `weights_only` semantics: DCP stores tensors and plain data, and meta.pt is loaded with
`weights_only=True`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

META_FILE = "meta.pt"
DCP_METADATA = ".metadata"


def is_sharded_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / DCP_METADATA).is_file() and (path / META_FILE).is_file()


def read_meta(path: str | Path) -> dict[str, Any]:
    """meta.pt: everything but the tensors (step, loops, callbacks, `lmforge` metadata)."""
    return torch.load(Path(path) / META_FILE, map_location="cpu", weights_only=True)


def read_model_weights(path: str | Path, prefix: str = "state_dict.") -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors of every `state_dict.*` entry, keyed as in a regular Lightning checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    reader = FileSystemReader(str(path))
    keys = {k for k in reader.read_metadata().state_dict_metadata if k.startswith(prefix)}
    loaded: dict[str, Any] = {}
    _load_state_dict(loaded, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True)
    weights = loaded.get(prefix.rstrip("."), loaded)
    return {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}


def read_sharded_checkpoint(path: str | Path, weights: bool = True) -> dict[str, Any]:
    """A regular checkpoint dict (as `torch.load` of a .ckpt file gives) from a sharded directory."""
    ckpt = read_meta(path)
    ckpt["state_dict"] = read_model_weights(path) if weights else {}
    return ckpt
