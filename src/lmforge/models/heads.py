"""Scalar heads on a decoder: reward models (one score per sequence) and PPO critics (one value per token).

The backbone is any decoder with `hidden_states(input_ids, attention_mask)` (GPT, Llama, Mixtral). Its LM
head stays in place (unused here) so the backbone's state dict keeps the keys of the checkpoint it came
from; the head is a single zero-initialised Linear, so a fresh reward model scores every sequence 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.kernels.linear import Linear
from lmforge.models import build


def last_token_index(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token: right padding puts it at sum(mask) - 1; left padding at T - 1."""
    if attention_mask is None:
        return torch.full((input_ids.size(0),), input_ids.size(1) - 1, device=input_ids.device, dtype=torch.long)
    mask = attention_mask.long()
    positions = torch.arange(mask.size(1), device=mask.device)
    return (mask * positions).argmax(dim=1)  # the highest position holding a real token, for either padding side


class ScalarHeadModel(nn.Module):
    """`backbone` + Linear(n_embd, 1). `forward` gives per-token scalars (B, T); `score` the last token's (B,)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        if not hasattr(backbone, "hidden_states"):
            raise ConfigError("model.family", f"{type(backbone).__name__} has no hidden_states()", "use a decoder family (gpt, llama, mixtral)")
        self.backbone = backbone
        self.head = Linear(backbone.config.n_embd, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def config(self) -> Any:
        return self.backbone.config

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        hidden = self.backbone.hidden_states(input_ids, attention_mask, position_ids)
        return self.head(hidden).squeeze(-1).float()

    def score(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One scalar per sequence, read at its last real token (the reward model's output)."""
        values = self(input_ids, attention_mask, position_ids)
        return values.gather(1, last_token_index(attention_mask, input_ids)[:, None]).squeeze(1)


def scalar_model_from_state(model_cfg: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> ScalarHeadModel:
    """Rebuild a reward model / critic saved by a stage (`backbone.*` + `head.*` keys)."""
    model = ScalarHeadModel(build(dict(model_cfg)))
    model.load_state_dict(dict(state_dict), strict=True)
    return model
