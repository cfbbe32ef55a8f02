"""Pre-training: the objective (causal LM by default) over packed blocks of raw text."""

from __future__ import annotations

from lmforge.stages.base import LMStage


class PretrainStage(LMStage):
    """Pre-training adds nothing to the base stage today; it is its own class so configs, checkpoints and
    later stages (SFT, DPO, …) can tell stages apart and override hooks without touching the others."""
