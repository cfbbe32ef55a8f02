"""`generate`: the one entry point for text generation — greedy, sampling, beam search, speculative decoding.

    out = generate(model, ids, max_new_tokens=50)                                   # greedy, KV cache
    out = generate(model, ids, max_new_tokens=50, temperature=0.8, top_p=0.9, generator=g)
    out = generate(model, ids, max_new_tokens=50, attention_mask=mask, eos_token_id=[eos, eot])  # left-padded batch
    out = generate(model, ids, max_new_tokens=50, num_beams=4, length_penalty=1.0)
    out = generate(model, ids, max_new_tokens=50, draft_model=small, num_draft_tokens=4, stats=s)

Returns the prompt followed by the new tokens, (B, T_prompt + n_new), where n_new <= max_new_tokens stops
early once every row is finished; a row that finished earlier (EOS, `stop_criteria`) is filled with
`pad_token_id` (default: the first EOS id) after its last token. For an encoder-decoder (T5) `input_ids`
are the encoder's input and the result is the decoder sequence, starting with the decoder start token:
(B, 1 + n_new), as HF's `generate` returns it.

Greedy and sampled decoding follow HF `generate` (same processors in the same order), so the same weights
give the same greedy tokens as `transformers` (tested for every family).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lmforge.generation.beam import beam_search
from lmforge.generation.sampling import (
    apply_repetition_penalty,
    check_sampling_args,
    sample_next,
    token_presence,
)
from lmforge.generation.speculative import speculative_generate
from lmforge.generation.state import DecodeState, check_can_generate, model_kind

StopCriteria = Callable[[torch.Tensor], torch.Tensor]  # sequences so far (B, T) -> rows to stop (B,) bool
Streamer = Callable[[torch.Tensor], Any]  # receives the (B,) new tokens of every step


@contextmanager
def eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Eval mode (no dropout) inside; every submodule's own train/eval flag restored afterwards, even on error."""
    modes = [(m, m.training) for model in models if model is not None for m in model.modules()]
    for model in models:
        if model is not None:
            model.eval()
    try:
        yield
    finally:
        for module, was_training in modes:
            module.training = was_training


def id_tensor(ids: int | Sequence[int] | torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """EOS id(s) as a 1-D long tensor on `device`, or None."""
    if ids is None:
        return None
    t = torch.as_tensor(ids, dtype=torch.long, device=device).reshape(-1)
    return t if t.numel() else None


def resolve_pad(pad_token_id: int | None, eos: torch.Tensor | None, model: nn.Module) -> int:
    """The filler after a finished row: pad_token_id, else the first EOS id (HF's default), else the model's
    pad id (T5), else 0."""
    if pad_token_id is not None:
        return int(pad_token_id)
    if eos is not None:
        return int(eos[0])
    return int(getattr(getattr(model, "config", None), "pad_token_id", 0) or 0)


def _check_inputs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int, left_padded: bool = True
) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.size(1) == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be (batch, seq_len) with seq_len >= 1, got shape {shape}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must have input_ids' shape {tuple(input_ids.shape)}")
        if left_padded and not bool(attention_mask[:, -1].bool().all()):
            raise ValueError("attention_mask must be left-padded: the last token of every row must be real (mask 1)")


