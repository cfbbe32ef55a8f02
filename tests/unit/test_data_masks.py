"""Document masks of packed blocks: no attention across documents, positions restart, models see each
document exactly as if it were alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.data.packed import PackedBlocks, collate_document_blocks, document_positions
from lmforge.models import build
from lmforge.objectives.clm import CausalLM

EOS, PAD = 0, 99


def packed_stream(doc_lengths: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of documents joined by EOS, and the document each token belongs to (EOS opens the next one)."""
    rng = np.random.default_rng(seed)
    tokens, owner = [], []
    for d, n in enumerate(doc_lengths):
        if d:
            tokens.append(EOS)
            owner.append(d)
        tokens += rng.integers(1, 50, n).tolist()
        owner += [d] * n
    tokens.append(EOS)
    owner.append(len(doc_lengths))
    return np.array(tokens, dtype=np.uint16), np.array(owner)


def test_document_positions_restart_at_eos() -> None:
    segment, position = document_positions(np.array([5, 6, EOS, 7, 8, 9, EOS, EOS, 4]), EOS)
    assert segment.tolist() == [0, 0, 1, 1, 1, 1, 2, 3, 3]
    assert position.tolist() == [0, 1, 0, 1, 2, 3, 0, 0, 1]


@pytest.mark.parametrize("block", [4, 16, 33])
def test_no_block_attends_across_documents(block: int) -> None:
    tokens, owner = packed_stream([3, 40, 1, 7, 25, 2, 60, 9])
    ds = PackedBlocks(tokens, block, PAD, include_tail=True, eos_id=EOS)
    batch = collate_document_blocks([ds[i] for i in range(len(ds))])
    mask = batch["attention_mask"]
    assert mask.shape == (len(ds), 1, block, block) and mask.dtype == torch.bool
    for b in range(len(ds)):
        start = b * block
        n = min(block, tokens.size - 1 - start)  # real (non-pad) inputs of this block
        docs = owner[start : start + n]
        m = mask[b, 0, :n, :n].numpy()
        i, j = np.nonzero(m)
        assert (j <= i).all()  # causal
        assert (docs[i] == docs[j]).all()  # never across a document boundary
        same = (docs[:, None] == docs[None, :]) & np.tri(n, dtype=bool)
        np.testing.assert_array_equal(m, same)  # and everything allowed inside a document
        pos = batch["position_ids"][b, :n].numpy()
        first = {d: np.argmax(docs == d) for d in np.unique(docs)}
        np.testing.assert_array_equal(pos, np.arange(n) - np.array([first[d] for d in docs]))
    assert "segment_ids" not in batch


def test_blocks_without_masks_are_unchanged() -> None:
    tokens, _ = packed_stream([5, 9, 3])
    plain, masked = PackedBlocks(tokens, 4, PAD), PackedBlocks(tokens, 4, PAD, eos_id=EOS)
    for i in range(len(plain)):
        assert set(plain[i]) == {"input_ids", "targets"}
        assert torch.equal(plain[i]["input_ids"], masked[i]["input_ids"]) and torch.equal(plain[i]["targets"], masked[i]["targets"])


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_model_sees_each_packed_document_as_if_alone(family: str) -> None:
    """Logits of a document inside a masked packed block == logits of that document run on its own."""
    torch.manual_seed(0)
    cfg = {"family": family, "n_layer": 2, "n_head": 2, "n_embd": 32, "max_seq_len": 64, "vocab_size": 64, "dropout": 0.0}
    if family == "llama":
        cfg.update(n_kv_head=1, intermediate_size=64)
    model = build(cfg).eval()
    tokens, _ = packed_stream([5, 11, 2, 8])
    block = tokens.size - 1
    batch = collate_document_blocks([PackedBlocks(tokens, block, PAD, eos_id=EOS)[0]])
    with torch.no_grad():
        packed = model(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
        seg, _ = document_positions(batch["input_ids"][0].numpy(), EOS)
        for s in np.unique(seg):
            idx = torch.from_numpy(np.nonzero(seg == s)[0])
            alone = model(batch["input_ids"][:, idx])
            torch.testing.assert_close(packed[:, idx], alone, atol=1e-5, rtol=1e-5)
        # and the clm objective passes both tensors through
        out = CausalLM()(model, batch)
        ref = torch.nn.functional.cross_entropy(packed[0], batch["targets"][0])
        torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)
