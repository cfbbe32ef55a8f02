"""Preference data (reward model, DPO): a prompt with a chosen and a rejected completion.

Prompts are rendered exactly as for SFT, so a SFT model is in-distribution. Batch (right-padded, chosen and
rejected to the same width T so a stage can run them as one (2B, T) forward):
`chosen_input_ids`, `chosen_targets`, `chosen_attention_mask`, `rejected_input_ids`, `rejected_targets`,
`rejected_attention_mask`. Targets are -100 except on the completion and its end tokens; both completions
keep the same (left-truncated) prompt tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lmforge.data.examples import (
    Example,
    RecordsDataModule,
    build_pair,
    check_max_length,
    pad_examples,
    padded_width,
)


def collate_pairs(
    batch: Sequence[tuple[Example, Example, int]], pad_id: int, multiple: int | None = None, cap: int = 0
) -> dict[str, torch.Tensor]:
    """Pairs → the batch dict; `index` is each pair's position in its split (keys for cached reference log-probs)."""
    width = padded_width(max(max(len(item[0]), len(item[1])) for item in batch), multiple, cap)
    out = {}
    for name, side in (("chosen", 0), ("rejected", 1)):
        for key, value in pad_examples([item[side] for item in batch], pad_id, width).items():
            out[f"{name}_{key}"] = value
    out["index"] = torch.tensor([item[2] for item in batch], dtype=torch.long)
    return out


class PreferenceDataModule(RecordsDataModule):
    """`source`: {kind: shakespeare|jsonl|hf, ...} (shakespeare: rejected = the next speech, words shuffled);
    `max_length`: input positions per completion sequence (prompt + completion + end)."""

    record_kind = "preference"

    def __init__(
        self,
        max_length: int = 128,
        **common: Any,  # source, template, system_prompt, batch sizes, seed, ... (RecordsDataModule)
    ) -> None:
        check_max_length(max_length, [0, 0])
        super().__init__(**common)
        self.max_length = max_length

    def pairs(self, records: list[dict[str, Any]]) -> list[tuple[Example, Example]]:
        template = self.template()
        check_max_length(self.max_length, template.end_ids)
        prompts = template.encode_prompts([r["prompt"] for r in records])
        chosen = template.encode_completions([r["chosen"] for r in records])
        rejected = template.encode_completions([r["rejected"] for r in records])
        return [
            build_pair(p, c, r, template.end_ids, self.max_length)
            for p, c, r in zip(prompts, chosen, rejected)
        ]

    def _tokenize(self, split: str, records: list[dict[str, Any]]) -> list[Any]:
        return [(chosen, rejected, i) for i, (chosen, rejected) in enumerate(self.pairs(records))]

    def _collate_fn(self) -> Any:
        return collate_pairs
