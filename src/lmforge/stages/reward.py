"""Reward modelling: a scalar head on the (SFT) decoder trained with the Bradley–Terry loss.

−log σ(r_chosen − r_rejected − margin) (Ouyang et al. 2022; the margin as in Llama 2). The score of a
sequence is the head's output at its last real token, i.e. after the end-of-turn token the SFT data ends
every response with. `center_rewards_coef` adds c·mean((r_c + r_r)²) (Eisenstein et al. 2023, TRL's
`center_rewards_coefficient`) so scores stay centred on 0, which PPO's value function likes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics import MeanMetric

from lmforge.losses import bradley_terry_loss
from lmforge.models.heads import ScalarHeadModel
from lmforge.stages.base import LMStage
from lmforge.stages.pairs import stack_pairs


class RewardStage(LMStage):
    def __init__(self, *args: Any, margin: float | None = None, center_rewards_coef: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.margin, self.center_rewards_coef = margin, center_rewards_coef
        self.val_metrics = nn.ModuleDict({name: MeanMetric() for name in ("loss", "accuracy", "margin")})

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return ScalarHeadModel(model)

    def pair_scores(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask, _ = stack_pairs(batch)
        scores = self.model.score(ids, mask)
        return scores.chunk(2)

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        chosen, rejected = self.pair_scores(batch)
        margin = batch.get("margin", self.margin)
        out = bradley_terry_loss(chosen, rejected, margin)
        loss = out.loss
        if self.center_rewards_coef:
            loss = loss + self.center_rewards_coef * ((chosen + rejected) ** 2).mean()
        return loss, out

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, out = self.step(batch)
        self.log_train_loss(loss)
        self.note_train_loss(loss)  # loss-spike detection (LMStage)
        self.log_dict({"reward/accuracy": out.accuracy, "reward/margin": out.margin_mean}, on_step=True)
        self.log_lr()
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, out = self.step(batch)
        n = batch["chosen_input_ids"].size(0)
        for name, value in (("loss", loss), ("accuracy", out.accuracy), ("margin", out.margin_mean)):
            self.val_metrics[name].update(value.detach().float(), n)

    def on_validation_epoch_end(self) -> None:
        values = {name: metric.compute() for name, metric in self.val_metrics.items()}
        self.log_reduced({"val/loss": values["loss"], "val/reward/accuracy": values["accuracy"], "val/reward/margin": values["margin"]}, prog_bar=True)
        for metric in self.val_metrics.values():
            metric.reset()
