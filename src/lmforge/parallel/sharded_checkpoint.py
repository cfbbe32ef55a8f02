"""Reading the sharded checkpoints `strategy=fsdp` writes, on one process, without a process group.

Lightning's `ModelParallelStrategy` saves a directory: `meta.pt` (loops, callbacks, lmforge metadata: a
plain `torch.save`) and torch-distributed-checkpoint shards (`.metadata` + one `__<rank>_0.distcp` per rank)
holding `state_dict.<param>` and `optimizer_0.*`. Consolidation reads the model weights only (never the
optimizer state, twice their size) into full tensors, whatever world size or TP layout wrote them. Both
files are read with `weights_only` semantics: DCP stores tensors and plain data, and meta.pt is loaded with
`weights_only=True`.

`read_resumable_checkpoint` reads all of it, optimizer state included, for resuming a sharded checkpoint under a
strategy that does not shard (`auto`, `ddp`): DCP keys the optimizer state by parameter name, torch's optimizers
by parameter position, so it is renumbered in the order the saved param groups list the parameters.
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


def _read_entries(path: str | Path, prefix: str = "") -> dict[str, Any]:
    """The DCP entries whose flattened keys start with `prefix`, as full tensors in their nested layout
    (`state_dict` -> {param: tensor}, `optimizer_0` -> {"state": ..., "param_groups": ...}), on one process."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    reader = FileSystemReader(str(path))
    keys = {k for k in reader.read_metadata().state_dict_metadata if k.startswith(prefix)}
    loaded: dict[str, Any] = {}
    _load_state_dict(loaded, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True)
    return loaded


def read_model_weights(path: str | Path, prefix: str = "state_dict.") -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors of every `state_dict.*` entry, keyed as in a regular Lightning checkpoint."""
    loaded = _read_entries(path, prefix)
    weights = loaded.get(prefix.rstrip("."), loaded)
    return {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}


def read_sharded_checkpoint(path: str | Path, weights: bool = True) -> dict[str, Any]:
    """A regular checkpoint dict (as `torch.load` of a .ckpt file gives) from a sharded directory."""
    ckpt = read_meta(path)
    ckpt["state_dict"] = read_model_weights(path) if weights else {}
    return ckpt


def read_resumable_checkpoint(path: str | Path) -> dict[str, Any]:
    """The whole checkpoint as a single-file resume reads it: meta.pt's loops and callbacks, the full weights, and
    each optimizer's state in torch's own layout (`indexed_optimizer_state`; `parallel/full_checkpoint.py` is the way back)."""
    loaded = _read_entries(path)
    ckpt = read_meta(path)
    ckpt["state_dict"] = {k: v for k, v in loaded.get("state_dict", {}).items() if isinstance(v, torch.Tensor)}
    ckpt["optimizer_states"] = [indexed_optimizer_state(loaded[f"optimizer_{i}"]) for i in range(len(loaded))
                                if f"optimizer_{i}" in loaded]
    return ckpt


def indexed_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """A name-keyed optimizer state (`torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`'s layout:
    param groups list parameter names, state is keyed by them) -> `torch.optim.Optimizer.state_dict()`'s layout:
    parameters numbered 0, 1, ... in the order the groups list them, which is how `load_state_dict` matches them
    to the optimizer it is loaded into (the same param groups, built by the same `configure_optimizers`)."""
    index: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        ids = [index.setdefault(name, len(index)) for name in group["params"]]
        groups.append({**group, "params": ids})
    unknown = state["state"].keys() - index.keys()
    if unknown:
        raise KeyError(f"optimizer state for parameters no param group lists: {sorted(unknown)[:3]}")
    return {"state": {index[name]: value for name, value in state["state"].items()}, "param_groups": groups}
