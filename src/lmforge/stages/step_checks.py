"""Non-finite steps and gradient clipping decided on the device, so a training step never waits for the GPU.

Why: every `if not torch.isfinite(loss)` or `float(grad_norm)` in a step makes the host wait until the GPU has
caught up, and the GPU then idles while the host launches the next work (backward after the loss check, the
optimizer after the clip coefficient, the next forward after the step). With an optimizer whose step takes
amp's `found_inf` and `grad_scale` tensors (torch's fused Adam / AdamW / SGD: `_step_supports_amp_scaling`),
both decisions stay tensors:

  * `found_inf` = the loss or the global gradient norm is not finite: the kernel leaves every weight, moment
    and step count as it was, which is what dropping the gradients did on the host path.
  * `grad_scale` = max(1, (‖g‖ + 1e-6) / gradient_clip_val): the kernel divides the gradients by it as it
    reads them, which is clip-by-global-norm without a pass of its own over the gradients.

The host learns which steps were skipped at the next logging step, checkpoint or the end of training (one
wait for all of them since the last), then counts, warns and stops past `stage.max_skipped_steps` as the
host path does, and feeds the finite losses to the spike detector in order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer


def unwrap(optimizer: Any) -> Optimizer:
    """The torch optimizer behind Lightning's LightningOptimizer wrapper (or the optimizer itself)."""
    return getattr(optimizer, "_optimizer", optimizer)


def takes_device_checks(optimizer: Optimizer) -> bool:
    """Whether the optimizer's step honours `found_inf` / `grad_scale` (torch sets this flag on fused optimizers)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


@dataclass
class PendingStep:
    """One optimizer step whose verdict is still on the device."""

    step: int
    bad: torch.Tensor  # 0-d bool: the step was skipped
    loss: torch.Tensor | None  # its (last micro-batch's) loss, for the message
    norm: torch.Tensor  # the global gradient norm before clipping
    spike_loss: tuple[int, torch.Tensor] | None  # (step, train/loss) for the spike detector, if it is on


class DeviceStepChecks:
    """Arms the optimizer before each step and keeps the verdicts until the host settles them."""

    def __init__(self) -> None:
        self.pending: list[PendingStep] = []
        self._loss_bad: torch.Tensor | None = None
        self._loss: torch.Tensor | None = None

    def note_loss(self, loss: torch.Tensor) -> None:
        """A micro-batch's loss; any non-finite one in an accumulation window skips the step."""
        loss = loss.detach()
        bad = ~torch.isfinite(loss).all()
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad
        self._loss = loss

    def arm(self, optimizer: Optimizer, step: int, norm: torch.Tensor, spike_loss: tuple[int, torch.Tensor] | None,
            agree: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Set `found_inf` for this step from the norm (and the losses noted since the last step). `agree` makes
        every rank take the same decision (a max over ranks) without the host reading it."""
        bad = ~torch.isfinite(norm)
        if self._loss_bad is not None:
            bad = bad | self._loss_bad.to(bad.device)
        if agree is not None:
            bad = agree(bad.float()) > 0
        optimizer.found_inf = bad.float().reshape(())  # the fused kernels compare it with 1 and skip the whole update
        self.pending.append(PendingStep(step, bad, self._loss, norm, spike_loss))
        self._loss_bad = self._loss = None

    @staticmethod
    def clip(optimizer: Optimizer, norm: torch.Tensor, max_norm: float) -> None:
        """Clip by the global norm inside the optimizer's kernel (torch's clip_grad_norm_ coefficient, inverted)."""
        optimizer.grad_scale = torch.clamp((norm.float() + 1e-6) / float(max_norm), min=1.0).reshape(())

    @staticmethod
    def disarm(optimizer: Optimizer) -> None:
        """After the step: nothing may carry over into a step that was not armed."""
        for name in ("found_inf", "grad_scale"):
            optimizer.__dict__.pop(name, None)

    def settle(self) -> list[tuple[PendingStep, bool, float | None]]:
        """Every pending step with whether it was skipped and its train/loss for the spike detector (None if it has
        none): one read from the GPU, however many steps."""
        pending, self.pending = self.pending, []
        if not pending:
            return []
        device = pending[0].bad.device
        nan = torch.tensor(float("nan"), device=device)
        table = torch.stack([torch.stack((p.bad.to(device).float(), nan if p.spike_loss is None else p.spike_loss[1].to(device).float().mean()))
                             for p in pending]).tolist()
        return [(p, bool(bad), None if p.spike_loss is None else loss) for p, (bad, loss) in zip(pending, table, strict=True)]

    @staticmethod
    def reason(record: PendingStep) -> str:
        """What was not finite, as the host path words it."""
        if record.loss is not None and not bool(torch.isfinite(record.loss).all()):
            return f"loss={record.loss.float().mean().item()}"
        return f"grad_norm={record.norm.item()}"
