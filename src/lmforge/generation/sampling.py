"""Choosing the next token: logit processors, warpers and one-step sampling.

Each follows the semantics of its HF transformers counterpart (RepetitionPenaltyLogitsProcessor,
TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper) and they run in HF's order —
repetition penalty, then temperature, top-k, top-p, min-p — so a checkpoint sampled here behaves like the
same checkpoint sampled through HF. The decoding loops live in `decode.py`, `beam.py`, `speculative.py`.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "apply_repetition_penalty",
    "apply_temperature",
    "min_p_filter",
    "next_token_probs",
    "sample_next",
    "token_presence",
    "top_k_filter",
    "top_p_filter",
    "warp",
]

_NEG_INF = float("-inf")


def _check_temperature(temperature: float) -> None:
    # `not >=` also rejects NaN.
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature!r}")


def _check_top_p(top_p: float | None) -> None:
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (or None to disable), got {top_p!r}")


def _check_min_p(min_p: float | None) -> None:
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1] (or None to disable), got {min_p!r}")


def _check_repetition_penalty(penalty: float | None) -> None:
    if penalty is not None and (not penalty > 0 or math.isinf(penalty)):
        raise ValueError(f"repetition_penalty must be a finite float > 0 (1.0 = none), got {penalty!r}")


def check_sampling_args(
    temperature: float, top_p: float | None, min_p: float | None = None, repetition_penalty: float | None = None
) -> None:
    """ValueError naming the first bad argument; called before any forward so nothing is wasted."""
    _check_temperature(temperature)
    _check_top_p(top_p)
    _check_min_p(min_p)
    _check_repetition_penalty(repetition_penalty)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide logits by `temperature` (>0): <1 sharpens the distribution, >1 flattens it.

    Zero is rejected here because dividing by it gives inf/NaN; callers wanting greedy decoding use
    `sample_next(..., temperature=0)`, which takes the argmax instead.
    """
    if not temperature > 0 or math.isinf(temperature):
        raise ValueError(f"temperature must be a finite float > 0 to rescale logits, got {temperature!r}")
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k largest logits along the last dim, set the rest to -inf.

    Ties with the k-th value are all kept (as HF does), so more than k entries may survive.
    `k` None or <= 0 disables the filter; a k above the vocabulary size keeps everything.
    """
    if k is None or k <= 0:
        return logits
    k = min(int(k), logits.size(-1))
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, _NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float | None, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most-probable tokens whose total probability is >= p.

    Equivalently a token survives when the probability mass of the tokens ranked strictly above it
    is < p; everything else is set to -inf. At least `min_tokens_to_keep` tokens always survive so a
    row can never end up all -inf. `p` None or >= 1 disables the filter.
    """
    if p is None or p >= 1.0:
        return logits
    if not p > 0:
        raise ValueError(f"top_p must be in (0, 1], got {p!r}")
    if min_tokens_to_keep < 1:
        raise ValueError(f"min_tokens_to_keep must be >= 1, got {min_tokens_to_keep!r}")
    # Ascending order: a token is dropped when it and every less-probable token together hold at
    # most 1 - p of the mass (the same comparison HF makes, so boundary cases round the same way).
    ascending, order = torch.sort(logits, dim=-1, descending=False)
    cum_probs = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum_probs <= (1.0 - p)
    drop_sorted[..., -min_tokens_to_keep:] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, _NEG_INF)


def min_p_filter(logits: torch.Tensor, min_p: float | None, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Min-p (Nguyen et al., 2024): drop tokens less likely than `min_p` × the top token's probability.

    The cut scales with the model's confidence: strict when one token dominates, permissive when the
    distribution is flat. The `min_tokens_to_keep` most probable tokens always survive; None or 0 disables.
    """
    if min_p is None or min_p == 0:
        return logits
    _check_min_p(min_p)
    probs = logits.softmax(dim=-1)
    drop = probs < min_p * probs.amax(dim=-1, keepdim=True)
    keep = torch.topk(probs, min(min_tokens_to_keep, probs.size(-1)), dim=-1).indices
    drop.scatter_(-1, keep, False)
    return logits.masked_fill(drop, _NEG_INF)


def token_presence(input_ids: torch.Tensor, vocab_size: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) bool: which tokens occur in each row (padding excluded), the state of the repetition penalty.

    Decoding loops build it once from the prompt and then set one entry per step, instead of re-reading the
    whole sequence every step as HF's processor does."""
    weights = torch.ones_like(input_ids, dtype=torch.float32) if attention_mask is None else attention_mask.float()
    counts = torch.zeros(input_ids.size(0), vocab_size, device=input_ids.device)
    return counts.scatter_add_(1, input_ids, weights) > 0


def apply_repetition_penalty(logits: torch.Tensor, presence: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """CTRL's repetition penalty as HF defines it: for tokens already present, divide positive logits by
    `penalty` and multiply negative ones (so > 1 always makes a repeat less likely). None or 1.0 disables.

    One difference from HF's processor: `presence` leaves out left padding, where HF also penalises the pad id.
    """
    if penalty is None or penalty == 1.0:
        return logits
    _check_repetition_penalty(penalty)
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(presence, penalised, logits)


def warp(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
) -> torch.Tensor:
    """Temperature (> 0) → top-k → top-p → min-p on float32 scores, HF's order; -inf marks dropped tokens."""
    scores = apply_temperature(logits.float(), temperature)
    scores = top_k_filter(scores, top_k)
    scores = top_p_filter(scores, top_p)
    return min_p_filter(scores, min_p)


def next_token_probs(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
) -> torch.Tensor:
    """The distribution `sample_next` draws from, as probabilities (..., V) in float32.

    temperature 0 gives the one-hot of the argmax: speculative decoding's acceptance rule then reduces to
    "accept while the draft agrees with the target's greedy choice"."""
    _check_temperature(temperature)
    if temperature == 0:
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return warp(logits, temperature, top_k, top_p, min_p).softmax(dim=-1)


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from next-token logits (B, V) -> (B,) int64 ids.

    temperature == 0 is greedy (argmax; top_k/top_p/min_p cannot change the argmax so they are skipped).
    Otherwise temperature -> top-k -> top-p -> min-p -> softmax -> multinomial, the order HF applies them,
    with `generator` making the draw reproducible without touching the global RNG.
    """
    _check_temperature(temperature)
    _check_top_p(top_p)
    _check_min_p(min_p)
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, vocab), got shape {tuple(logits.shape)}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    # Softmax in float32 at least: bf16/fp16 logits lose the tail of the distribution otherwise.
    probs = warp(logits, temperature, top_k, top_p, min_p).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
