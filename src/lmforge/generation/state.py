"""The state of one batch being decoded: the model, its KV cache, the tokens so far and their padding.

Every decoding strategy (sampling, beam search, speculative decoding) drives a model the same way — append
tokens, run the model on the ones it has not seen yet, sometimes reorder rows or take tokens back — so that
bookkeeping lives here once:

  * `append(tokens)` writes tokens after the current ones; `forward()` runs the model on the tokens appended
    since the last forward (the prompt, at first) and returns their logits (B, T_new, V), or the last `keep`;
  * `truncate(n)` takes tokens back (rejected drafts), `reorder(index)` permutes rows (surviving beams);
  * `sequences` is the (B, length) view of everything so far.

Families: decoder-only models get `input_ids` as the prompt. An encoder-decoder (T5) encodes `input_ids`
once and decodes from its decoder start token, so `sequences` are decoder tokens. Encoder-only models are
refused. Left padding: `attention_mask` (B, T) with 0 on the left; positions are counted from the first real
token (HF's cumsum - 1) and pad keys are masked at every step.

The KV cache (`model.make_cache`) holds min(prompt + max_new_tokens + extra, context limit) tokens, allocated
once. Past the model's context (learned / RoPE positions: `max_seq_len`) or for a model without `make_cache`
or with `use_cache=False`, the logits at a position are computed from the last `max_seq_len` tokens ending
there (one uncached forward per position past the context) — the window behaviour generation always had,
so cached, uncached and speculative decoding agree token for token.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmforge.generation.fastpath import DecodePlan
from lmforge.models.layers.kv_cache import KVCache


def model_kind(model: nn.Module) -> str:
    """decoder | encoder | encoder_decoder (a model without a `kind` in its config is taken as a decoder)."""
    return getattr(getattr(model, "config", None), "kind", "decoder")


def check_can_generate(model: nn.Module, role: str = "model") -> None:
    """A clear error for encoder-only families, which have no left-to-right distribution to sample from."""
    if model_kind(model) == "encoder":
        family = getattr(model.config, "family", type(model).__name__)
        raise ValueError(
            f"{role} is an encoder-only model ({family}): it has no next-token distribution to generate from. "
            "Use a decoder (gpt, llama, mixtral) or an encoder-decoder (t5)"
        )


def context_limit(model: nn.Module) -> int | None:
    """Longest sequence the model's positions cover: max_seq_len for learned positions and RoPE; None where
    positions are relative and unbounded (ALiBi, T5's buckets)."""
    cfg = getattr(model, "config", None)
    if model_kind(model) == "encoder_decoder" or getattr(cfg, "position", None) == "alibi":
        return None
    return getattr(cfg, "max_seq_len", None)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) padding mask -> position ids counted from each row's first real token (pads get 1, as in HF)."""
    mask = mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


