"""Token ids arriving one step at a time -> text deltas that are safe to show (stdout, server-sent events).

Two things make naive "decode each new token" wrong: a byte-level token may hold half a UTF-8 character
(decoding it alone gives U+FFFD), and a stop string may arrive over several tokens, so its first half
would already be on screen when the row stops. `TextStreamer` therefore re-decodes each row's generated
ids, emits only text that is complete and cannot be the start of a stop string, and stops emitting at a
stop string. The concatenated deltas equal the final, stop-truncated completion.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from lmforge.generation.stop_strings import normalize_stop, truncate_at_stop

if TYPE_CHECKING:
    from lmforge.data.tokenizer import Tokenizer


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class TextStreamer:
    """A `streamer` for `generate`: called with the (B,) new token ids of each step; `on_text(row, delta)`."""

    def __init__(self, tokenizer: Tokenizer, on_text: Callable[[int, str], None], stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.stops = normalize_stop(stop)
        self.ids: list[list[int]] = []
        self.sent: list[int] = []  # characters of the decoded text already emitted, per row
        self.stopped: list[bool] = []

    def __call__(self, new_tokens: torch.Tensor) -> None:
        new = new_tokens.reshape(-1).tolist()
        if not self.ids:
            self.ids, self.sent, self.stopped = [[] for _ in new], [0] * len(new), [False] * len(new)
        for row, tok in enumerate(new):
            self.ids[row].append(int(tok))
            self._emit(row, final=False)

    def end(self) -> None:
        """Flush what was held back as a possible stop-string prefix (the row ended without one)."""
        for row in range(len(self.ids)):
            self._emit(row, final=True)

    def _emit(self, row: int, final: bool) -> None:
        if self.stopped[row]:
            return
        text = self.tokenizer.decode(self.ids[row])
        text, hit = truncate_at_stop(text, self.stops)
        if hit:
            self.stopped[row] = True
        elif not final:
            if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next byte
                return
            text = text[: len(text) - _held_back(text, self.stops)]
        if len(text) > self.sent[row]:
            self.on_text(row, text[self.sent[row]:])
            self.sent[row] = len(text)
