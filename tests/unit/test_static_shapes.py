"""A model compiled for static shapes (tensor parallelism) and padded post-training batches: unbounded lengths get a
warning naming `data.pad_to_multiple_of`, bounded ones a dynamo recompile limit that fits every shape they can take."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from lmforge.data.chat import CHATML_SPECIALS
from lmforge.data.prompts import PromptDataModule
from lmforge.data.sft import SFTDataModule
from lmforge.data.tokenizer import ByteTokenizerSpec
from lmforge.stages.static_shapes import fit_recompile_limit, suggested_multiple


@pytest.fixture
def source(tmp_path: Path) -> dict:
    rows = "".join(f'{{"prompt": "p{i}", "response": "r{i}"}}\n' for i in range(20))
    (tmp_path / "d.jsonl").write_text(rows)
    return {"kind": "jsonl", "train": str(tmp_path / "d.jsonl"), "val": str(tmp_path / "d.jsonl")}


@pytest.fixture
def dynamo_limit():
    before = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = 8
    yield
    torch._dynamo.config.recompile_limit = before


def test_unbounded_lengths_are_warned_with_the_key_and_a_value(source, dynamo_limit, caplog) -> None:
    dm = SFTDataModule(source=source, max_length=2048)
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        assert fit_recompile_limit(dm) is None
    assert "set data.pad_to_multiple_of=512" in caplog.text and torch._dynamo.config.recompile_limit == 8
    for longest in (10, 100, 130, 2048, 4097):
        multiple = suggested_multiple(longest)
        assert multiple % 8 == 0 and -(-longest // multiple) <= 4, (longest, multiple)
    assert suggested_multiple(2048) == 512 and suggested_multiple(130) == 40


def test_bounded_lengths_raise_the_recompile_limit_to_fit_them(source, dynamo_limit, caplog) -> None:
    sft = SFTDataModule(source=source, max_length=2048, pad_to_multiple_of=256)
    prompts = PromptDataModule(source=source, max_prompt_length=100, pad_to_multiple_of=64)
    assert sft.batch_lengths() == 8 and prompts.batch_lengths() == 2 and sft.longest_batch() == 2048
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        assert fit_recompile_limit(prompts) == {"batch_lengths": 2, "recompile_limit": 8}  # 6 shapes fit in 8
        assert fit_recompile_limit(sft) == {"batch_lengths": 8, "recompile_limit": 24}  # train, val, last val batch
        assert fit_recompile_limit(prompts) == {"batch_lengths": 2, "recompile_limit": 24}  # never lowered
    assert not caplog.text
    assert fit_recompile_limit(object()) is None  # packed pre-training blocks: one shape, nothing to do


def test_a_padded_batch_never_exceeds_the_cap(source) -> None:
    tok = ByteTokenizerSpec().train(iter([""]))
    tok.add_special_tokens(CHATML_SPECIALS)
    dm = PromptDataModule(source=source, max_prompt_length=20, pad_to_multiple_of=16)
    dm.set_tokenizer(tok)
    assert {b["input_ids"].size(1) for b in dm.val_dataloader()} == {20}  # 16 < longest prompt, 32 > cap
