"""What every objective is and returns, so stages can log loss, perplexity and bits-per-byte uniformly.

An objective is a callable (model, batch) -> LossOutput. Before training, `run.py` checks the model
family's `kind` against `supported_kinds` (refusing e.g. bert + clm with one line), adds the
objective's `special_tokens()` to the tokenizer (the model's vocab is sized after that), then calls
`bind(tokenizer)` so the objective can read the ids it needs (mask, sentinels, eos, pad).

Batches from the packed data module carry `input_ids` (B, T) and `targets` (B, T) = input_ids shifted by
one (IGNORE_INDEX where nothing is to be predicted); objectives that need the unshifted block rebuild it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from lmforge.metrics import mean_loss

if TYPE_CHECKING:
    from lmforge.data.tokenizer import Tokenizer

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    loss: torch.Tensor  # mean NLL over counted tokens (what backward sees)
    nll_sum: torch.Tensor  # summed NLL in nats, for token-weighted val/loss and val/bpb
    n_tokens: torch.Tensor  # number of counted target tokens
    targets: torch.Tensor  # target ids, IGNORE_INDEX where not counted (bytes of counted ones -> val/bpb)
    correct: torch.Tensor | None = None  # counted targets the argmax predicts (MLM in eval mode -> val/mlm_accuracy)


class Objective(ABC):
    """Base of all objectives: which model kinds it trains, which special tokens it needs."""

    name: ClassVar[str] = "objective"
    supported_kinds: ClassVar[tuple[str, ...]] = ("decoder",)  # decoder | encoder | encoder_decoder

    def special_tokens(self) -> dict[str, str]:
        """Role -> token that must exist in the tokenizer (added when missing)."""
        return {}

    def bind(self, tokenizer: Tokenizer) -> None:  # noqa: B027 - optional hook: clm and prefix_lm need no ids
        """Read the special ids this objective needs, once the tokenizer is final."""

    def model_seq_len(self, block_size: int, kind: str = "decoder") -> int:
        """Longest sequence a model of `kind` is fed for data blocks of `block_size` (checked against max_seq_len)."""
        return block_size

    @abstractmethod
    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        """Loss of `model` on `batch`, with the counts token-weighted metrics need."""


def full_blocks(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The unshifted (B, T+1) token blocks behind a packed CLM batch (input_ids + the last target).

    Token t+1 of a row is its target t; where that is IGNORE_INDEX (the val tail's padding) input_ids holds
    the pad id at the same index, so a tail row comes back as its text followed by pads.
    """
    ids, targets = batch["input_ids"], batch["targets"]
    return torch.cat([ids[:, :1], torch.where(targets == IGNORE_INDEX, ids, targets)], dim=1)


def token_nll(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> LossOutput:
    """Summed and mean cross-entropy over counted targets, in fp32 (bf16 logits lose ~3 digits)."""
    nll_sum = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
    return nll_output(nll_sum, targets, ignore_index)


def nll_output(nll_sum: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> LossOutput:
    """LossOutput from a summed NLL: the mean over counted targets for backward, the counts for metrics."""
    n_tokens = (targets != ignore_index).sum()
    return LossOutput(loss=mean_loss(nll_sum, n_tokens), nll_sum=nll_sum.detach(), n_tokens=n_tokens, targets=targets)


def decoder_nll(
    model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, ignore_index: int, fused: bool, **kwargs: torch.Tensor | None
) -> LossOutput:
    """A decoder's loss on `targets`: through forward's chunked head + cross-entropy where the model offers it
    (`loss_in_forward`, never materialising the logits), else from full logits. Both give the same numbers."""
    if fused and getattr(model, "loss_in_forward", False):
        return nll_output(model(input_ids, targets=targets, ignore_index=ignore_index, **kwargs), targets, ignore_index)
    return token_nll(model(input_ids, **kwargs), targets, ignore_index)


def decoder_token_logprobs(
    model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, with_entropy: bool = False, ignore_index: int = IGNORE_INDEX,
    **kwargs: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) per position (B, T), 0 where ignored, and optionally each position's entropy (detached).
    Through forward's chunked head (`reduction="none"`) where the model offers it, so the (B, T, vocab) logits
    never exist (DPO's preference batches, RL's rollouts); else from full logits. Both give the same numbers."""
    from lmforge.losses.logprobs import entropy_from_logits, token_logprobs

    if getattr(model, "loss_in_forward", False):
        out = model(input_ids, targets=targets, ignore_index=ignore_index, reduction="none", with_entropy=with_entropy, **kwargs)
        nll, entropy = out if with_entropy else (out, None)
        return -nll, entropy
    logits = model(input_ids, **kwargs)
    return token_logprobs(logits, targets, ignore_index), entropy_from_logits(logits.detach()) if with_entropy else None


def decoder_sequence_logprobs(
    model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, average: bool = False, ignore_index: int = IGNORE_INDEX,
    **kwargs: torch.Tensor | None,
) -> torch.Tensor:
    """log p(targets) per sequence (B,): the sum over counted targets, or their mean when `average` (DPO/IPO),
    from `decoder_token_logprobs`."""
    from lmforge.losses.logprobs import sequence_total

    logps, _ = decoder_token_logprobs(model, input_ids, targets, ignore_index=ignore_index, **kwargs)
    return sequence_total(logps, targets, ignore_index, average)


def batch_generator(input_ids: torch.Tensor, salt: int) -> torch.Generator:
    """A generator seeded from the batch content: validation draws the same split every evaluation."""
    seed = int((input_ids.long() * torch.arange(1, input_ids.numel() + 1, device=input_ids.device).view_as(input_ids)).sum().item())
    return torch.Generator(device=input_ids.device).manual_seed((seed ^ salt) & 0x7FFF_FFFF_FFFF_FFFF)
