"""Sparse mixture-of-experts feed-forward (Mixtral): a learned router picks k of E SwiGLU experts per token.

Routing, exactly as Mixtral: router logits = W_r x (no bias); probabilities = softmax over all E experts
(in float32); keep the top k; renormalise those k to sum to 1; output = Σ weight · expert(x).

Dispatch never loops over tokens: the (token, slot) assignments are sorted by expert, so each expert runs
once on the contiguous block of tokens routed to it, and the weighted outputs are scattered back with one
`index_add_`. One host sync per layer (the per-expert counts, to split the block) is the only cost.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.kernels.linear import Linear
from lmforge.models.layers.mlp import SwiGLU


def route(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, E) logits -> (weights (N, k) float32 summing to 1 per token, expert ids (N, k))."""
    probs = router_logits.float().softmax(dim=-1)
    weights, experts = probs.topk(k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), experts


class MoEMLP(nn.Module):
    """Router + E SwiGLU experts. `forward(x) -> y` (same shape); the router logits of the last call are
    kept in `self.router_logits` (N, E) for the model's load-balancing loss and metrics."""

    def __init__(self, n_embd: int, hidden: int, n_expert: int, n_expert_per_token: int) -> None:
        super().__init__()
        self.n_expert, self.k = n_expert, n_expert_per_token
        self.router = Linear(n_embd, n_expert, bias=False)
        self.experts = nn.ModuleList(SwiGLU(n_embd, hidden) for _ in range(n_expert))
        self.router_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x)
        self.router_logits = logits
        weights, experts = route(logits, self.k)
        # Sort the N·k assignments by expert: expert e's tokens then form one contiguous block.
        flat = experts.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.n_expert).tolist()
        token = order // self.k  # which token each sorted assignment belongs to
        blocks = x[token].split(counts)
        y = torch.cat([expert(block) for expert, block in zip(self.experts, blocks)])
        y = (y * weights.reshape(-1)[order, None]).to(x.dtype)  # weight in float32, as Mixtral does
        return torch.zeros_like(x).index_add_(0, token, y).reshape(shape)


def routing_stats(
    router_logits: list[torch.Tensor], n_expert: int, k: int, token_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(load-balancing loss, router z-loss, expert load) over all layers' router logits (each (N, E)).

    * Load balancing, Switch-Transformer form as Mixtral computes it (HF `load_balancing_loss_func`): with
      all layers' tokens pooled, f_e = top-k assignments to expert e per token and P_e = mean router
      probability of e; loss = E · Σ_e f_e · P_e (= k when perfectly balanced, larger when not).
    * z-loss (ST-MoE): mean over layers and tokens of logsumexp(router logits)², keeps the logits small.
    * expert load: (E,) float count of token→expert assignments over all layers (sums to tokens·k·layers).

    `token_mask` (N,), 1 for real tokens, leaves padding out of all three (as HF's attention_mask does).
    """
    device = router_logits[0].device
    mask = torch.ones(router_logits[0].size(0), device=device) if token_mask is None else token_mask.reshape(-1).to(device).float()
    load = torch.zeros(n_expert, device=device)
    prob_sum = torch.zeros(n_expert, device=device)
    z_sum = torch.zeros((), device=device)
    for logits in router_logits:
        logits = logits.float()
        probs = logits.softmax(dim=-1)
        experts = probs.topk(k, dim=-1).indices
        load = load + torch.zeros(n_expert, device=device).scatter_add_(0, experts.reshape(-1), mask.repeat_interleave(k))
        prob_sum = prob_sum + (probs * mask[:, None]).sum(dim=0)
        z_sum = z_sum + (torch.logsumexp(logits, dim=-1).pow(2) * mask).sum()
    rows = (mask.sum() * len(router_logits)).clamp(min=1)
    aux = n_expert * torch.sum((load / rows) * (prob_sum / rows))
    return aux, z_sum / rows, load
