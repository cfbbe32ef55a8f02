"""Supervised fine-tuning data: (prompt, response) pairs, loss on the response and its end tokens only.

Batch (right-padded): `input_ids` (B, T), `targets` (B, T) next-token targets with -100 on the prompt, the
template's user turn and assistant header and on padding, `attention_mask` (B, T) 1 = real token.
With `packing`, examples are concatenated into rows of `max_length` (never split across rows) and the
batch also holds `position_ids` restarting per example and a (B, 1, T, T) same-example causal mask.
See `examples.py` for the template, the end tokens and truncation.
"""

from __future__ import annotations

from typing import Any

from lmforge.data.examples import (
    Example,
    RecordsDataModule,
    build_example,
    check_max_length,
    collate_examples,
    collate_packed,
    pack,
)


class SFTDataModule(RecordsDataModule):
    """`source`: {kind: shakespeare|jsonl|hf, ...} (see `records.load_source`); `template`: chatml | plain;
    `max_length`: input positions per example (per row when packing)."""

    record_kind = "sft"

    def __init__(
        self,
        max_length: int = 128,
        packing: bool = False,
        **common: Any,  # source, template, system_prompt, batch sizes, seed, ... (RecordsDataModule)
    ) -> None:
        check_max_length(max_length, [0, 0])
        super().__init__(**common)
        self.max_length, self.packing = max_length, bool(packing)

    def examples(self, records: list[dict[str, Any]]) -> list[Example]:
        template = self.template()
        check_max_length(self.max_length, template.end_ids)
        prompts = template.encode_prompts([r["prompt"] for r in records])
        responses = template.encode_completions([r["response"] for r in records])
        return [build_example(p, c, template.end_ids, self.max_length) for p, c in zip(prompts, responses)]

    def _tokenize(self, split: str, records: list[dict[str, Any]]) -> list[Any]:
        examples = self.examples(records)
        return pack(examples, self.max_length) if self.packing else examples

    def _collate_fn(self) -> Any:
        return collate_packed if self.packing else collate_examples
