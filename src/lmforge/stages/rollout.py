"""Rollouts for RL stages: sample completions with the KV-cached generator, then score them token by token.

A rollout holds prompt + completion ids, the completion mask (tokens up to and including the first stop
token: what the policy is accountable for) and the texts the reward functions read. Log-probabilities of a
rollout are recomputed with one teacher-forced forward using the positions generation used (counted from
each row's first real token), so the PPO/GRPO ratio starts at exactly 1 up to float noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from lmforge.generation import generate
from lmforge.generation.state import positions_from_mask
from lmforge.objectives.base import IGNORE_INDEX, decoder_token_logprobs


@dataclass
class Rollout:
    ids: torch.Tensor  # (N, P + L) prompt (left-padded) + completion
    attention_mask: torch.Tensor  # (N, P + L): prompt padding and everything after the stop token are 0
    prompt_len: int  # P
    completion_mask: torch.Tensor  # (N, L) bool
    prompts: list[str]
    completions: list[str] = field(default_factory=list)
    metadata: list[dict[str, Any]] = field(default_factory=list)
    stopped: torch.Tensor | None = None  # (N,) bool: ended with a stop token (else cut at max_new_tokens)

    @property
    def targets(self) -> torch.Tensor:
        """Completion tokens as next-token targets of positions P-1 .. P+L-2 (IGNORE_INDEX after the stop)."""
        completion = self.ids[:, self.prompt_len :]
        return completion.masked_fill(~self.completion_mask, IGNORE_INDEX)

    @property
    def position_ids(self) -> torch.Tensor:
        return positions_from_mask(self.attention_mask)

    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=1)


def pad_completions(rollout: Rollout, length: int, pad_id: int) -> Rollout:
    """`rollout` with every completion right-padded to `length` tokens, masked out (attention, completion mask):
    generation stops when every row has stopped, so completions come in any length up to the limit, and a model
    compiled for static shapes would recompile for each. Masked, causal: the same log-probs, losses and advantages."""
    short = length - rollout.completion_mask.size(1)
    if short <= 0:
        return rollout
    n = rollout.ids.size(0)
    pad = rollout.ids.new_full((n, short), pad_id)
    return replace(
        rollout,
        ids=torch.cat([rollout.ids, pad], dim=1),
        attention_mask=torch.cat([rollout.attention_mask, torch.zeros_like(pad)], dim=1),
        completion_mask=torch.cat([rollout.completion_mask, torch.zeros_like(pad, dtype=torch.bool)], dim=1),
    )


def stop_hits(completion: torch.Tensor, stop_ids: Sequence[int]) -> torch.Tensor:
    """(N, L) bool: where the completion holds a stop token."""
    if not stop_ids:
        return torch.zeros_like(completion, dtype=torch.bool)
    return torch.isin(completion, torch.tensor(list(stop_ids), device=completion.device))


def mask_through_first_stop(is_stop: torch.Tensor) -> torch.Tensor:
    """True up to and including each row's first stop (all True when the row never stopped)."""
    return (is_stop.long().cumsum(dim=1) - is_stop.long()) == 0


def completion_mask(completion: torch.Tensor, stop_ids: Sequence[int]) -> torch.Tensor:
    """True up to and including each row's first stop token (all True when the row never stopped)."""
    return mask_through_first_stop(stop_hits(completion, stop_ids))


@torch.no_grad()
def sample_rollout(
    model: nn.Module,
    batch: dict[str, Any],
    *,
    tokenizer: Any,
    num_generations: int,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Rollout:
    """`num_generations` completions of every prompt in `batch` (rows i·G .. i·G+G-1 share prompt i)."""
    ids = batch["input_ids"].repeat_interleave(num_generations, dim=0)
    mask = batch["attention_mask"].repeat_interleave(num_generations, dim=0)
    seqs = generate(
        model, ids, attention_mask=mask, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, eos_token_id=list(stop_ids) or None, pad_token_id=pad_id, generator=generator,
    )
    seqs = seqs.clone()  # out of inference mode: the training forward saves these ids for backward
    P = ids.size(1)
    completion = seqs[:, P:]
    is_stop = stop_hits(completion, stop_ids)
    done = mask_through_first_stop(is_stop)
    full_mask = torch.cat([mask.long(), done.long()], dim=1)
    prompts = [p for p in batch["prompts"] for _ in range(num_generations)]
    metadata = [m for m in batch.get("metadata", [{}] * len(batch["prompts"])) for _ in range(num_generations)]
    stops = set(stop_ids)
    texts = [tokenizer.decode([t for t in row[: int(n)].tolist() if t not in stops]) for row, n in zip(completion, done.sum(1))]
    stopped = is_stop.any(dim=1)
    return Rollout(seqs, full_mask, P, done, prompts, texts, metadata, stopped)


def rollout_logprobs(model: nn.Module, rollout: Rollout, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (N, L) of the completion under `model` (0 where masked), and optionally entropies,
    through the decoder's chunked head where it has one (`decoder_token_logprobs`: no (N, P + L, vocab) logits)."""
    P = rollout.prompt_len
    targets = torch.full_like(rollout.ids, IGNORE_INDEX)  # position t predicts token t+1: the completion's window
    targets[:, P - 1 : -1] = rollout.targets
    logp, entropy = decoder_token_logprobs(model, rollout.ids, targets, with_entropy, attention_mask=rollout.attention_mask,
                                           position_ids=rollout.position_ids)
    return logp[:, P - 1 : -1], None if entropy is None else entropy[:, P - 1 : -1]
