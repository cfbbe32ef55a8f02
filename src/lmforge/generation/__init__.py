"""Text generation: a KV-cached decoding core with greedy / sampled decoding, beam search and speculative
decoding behind one `generate`, plus the logit processors and warpers they share."""

from __future__ import annotations

from lmforge.generation.beam import beam_search
from lmforge.generation.decode import StopCriteria, Streamer, eval_mode, generate
from lmforge.generation.sampling import (
    apply_repetition_penalty,
    apply_temperature,
    min_p_filter,
    next_token_probs,
    sample_next,
    token_presence,
    top_k_filter,
    top_p_filter,
    warp,
)
from lmforge.generation.speculative import accept_drafts, speculative_generate
from lmforge.generation.state import DecodeState, context_limit
from lmforge.models.layers.kv_cache import KVCache

__all__ = [
    "DecodeState",
    "KVCache",
    "StopCriteria",
    "Streamer",
    "accept_drafts",
    "apply_repetition_penalty",
    "apply_temperature",
    "beam_search",
    "context_limit",
    "eval_mode",
    "generate",
    "min_p_filter",
    "next_token_probs",
    "sample_next",
    "speculative_generate",
    "token_presence",
    "top_k_filter",
    "top_p_filter",
    "warp",
]
