"""What PPO and GRPO share: sampling rollouts inside the training step, rewards, the frozen reference policy,
manual optimisation (several updates per batch of rollouts) and reward-based validation.

Rewards come from a Python function (`reward: keyword`, `length`, or a `_target_`; see `lmforge.rewards`)
or a reward-model checkpoint (`reward_model: <path>`, trained with `stage=reward`). Validation samples one
greedy completion per held-out prompt and logs `val/reward_mean`, which checkpoints monitor (higher is
better). `max_steps` counts optimizer steps: `updates_per_batch` of them per batch of prompts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn
from torchmetrics import MeanMetric

from lmforge.checkpoint import load_checkpoint, model_state_dict
from lmforge.errors import ConfigError
from lmforge.models.heads import ScalarHeadModel, scalar_model_from_state
from lmforge.parallel.zero_init import GeneratorStates, generator_states
from lmforge.stages.base import LMStage
from lmforge.stages.rollout import Rollout, pad_completions, rollout_logprobs, sample_rollout

log = logging.getLogger("lmforge")


def reward_model_cfg(ckpt: dict[str, Any], path: str, vocab_size: int) -> dict[str, Any]:
    """The architecture of a `stage=reward` checkpoint (its metadata), checked against the policy's vocabulary."""
    meta = ckpt["lmforge"]
    if meta.get("stage") != "RewardStage":
        raise ConfigError("stage.reward_model", f"{path} was written by {meta.get('stage') or 'an older lmforge'}, not stage=reward", "pass a checkpoint from `python train.py stage=reward ...`")
    model_cfg = dict(meta["config"]["model"])
    if model_cfg.get("vocab_size") != vocab_size:
        raise ConfigError("stage.reward_model", f"its vocab ({model_cfg.get('vocab_size')}) differs from the policy's ({vocab_size})",
                          "train the reward model from the same SFT checkpoint (same tokenizer) as the policy")
    return model_cfg


def load_reward_model(path: str, vocab_size: int) -> ScalarHeadModel:
    """A frozen reward model from a `stage=reward` checkpoint; its tokenizer must be the policy's."""
    ckpt = load_checkpoint(path)
    model_cfg = reward_model_cfg(ckpt, path, vocab_size)
    return scalar_model_from_state(model_cfg, model_state_dict(ckpt, scalar_head=True)).requires_grad_(False).eval()


def reward_model_partitioned(path: str, vocab_size: int, strategy: Any) -> ScalarHeadModel:
    """`load_reward_model` under ZeRO-3's partitioned build: built partitioned with the init draws a whole build
    makes, then filled from the file, read on rank 0 only (`load_partitioned`)."""
    from lmforge.models import build
    from lmforge.parallel.zero_init import load_partitioned

    model_cfg = reward_model_cfg(load_checkpoint(path, weights=False), path, vocab_size)
    with strategy.partitioned_build():
        model = ScalarHeadModel(build(model_cfg))
    count = load_partitioned(model, lambda: model_state_dict(load_checkpoint(path), scalar_head=True), what="stage.reward_model")
    log.info("deepspeed: ZeRO-3 reward model partitioned as it was built, %d tensors loaded from %s", count, path)
    return model.requires_grad_(False).eval()


def reward_model_on_meta(path: str, vocab_size: int) -> tuple[ScalarHeadModel, Callable[[], dict[str, torch.Tensor]]]:
    """The frozen reward model built on the meta device (drawing from the generator what `load_reward_model` draws),
    and the reader of its weights, which a sharded run calls on rank 0 only (`parallel.load_weights`)."""
    from lmforge.parallel.meta_init import build_on_meta, draw_on_meta

    model_cfg = reward_model_cfg(load_checkpoint(path, weights=False), path, vocab_size)
    backbone, _ = build_on_meta(model_cfg)
    with torch.device("meta"), draw_on_meta():  # the head's init draws, as in load_reward_model
        model = ScalarHeadModel(backbone)
    return model.requires_grad_(False).eval(), lambda: model_state_dict(load_checkpoint(path), scalar_head=True)


