"""Objectives: (model, batch) → loss and the token counts that metrics need."""

from lmforge.objectives.base import IGNORE_INDEX, LossOutput, Objective
from lmforge.objectives.clm import CausalLM

__all__ = ["IGNORE_INDEX", "CausalLM", "LossOutput", "Objective"]
