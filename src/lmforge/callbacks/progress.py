"""The progress bar, with `train/loss` read on logging steps only.

Why: Lightning converts every metric logged with `prog_bar=True` into a Python number at the end of each step, and
reading a GPU tensor makes the host wait until the GPU has finished all it was given: once a step, the GPU then
idles while the host prepares the next one. Here the loss is logged for the loggers only, and the bar reads it from
`trainer.callback_metrics` on logging steps (`trainer.log_every_n_steps`), where Lightning reads the logged metrics
anyway. Between them the bar shows the last value read, with the step it belongs to.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar

from lmforge.utils.logging_steps import logging_step


class LossProgressBar(RichProgressBar):
    """Lightning's RichProgressBar plus `train/loss` (and its step) as of the last logging step."""

    def __init__(self, *args: Any, monitor: str = "train/loss", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.monitor = monitor
        self._shown: tuple[int, float] | None = None

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        if trainer.training and logging_step(trainer):
            value = trainer.callback_metrics.get(self.monitor)
            if value is not None:
                self._shown = (trainer.global_step, float(value))
        if self._shown is not None:
            items[self.monitor] = self._shown[1]
            items["at_step"] = self._shown[0]
        return items

    def _get_train_description(self, current_epoch: int) -> str:
        """"Epoch 3/9" when `trainer.max_epochs` bounds the run; "Epoch 3" when steps do (max_epochs = -1, where
        Lightning's bar printed "Epoch 3/-2")."""
        description = super()._get_train_description(current_epoch)
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs < 0:
            description = description.replace(f"Epoch {current_epoch}/{max_epochs - 1}", f"Epoch {current_epoch}", 1)
        return description