class DecodeState:
    """A batch of sequences being extended by `model`; see the module doc for the protocol."""

    def __init__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int,
        use_cache: bool = True,
        extra: int = 0,
    ) -> None:
        check_can_generate(model)
        self.model = model
        self.encoder_decoder = model_kind(model) == "encoder_decoder"
        device = input_ids.device
        B = input_ids.size(0)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device=device, dtype=torch.bool)
            if bool(attention_mask.all()):
                attention_mask = None
        self.memory: torch.Tensor | None = None
        self.encoder_mask: torch.Tensor | None = None
        if self.encoder_decoder:
            self.encoder_mask = attention_mask
            self.memory = model.encode(input_ids, attention_mask)
            cfg = model.config
            start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.pad_token_id
            prompt = torch.full((B, 1), start, dtype=torch.long, device=device)
            attention_mask = None
        else:
            prompt = input_ids
        T = prompt.size(1)
        capacity = T + max_new_tokens + extra
        self.tokens = torch.empty(B, capacity, dtype=torch.long, device=device)
        self.tokens[:, :T] = prompt
        self.mask: torch.Tensor | None = None  # (B, capacity) key padding, None when there is none
        self.offset: torch.Tensor | None = None  # (B,) left pads per row: position = index - offset
        if attention_mask is not None:
            self.mask = torch.ones(B, capacity, dtype=torch.bool, device=device)
            self.mask[:, :T] = attention_mask
            self.offset = (~attention_mask).sum(-1)
        self.length, self.fed = T, 0
        self.limit = context_limit(model)
        self.cache: KVCache | None = None
        if use_cache and hasattr(model, "make_cache"):
            size = capacity if self.limit is None else min(capacity, self.limit)
            if T <= size:
                self.cache = model.make_cache(B, size)
        # one-token steps of GPT / Llama on CPU run through a lean plan of the same math (fastpath.py)
        self.plan = DecodePlan.get(model) if self.cache is not None and not self.encoder_decoder else None

    @property
    def sequences(self) -> torch.Tensor:
        """(B, length) every token so far: the prompt (decoder start token for T5) and those appended."""
        return self.tokens[:, : self.length]

    @property
    def batch_size(self) -> int:
        return self.tokens.size(0)

    def append(self, tokens: torch.Tensor) -> None:
        """Write (B,) or (B, T) tokens after the current ones; the next `forward` feeds them to the model."""
        if tokens.dim() == 1:
            tokens = tokens[:, None]
        end = self.length + tokens.size(1)
        if end > self.tokens.size(1):
            raise ValueError(f"decode buffer overflow: {end} tokens > capacity {self.tokens.size(1)}")
        self.tokens[:, self.length : end] = tokens
        self.length = end

    def truncate(self, length: int) -> None:
        """Drop every token from `length` on (and from the cache)."""
        if not 0 < length <= self.length:
            raise ValueError(f"cannot truncate {self.length} tokens to {length}")
        self.length = length
        self.fed = min(self.fed, length)
        if self.cache is not None:
            self.cache.crop(min(self.cache.length, self.fed))

    def reorder(self, index: torch.Tensor) -> None:
        """Row b becomes old row index[b] (beam search)."""
        self.tokens = self.tokens.index_select(0, index)
        if self.mask is not None:
            self.mask = self.mask.index_select(0, index)
            self.offset = self.offset.index_select(0, index)
        if self.cache is not None:
            self.cache.reorder(index)

    def forward(self, keep: int | None = None) -> torch.Tensor:
        """Run the model on the tokens appended since the last forward -> their logits (B, T_new, V), or only
        the last `keep` of them (what the caller reads; uncached decoding then computes no more)."""
        start, end = self.fed, self.length
        if start == end:
            raise ValueError("nothing to feed: append tokens before calling forward")
        if self.cache is not None and end > self.cache.max_len:
            self.cache = None  # past the context: from here on every step re-runs the last `limit` tokens
        if self.cache is not None:
            logits = self._cached(start, end, keep)
        else:
            logits = self._window(start if keep is None else max(start, end - keep), end)
        self.fed = end
        return logits

    def _cached(self, start: int, end: int, keep: int | None = None) -> torch.Tensor:
        ids = self.tokens[:, start:end]
        mask = None if self.mask is None else self.mask[:, :end]
        if self.plan is not None and end - start == 1 and self.cache.length == start > 0:
            pos = None if mask is None else torch.full_like(self.offset[:, None], start) - self.offset[:, None]
            return self.plan.step(ids, self.cache, pos, mask)
        if self.encoder_decoder:
            memory = self.memory if start == 0 else None  # later steps read the cached cross-attention K/V
            return self.model.decode(ids, memory, self.encoder_mask, mask, cache=self.cache)
        kwargs: dict[str, Any] = {"cache": self.cache}
        if mask is not None:
            kwargs["attention_mask"] = mask
            if start == 0:
                kwargs["position_ids"] = positions_from_mask(mask)
            else:
                kwargs["position_ids"] = torch.arange(start, end, device=ids.device)[None] - self.offset[:, None]
        if self.plan is not None and keep is not None:  # the head only where logits are read (the prefill's last)
            return self.model.lm_head(self.model.hidden_states(ids, **kwargs)[:, -keep:])
        logits = self.model(ids, **kwargs)
        return logits if keep is None else logits[:, -keep:]

    def _window(self, start: int, end: int) -> torch.Tensor:
        """No cache: logits of positions [start, end), each computed from (at most) the `limit` tokens that
        end at it — one forward for the positions within the first `limit` tokens, one per position after."""
        if self.limit is None or end <= self.limit:
            return self._run(0, end)[:, start - end :]
        parts = []
        if start < self.limit:
            parts.append(self._run(0, self.limit)[:, start - self.limit :])
        for j in range(max(start, self.limit), end):
            parts.append(self._run(j + 1 - self.limit, j + 1)[:, -1:])
        return torch.cat(parts, dim=1)

    def _run(self, first: int, end: int) -> torch.Tensor:
        """One uncached forward over tokens [first, end) (positions restart at the window's first token)."""
        ids = self.tokens[:, first:end]
        if self.encoder_decoder:
            return self.model.decode(ids, self.memory, self.encoder_mask)
        if self.mask is None:
            return self.model(ids)
        mask = self.mask[:, first:end]
        return self.model(ids, attention_mask=mask, position_ids=positions_from_mask(mask))
