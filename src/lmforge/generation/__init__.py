"""Text generation from decoder models: logit warpers (temperature, top-k, top-p) and a sampling loop."""

from __future__ import annotations

from lmforge.generation.sampling import apply_temperature, generate, sample_next, top_k_filter, top_p_filter

__all__ = ["apply_temperature", "generate", "sample_next", "top_k_filter", "top_p_filter"]
