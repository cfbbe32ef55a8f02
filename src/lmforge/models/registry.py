"""Family name → (config class, model class). New families register here and nowhere else."""

from __future__ import annotations

from torch import nn

from lmforge.models.config import GPTConfig
from lmforge.models.gpt import GPT

FAMILIES: dict[str, tuple[type, type[nn.Module]]] = {
    "gpt": (GPTConfig, GPT),
}
