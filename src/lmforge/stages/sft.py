"""Supervised fine-tuning: causal LM loss on the response tokens only.

The data (`lmforge.data.sft`) renders each example with the chat template and sets every prompt,
template and padding target to IGNORE_INDEX, keeping the response and its end-of-turn token: the model
learns to answer *and to stop*. The loss, validation metrics (val/loss, val/ppl, val/bpb over response
tokens) and optimisation are the base stage's; this class exists so checkpoints and configs name the stage.
"""

from __future__ import annotations

from lmforge.stages.base import LMStage


class SFTStage(LMStage):
    """Response-only next-token loss; batches carry `input_ids`, pre-shifted `targets`, `attention_mask`
    (and `position_ids` + a 4-D mask when examples are packed)."""
