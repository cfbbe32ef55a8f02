"""Stop strings: end a row when its generated text contains one of them, then cut the text there.

A stop string is text, not a token: "\\n\\n" or "<|im_end|>" may be spelt by many different token splits,
so matching ids would miss some. `StopOnStrings` is a `stop_criteria` for `lmforge.generation.generate`
that decodes only the tail of each row's *generated* tokens (never the prompt, which may itself contain
the string) - enough tokens to spell the longest stop string, since a byte-level token is at least one byte.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lmforge.errors import ConfigError

if TYPE_CHECKING:
    from lmforge.data.tokenizer import Tokenizer


def normalize_stop(stop: str | Sequence[str] | None, key: str = "stop") -> list[str]:
    """OpenAI and Hydra both allow one string or a list; empty strings would stop every row at once."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) for s in stops):
        raise ConfigError(key, f"must be a string or a list of strings, got {stop!r}", f'pass e.g. {key}=["\\n\\n"]')
    if any(s == "" for s in stops):
        raise ConfigError(key, "contains an empty string, which would stop every row immediately", "remove the empty string")
    return list(dict.fromkeys(stops))


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """`\\n`, `\\t`, `\\r`, `\\\\` typed on a command line -> the characters: Hydra keeps backslashes literally,
    and a newline is the stop string people want most."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


def truncate_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` up to (excluding) the earliest stop string, and whether one was found (OpenAI semantics)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class StopOnStrings:
    """`stop_criteria(sequences (B, T)) -> (B,) bool`: rows whose generated tail contains a stop string."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str], prompt_len: int) -> None:
        self.tokenizer = tokenizer
        self.stops = normalize_stop(stops)
        self.prompt_len = int(prompt_len)  # padded prompt width: generated tokens start here in every row
        # +2: a partial UTF-8 character at the window's start, and a token that only completes a char at the end
        self.window = max((len(s.encode("utf-8")) for s in self.stops), default=0) + 2

    def __call__(self, sequences: torch.Tensor) -> torch.Tensor:
        hit = torch.zeros(sequences.size(0), dtype=torch.bool, device=sequences.device)
        if not self.stops:
            return hit
        start = max(self.prompt_len, sequences.size(1) - self.window)
        tails = sequences[:, start:].tolist()
        for row, ids in enumerate(tails):
            text = self.tokenizer.decode(ids)
            hit[row] = any(s in text for s in self.stops)
        return hit
