"""ChatML: the one chat template lmforge renders, for interactive generation, serving and SFT data.

    <|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n

ChatML is role-agnostic and marks every turn boundary with a token pair, so one renderer serves any
conversation and the model learns (in SFT) to end its turn with `<|im_end|>`, which generation stops at.
A tokenizer that has the markers as special tokens (`add_special_tokens(CHATML_SPECIALS)`, as SFT does)
gets them as single ids; a base model's tokenizer without them spells them out as text, and generation
then stops on the text `<|im_end|>` instead of its id.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from lmforge.errors import DataError

if TYPE_CHECKING:
    from lmforge.data.tokenizer import Tokenizer

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_SPECIALS = {"im_start": IM_START, "im_end": IM_END}  # roles for Tokenizer.add_special_tokens
# The same template in Jinja, for tokenizer_config.json: HF `apply_chat_template` and vLLM's chat API render
# exactly what `render_chatml` does (tested).
CHATML_JINJA = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

Message = Mapping[str, str]


def _check(messages: Sequence[Message]) -> None:
    """A malformed turn must fail here with its index, not render into a silently wrong prompt."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise DataError(f"chat messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}. Fix: pass [{{'role': 'user', 'content': '...'}}]")
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise DataError(f"chat message {i} must be a dict with string 'role' and 'content', got {msg!r}. Fix: pass {{'role': 'user', 'content': '...'}}")
        role = msg["role"]
        if not role or "\n" in role or IM_START in role or IM_END in role:
            raise DataError(f"chat message {i}: role {role!r} must be one non-empty line without ChatML markers. Fix: use e.g. 'system', 'user' or 'assistant'")


def render_chatml(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """The conversation as ChatML text; with `add_generation_prompt`, an open assistant turn to complete."""
    _check(messages)
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + f"{IM_START}assistant\n" if add_generation_prompt else text


def encode_chatml(tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `render_chatml(...)`: the markers as single ids where the tokenizer has them.

    Text is never parsed for markers (the tokenizer encodes specials in text as text), so a user typing
    `<|im_end|>` cannot close a turn: only the template inserts marker ids.
    """
    text = render_chatml(messages, add_generation_prompt)
    start_id, end_id = (tokenizer.hf.token_to_id(t) for t in (IM_START, IM_END))
    if start_id is None or end_id is None:
        return tokenizer.encode(text)
    ids: list[int] = []
    for m in messages:
        ids += [start_id, *tokenizer.encode(f"{m['role']}\n{m['content']}"), end_id, *tokenizer.encode("\n")]
    if add_generation_prompt:
        ids += [start_id, *tokenizer.encode("assistant\n")]
    return ids


def im_end_id(tokenizer: Tokenizer) -> int | None:
    """The id that ends an assistant turn, or None when the tokenizer spells `<|im_end|>` as text."""
    return tokenizer.hf.token_to_id(IM_END)
