"""Prompts for on-policy stages (PPO, GRPO): the policy completes them, a reward scores the completions.

Prompts are rendered as for SFT (chatml: through `<|im_start|>assistant\\n`; plain: prompt + "\\n"), so the
completion starts where a SFT response would. Batch: `input_ids` (B, P) LEFT-padded (every row ends at the
last column, where generation continues), `attention_mask` (B, P) 1 = real token, `prompts` (list[str], the
prompt as plain text) and `metadata` (list[dict], the record's other fields, e.g. `next_speaker`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lmforge.data.examples import RecordsDataModule, padded_width
from lmforge.data.records import prompt_text
from lmforge.errors import ConfigError


@dataclass(frozen=True)
class PromptItem:
    ids: tuple[int, ...]
    prompt: str
    metadata: dict[str, Any] = field(default_factory=dict)


def collate_prompts(batch: Sequence[PromptItem], pad_id: int, multiple: int | None = None, cap: int = 0) -> dict[str, Any]:
    """Left-padded prompts (generation continues from the right edge), `multiple`/`cap` as `padded_width`."""
    width = padded_width(max(len(item.ids) for item in batch), multiple, cap)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, item in enumerate(batch):
        n = len(item.ids)
        ids[i, width - n :] = torch.tensor(item.ids, dtype=torch.long)
        mask[i, width - n :] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "prompts": [b.prompt for b in batch],
        "metadata": [dict(b.metadata) for b in batch],
    }


class PromptDataModule(RecordsDataModule):
    """`source`: {kind: shakespeare|jsonl|hf, ...}; `max_prompt_length`: prompt tokens kept (from the
    right, so
    the assistant header stays; the completion budget is the stage's `max_new_tokens`)."""

    record_kind = "prompts"

    def __init__(
        self,
        max_prompt_length: int = 96,
        **common: Any,  # source, template, system_prompt, batch sizes, seed, ... (RecordsDataModule)
    ) -> None:
        if not isinstance(max_prompt_length, int) or max_prompt_length < 1:
            raise ConfigError(
                "data.max_prompt_length",
                f"must be a positive integer, got {max_prompt_length!r}",
                "set data.max_prompt_length=96",
            )
        super().__init__(**common)
        self.max_prompt_length = max_prompt_length

    def items(self, records: list[dict[str, Any]]) -> list[PromptItem]:
        encoded = self.template().encode_prompts([r["prompt"] for r in records])
        return [
            PromptItem(
                tuple(ids[-self.max_prompt_length :]), prompt_text(r["prompt"]), dict(r.get("metadata") or {})
            )
            for ids, r in zip(encoded, records)
        ]

    def _tokenize(self, split: str, records: list[dict[str, Any]]) -> list[Any]:
        return self.items(records)

    def longest_batch(self) -> int:
        return self.max_prompt_length

    def _collate_fn(self) -> Any:
        return collate_prompts
