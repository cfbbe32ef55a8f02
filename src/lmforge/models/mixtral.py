"""Mixtral: Llama blocks whose feed-forward is a sparse mixture of SwiGLU experts (top-k routing).

Everything but the MLP is Llama's (`lmforge.models.llama`). After each forward the model exposes

  * `aux_loss` – scalar tensor `router_aux_loss_coef · load_balancing + router_z_loss_coef · z_loss`,
    for the training stage to add to the LM loss (zero-valued when both coefficients are 0);
  * `moe_metrics` – detached {"aux_loss": unweighted load-balancing loss, "z_loss": unweighted z-loss,
    "expert_load": (E,) float *count* of token→expert assignments summed over all layers of the last
    forward (padding excluded when a (B, T) mask is given; sums to real tokens · k · n_layer)}.

With a KV cache (incremental decoding, `forward(..., cache=)`) the routing statistics are not computed:
`aux_loss` is None and `moe_metrics` empty, since generation needs neither.

The load-balancing loss pools all layers' router logits exactly as HF `load_balancing_loss_func` does,
so it equals the `aux_loss` a MixtralForCausalLM reports for the same weights and input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.models.layers.kv_cache import KVCache
from lmforge.models.layers.moe import MoEMLP, routing_stats
from lmforge.models.llama import Llama, LlamaConfig


@dataclass
class MixtralConfig(LlamaConfig):
    """LlamaConfig plus the expert layout and the router's auxiliary-loss weights."""

    n_expert: int = 8  # experts per layer (E)
    n_expert_per_token: int = 2  # experts each token is routed to (k)
    router_aux_loss_coef: float = 0.001  # weight of the load-balancing loss (HF MixtralConfig's default)
    router_z_loss_coef: float = 0.0  # weight of the router z-loss (ST-MoE suggests 0.001)
    rope_theta: float = 1e6  # Mixtral's
    family: str = "mixtral"

    def __post_init__(self) -> None:
        super().__post_init__()
        k = self.n_expert_per_token
        if not isinstance(self.n_expert, int) or isinstance(self.n_expert, bool) or self.n_expert <= 0:
            raise ConfigError("model.n_expert", f"must be a positive integer, got {self.n_expert!r}", "e.g. model.n_expert=8")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.n_expert:
            raise ConfigError(
                "model.n_expert_per_token",
                f"must be an integer in [1, n_expert={self.n_expert}], got {k!r}",
                f"set model.n_expert_per_token between 1 and {self.n_expert} (Mixtral: 2)",
            )
        for key in ("router_aux_loss_coef", "router_z_loss_coef"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.{key}", f"must be >= 0, got {getattr(self, key)}", f"set model.{key}=0.001 (0 disables it)")


class Mixtral(Llama):
    """Sparse-MoE decoder. Same forward signature as Llama; see the module doc for `aux_loss` / `moe_metrics`."""

    config: MixtralConfig

    def __init__(self, cfg: MixtralConfig) -> None:
        super().__init__(cfg)
        self.aux_loss: torch.Tensor | None = None
        self.moe_metrics: dict[str, torch.Tensor] = {}

    def make_mlp(self, cfg: MixtralConfig) -> nn.Module:  # type: ignore[override]
        return MoEMLP(cfg.n_embd, cfg.intermediate_size, cfg.n_expert, cfg.n_expert_per_token)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Llama's hidden states, plus the routing statistics of this pass (`aux_loss`, `moe_metrics`)."""
        hidden = super().hidden_states(input_ids, attention_mask, position_ids, cache)
        router_logits = []
        for block in self.blocks:
            router_logits.append(block.mlp.router_logits)
            block.mlp.router_logits = None  # don't keep the graph alive past this call
        if cache is not None:  # decoding: no loss to balance, and the statistics cost a pass over every layer
            self.aux_loss, self.moe_metrics = None, {}
            return hidden
        token_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        cfg = self.config
        balance, z_loss, load = routing_stats(router_logits, cfg.n_expert, cfg.n_expert_per_token, token_mask)
        self.aux_loss = cfg.router_aux_loss_coef * balance + cfg.router_z_loss_coef * z_loss
        self.moe_metrics = {"aux_loss": balance.detach(), "z_loss": z_loss.detach(), "expert_load": load.detach()}
        return hidden

    def expert_params(self) -> int:
        """Parameters of one expert (all experts of all layers have the same shape)."""
        return sum(p.numel() for p in self.blocks[0].mlp.experts[0].parameters())

    def active_params(self, non_embedding: bool = True) -> int:
        """Parameters one token's forward touches: `num_params` less the n_expert - k experts it skips in
        each layer. The N of the 6·N FLOPs per token (MFU)."""
        skipped = (self.config.n_expert - self.config.n_expert_per_token) * self.expert_params() * self.config.n_layer
        return self.num_params(non_embedding) - skipped
