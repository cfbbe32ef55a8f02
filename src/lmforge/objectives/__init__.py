"""Objectives: (model, batch) → loss and the token counts that metrics need."""

from lmforge.objectives.base import LossOutput
from lmforge.objectives.clm import CausalLM

__all__ = ["CausalLM", "LossOutput"]
