"""Direct Preference Optimization (Rafailov et al. 2023) against a frozen reference policy.

The reference is a frozen copy of the starting (SFT) weights, or — under PEFT — the same model with its
adapters switched off (no second copy in memory), or, with `precompute_reference`, only its log-probabilities:
computed once over both splits at the start of training by the policy itself (before its first step it is the
reference, so no copy is ever made), kept as buffers (in the checkpoint, so a resume
never recomputes them) and looked up by example index — no reference forward per step and no reference
weights in memory afterwards. Sequence log-probabilities are summed over completion tokens (averaged for IPO,
as TRL does); losses: `sigmoid` (DPO, with label smoothing = conservative DPO), `ipo` (Azar et al. 2023),
`robust` (Chowdhury et al. 2024). A reference copy is part of the checkpoint too, so a resumed run keeps
comparing against the same weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics import MeanMetric

from lmforge.errors import CheckpointError
from lmforge.losses import dpo_loss, dpo_uses_average_logps
from lmforge.objectives.base import decoder_sequence_logprobs
from lmforge.stages.base import LMStage
from lmforge.stages.pairs import stack_pairs

METRICS = ("loss", "chosen_reward", "rejected_reward", "margin", "accuracy")


class DPOStage(LMStage):
    def __init__(
        self, *args: Any, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
        precompute_reference: bool = False, **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.precompute_reference = precompute_reference
        dpo_loss(*(torch.zeros(1),) * 4, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)  # bad settings fail at start
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.reference: nn.Module | None = None
        self.val_metrics = nn.ModuleDict({name: MeanMetric() for name in METRICS})

    def frozen_models_build_on_meta(self) -> bool:
        return True  # the reference is a deep copy of the model (none with precompute_reference or PEFT)

    def frozen_models_build_partitioned(self) -> bool:
        return True  # the reference is a `frozen_copy`

    def build_frozen_models(self) -> None:
        if self.precompute_reference:  # (N, 2) chosen/rejected log-probs per split, filled in on_fit_start
            sizes = {split: len(self.trainer.datamodule.datasets[split]) for split in ("train", "val")}
            for split, n in sizes.items():
                self.register_buffer(f"reference_{split}", torch.full((n, 2), float("nan")))
        elif self.peft_cfg is None:  # under PEFT the reference is the base model with adapters disabled
            self.reference = self.frozen_copy()

    def reference_sequence_logps(self, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        average = dpo_uses_average_logps(self.loss_type)
        with torch.no_grad():
            if self.reference is not None:
                self.reference.eval()  # Lightning's model.train() reaches it too: keep dropout off
                return decoder_sequence_logprobs(self.reference, ids, targets, average, attention_mask=mask)
            if self.peft_cfg is None:  # precompute_reference, before the first step: the policy is still the reference
                return decoder_sequence_logprobs(self.model, ids, targets, average, attention_mask=mask)
            from lmforge.peft import adapters_disabled

            with adapters_disabled(self.model):
                return decoder_sequence_logprobs(self.model, ids, targets, average, attention_mask=mask)

    def reference_logps(self, batch: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(2B,) reference sequence log-probs: looked up when precomputed, else one no-grad forward."""
        if self.precompute_reference and "index" in batch:
            table = self.reference_train if self.training else self.reference_val
            pairs = table[batch["index"]]
            return torch.cat([pairs[:, 0], pairs[:, 1]])
        return self.reference_sequence_logps(ids, mask, targets)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if not self.precompute_reference or not (self.reference_train.isnan().any() or self.reference_val.isnan().any()):
            return  # no cache, or it was restored complete from a checkpoint
        if self.trainer.ckpt_path is not None:  # resumed weights are no longer the reference
            raise CheckpointError(f"{self.trainer.ckpt_path} has no complete reference log-probs (stage.precompute_reference was "
                                  "off, or the data changed): the resumed policy is no longer the reference. Fix: resume with the "
                                  "run's own settings, or start a new run from these weights with init_from=<ckpt>")
        # no step taken yet: the policy is the reference (in eval mode, no dropout); no copy of the weights is made
        was_training = self.model.training
        self.model.eval()
        try:
            self.fill_reference_tables()
        finally:
            self.model.train(was_training)

    def fill_reference_tables(self) -> None:
        datamodule = self.trainer.datamodule
        for split in ("train", "val"):
            table = getattr(self, f"reference_{split}")
            for batch in datamodule.ordered_dataloader(split):
                batch = {k: v.to(self.device) for k, v in batch.items()}
                ids, mask, targets = stack_pairs(batch)
                # the precision the steps run at (bf16 autocast under bf16-mixed): hooks run outside it, and
                # float32 reference log-probs would differ from the policy's by bf16 rounding at step 0
                with self.trainer.precision_plugin.forward_context():
                    logps = self.reference_sequence_logps(ids, mask, targets)
                table[batch["index"]] = torch.stack(logps.float().chunk(2), dim=1)

    def step(self, batch: dict[str, torch.Tensor]) -> Any:
        ids, mask, targets = stack_pairs(batch)
        average = dpo_uses_average_logps(self.loss_type)
        policy = decoder_sequence_logprobs(self.model, ids, targets, average, attention_mask=mask)
        reference = self.reference_logps(batch, ids, mask, targets)
        pc, pr = policy.chunk(2)
        rc, rr = reference.chunk(2)
        return dpo_loss(pc, pr, rc, rr, beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.step(batch)
        self.log_train_loss(out.loss)
        self.note_train_loss(out.loss)  # loss-spike detection (LMStage)
        self.log_dict({
            "dpo/chosen_reward": out.chosen_rewards.mean(), "dpo/rejected_reward": out.rejected_rewards.mean(),
            "dpo/margin": out.margin, "dpo/accuracy": out.accuracy,
        }, on_step=True)
        self.log_lr()
        return out.loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self.step(batch)
        n = batch["chosen_input_ids"].size(0)
        values = {"loss": out.loss, "chosen_reward": out.chosen_rewards.mean(), "rejected_reward": out.rejected_rewards.mean(),
                  "margin": out.margin, "accuracy": out.accuracy}
        for name, value in values.items():
            self.val_metrics[name].update(value.detach().float(), n)

    def on_validation_epoch_end(self) -> None:
        values = {name: metric.compute() for name, metric in self.val_metrics.items()}
        self.log_reduced({"val/loss": values.pop("loss"), **{f"val/dpo/{k}": v for k, v in values.items()}}, prog_bar=True)
        for metric in self.val_metrics.values():
            metric.reset()
