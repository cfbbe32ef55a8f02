"""Muon for hidden matrices + AdamW for the rest, as one optimizer Lightning and LR schedulers can drive.

Both halves are torch's own (`torch.optim.Muon`, `torch.optim.AdamW`). With `adjust_lr_fn=
"match_rms_adamw"` (Moonlight) Muon's update RMS matches AdamW's, so one `lr` and one `weight_decay`
serve both and the AdamW schedules and sweeps carry over unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import AdamW, Muon, Optimizer


class MuonAdamW(Optimizer):
    """Param groups flagged `use_muon=True` (2-D hidden matrices) step with Muon, the others with AdamW.

    The outer `param_groups` are the single source of truth for lr / weight_decay: a scheduler edits
    them, and each step copies them into the inner optimizers.
    """

    wants_muon_groups = True  # the stage builds groups with lmforge.optim.param_groups.muon_param_groups

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr_fn: str = "match_rms_adamw",
    ) -> None:
        defaults = {"lr": lr, "weight_decay": weight_decay, "use_muon": False}
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["use_muon"] and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon groups may only hold 2-D matrices; put other params in use_muon=False groups")
        self._muon_idx = [i for i, g in enumerate(self.param_groups) if g["use_muon"] and g["params"]]
        self._adam_idx = [i for i, g in enumerate(self.param_groups) if not g["use_muon"] and g["params"]]
        muon_groups = [{"params": self.param_groups[i]["params"]} for i in self._muon_idx]
        adam_groups = [{"params": self.param_groups[i]["params"]} for i in self._adam_idx]
        self.muon = Muon(muon_groups, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                         ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn) if muon_groups else None
        self.adamw = AdamW(adam_groups, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps) if adam_groups else None

    def _inner(self) -> list[tuple[Optimizer, list[int]]]:
        return [(opt, idx) for opt, idx in ((self.muon, self._muon_idx), (self.adamw, self._adam_idx)) if opt is not None]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt, idx in self._inner():
            for inner, i in zip(opt.param_groups, idx):
                inner["lr"] = self.param_groups[i]["lr"]
                inner["weight_decay"] = self.param_groups[i]["weight_decay"]
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt, _ in self._inner():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {
            "outer": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
            "muon": self.muon.state_dict() if self.muon else None,
            "adamw": self.adamw.state_dict() if self.adamw else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for group, saved in zip(self.param_groups, state_dict["outer"]):
            group.update(saved)
        if self.muon is not None:
            self.muon.load_state_dict(state_dict["muon"])
        if self.adamw is not None:
            self.adamw.load_state_dict(state_dict["adamw"])
