"""Autoregressive sampling for decoder models: logit warpers, one-step sampling and a generate loop.

The warpers follow the semantics of HF transformers' TemperatureLogitsWarper / TopKLogitsWarper /
TopPLogitsWarper, so a checkpoint sampled here behaves like the same checkpoint sampled through HF.
There is no KV cache yet: `generate` re-runs the (cropped) context every step, which is O(T^2) per token
but needs nothing from the model beyond `forward(input_ids) -> logits` and `config.max_seq_len`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["apply_temperature", "generate", "sample_next", "top_k_filter", "top_p_filter"]

_NEG_INF = float("-inf")


def _check_temperature(temperature: float) -> None:
    # `not >=` also rejects NaN.
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature!r}")


def _check_top_p(top_p: float | None) -> None:
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (or None to disable), got {top_p!r}")


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


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from next-token logits (B, V) -> (B,) int64 ids.

    temperature == 0 is greedy (argmax; top_k/top_p cannot change the argmax so they are skipped).
    Otherwise temperature -> top-k -> top-p -> softmax -> multinomial, the order HF applies them, with
    `generator` making the draw reproducible without touching the global RNG.
    """
    _check_temperature(temperature)
    _check_top_p(top_p)
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, vocab), got shape {tuple(logits.shape)}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    # Softmax in float32 at least: bf16/fp16 logits lose the tail of the distribution otherwise.
    scores = apply_temperature(logits.float(), temperature)
    scores = top_k_filter(scores, top_k)
    scores = top_p_filter(scores, top_p)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend `input_ids` (B, T) by up to `max_new_tokens` sampled tokens -> (B, T + n).

    Each step feeds the last `model.config.max_seq_len` tokens (the model has learned positions only
    that far), so outputs may be longer than the context window. Rows are unpadded and share one
    length. With `eos_id`, a row that has emitted it keeps emitting it, and the loop stops as soon as
    every row has, so n can be < max_new_tokens. The model runs in eval mode (no dropout) and every
    submodule's train/eval flag is restored afterwards, even on error.
    """
    _check_temperature(temperature)
    _check_top_p(top_p)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if input_ids.dim() != 2 or input_ids.size(1) == 0:
        raise ValueError(
            f"input_ids must be (batch, seq_len) with seq_len >= 1, got shape {tuple(input_ids.shape)}"
        )
    max_len = model.config.max_seq_len

    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        tokens = input_ids
        finished = torch.zeros(input_ids.size(0), dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits = model(tokens[:, -max_len:])[:, -1, :]
            next_ids = sample_next(
                logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
            )
            if eos_id is not None:
                next_ids = next_ids.masked_fill(finished, eos_id)
                finished |= next_ids == eos_id
            tokens = torch.cat([tokens, next_ids.to(tokens.dtype).unsqueeze(-1)], dim=-1)
            if eos_id is not None and bool(finished.all()):
                break
    finally:
        for module, was_training in modes:
            module.training = was_training
    return tokens
