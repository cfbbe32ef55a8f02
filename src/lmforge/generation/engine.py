"""Text in, text out: prompts -> left-padded batch -> `generate` -> completions cut at EOS or a stop string.

The one place where tokenization, stop strings, streaming and the decoding core meet, so that generate.py
(single prompt, prompts file, chat) and the OpenAI-compatible server produce the same text for the same
request. `generate` itself stays about token ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmforge.data.tokenizer import Tokenizer
from lmforge.generation.stop_strings import StopOnStrings, normalize_stop, truncate_at_stop
from lmforge.generation.streaming import TextStreamer


@dataclass
class Completion:
    text: str  # the generated text only (no prompt), cut before EOS / the first stop string
    finish_reason: str  # "stop" (EOS or a stop string) | "length" (max_new_tokens reached)
    prompt_tokens: int
    completion_tokens: int


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids with padding on the left, and the attention mask (1 = real token): every row ends at T-1,
    so one next-token position serves the whole batch."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


class TextGenerator:
    """A loaded decoder or encoder-decoder + its tokenizer (+ an optional draft model for speculative decoding)."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, draft_model: nn.Module | None = None) -> None:
        self.model, self.tokenizer, self.draft_model = model, tokenizer, draft_model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context(self) -> int | None:
        """Tokens the model's positions cover (None: unbounded, e.g. ALiBi or T5). Generation may run past it
        (the decoding core then slides a window), but a server or chat history should stay inside it."""
        from lmforge.generation import context_limit

        return context_limit(self.model)

    @property
    def encoder_decoder(self) -> bool:
        return getattr(self.model.config, "kind", "decoder") == "encoder_decoder"

    def encode(self, prompt: str) -> list[int]:
        """An empty prompt starts after a document break (EOS), as every training document does."""
        return self.tokenizer.encode(prompt) or [self.tokenizer.eos_id]

    def complete(
        self,
        prompts: Sequence[str | Sequence[int]],
        *,
        max_new_tokens: int,
        stop: str | Sequence[str] | None = None,
        eos_token_ids: Sequence[int] = (),
        on_text: Callable[[int, str], None] | None = None,
        seed: int | None = None,
        **sampling: Any,
    ) -> list[Completion]:
        """Complete each prompt (text or ids); `on_text(row, delta)` streams the text as it is decided.

        `sampling` goes to `lmforge.generation.generate` (temperature, top_k, top_p, min_p,
        repetition_penalty, num_beams, length_penalty, num_draft_tokens). `eos_token_ids` are extra ids
        that end a row besides the tokenizer's EOS (e.g. ChatML's `<|im_end|>`).
        """
        from lmforge.generation import generate

        if not prompts:
            return []
        if self.draft_model is not None and len(prompts) > 1:  # speculative decoding runs one sequence at a time
            return [c for i, p in enumerate(prompts) for c in self.complete(
                [p], max_new_tokens=max_new_tokens, stop=stop, eos_token_ids=eos_token_ids, seed=seed,
                on_text=None if on_text is None else (lambda _row, text, i=i: on_text(i, text)), **sampling)]
        stops = normalize_stop(stop)
        rows = [self.encode(p) if isinstance(p, str) else list(p) or [self.tokenizer.eos_id] for p in prompts]
        ids, mask = left_pad(rows, self.tokenizer.pad_id, self.device)
        eos_ids = list(dict.fromkeys([self.tokenizer.eos_id, *eos_token_ids]))
        # generated tokens start after the padded prompt; an encoder-decoder returns decoder tokens after its start token
        start = 1 if self.encoder_decoder else ids.size(1)
        streamer = TextStreamer(self.tokenizer, on_text, stops) if on_text is not None else None
        generator = torch.Generator(device=self.device).manual_seed(int(seed)) if seed is not None else None
        if self.draft_model is not None:
            sampling["draft_model"] = self.draft_model
        out = generate(
            self.model, ids, max_new_tokens=int(max_new_tokens), attention_mask=mask, eos_token_id=eos_ids,
            pad_token_id=self.tokenizer.pad_id, stop_criteria=StopOnStrings(self.tokenizer, stops, start) if stops else None,
            generator=generator, streamer=streamer, **sampling,
        )
        if streamer is not None:
            streamer.end()
        return [self._completion(row[start:], len(prompt), stops, set(eos_ids)) for row, prompt in zip(out.tolist(), rows)]

    def _completion(self, generated: list[int], prompt_len: int, stops: list[str], eos_ids: set[int]) -> Completion:
        end = next((i for i, tok in enumerate(generated) if tok in eos_ids), None)
        kept = generated if end is None else generated[:end]
        text, hit = truncate_at_stop(self.tokenizer.decode(kept), stops)
        pad = self.tokenizer.pad_id
        n_tokens = (end + 1) if end is not None else sum(1 for tok in generated if tok != pad)
        return Completion(text, "stop" if end is not None or hit else "length", prompt_len, n_tokens)
