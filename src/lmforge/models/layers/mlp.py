"""Feed-forward blocks."""

from __future__ import annotations

import torch
from torch import nn


class GeluMLP(nn.Module):
    """GPT-2 MLP: Linear → GELU (tanh approximation, as GPT-2's `gelu_new`) → Linear → dropout."""

    def __init__(self, n_embd: int, hidden: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, hidden, bias=bias)
        self.act = nn.GELU(approximate="tanh")
        self.proj = nn.Linear(hidden, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))
