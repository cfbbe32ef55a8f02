"""What a meta-device build needs beyond the checkpoint: the weights a whole build would *draw* around it.

`init_from` under FSDP/TP fills the base weights from the checkpoint (`load_weights.broadcast_weights`), but some
weights are created around the base when the stage builds its modules: PEFT's (LoRA's A, an adapter's down projection,
a prefix) and the scalar head of a reward model or of PPO's critic. They come from the generator, and a meta model
cannot hold what was drawn. So the code that creates them runs twice (`build_with_shadow`):

* on a *shadow* of the meta module whose parameters and buffers are zero-stride CPU tensors (one element of storage
  each, whatever their shape): the code sees real CPU layers, draws exactly what it draws on a whole model, and leaves
  the generator where a whole build leaves it. The new weights are small; they are kept;
* on the meta module itself under `torch.device("meta")`, with the generator restored afterwards, so the structure
  (LoRA wrappers, adapters, prefix encoder, head) is in place before tensor parallelism and FSDP shard it.

Once the shards exist, `fill_values` copies each kept weight's slice into them (no communication: every rank drew
the same numbers). `MetaSource` says where each of a stage's meta-built modules gets its weights.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")


@dataclass
class MetaSource:
    """Where a meta-built module's weights come from once allocated."""

    read: Callable[[], dict[str, torch.Tensor]] | None  # whole weights, read on rank 0 only; None: replay the model's init
    prefix: str = ""  # the module's keys are prefix + the checkpoint's (a scalar-head wrapper: "backbone.")
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # weights the checkpoint lacks, drawn as a whole build draws them
    what: str = "init_from"  # the config key that named the file, for errors


def _zero_stride_shadow(model: nn.Module) -> tuple[nn.Module, set[int]]:
    """A copy of meta `model` whose parameters and buffers are CPU tensors of the same shapes and dtypes backed by one
    element each (ties kept); returns it and the ids of those tensors."""
    shadow = copy.deepcopy(model)
    made: dict[int, torch.Tensor] = {}
    for module in shadow.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in list(store.items()):
                if tensor is None:
                    continue
                if id(tensor) not in made:
                    fake = torch.empty_strided(tensor.shape, (0,) * tensor.dim(), dtype=tensor.dtype)
                    made[id(tensor)] = nn.Parameter(fake, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else fake
                store[name] = made[id(tensor)]
    return shadow, {id(t) for t in made.values()}


def build_with_shadow(build: Callable[[nn.Module], T], model: nn.Module) -> tuple[T, dict[str, torch.Tensor]]:
    """`build(model)` on meta `model` (in place, like `apply_peft`, or wrapping it, like `ScalarHeadModel`); returns
    its result and the values a whole build gives every parameter `build` creates, by name in the module it returns
    (in `model` when it returns something else). The CPU generator ends where the whole build leaves it."""
    shadow, base = _zero_stride_shadow(model)
    quiet = logging.getLogger("lmforge")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # what `build` logs (PEFT's trainable-parameter report) is logged once, below
    try:
        made = build(shadow)  # draws what a whole build draws, from where it would draw it
    finally:
        quiet.setLevel(level)
    owner = made if isinstance(made, nn.Module) else shadow
    values = {name: p.detach().clone() for name, p in owner.named_parameters(remove_duplicate=False) if id(p) not in base}
    after = torch.get_rng_state()
    try:
        with torch.device("meta"):
            result = build(model)
    finally:
        torch.set_rng_state(after)
    return result, values


def apply_peft_on_meta(model: nn.Module, cfg: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """`apply_peft(model, cfg)` on a meta `model`: its report, and the PEFT weights a whole build would draw."""
    from lmforge.peft import apply_peft

    return build_with_shadow(lambda m: apply_peft(m, cfg), model)


def base_key(name: str) -> str:
    """The key a PEFT model's base weight has in a plain checkpoint: LoRA wraps a Linear as `<name>.base_layer`."""
    return name.replace(".base_layer.", ".")


def fill_values(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Copy `values` (whole tensors, by parameter name) into `model`'s allocated (sharded) parameters."""
    from lmforge.parallel.meta_init import copy_full_into

    params = dict(model.named_parameters(remove_duplicate=False))
    for name, full in values.items():
        copy_full_into(params[name], full)
