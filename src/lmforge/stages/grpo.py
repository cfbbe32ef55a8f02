"""GRPO (Shao et al. 2024, DeepSeekMath): G sampled completions per prompt, advantages normalised within
each prompt's group — no value model — and a clipped ratio objective, optionally with a k3 KL penalty
to the reference (β, default 0: no reference is loaded at all, as in DAPO / Dr GRPO).

`scale_rewards`: group (the paper), batch, or none (Dr GRPO: dividing by the group std over-weights
easy prompts). `loss_normalization`: token (every completion token weighs the same, DAPO) or sequence
(mean per completion, then over completions: the original paper). `updates_per_batch` > 1 reuses the
rollouts for several clipped updates (the paper's μ); with 1, the ratio is exactly 1 and the update is the
plain policy gradient.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.errors import ConfigError
from lmforge.losses import group_advantages, grpo_loss, masked_mean
from lmforge.losses.policy import GRPO_NORMALIZATIONS, SCALE_REWARDS
from lmforge.stages.rl_base import RLStage, mean_kl
from lmforge.stages.rollout import Rollout, rollout_logprobs


class GRPOStage(RLStage):
    def __init__(
        self,
        *args: Any,
        num_generations: int = 4,
        clip_eps: float = 0.2,
        clip_eps_high: float | None = None,
        scale_rewards: str = "group",
        loss_normalization: str = "token",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, num_generations=num_generations, **kwargs)
        if num_generations < 2:
            raise ConfigError("stage.num_generations", f"must be >= 2 for group-relative advantages, got {num_generations}", "set stage.num_generations=4 (or more)")
        if scale_rewards not in SCALE_REWARDS:
            raise ConfigError("stage.scale_rewards", f"{scale_rewards!r} is not one of {list(SCALE_REWARDS)}", "use group, batch or none")
        if loss_normalization not in GRPO_NORMALIZATIONS:
            raise ConfigError("stage.loss_normalization", f"{loss_normalization!r} is not one of {list(GRPO_NORMALIZATIONS)}", "use token or sequence")
        self.clip_eps, self.clip_eps_high = clip_eps, clip_eps_high
        self.scale_rewards, self.loss_normalization = scale_rewards, loss_normalization

    def update(self, rollout: Rollout, rewards: torch.Tensor) -> dict[str, torch.Tensor]:
        advantages = group_advantages(rewards, self.num_generations, self.scale_rewards)
        mask = rollout.completion_mask.float()
        ref_logp = self.reference_logprobs(rollout) if self.beta > 0 else None
        old_logp = None
        if self.updates_per_batch > 1:  # the policy that sampled: fixed across the μ updates
            with torch.no_grad():
                old_logp = rollout_logprobs(self.model, rollout)[0]
        for _ in range(self.updates_per_batch):
            logp, entropy = rollout_logprobs(self.model, rollout, with_entropy=True)
            out = grpo_loss(
                logp, logp.detach() if old_logp is None else old_logp, advantages, mask, clip_eps=self.clip_eps,
                clip_eps_high=self.clip_eps_high, beta=self.beta, ref_logp=ref_logp, normalization=self.loss_normalization,
            )
            self.optimizer_step(out.loss)
        logs = {"rl/loss": out.loss.detach(), "rl/clipfrac": out.clipfrac, "rl/entropy": masked_mean(entropy, mask),
                "rl/advantage_abs": advantages.abs().mean()}
        logs["rl/kl"] = mean_kl(logp.detach(), ref_logp, mask) if ref_logp is not None else out.kl
        return logs