def _without_autograd(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Run `fn(model, ...)` under inference mode, or under no_grad for an FSDP2-sharded model (or draft): FSDP
    allocates its all-gather buffers at the first forward and reuses them, so buffers made under inference mode
    break every later training step ("inplace update to inference tensor"), e.g. after an RL stage's first rollout
    (pytorch/pytorch#95957; Lightning's evaluation loops avoid it the same way)."""

    @functools.wraps(fn)
    def run(model: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        from lmforge.parallel.fsdp import fsdp_units

        sharded = any(fsdp_units(m) for m in (model, kwargs.get("draft_model")) if m is not None)
        with torch.no_grad() if sharded else torch.inference_mode():
            return fn(model, *args, **kwargs)

    return run


@_without_autograd
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    stop_criteria: StopCriteria | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    streamer: Streamer | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    draft_model: nn.Module | None = None,
    num_draft_tokens: int = 4,
    stats: dict[str, float] | None = None,
) -> torch.Tensor:
    """Extend `input_ids` (B, T) by up to `max_new_tokens` tokens -> (B, T + n_new); see the module doc.

    temperature 0 is greedy; > 0 samples after repetition penalty → temperature → top-k → top-p → min-p
    (`generator` makes it reproducible). `eos_token_id` (int or list) finishes a row; `stop_criteria(seqs)`
    returns the rows to finish; `streamer(tokens)` sees each step's (B,) tokens (finished rows: pad; with a
    draft model, one (1,) call per emitted token). `attention_mask` marks left padding.
    `use_cache=False` re-runs the whole context every step (same tokens, slower). `num_beams > 1` runs beam
    search (`beam.py`: length_penalty, early_stopping as HF); `draft_model` runs speculative decoding
    (`speculative.py`, batch size 1, `num_draft_tokens` per round; `stats` receives its acceptance rate).
    The models run in eval mode; their train/eval flags are restored afterwards.
    """
    check_sampling_args(temperature, top_p, min_p, repetition_penalty)
    check_can_generate(model)
    _check_inputs(input_ids, attention_mask, max_new_tokens, left_padded=model_kind(model) == "decoder")
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    if num_beams > 1 and draft_model is not None:
        raise ValueError("beam search and speculative decoding cannot be combined: pass num_beams=1 or no draft_model")
    if num_beams > 1 and streamer is not None:
        raise ValueError("a streamer needs one token per row per step: it cannot follow beam search (num_beams > 1)")
    if num_beams > 1 and (temperature != 0 or top_k is not None or top_p is not None or min_p is not None):
        raise ValueError("beam search is deterministic here: leave temperature=0 and top_k/top_p/min_p unset")
    eos = id_tensor(eos_token_id, input_ids.device)
    pad = resolve_pad(pad_token_id, eos, model)
    with eval_mode(model, draft_model):
        if num_beams > 1:
            return beam_search(
                model, input_ids, max_new_tokens=max_new_tokens, num_beams=num_beams, length_penalty=length_penalty,
                early_stopping=early_stopping, eos=eos, pad=pad, attention_mask=attention_mask,
                repetition_penalty=repetition_penalty, stop_criteria=stop_criteria, use_cache=use_cache,
            )
        if draft_model is not None:
            return speculative_generate(
                model, draft_model, input_ids, max_new_tokens=max_new_tokens, num_draft_tokens=num_draft_tokens,
                temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                eos=eos, attention_mask=attention_mask, stop_criteria=stop_criteria, generator=generator,
                use_cache=use_cache, streamer=streamer, stats=stats,
            )
        return sample_loop(
            model, input_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            min_p=min_p, repetition_penalty=repetition_penalty, eos=eos, pad=pad, attention_mask=attention_mask,
            stop_criteria=stop_criteria, generator=generator, use_cache=use_cache, streamer=streamer,
        )


def sample_loop(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    min_p: float | None,
    repetition_penalty: float | None,
    eos: torch.Tensor | None,
    pad: int,
    attention_mask: torch.Tensor | None,
    stop_criteria: StopCriteria | None,
    generator: torch.Generator | None,
    use_cache: bool,
    streamer: Streamer | None,
) -> torch.Tensor:
    """Greedy / sampled decoding, one token per row per step. Kept lean: per step one model call, one pick,
    one write into the preallocated sequence buffer, and a host sync only when rows can finish."""
    state = DecodeState(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, use_cache=use_cache)
    if max_new_tokens == 0:
        return state.sequences.clone()
    penalise = repetition_penalty is not None and repetition_penalty != 1.0
    track = eos is not None or stop_criteria is not None
    finished = torch.zeros(state.batch_size, dtype=torch.bool, device=input_ids.device)
    presence: torch.Tensor | None = None
    logits = state.forward(keep=1)[:, -1]
    for step in range(max_new_tokens):
        if penalise:
            if presence is None:
                prompt_mask = None if state.mask is None else state.mask[:, : state.length]
                presence = token_presence(state.sequences, logits.size(-1), prompt_mask)
            logits = apply_repetition_penalty(logits.float(), presence, repetition_penalty)
        if temperature == 0:
            next_ids = logits.argmax(dim=-1)
        else:
            next_ids = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, generator=generator)
        if track:
            next_ids = next_ids.masked_fill(finished, pad)
        state.append(next_ids)
        if presence is not None:
            presence.scatter_(1, next_ids[:, None], True)
        if eos is not None:
            finished |= torch.isin(next_ids, eos)
        if stop_criteria is not None:
            finished |= torch.as_tensor(stop_criteria(state.sequences), dtype=torch.bool, device=finished.device)
        if streamer is not None:
            streamer(next_ids)
        if step == max_new_tokens - 1 or (track and bool(finished.all())):
            break
        logits = state.forward(keep=1)[:, -1]
    return state.sequences.clone()
