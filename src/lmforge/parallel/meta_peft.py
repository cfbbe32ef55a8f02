"""PEFT on a meta-device model: the adapters a whole-model build would have, without ever building the model whole.

`init_from` + PEFT under FSDP/TP is the usual way to fine-tune a large model; the base comes from the checkpoint
(`load_weights.broadcast_weights`), but the PEFT weights (LoRA's A, an adapter's down projection, a prefix) are drawn
from the generator when `apply_peft` runs, and a meta model cannot hold what was drawn. So the same `apply_peft`
runs twice:

* on a *shadow* of the model whose base parameters are zero-stride CPU tensors (one element of storage each, whatever
  their shape): the PEFT code sees real CPU layers, draws exactly what it draws on a whole model, and leaves the
  generator where a whole build leaves it. The new weights are small; they are kept (`PeftValues`);
* on the meta model itself under `torch.device("meta")`, with the generator restored afterwards, so the structure
  (LoRA wrappers, adapters, prefix encoder) is in place before tensor parallelism and FSDP shard it.

Once the shards exist, `fill_peft_values` copies each kept weight's slice into them (no communication: every rank
drew the same numbers).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

PeftValues = dict[str, torch.Tensor]


def _zero_stride_shadow(model: nn.Module) -> tuple[nn.Module, set[int]]:
    """A copy of meta `model` whose parameters and buffers are CPU tensors of the same shapes and dtypes backed by one
    element each (ties kept); returns it and the ids of those base tensors."""
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


def apply_peft_on_meta(model: nn.Module, cfg: Mapping[str, Any]) -> tuple[Any, PeftValues]:
    """`apply_peft(model, cfg)` on a meta `model`; returns its report and the PEFT weights a whole build would have drawn
    (by parameter name), leaving the CPU generator where that build leaves it."""
    from lmforge.peft import apply_peft

    shadow, base = _zero_stride_shadow(model)
    peft_log = logging.getLogger("lmforge")
    level = peft_log.level
    peft_log.setLevel(logging.WARNING)  # the shadow's report would be logged twice
    try:
        apply_peft(shadow, cfg)  # draws what a whole build draws, from where it would draw it
    finally:
        peft_log.setLevel(level)
    values = {name: p.detach().clone() for name, p in shadow.named_parameters(remove_duplicate=False) if id(p) not in base}
    after = torch.get_rng_state()
    try:
        with torch.device("meta"):
            report = apply_peft(model, cfg)
    finally:
        torch.set_rng_state(after)
    return report, values


def base_key(name: str) -> str:
    """The key a PEFT model's base weight has in a plain checkpoint: LoRA wraps a Linear as `<name>.base_layer`."""
    return name.replace(".base_layer.", ".")


def fill_peft_values(model: nn.Module, values: PeftValues) -> None:
    """Copy the PEFT weights `values` (whole tensors) into `model`'s allocated (sharded) parameters: each rank keeps its
    slice of the whole tensor, as `distribute_tensor` lays it out."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, full in values.items():
            param = params[name]
            if isinstance(param, DTensor):
                local = distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None).to_local()
                param.to_local().copy_(local)
            else:
                param.copy_(full)
