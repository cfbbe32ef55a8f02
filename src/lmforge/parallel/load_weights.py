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
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.errors import CheckpointError, LmforgeError


@dataclass(frozen=True)
class Target:
    """A sharded module to fill: its keys are `prefix` + the checkpoint's (LoRA's `base_layer` aside), except `skip`
    (weights the checkpoint lacks: PEFT's, a new head's)."""

    module: nn.Module
    prefix: str = ""
    skip: frozenset[str] = frozenset()

    def source_keys(self) -> dict[str, str]:
        """The module's state-dict key -> the key of the same weight in the checkpoint."""
        from lmforge.parallel.meta_shadow import base_key

        return {k: base_key(k).removeprefix(self.prefix) for k in self.module.state_dict() if k not in self.skip}

    def mismatch(self, state: dict[str, torch.Tensor]) -> str | None:
        """What differs between `state` (whole tensors, checkpoint keys) and the module's (sharded) state dict."""
        sharded = self.module.state_dict()
        return mismatch({source: tuple(sharded[key].shape) for key, source in self.source_keys().items()}, state)


def mismatch(expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor]) -> str | None:
    """Missing / unexpected keys and wrong shapes of `state` against the `expected` key -> whole shape."""
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shapes = [f"{k}: {tuple(state[k].shape)} for {expected[k]}" for k in sorted(expected.keys() & state.keys())
              if tuple(state[k].shape) != expected[k]]
    problems = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
                f"shapes {shapes[:5]}" if shapes else ""]
    return "; ".join(p for p in problems if p) or None


def read_on_rank0(read: Callable[[], dict[str, torch.Tensor]], problem: Callable[[dict[str, torch.Tensor]], str | None],
                  what: str) -> tuple[dict[str, torch.Tensor], int]:
    """`read()` on rank 0 only, checked there by `problem`; the verdict is shared, so a bad file is the same clear
    error on every rank, never ranks waiting in a collective for one that raised. Returns the state dict (empty
    off rank 0) and its tensor count. Collective when a process group exists."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    state: dict[str, torch.Tensor] = {}
    verdict: list[str | int | None] = [None]
    if not distributed or dist.get_rank() == 0:
        try:
            state = read()
            found = problem(state)
            verdict[0] = f"{what} weights do not fit the model: {found}" if found else len(state)
        except (LmforgeError, OSError, RuntimeError, KeyError, ValueError) as err:  # shared, so no rank is left waiting
            verdict[0] = f"{what} weights could not be read on rank 0: {err}"
    if distributed:
        dist.broadcast_object_list(verdict, src=0)
    if isinstance(verdict[0], str):
        raise CheckpointError(f"{verdict[0]}. Fix: pass a checkpoint of this architecture ({what} sets the model from it)")
    return state, int(verdict[0])


def broadcast_weights(targets: Sequence[Target], read: Callable[[], dict[str, torch.Tensor]], what: str = "init_from") -> int:
    """Load the whole state dict `read()` returns on rank 0 into each of `targets` (sharded modules holding those
    weights: the trained model and its frozen copies), on every rank; returns the number of tensors read.
    Collective: every rank calls it; `read` runs on rank 0 only. `what` names the source in errors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state, count = read_on_rank0(read, lambda s: next((p for p in (t.mismatch(s) for t in targets) if p), None), what)
    for target in targets:
        # strict unless some keys are filled elsewhere; the keys were checked above either way
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=not target.skip)
        keys = target.source_keys()
        renamed = {key: state[source] for key, source in keys.items()} if state else {}  # a new dict: torch replaces entries
        set_model_state_dict(target.module, renamed, options=options)
    return count
