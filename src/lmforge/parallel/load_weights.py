"""Loading whole weights (`init_from`) into a sharded model: rank 0 reads them, every rank gets its shards.

Without this, each rank would read the checkpoint and build the whole model in host memory before sharding:
eight ranks on a node fine-tuning a 7B model would hold eight fp32 copies (8 × 28 GB). Here the model is built
on the meta device and sharded (TP, FSDP2) like a fresh one; rank 0 alone reads the file, and torch's
`set_model_state_dict(broadcast_from_rank0=True)` sends it one tensor at a time, each rank keeping its slice.
Peak host memory: rank 0 holds the whole state dict once, the others one tensor plus their shards.

Rank 0 checks the keys and shapes against the sharded model before the first broadcast and sends its verdict:
a mismatch is the same clear error on every rank, never some ranks waiting in a collective for a rank that raised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from lmforge.errors import CheckpointError, LmforgeError


def _source_keys(module: nn.Module, skip: frozenset[str]) -> dict[str, str]:
    """`module`'s state-dict key -> the key of the same weight in a plain checkpoint (LoRA's `base_layer` dropped),
    for every key but the `skip`ped ones (PEFT weights, which the checkpoint does not have)."""
    from lmforge.parallel.meta_peft import base_key

    return {k: base_key(k) for k in module.state_dict() if k not in skip}


def _mismatch(module: nn.Module, state: dict[str, torch.Tensor], skip: frozenset[str]) -> str | None:
    """What differs between `state` (whole tensors, checkpoint keys) and `module`'s (sharded) state dict; None when
    they match."""
    sharded = module.state_dict()
    expected = {source: tuple(sharded[key].shape) for key, source in _source_keys(module, skip).items()}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shapes = [f"{k}: {tuple(state[k].shape)} for {expected[k]}" for k in sorted(expected.keys() & state.keys())
              if tuple(state[k].shape) != expected[k]]
    problems = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
                f"shapes {shapes[:5]}" if shapes else ""]
    found = "; ".join(p for p in problems if p)
    return found or None


def broadcast_weights(modules: Sequence[nn.Module], read: Callable[[], dict[str, torch.Tensor]],
                      skip: frozenset[str] = frozenset()) -> int:
    """Load the whole state dict `read()` returns on rank 0 into each of `modules` (the same architecture, sharded
    alike: the trained model and its frozen copies), on every rank; returns the number of tensors loaded. `skip`:
    the modules' keys the checkpoint lacks (PEFT weights, filled elsewhere). Collective: every rank calls it; `read`
    runs on rank 0 only."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state: dict[str, torch.Tensor] = {}
    verdict: list[str | int | None] = [None]
    if dist.get_rank() == 0:
        try:
            state = read()
            problem = next((p for p in (_mismatch(m, state, skip) for m in modules) if p), None)
            verdict[0] = f"init_from weights do not fit the model: {problem}" if problem else len(state)
        except (LmforgeError, OSError, RuntimeError, KeyError, ValueError) as err:  # shared, so no rank is left waiting
            verdict[0] = f"init_from weights could not be read on rank 0: {err}"
    dist.broadcast_object_list(verdict, src=0)
    if isinstance(verdict[0], str):
        raise CheckpointError(f"{verdict[0]}. Fix: pass a checkpoint of this architecture (init_from sets the model from it)")
    # strict unless PEFT weights are left out; the keys were checked above either way
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=not skip)
    for module in modules:
        keys = _source_keys(module, skip)
        renamed = {key: state[source] for key, source in keys.items()} if state else {}  # a new dict: torch replaces entries
        set_model_state_dict(module, renamed, options=options)
    return int(verdict[0])
