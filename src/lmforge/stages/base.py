"""Shared LightningModule for language-model stages.

Owns what every stage needs: building the model in `configure_model` (so sharding strategies can wrap
it), AdamW param groups, a step-based LR schedule, gradient-norm logging, and token-weighted validation
metrics (loss, perplexity, bits per byte) that are exact over however many batches were evaluated.
"""

from __future__ import annotations

import copy
import logging
import re
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning
from torch import nn
from torch.optim import Optimizer
from torchmetrics import SumMetric

from lmforge.errors import TrainingDivergedError
from lmforge.loss_spikes import LossSpikeDetector
from lmforge.metrics import bits_per_byte, mean_loss, perplexity
from lmforge.models import build
from lmforge.models.activation_checkpointing import checkpoint_policy
from lmforge.objectives.base import LossOutput
from lmforge.optim.grad_norm import clip_grads_, total_grad_norm
from lmforge.optim.param_groups import decay_param_groups, muon_param_groups, true_numel
from lmforge.parallel.zero_init import generator_states, replayed
from lmforge.stages.step_checks import DeviceStepChecks, takes_device_checks, unwrap
from lmforge.utils.logging_steps import logging_step

SCHEMA_VERSION = 1

log = logging.getLogger("lmforge")
_REDUCED_NAMES: set[str] = set()  # names log_reduced logs: Lightning's sync_dist hint is silenced for exactly these