class RLStage(LMStage):
    """Base of PPO and GRPO. Subclasses implement `update(rollout)`: the optimisation on one batch of rollouts."""

    checkpoint_monitor = ("val/reward_mean", "max")

    def __init__(
        self,
        *args: Any,
        reward: str | Mapping[str, Any] | None = "keyword",
        reward_model: str | None = None,
        num_generations: int = 1,
        max_new_tokens: int = 48,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        beta: float = 0.0,
        updates_per_batch: int = 1,
        val_max_new_tokens: int | None = None,
        missing_eos_penalty: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        if reward_model is None and reward is None:
            raise ConfigError("stage.reward", "is null and no stage.reward_model is given", "set stage.reward=keyword (or length) or stage.reward_model=<reward ckpt>")
        for key, value in (("num_generations", num_generations), ("max_new_tokens", max_new_tokens), ("updates_per_batch", updates_per_batch)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"stage.{key}", f"must be a positive integer, got {value!r}", f"set stage.{key}=<int >= 1>")
        if beta < 0:
            raise ConfigError("stage.beta", f"must be >= 0, got {beta}", "set stage.beta=0 (no KL term) or a small positive value")
        self.reward_fn: Callable[..., torch.Tensor] | None = None
        if reward_model is None:
            from lmforge.rewards import build_reward

            self.reward_fn = build_reward(reward)
        self.reward_model_path = reward_model
        self.num_generations, self.max_new_tokens = num_generations, max_new_tokens
        self.val_max_new_tokens = val_max_new_tokens or max_new_tokens
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.beta, self.updates_per_batch = beta, updates_per_batch
        self.missing_eos_penalty = missing_eos_penalty
        self.max_grad_norm: float | None = None  # run.py moves trainer.gradient_clip_val here (manual optimisation)
        self.reference: nn.Module | None = None
        self.reward_model: ScalarHeadModel | None = None
        self.reward_model_from: GeneratorStates | None = None  # ZeRO-3: the generator states its partitioned build began at
        self.val_reward, self.val_length, self.val_stop = MeanMetric(), MeanMetric(), MeanMetric()

    def setup(self, stage: str) -> None:
        """DeepSpeed clips inside its engine from its config, which Lightning fills from trainer.gradient_clip_val;
        manual optimisation moved that value here (run.adapt_to_stage), so hand it to the engine's config."""
        set_clipping = getattr(getattr(self._trainer, "strategy", None), "set_gradient_clipping", None)
        if set_clipping is not None and self.max_grad_norm:
            set_clipping(float(self.max_grad_norm))

    # --- models --------------------------------------------------------------------------------------
    def needs_reference(self) -> bool:
        return self.beta > 0

    def frozen_models_build_on_meta(self) -> bool:
        return True  # the reference is a deep copy; a reward model has its own file, read on rank 0

    def frozen_models_build_partitioned(self) -> bool:
        return True  # the reference is a `frozen_copy`; a reward model file is read into a partitioned build

    def build_frozen_models(self) -> None:
        if self.needs_reference() and self.peft_cfg is None:
            self.reference = self.frozen_copy()
        if self.reward_model_path is not None and self.partitioned_from is not None:  # ZeRO-3: partitioned as well
            strategy = self.partitioned_from[0]
            self.reward_model_from = generator_states()  # a PPO critic copied from it replays this build
            self.reward_model = reward_model_partitioned(self.reward_model_path, self.model.config.vocab_size, strategy)
        elif self.reward_model_path is not None and self.meta_sources is not None:  # a meta build: filled once sharded
            from lmforge.parallel.meta_shadow import MetaSource

            self.reward_model, read = reward_model_on_meta(self.reward_model_path, self.model.config.vocab_size)
            self.meta_sources["reward_model"] = MetaSource(read, what="stage.reward_model")
        elif self.reward_model_path is not None:
            self.reward_model = load_reward_model(self.reward_model_path, self.model.config.vocab_size)

    def reference_context(self) -> AbstractContextManager[Any]:
        if self.reference is not None:
            return nullcontext()
        from lmforge.peft import adapters_disabled

        return adapters_disabled(self.model)

    @torch.no_grad()
    def reference_logprobs(self, rollout: Rollout) -> torch.Tensor:
        model = self.reference if self.reference is not None else self.model
        if self.reference is not None:
            self.reference.eval()  # Lightning's .train() on the stage reaches it too: keep dropout off
        with self.reference_context():
            return rollout_logprobs(model, rollout)[0]

    # --- rollouts and rewards ------------------------------------------------------------------------
    def stop_ids(self) -> list[int]:
        tok = self.tokenizer
        ids = [tok.eos_id] if tok.eos_id is not None else []
        im_end = tok.hf.token_to_id("<|im_end|>")
        return ids + ([im_end] if im_end is not None else [])

    def rollout(self, batch: dict[str, Any], greedy: bool = False) -> Rollout:
        # a model compiled for fixed shapes (tensor parallelism) would recompile at every new sequence length: decode
        # eagerly, and pad the completions to their limit so the training forward sees one length per prompt length
        pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        max_new_tokens = self.val_max_new_tokens if greedy else self.max_new_tokens
        with torch.compiler.set_stance("force_eager") if self.static_shapes else nullcontext():
            rollout = sample_rollout(
                self.model, batch, tokenizer=self.tokenizer, num_generations=1 if greedy else self.num_generations,
                max_new_tokens=max_new_tokens, stop_ids=self.stop_ids(), pad_id=pad_id,
                temperature=0.0 if greedy else self.temperature, top_k=None if greedy else self.top_k, top_p=None if greedy else self.top_p,
            )
        return pad_completions(rollout, max_new_tokens, pad_id) if self.static_shapes and not greedy else rollout

    @torch.no_grad()
    def scores(self, rollout: Rollout) -> torch.Tensor:
        """One reward per completion (N,), float32 on the model's device, less `missing_eos_penalty` for a
        completion that never ended its turn (TRL's option: otherwise a policy learns to ramble to the limit)."""
        if self.reward_model is not None:
            self.reward_model.eval()
            scores = self.reward_model.score(rollout.ids, rollout.attention_mask, rollout.position_ids).float()
        else:
            assert self.reward_fn is not None
            scores = self.reward_fn(rollout.prompts, rollout.completions, rollout.metadata).to(self.device).float()
        if self.missing_eos_penalty and rollout.stopped is not None:
            scores = scores - self.missing_eos_penalty * (~rollout.stopped).float()
        return scores

    # --- optimisation --------------------------------------------------------------------------------
    def optimizer_step(self, loss: torch.Tensor) -> None:
        """One manual update: backward, step, schedule (what automatic optimisation would do). Clipping to
        `max_grad_norm` happens in `on_before_optimizer_step`, which `optimizer.step()` calls first, after the
        pre-clip norm is logged (under DeepSpeed, inside its engine: see `setup`)."""
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        rollout = self.rollout(batch)
        rewards = self.scores(rollout)
        logs = self.update(rollout, rewards)  # defined by PPOStage / GRPOStage: returns the rl/* metrics
        lengths = rollout.lengths().float()
        if rollout.stopped is not None:
            logs["rl/stop_rate"] = rollout.stopped.float().mean()
        self.log_dict({
            "rl/reward_mean": rewards.mean(), "rl/reward_std": rewards.std() if rewards.numel() > 1 else torch.zeros(()),
            "rl/completion_len": lengths.mean(), **logs,
        }, on_step=True, prog_bar=False)
        self.log_train_loss(logs["rl/loss"])
        self.note_train_loss(logs["rl/loss"])  # loss-spike detection (LMStage)
        self.log_lr()

    # --- validation ----------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        rollout = self.rollout(batch, greedy=True)
        rewards = self.scores(rollout)
        self.val_reward.update(rewards)
        self.val_length.update(rollout.lengths().float())
        if rollout.stopped is not None:
            self.val_stop.update(rollout.stopped.float())

    def on_validation_epoch_end(self) -> None:
        self.log_reduced({"val/reward_mean": self.val_reward.compute(), "val/completion_len": self.val_length.compute(),
                       "val/stop_rate": self.val_stop.compute()}, prog_bar=True)
        for metric in (self.val_reward, self.val_length, self.val_stop):
            metric.reset()


def mean_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(policy || reference) per sequence (summed over its tokens, k1 estimate), averaged over sequences."""
    return ((logp - ref_logp) * mask).sum(dim=1).mean()
