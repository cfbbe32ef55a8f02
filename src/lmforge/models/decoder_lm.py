"""What GPT, Llama and Mixtral share above their blocks: forward = LM head over `hidden_states`, or the loss.

One forward for the decoder families, so the chunked head + cross-entropy (`losses/linear_cross_entropy.py`)
runs inside `__call__` for all of them: FSDP's root hooks and DeepSpeed's module hooks see it like any forward.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.losses.linear_cross_entropy import linear_cross_entropy
from lmforge.losses.vocab_parallel_cross_entropy import gather_vocab
from lmforge.models.layers.kv_cache import KVCache


class DecoderLM(nn.Module):
    """Base of the decoder-only families; subclasses define `hidden_states(input_ids, attention_mask,
    position_ids, cache) -> (B, T, n_embd)` and `self.lm_head`."""

    loss_in_forward = True  # forward(..., targets=) returns the summed NLL (objectives/base.py:decoder_nll), or per token
    lm_head: nn.Module

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        targets: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "sum",
        with_entropy: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`attention_mask`: (B, T) padding or (B, 1, T, T) boolean mask; with a `cache` holding `past` tokens
        a padding mask covers all past + T keys. `position_ids` default to past .. past + T - 1.

        With `targets` (B, T) the result is the summed fp32 cross-entropy instead of logits (B, T, vocab),
        computed chunk by chunk without materialising the logits (or, with a vocab-parallel head under tensor
        parallelism, on each rank's vocabulary shard; logits are then gathered only when returned).
        `reduction="none"`: each target's NLL (B, T) instead, 0 where ignored (sequence log-probs for DPO), and with
        `with_entropy` the pair (NLL, detached entropy per position) for RL's policy pass."""
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, cache)
        if targets is None:
            return gather_vocab(self.lm_head(hidden))
        return linear_cross_entropy(hidden, self.lm_head, targets, ignore_index, reduction=reduction, with_entropy=with_entropy)