class LMStage(L.LightningModule):
    def __init__(
        self,
        model_cfg: dict[str, Any],
        objective: Callable[[nn.Module, dict[str, torch.Tensor]], LossOutput],
        optimizer: Callable[..., Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        token_bytes: torch.Tensor | None = None,
        compile: bool | str = False,
        metadata: dict[str, Any] | None = None,
        peft: dict[str, Any] | None = None,
        activation_checkpointing: int | str | None = 0,
        max_skipped_steps: int | None = 10,
        loss_spike_threshold: float | None = 6.0,
        loss_spike_warmup: int = 20,
    ) -> None:
        super().__init__()
        self.model_cfg = model_cfg
        self.peft_cfg = peft if peft and peft.get("method", "none") != "none" else None
        self.activation_checkpointing = checkpoint_policy(activation_checkpointing)  # 0, n or "selective"
        self.peft_report: Any = None
        self.tokenizer: Any = None  # set by run.py: stages that decode (RL rewards) or stop on special ids need it
        self.objective = objective
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.compile_model = compile
        self.static_shapes = False  # compiled (whole or per block) for fixed shapes (configure_model): generate eagerly
        self.metadata = metadata if metadata is not None else {}
        self.model: nn.Module | None = None
        # init_from: reads the weights (InitSource.load_weights) once the model exists; under a meta-device build on rank 0 only
        self.init_weights: Callable[[], dict[str, torch.Tensor]] | None = None
        self.meta_sources: dict[str, Any] | None = None  # a meta build: child name -> MetaSource (parallel/meta_shadow.py)
        # run.py: the weights come from ckpt_path (a resume), so a meta build only allocates: the checkpoint fills every tensor
        self.resuming = False
        # a ZeRO-3 partitioned build: (strategy, generator states before it) for `frozen_copy`; None otherwise
        self.partitioned_from: tuple[Any, tuple[torch.Tensor, torch.Tensor | None]] | None = None
        # bytes per token id (0 for specials): bits-per-byte denominator, comparable across tokenizers
        self.register_buffer("token_bytes", token_bytes if token_bytes is not None else torch.zeros(0, dtype=torch.long), persistent=False)
        self.val_nll, self.val_tokens, self.val_bytes = SumMetric(), SumMetric(), SumMetric()
        self.val_correct = SumMetric()  # MLM only: masked positions predicted right (val/mlm_accuracy)
        self.val_has_correct = False
        self.max_skipped_steps = max_skipped_steps  # null: never give up
        self.skipped_steps = 0  # saved in checkpoints: max_skipped_steps counts across a resume
        # train/loss far above its moving mean + threshold * std: warned and counted (train/loss_spikes); null: off
        self.spike_detector = (LossSpikeDetector(threshold=float(loss_spike_threshold), warmup=int(loss_spike_warmup))
                               if loss_spike_threshold is not None else None)
        self.pending_loss: tuple[int, torch.Tensor] | None = None  # (step, loss) until the step is known not skipped
        # fused optimizers: the non-finite check and clipping run on the device (stages/step_checks.py); None: on the host
        self.step_checks: DeviceStepChecks | None = None

    # --- model ---------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Build here (not in __init__) so strategies can build under init_module / shard per block."""
        if self.model is not None:
            return
        strategy = self.trainer.strategy if self._trainer is not None else None
        sharded = strategy is not None and self._device_mesh is not None
        meta_rng = None
        if sharded and getattr(strategy, "meta_init", False) and self.can_build_on_meta():
            self.model, meta_rng = self.build_model_on_meta()  # no rank ever holds the whole model
        elif self.builds_partitioned(strategy):
            self.model = self.build_model_partitioned(strategy)  # ZeRO-3: no process ever holds the whole model either
        else:
            self.model = self.build_model()
        self.build_frozen_models()
        if self.peft_cfg is not None and meta_rng is not None:
            from lmforge.parallel.meta_shadow import apply_peft_on_meta

            self.peft_report, values = apply_peft_on_meta(self.model, self.peft_cfg)
            self.meta_sources["model"].extras.update(values)  # drawn as a whole build draws them, filled in once sharded
        elif self.peft_cfg is not None:
            from lmforge.peft import apply_peft

            self.peft_report = apply_peft(self.model, self.peft_cfg)
        if self.activation_checkpointing:
            from lmforge.models.activation_checkpointing import apply_activation_checkpointing

            apply_activation_checkpointing(self.model, self.activation_checkpointing)
        # under tensor parallelism `auto` compiles block by block (torchtitan's way: no graph break at each FSDP unit's
        # collectives); stage.compile=true compiles the whole tensor-parallel model. Either way for static shapes there:
        # DTensor's sharding propagation fails on symbolic sizes (torch 2.13: a symbolic batch where LoRA's B meets
        # sequence-sharded activations; GRPO's training forward after rollouts had made the shapes dynamic), so a new
        # batch shape (validation, a last short batch) is a recompile instead, and generation runs eagerly
        tensor_parallel = sharded and int(getattr(strategy, "_tensor_parallel_size", 1)) > 1
        per_block = self.compile_model == "per_block" or (tensor_parallel and self.compile_model == "auto" and self.should_compile())
        self.static_shapes = tensor_parallel and (per_block or self.should_compile())
        if self.static_shapes and self._trainer is not None:
            from lmforge.stages.static_shapes import fit_recompile_limit

            fitted = fit_recompile_limit(getattr(self._trainer, "datamodule", None))
            if fitted:
                log.info("static shapes: %s", fitted)
        dynamic = False if self.static_shapes else None
        if per_block:  # torchtitan's way: one graph per block, compiled before FSDP wraps it
            from lmforge.models.activation_checkpointing import transformer_blocks

            for block in transformer_blocks(self.model):
                block.compile(dynamic=dynamic)
        if sharded:
            from lmforge.parallel.plan import shard_stage

            log.info("parallel: %s", shard_stage(self, strategy, meta_rng, self.meta_sources, fill=not self.resuming))
        self.init_weights, self.meta_sources = None, None  # read once; not kept for the whole run
        if self.should_compile() and not per_block:
            self.model.compile(dynamic=dynamic)  # in place: state_dict keys stay free of `_orig_mod.`

    def can_build_on_meta(self) -> bool:
        """Meta-device init re-creates a fresh family model exactly (its init replayed), and `init_from` weights are
        broadcast from rank 0 into its shards. Weights drawn around the base (PEFT's, a reward model's or PPO critic's
        scalar head) are drawn as a whole build draws them (`meta_shadow`), and frozen companions (a DPO/RL reference,
        a reward model read from its own file) are built on meta too. On a resume the checkpoint fills every tensor.
        Built as usual (whole on each rank, then sharded): stages that override `build_model` or
        `build_frozen_models` without saying how their modules build on meta."""
        return type(self).build_model is LMStage.build_model and self.frozen_models_build_on_meta()

    def builds_partitioned(self, strategy: Any) -> bool:
        """ZeRO-3 (`ZeroStrategy.partitioned_build`) for the family model, its `init_from` weights loaded after
        (`load_partitioned`). What goes around it is added after, as whole small tensors DeepSpeed partitions in
        `deepspeed.initialize`: PEFT's parameters, `wrap_model`'s (a reward model's scalar head). Companions are
        built partitioned too where the stage says how (`frozen_models_build_partitioned`)."""
        return (bool(getattr(strategy, "zero_stage_3", False)) and hasattr(strategy, "partitioned_build")
                and type(self).build_model is LMStage.build_model and self.frozen_models_build_partitioned())

    def frozen_models_build_partitioned(self) -> bool:
        """Whether `build_frozen_models` works on a ZeRO-3 partitioned model: it adds nothing, or only companions
        built partitioned themselves (`frozen_copy`s, `zero_init.replayed` builds, models read into a partitioned build)."""
        return type(self).build_frozen_models is LMStage.build_frozen_models

    def frozen_copy(self) -> nn.Module:
        """A frozen copy of the model just built (a DPO/RL reference): a deep copy, or under ZeRO-3's partitioned
        build (which cannot be deep-copied) a second partitioned build from the same generator state with the same
        `init_from` weights; the generator is left where the first build left it."""
        if self.partitioned_from is None:
            return copy.deepcopy(self.model).requires_grad_(False).eval()
        strategy, before = self.partitioned_from
        return replayed(before, lambda: self.build_model_partitioned(strategy)).requires_grad_(False).eval()

    def build_model_partitioned(self, strategy: Any) -> nn.Module:
        """The trained module with its family model built under ZeRO-3's `partitioned_build` (exact init), `init_from`
        weights loaded into it from rank 0's read one gathered parameter at a time, then `wrap_model` around it.
        Records the generator states it starts from (a `replayed` build records the same ones again)."""
        self.partitioned_from = (strategy, generator_states())
        with strategy.partitioned_build():
            model = build(self.model_cfg)
        log.info("deepspeed: ZeRO-3 model partitioned module by module as it was built (deepspeed.zero.Init, exact init)")
        if self.init_weights is not None:
            from lmforge.parallel.zero_init import load_partitioned

            log.info("init_from: %d tensors loaded into the partitioned model", load_partitioned(model, self.init_weights))
        return self.wrap_model(model)

    def frozen_models_build_on_meta(self) -> bool:
        """Whether `build_frozen_models` can build on a meta model: deep copies of it (the same init or `init_from`
        weights), and companions it registers in `self.meta_sources` with their own source."""
        return type(self).build_frozen_models is LMStage.build_frozen_models

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The trained module around the family model (reward models: a scalar head); itself by default."""
        return model

    def build_model(self) -> nn.Module:
        """The trained module, with `init_from` weights loaded, whole on this rank."""
        model = build(self.model_cfg)
        if self.init_weights is not None:
            model.load_state_dict(self.init_weights(), strict=True)
        return self.wrap_model(model)

    def build_model_on_meta(self) -> tuple[nn.Module, torch.Tensor]:
        """The trained module on the meta device, and the generator state its init replays from; records in
        `self.meta_sources['model']` where its weights come from once sharded (init replay, or `init_from` read on
        rank 0 plus the weights `wrap_model` draws)."""
        from lmforge.parallel import build_on_meta
        from lmforge.parallel.meta_shadow import MetaSource, build_with_shadow

        base, rng = build_on_meta(self.model_cfg)
        source = MetaSource(self.init_weights)
        model = base
        if type(self).wrap_model is not LMStage.wrap_model:
            model, source.extras = build_with_shadow(self.wrap_model, base)
            source.prefix = next(f"{name}." if name else "" for name, m in model.named_modules() if m is base)
        self.meta_sources = {"model": source}
        return model, rng

    def build_frozen_models(self) -> None:  # noqa: B027 - optional hook: DPO / RL stages add a reference model here
        """Frozen companions (reference policy, reward model), built after the model and before PEFT wraps it."""

    def on_fit_start(self) -> None:
        """Log how much of the model trains (LoRA: ~1%): the first thing to check in a PEFT run."""
        trainable = sum(true_numel(p) for p in self.model.parameters() if p.requires_grad)
        total = sum(true_numel(p) for p in self.model.parameters())
        stats = {"model/trainable_params": float(trainable), "model/trainable_pct": 100.0 * trainable / max(total, 1)}
        for logger in self.loggers:  # apply_peft already logged the same line for PEFT runs
            logger.log_metrics(stats, step=0)
        self.expect_frozen_modules_in_eval_mode()

    def expect_frozen_modules_in_eval_mode(self) -> None:
        """Lightning warns, as training starts, about every module in eval mode ("may lead to unexpected behavior").
        A frozen companion (a DPO/RL reference, a reward model: no trainable parameter, eval mode) is in eval mode on
        purpose, so every DPO, PPO and GRPO run printed that warning. Where those companions are all the eval-mode
        modules there are, the warning is silenced for exactly their count: a trained module left in eval mode
        changes the count and still warns."""
        frozen = [m for m in self.children() if m is not self.model and not m.training
                  and not any(p.requires_grad for p in m.parameters())]
        count = sum(1 for m in frozen for _ in m.modules())
        if count and count == sum(1 for m in self.modules() if not m.training):
            message = re.escape(f"Found {count} module(s) in eval mode at the start of training.")
            warnings.filterwarnings("ignore", message=message, category=PossibleUserWarning)

    def should_compile(self) -> bool:
        """Whether the whole model is compiled. `compile: auto` compiles on CUDA only: on CPU it measured no faster
        for small GPTs, after ~30 s of compiling."""
        if self.compile_model == "per_block":
            return False  # its blocks are compiled (configure_model), not the model
        if self.compile_model != "auto":
            return bool(self.compile_model)
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        return device.type == "cuda"

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The model's own signature: decoders (ids, attention_mask), BERT (+ token_type_ids), T5 (+ decoder ids)."""
        return self.model(*args, **kwargs)

    # --- steps ---------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        out = self.objective(self.model, batch)
        self.log_train_loss(out.loss)
        self.log_lr()
        aux = getattr(self.model, "aux_loss", None)  # mixture-of-experts: weighted load-balancing + z-loss
        loss = out.loss if aux is None else out.loss + aux
        if aux is not None:
            self.log_moe_metrics()
        if self.step_checks is not None:  # judged with the grad norm on the device: no wait for the GPU here
            self.step_checks.note_loss(loss)
        elif not self.loss_is_finite(loss):  # None: Lightning skips backward; the optimizer sees no grads
            self.skip_step(f"loss={loss.item()}")
            return None
        self.note_train_loss(out.loss)
        return loss

    # --- loss spikes: a finite train/loss far above its recent level, warned and counted ------------------
    def note_train_loss(self, loss: torch.Tensor) -> None:
        """Called by every stage's training_step with its train/loss; judged in on_train_batch_end, once the
        step is known not to be skipped (a non-finite grad norm drops it in on_before_optimizer_step)."""
        if self.spike_detector is not None:
            self.pending_loss = (self.trainer.global_step if self._trainer is not None else -1, loss.detach())

    def on_train_start(self) -> None:
        """Device-side step checks where nothing needs the host's verdict first: automatic optimisation, one
        optimizer that takes found_inf/grad_scale, no fp16 GradScaler (it owns those), no DeepSpeed engine, and
        clipping by norm or none."""
        trainer = self.trainer
        optimizers = trainer.optimizers
        self.step_checks = DeviceStepChecks() if (
            self.automatic_optimization and len(optimizers) == 1 and takes_device_checks(optimizers[0])
            and not self.engine_owns_gradients() and getattr(trainer.precision_plugin, "scaler", None) is None
            and getattr(trainer, "gradient_clip_algorithm", None) in (None, "norm")  # a str enum: equal to "norm"
        ) else None

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().optimizer_step(*args, **kwargs)
        finally:
            if self.step_checks is not None and self._trainer is not None:
                for optimizer in self.trainer.optimizers:
                    DeviceStepChecks.disarm(optimizer)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log_engine_grad_norm()
        if self.step_checks is not None:
            if logging_step(self.trainer):  # Lightning reads the logs now anyway
                self.settle_steps()
        else:
            pending, self.pending_loss = self.pending_loss, None
            if pending is not None and self.spike_detector is not None:
                self.judge_loss(*pending)
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True)
        if self.spike_detector is not None:
            self.log("train/loss_spikes", float(self.spike_detector.spikes), on_step=True)

    def on_train_end(self) -> None:
        self.settle_steps()

    def settle_steps(self) -> None:
        """The device-side verdicts so far, in step order: skipped steps counted (fatal past max_skipped_steps),
        the others' losses judged for spikes."""
        if self.step_checks is None:
            return
        for record, skipped, loss in self.step_checks.settle():
            if skipped:
                self.skip_step(DeviceStepChecks.reason(record), step=record.step)
            elif record.spike_loss is not None and self.spike_detector is not None:
                self.judge_loss(record.spike_loss[0], loss)

    def judge_loss(self, step: int, loss: torch.Tensor | float) -> None:
        """Feed a kept step's train/loss to the spike detector; warn on a spike."""
        assert self.spike_detector is not None
        spike = self.spike_detector.update(float(loss.float().item()) if isinstance(loss, torch.Tensor) else loss)
        if spike is not None:
            log.warning("step %d: loss spike: train/loss=%.4g is %.1f std above its moving mean %.4g (%d so far; "
                        "stage.loss_spike_threshold=%g)", step, spike.loss, spike.sigmas, spike.mean,
                        self.spike_detector.spikes, self.spike_detector.threshold)

    def engine_owns_gradients(self) -> bool:
        """DeepSpeed: gradients live in the engine's buffers, which norms, clips and steps them itself."""
        return hasattr(getattr(self._trainer, "strategy", None), "global_grad_norm")

    def log_engine_grad_norm(self) -> None:
        """DeepSpeed ZeRO reduces gradients into its own partitioned buffers (no `p.grad` for on_before_optimizer_step
        to read) and computes the global norm, clips and steps inside its engine: log the norm it computed, once per
        optimizer step."""
        if not self.engine_owns_gradients() or getattr(self, "_engine_norm_step", None) == self.trainer.global_step:
            return
        norm = self.trainer.strategy.global_grad_norm()
        if norm is not None:
            self._engine_norm_step = self.trainer.global_step
            self.log("train/grad_norm", norm, on_step=True)

    def spike_state(self) -> dict[str, Any] | None:
        """The detector as it will be after this step: checkpoint callbacks save in their on_train_batch_end,
        before the stage's own hook has judged the step's loss."""
        if self.spike_detector is None:
            return None
        probe = copy.copy(self.spike_detector)
        if self.pending_loss is not None:
            probe.update(self.pending_loss[1].float().item())
        return probe.state_dict()

    # --- non-finite steps: skipped (weights untouched), counted, fatal past stage.max_skipped_steps --------
    def loss_is_finite(self, loss: torch.Tensor) -> bool:
        """Decided by all ranks together: one rank skipping backward alone would hang DDP's gradient all-reduce."""
        bad = (~torch.isfinite(loss.detach())).any().float()
        if self._trainer is not None and self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="max")
        return not bool(bad)

    def skip_step(self, why: str, step: int | None = None) -> None:
        """Count a skipped step (logged as train/skipped_steps at the batch's end), warn, and stop past the limit."""
        self.skipped_steps += 1
        self.pending_loss = None  # a skipped step's loss stays out of the spike statistics
        if step is None:
            step = self.trainer.global_step if self._trainer is not None else -1
        log.warning("step %d skipped: non-finite %s (%d skipped so far)", step, why, self.skipped_steps)
        if self.max_skipped_steps is not None and self.skipped_steps > self.max_skipped_steps:
            raise TrainingDivergedError(
                f"training diverged: {self.skipped_steps} steps skipped for a non-finite loss or gradient norm "
                f"(last at step {step}: {why}), more than stage.max_skipped_steps={self.max_skipped_steps}. "
                "Fix: lower optimizer.lr or raise scheduler.warmup_steps, check the data, then resume from an "
                "earlier checkpoint (ckpt_path=<run dir>/checkpoints/last.ckpt); the checkpoints already written are kept"
            )

    def log_train_loss(self, loss: torch.Tensor) -> None:
        """`train/loss`, averaged over ranks (one scalar all-reduce), so a multi-process run's curve is the
        single-process one with the same global batch rather than rank 0's share. Not a progress-bar metric: Lightning
        turns those into Python numbers at every step (a wait for the GPU); `callbacks/progress.py` shows it instead,
        read on logging steps."""
        self.log("train/loss", loss.detach(), on_step=True, sync_dist=True)

    def log_lr(self) -> None:
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, prog_bar=False)

    def log_moe_metrics(self) -> None:
        """`moe/aux_loss`, `moe/z_loss` and the share of routed tokens per expert (`moe/expert_load/e<i>`)."""
        stats = getattr(self.model, "moe_metrics", None) or {}
        for name in ("aux_loss", "z_loss"):
            if name in stats:
                self.log(f"moe/{name}", stats[name].detach().float(), on_step=True)
        load = stats.get("expert_load")
        if load is not None:
            share = load.detach().float() / load.detach().float().sum().clamp(min=1)
            self.log_dict({f"moe/expert_load/e{i}": v for i, v in enumerate(share)}, on_step=True)
            self.log("moe/expert_load_max_over_mean", share.max() * share.numel(), on_step=True)

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Total gradient L2 norm before clipping: the first thing to look at when a loss spikes. A non-finite
        norm after a finite loss skips the update: the grads are dropped, so the optimizer leaves every weight
        (and its moments) as it was, while the step and LR schedule advance as usual (resume stays exact)."""
        params = [p for p in self.parameters() if p.grad is not None]
        if not params or self.engine_owns_gradients():
            return
        norm = total_grad_norm([p.grad for p in params])  # DTensor-aware (FSDP2 / tensor parallel)
        if self.step_checks is not None:  # found_inf / grad_scale for the fused optimizer: nothing read back here
            agree = (lambda bad: self.trainer.strategy.reduce(bad, reduce_op="max")) if self.trainer.world_size > 1 else None
            self.step_checks.arm(unwrap(optimizer), self.trainer.global_step, norm, self.pending_loss, agree)
            self.pending_loss = None
            self.log("train/grad_norm", norm, on_step=True)
            self._grad_norm = norm
            return
        if not torch.isfinite(norm) and getattr(self.trainer.precision_plugin, "scaler", None) is None:
            for p in params:  # fp16's GradScaler skips overflowing steps itself and must still see them
                p.grad = None
            self.skip_step(f"grad_norm={norm.item()}")
            return
        self.log("train/grad_norm", norm, on_step=True)
        self._grad_norm = norm  # reused by configure_gradient_clipping, which Lightning calls right after
        max_norm = getattr(self, "max_grad_norm", None)
        if not self.automatic_optimization and max_norm:  # manual optimisation (RL): Lightning never clips, so here
            clip_grads_([p.grad for p in params], max_norm, norm)

    def configure_gradient_clipping(self, optimizer: Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip by the global norm already computed for train/grad_norm (one pass over the gradients, not two). Ours,
        not Lightning's, wherever no GradScaler is involved: clip_grad_norm_ stacks per-parameter norms, which DTensor
        refuses when TP and FSDP parameters live on different meshes, and Lightning's mixed-precision plugin refuses
        to clip for fused optimizers even under bf16, where there is nothing to unscale. fp16 keeps Lightning's path."""
        norm, self._grad_norm = getattr(self, "_grad_norm", None), None
        if self.engine_owns_gradients():  # DeepSpeed clips inside its step (trainer.gradient_clip_val is in its config)
            return
        if self.step_checks is not None:  # inside the fused optimizer's kernel (stages/step_checks.py)
            if gradient_clip_val and norm is not None:
                DeviceStepChecks.clip(unwrap(optimizer), norm, gradient_clip_val)
            return
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if gradient_clip_val and scaler is None and (gradient_clip_algorithm or "norm") == "norm":
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            if grads:
                clip_grads_(grads, gradient_clip_val, norm if norm is not None else total_grad_norm(grads))
            return
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self.objective(self.model, batch)
        self.val_nll.update(out.nll_sum.float())
        self.val_tokens.update(out.n_tokens.float())
        if self.token_bytes.numel():
            counted = out.targets != -100
            self.val_bytes.update(self.token_bytes[out.targets.clamp(min=0)][counted].sum().float())
        if getattr(out, "correct", None) is not None:  # objectives that count argmax hits (MLM)
            self.val_correct.update(out.correct.float())
            self.val_has_correct = True

    def on_validation_epoch_end(self) -> None:
        nll, n = self.val_nll.compute(), self.val_tokens.compute()  # summed over ranks
        metrics = {"val/loss": mean_loss(nll, n), "val/ppl": perplexity(nll, n), "val/tokens": n}
        if self.token_bytes.numel():
            metrics["val/bpb"] = bits_per_byte(nll, self.val_bytes.compute())
        if self.val_has_correct:  # token-weighted over the masked positions of all batches (and ranks)
            metrics["val/mlm_accuracy"] = self.val_correct.compute() / n.clamp(min=1)
        self.log_reduced(metrics, prog_bar=True)
        for m in (self.val_nll, self.val_tokens, self.val_bytes, self.val_correct):
            m.reset()
        self.val_has_correct = False

    def log_reduced(self, metrics: dict[str, torch.Tensor], **kwargs: Any) -> None:
        """Log epoch-level values that are already global (torchmetrics' `compute()` sums over ranks) as they are.
        Lightning cannot tell and, in a distributed run, advises `sync_dist=True` for each: advice that would
        average them again. The hint is silenced for these names only; a tensor logged elsewhere keeps it."""
        for name in metrics.keys() - _REDUCED_NAMES:
            hint = re.escape(f"It is recommended to use `self.log({name!r}, ..., sync_dist=True)`")
            warnings.filterwarnings("ignore", message=hint, category=PossibleUserWarning)
            _REDUCED_NAMES.add(name)
        self.log_dict(metrics, sync_dist=False, **kwargs)

    # --- optimisation --------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise RuntimeError("this stage was built without an optimizer (evaluation only)")
        wd = getattr(self.optimizer_factory, "keywords", {}).get("weight_decay", 0.0)
        target = getattr(self.optimizer_factory, "func", self.optimizer_factory)
        groups = muon_param_groups if getattr(target, "wants_muon_groups", False) else decay_param_groups
        # empty groups dropped (LoRA has nothing undecayed): DeepSpeed removes them, and an LR scheduler built on
        # the optimizer beforehand would then hold one learning rate too many
        param_groups = [g for g in groups(self.model, wd) if g["params"]]
        optimizer = self.optimizer_factory(param_groups, **self.unfused_under_grad_scaler())
        adapt = getattr(getattr(self._trainer, "strategy", None), "adapt_optimizer", None)
        if adapt is not None:  # DeepSpeed ZeRO-Offload: the same AdamW as DeepSpeedCPUAdam (lmforge.parallel.zero)
            optimizer = adapt(optimizer)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def unfused_under_grad_scaler(self) -> dict[str, Any]:
        """fp16 (`16-mixed`) clips after Lightning unscales the gradients, which it does not do for fused optimizers
        (they unscale inside step) and so refuses to clip: with a GradScaler and clipping, AdamW runs unfused."""
        trainer = self._trainer
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None) if trainer is not None else None
        target = getattr(self.optimizer_factory, "func", self.optimizer_factory)
        if scaler is not None and getattr(trainer, "gradient_clip_val", None) and isinstance(target, type) \
                and issubclass(target, torch.optim.AdamW):
            return {"fused": False}
        return {}

    # --- checkpoints ---------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Everything eval/generate need besides weights: resolved config, tokenizer, W&B run id."""
        checkpoint["lmforge"] = {"schema_version": SCHEMA_VERSION, **self.metadata, "peft": self.peft_cfg, "stage": type(self).__name__}
        # counters that must survive a resume: max_skipped_steps counts across it, spike statistics carry on
        self.settle_steps()  # the counters below must include every step taken so far
        checkpoint["lmforge_train_state"] = {"skipped_steps": self.skipped_steps, "loss_spikes": self.spike_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("lmforge_train_state") or {}  # absent in checkpoints of older lmforge versions
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if self.spike_detector is not None and state.get("loss_spikes"):
            self.spike_detector.load_state_dict(state["loss_spikes"])
