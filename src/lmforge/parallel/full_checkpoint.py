"""Resuming a single-file checkpoint (written by `strategy=auto` or `ddp`) under `strategy=fsdp` / `fsdp_tp`.

Why: Lightning's ModelParallelStrategy reads such a file, but hands the optimizer state to torch with its parameters
renamed by FSDP1's `rekey_optim_state_dict`, which assumes the optimizer lists them in `model.parameters()` order.
lmforge's optimizers list them by param group (the decayed matrices first, then norms and biases), so AdamW's moments
went to other parameters: an error where the shapes differ, silently wrong ones where they match. Here each saved
position is named after the parameter at that position in the live optimizer (built by the same
`configure_optimizers`), which is how torch's own `Optimizer.load_state_dict` matches them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.errors import CheckpointError


def named_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module, path: str | Path) -> dict[str, Any]:
    """torch's position-keyed optimizer state -> keyed by parameter name relative to `model` (the layout
    `torch.distributed.checkpoint.state_dict.set_optimizer_state_dict` takes). The saved groups must have the
    live optimizer's sizes; anything else is another optimizer setup, refused with the fix."""
    names = {id(p): name for name, p in model.named_parameters()}
    live = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    saved = [len(group["params"]) for group in state["param_groups"]]
    if saved != [len(group) for group in live]:
        raise CheckpointError(
            f"ckpt_path={str(path)!r}: its optimizer has param groups of {saved} parameters, this run's {[len(g) for g in live]}. "
            "Fix: resume with the optimizer, PEFT and model settings that wrote it, or start from its weights with init_from="
            f"{str(path)!r} (fresh optimizer state)."
        )
    order = [name for group in live for name in group]  # torch numbers parameters 0, 1, ... in this order
    by_position = {position: order[position] for group in state["param_groups"] for position in group["params"]}
    return {"state": {by_position[position]: value for position, value in state["state"].items()},
            "param_groups": [{**group, "params": [by_position[p] for p in group["params"]]} for group in state["param_groups"]]}


def load_full_checkpoint(path: Path, model: nn.Module, optimizers: list[torch.optim.Optimizer], strict: bool) -> dict[str, Any]:
    """Load a single-file checkpoint into a sharded `model` and its optimizers (each rank reads the file memory-mapped
    and keeps its own shards); returns the rest of the checkpoint (loops, callbacks, schedulers, lmforge metadata),
    as Lightning's reader does."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=True)
    set_model_state_dict(model, checkpoint.pop("state_dict"), options=StateDictOptions(full_state_dict=True, strict=strict))
    for state, optimizer in zip(checkpoint.get("optimizer_states", []), optimizers, strict=False):
        set_optimizer_state_dict(model, optimizer, optim_state_dict=named_optimizer_state(state, optimizer, model, path),
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict))
    return checkpoint
