"""PPO for language models (Ziegler et al. 2019; Ouyang et al. 2022), as TRL's PPOTrainer does it.

Per batch of prompts: sample one completion each with the KV cache; score it (reward model or a Python
reward); per-token reward = −β·KL(policy‖reference) on every completion token + the score on the last one;
values from a separate critic (initialised from the reward model when one is given, else from the policy
with a zero head); GAE(γ, λ) advantages, whitened; then `ppo_epochs` passes over `num_minibatches`
minibatches of clipped policy loss + `vf_coef` × clipped value loss. The critic lives in the checkpoint
next to the policy, so a resumed run keeps its value estimates.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.losses import gae, masked_mean, masked_whiten, ppo_policy_loss, ppo_value_loss
from lmforge.models.heads import ScalarHeadModel
from lmforge.optim.param_groups import decay_param_groups
from lmforge.parallel.zero_init import replayed
from lmforge.stages.rl_base import RLStage, reward_model_partitioned
from lmforge.stages.rollout import Rollout, rollout_logprobs


def _rows(rollout: Rollout, index: torch.Tensor) -> Rollout:
    return Rollout(rollout.ids[index], rollout.attention_mask[index], rollout.prompt_len, rollout.completion_mask[index], [])


class PPOStage(RLStage):
    def __init__(
        self,
        *args: Any,
        beta: float = 0.05,
        gamma: float = 1.0,
        lam: float = 0.95,
        clip_eps: float = 0.2,
        clip_value: float = 0.2,
        vf_coef: float = 0.1,
        ppo_epochs: int = 2,
        num_minibatches: int = 2,
        whiten_advantages: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, beta=beta, updates_per_batch=ppo_epochs * num_minibatches, **kwargs)
        if not 0 <= gamma <= 1 or not 0 <= lam <= 1:
            raise ConfigError("stage.gamma" if not 0 <= gamma <= 1 else "stage.lam", "must be in [0, 1]", "use gamma=1.0, lam=0.95")
        self.gamma, self.lam, self.clip_eps, self.clip_value = gamma, lam, clip_eps, clip_value
        self.vf_coef, self.ppo_epochs, self.num_minibatches = vf_coef, ppo_epochs, num_minibatches
        self.whiten_advantages = whiten_advantages
        self.critic: ScalarHeadModel | None = None

    def needs_reference(self) -> bool:
        return True  # the KL penalty is part of PPO's reward: β = 0 still logs the KL

    def frozen_models_build_on_meta(self) -> bool:
        return True  # the critic: a copy of the reward model, or the policy's base + a head drawn on a shadow

    def frozen_models_build_partitioned(self) -> bool:
        return True  # the critic: a replay of the reward model's or the policy's partitioned build (+ a head)

    def build_frozen_models(self) -> None:
        super().build_frozen_models()
        if self.partitioned_from is not None:  # ZeRO-3: no deep copies of partitioned models; rebuilt the same
            self.critic = self.critic_partitioned()
        elif self.reward_model is not None:  # TRL: the value model starts as the reward model
            self.critic = copy.deepcopy(self.reward_model).requires_grad_(True).train()
            if self.meta_sources is not None:
                self.meta_sources["critic"] = self.meta_sources["reward_model"]  # the same file, read once
        elif self.meta_sources is not None:  # the policy's init_from weights + the head a whole build draws
            from lmforge.parallel.meta_shadow import MetaSource, build_with_shadow

            critic, head = build_with_shadow(ScalarHeadModel, copy.deepcopy(self.model))
            self.critic = critic.requires_grad_(True)
            self.meta_sources["critic"] = MetaSource(self.meta_sources["model"].read, "backbone.", head)
        else:
            self.critic = ScalarHeadModel(copy.deepcopy(self.model)).requires_grad_(True)

    def critic_partitioned(self) -> ScalarHeadModel:
        """The critic the branches of `build_frozen_models` make, under ZeRO-3's partitioned build: the reward
        model's build replayed (its file read again), or the policy's (its `init_from` weights) with the scalar
        head drawn where a whole build draws it, after."""
        strategy, policy_from = self.partitioned_from
        if self.reward_model is not None:
            path, vocab = self.reward_model_path, self.model.config.vocab_size
            critic = replayed(self.reward_model_from, lambda: reward_model_partitioned(path, vocab, strategy))
            return critic.requires_grad_(True).train()
        backbone = replayed(policy_from, lambda: self.build_model_partitioned(strategy))
        return ScalarHeadModel(backbone).requires_grad_(True)

    def configure_optimizers(self) -> Any:
        """One optimizer over policy and critic (the critic's parameters are not under `self.model`)."""
        if self.optimizer_factory is None:
            raise RuntimeError("this stage was built without an optimizer (evaluation only)")
        wd = getattr(self.optimizer_factory, "keywords", {}).get("weight_decay", 0.0)
        optimizer = self.optimizer_factory(decay_param_groups(nn.ModuleList([self.model, self.critic]), wd))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def values(self, rollout: Rollout) -> torch.Tensor:
        """V(state before each completion token), (N, L): the critic's outputs at positions P-1 .. P+L-2."""
        out = self.critic(rollout.ids, rollout.attention_mask, rollout.position_ids)
        return out[:, rollout.prompt_len - 1 : -1]

    def update(self, rollout: Rollout, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = rollout.completion_mask.float()
        with torch.no_grad():
            old_logp = rollout_logprobs(self.model, rollout)[0]
            ref_logp = self.reference_logprobs(rollout)
            old_values = self.values(rollout)
        kl = (old_logp - ref_logp) * mask
        rewards = -self.beta * kl
        last = (rollout.lengths() - 1).clamp(min=0)
        rewards[torch.arange(rewards.size(0), device=rewards.device), last] += scores
        advantages, returns = gae(rewards, old_values, mask, self.gamma, self.lam)
        if self.whiten_advantages and mask.sum() > 1:
            advantages = masked_whiten(advantages, mask)
        n = rollout.ids.size(0)
        size = max(1, n // self.num_minibatches)
        stats: dict[str, list[torch.Tensor]] = {k: [] for k in ("policy", "value", "clipfrac", "vf_clipfrac", "entropy")}
        for _ in range(self.ppo_epochs):
            order = torch.randperm(n, device=rollout.ids.device)
            for start in range(0, size * self.num_minibatches, size):
                idx = order[start : start + size]
                part, m = _rows(rollout, idx), mask[idx]
                logp, entropy = rollout_logprobs(self.model, part, with_entropy=True)
                policy = ppo_policy_loss(logp, old_logp[idx], advantages[idx], m, self.clip_eps)
                value = ppo_value_loss(self.values(part), old_values[idx], returns[idx], m, self.clip_value)
                self.optimizer_step(policy.loss + self.vf_coef * value.loss)
                for key, v in (("policy", policy.loss), ("value", value.loss), ("clipfrac", policy.clipfrac),
                               ("vf_clipfrac", value.clipfrac), ("entropy", masked_mean(entropy, m))):
                    stats[key].append(v.detach())
        mean = {k: torch.stack(v).mean() for k, v in stats.items()}
        return {
            "rl/loss": mean["policy"] + self.vf_coef * mean["value"], "rl/policy_loss": mean["policy"], "rl/value_loss": mean["value"],
            "rl/clipfrac": mean["clipfrac"], "rl/vf_clipfrac": mean["vf_clipfrac"], "rl/entropy": mean["entropy"],
            "rl/kl": kl.sum(dim=1).mean(), "rl/score": scores.mean(),
        }
