"""torch.optim.AdamW with `fused=None` meaning "fused wherever torch has the kernel", CPU included.

torch's own default (`fused=None`, `foreach=None`) is the foreach implementation on CUDA and the per-tensor
Python loop on CPU, although a fused CPU kernel exists (torch >= 2.4) and is what Hugging Face's Trainer
uses by default (`adamw_torch_fused`). The fused kernel updates each parameter in one pass over its
weight, gradient and two moments; the loop makes ~10 passes and ~10 Python op dispatches per parameter
(`python scripts/benchmark.py train-vs-hf` reports which implementation each side ran).

Fused is chosen for parameters on CPU or CUDA with a floating dtype (torch's own condition), plain tensors or
FSDP2's DTensors on one mesh (each rank's shards in one pass, where foreach makes several over every weight,
gradient and moment); parameters over several meshes, other devices, or an explicit `foreach=True` keep
torch's choice. `fused=True` / `False` are passed through unchanged. The object is a torch.optim.AdamW: its
state dict, schedulers and Lightning treat it as one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

FUSED_DEVICES = ("cpu", "cuda")


def _params(params: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for item in params:
        if isinstance(item, dict):
            out.extend(item["params"] if not isinstance(item["params"], torch.Tensor) else [item["params"]])
        elif isinstance(item, tuple):  # (name, tensor)
            out.append(item[1])
        else:
            out.append(item)
    return out


def can_fuse(params: Iterable[torch.Tensor]) -> bool:
    """Every parameter on CPU/CUDA with a floating dtype, and either all plain tensors or all DTensors of one device
    mesh (FSDP2: DTensor runs the fused kernel on each rank's shard; parameters spread over several meshes, as
    tensor parallel's 2-D layouts can be, keep torch's foreach choice)."""
    from torch.distributed.tensor import DTensor

    params = list(params)
    if not params or not all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params):
        return False
    if all(type(p) in (torch.Tensor, torch.nn.Parameter) for p in params):
        return True
    return all(isinstance(p, DTensor) for p in params) and len({id(p.device_mesh) for p in params}) == 1


class AdamW(torch.optim.AdamW):
    """AdamW, fused by default where possible (see the module doc); arguments as torch.optim.AdamW."""

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        params = list(params)
        if fused is None and not foreach and not differentiable and can_fuse(_params(params)):
            fused = True
        super().__init__(
            params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
        )

    def step(self, closure: Any = None) -> Any:
        """torch's step; then, for the fused kernel, the parameters' version counters bumped as the foreach and
        per-tensor implementations bump them (torch 2.13's fused kernel updates in place without doing so, which
        hides the update from anything that caches on versions)."""
        loss = super().step(closure)
        if self.defaults.get("fused"):
            torch.autograd.graph.increment_version(
                [p for group in self.param_groups for p in group["params"] if p.grad is not None and type(p.data) is torch.Tensor])
        return loss
