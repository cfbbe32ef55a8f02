"""Global gradient L2 norm and clipping that also work for sharded (DTensor) gradients.

Under FSDP2 the gradients are DTensors sharded on the data-parallel mesh; with tensor parallel some live on the
2-D (dp, tp) mesh and the rest on the dp mesh. `torch.nn.utils.clip_grad_norm_` stacks all per-parameter
norms into one tensor, which DTensor refuses across meshes. Here norms are grouped by (mesh, placements),
reduced to plain numbers per group (`full_tensor()` performs the cross-rank sum of squares), then combined.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def total_grad_norm(grads: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The L2 norm of all gradients together, as a plain (replicated) tensor, identical on every rank."""
    from torch.distributed.tensor import DTensor

    plain: list[torch.Tensor] = []
    groups: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        if isinstance(g, DTensor):
            groups.setdefault((g.device_mesh, tuple(g.placements)), []).append(g)
        else:
            plain.append(g)
    parts: list[torch.Tensor] = []
    if plain:
        parts.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(plain, norm_type)), norm_type))
    for group in groups.values():
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(group, norm_type)), norm_type)
        parts.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not parts:
        return torch.zeros(())
    device = parts[0].device
    return torch.linalg.vector_norm(torch.stack([p.to(device) for p in parts]), norm_type)


def clip_grads_(grads: list[torch.Tensor], max_norm: float, total: torch.Tensor) -> None:
    """Scale gradients in place so their global norm is at most `max_norm` (as clip_grad_norm_ does)."""
    from torch.distributed.tensor import DTensor

    coef = float(max_norm) / (float(total) + 1e-6)
    if coef >= 1.0:
        return
    plain = [g for g in grads if not isinstance(g, DTensor)]
    if plain:
        torch._foreach_mul_(plain, coef)
    for g in grads:
        if isinstance(g, DTensor):
            g.mul_(coef)
