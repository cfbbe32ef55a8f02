"""Feed-forward blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.kernels.dropout import Dropout
from lmforge.kernels.gelu import GeluTanh
from lmforge.kernels.linear import Linear


class GeluMLP(nn.Module):
    """GPT-2 MLP: Linear → GELU (tanh approximation, as GPT-2's `gelu_new`) → Linear → dropout."""

    def __init__(self, n_embd: int, hidden: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.fc = Linear(n_embd, hidden, bias=bias)
        self.act = GeluTanh()  # nn.GELU(approximate="tanh"), one compiled loop on CPU
        self.proj = Linear(hidden, n_embd, bias=bias)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(self.act(self.fc(x)))
        return self.dropout(y) if self.training else y  # eval: skip a no-op module call (decoding runs this per token)


class SwiGLU(nn.Module):
    """Gated feed-forward of Llama / Mistral (Shazeer, 2020): down(silu(gate(x)) · up(x)).

    Three separate projections named as in the Hugging Face checkpoints, so weight conversion is a key map.
    """

    def __init__(self, n_embd: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = Linear(n_embd, hidden, bias=bias)
        self.up_proj = Linear(n_embd, hidden, bias=bias)
        self.down_proj = Linear(hidden, n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
