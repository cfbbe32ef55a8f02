"""Loss / perplexity / bits-per-byte: hand-computed values, then exact values through a Lightning validate."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lmforge.data.packed import IGNORE_INDEX, PackedBlocks
from lmforge.metrics import bits_per_byte, mean_loss, perplexity
from lmforge.objectives.clm import CausalLM
from lmforge.stages.base import LMStage

V = 40
BLOCK = 8


def t(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


# --- metric functions -------------------------------------------------------------------------------


def test_mean_loss() -> None:
    assert mean_loss(t(6.0), t(4.0)).item() == pytest.approx(1.5)
    assert mean_loss(t(0.0), t(10.0)).item() == 0.0
    assert mean_loss(t(3.0), t(0.0)).item() == pytest.approx(3.0)  # no tokens: clamp, no division by zero


def test_perplexity() -> None:
    assert perplexity(t(6.0), t(4.0)).item() == pytest.approx(math.exp(1.5))
    assert perplexity(t(0.0), t(7.0)).item() == pytest.approx(1.0)
    # uniform over 50 symbols: n * ln 50 summed nll -> ppl 50
    assert perplexity(t(13 * math.log(50)), t(13.0)).item() == pytest.approx(50.0)


def test_bits_per_byte() -> None:
    # 10 bits of information (10 ln 2 nats) over 5 bytes -> 2 bits per byte
    assert bits_per_byte(t(10 * math.log(2)), t(5.0)).item() == pytest.approx(2.0)
    # 8 tokens, uniform over 256 -> 8 bits each; 16 bytes -> 4 bits/byte
    assert bits_per_byte(t(8 * math.log(256)), t(16.0)).item() == pytest.approx(4.0)
    assert bits_per_byte(t(1.0), t(0.0)).item() == pytest.approx(1 / math.log(2))
    # works on the float32 SumMetric outputs too
    out = bits_per_byte(torch.tensor(3 * math.log(2), dtype=torch.float32), torch.tensor(3.0))
    assert out.dtype == torch.float32 and out.item() == pytest.approx(1.0, rel=1e-6)


# --- through the stage ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, V, size=61).astype(np.uint16)  # 60 targets -> 8 blocks of 8, the last half padding


@pytest.fixture(scope="module")
def token_bytes() -> torch.Tensor:
    b = (torch.arange(V) % 4) + 1  # 1..4 bytes
    b[:3] = 0  # specials
    return b.long()


def _stage(token_bytes: torch.Tensor | None) -> LMStage:
    torch.manual_seed(0)
    stage = LMStage(
        model_cfg={"n_layer": 1, "n_head": 2, "n_embd": 16, "max_seq_len": 16, "vocab_size": V},
        objective=CausalLM(),
        token_bytes=token_bytes,
    )
    stage.configure_model()
    return stage


def _validate(stage: LMStage, tokens: np.ndarray, tmp_path: Path, batch_size: int = 3) -> dict[str, float]:
    ds = PackedBlocks(tokens, BLOCK, pad_id=0, include_tail=True)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False)
    assert len(loader) >= 2
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (results,) = trainer.validate(stage, dataloaders=loader, verbose=False)
    return results


def test_uniform_model_exact_metrics(tokens: np.ndarray, token_bytes: torch.Tensor, tmp_path: Path) -> None:
    stage = _stage(token_bytes)
    with torch.no_grad():
        stage.model.wte.weight.zero_()  # tied: also the lm_head -> all logits 0 -> uniform
    assert stage.model.lm_head.weight is stage.model.wte.weight

    res = _validate(stage, tokens, tmp_path)
    n_targets = tokens.size - 1
    target_bytes = int(token_bytes[torch.from_numpy(tokens[1:].astype(np.int64))].sum())
    assert target_bytes > 0
    assert res["val/tokens"] == n_targets
    assert res["val/loss"] == pytest.approx(math.log(V), abs=1e-5)
    assert res["val/ppl"] == pytest.approx(V, abs=1e-3)
    assert res["val/bpb"] == pytest.approx(n_targets * math.log2(V) / target_bytes, abs=1e-5)


def test_metrics_are_token_weighted_not_batch_mean(tokens: np.ndarray, token_bytes: torch.Tensor, tmp_path: Path) -> None:
    """Random weights, unequal batches (last one partly padded): val/loss is the mean over all targets."""
    stage = _stage(token_bytes)
    ds = PackedBlocks(tokens, BLOCK, pad_id=0, include_tail=True)
    inputs = torch.stack([ds[i]["input_ids"] for i in range(len(ds))])
    targets = torch.stack([ds[i]["targets"] for i in range(len(ds))])
    with torch.no_grad():
        logits = stage.model(inputs).float()
    nll = F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=IGNORE_INDEX, reduction="sum").item()
    n = int((targets != IGNORE_INDEX).sum())
    assert n == tokens.size - 1

    res = _validate(stage, tokens, tmp_path, batch_size=3)  # batches of 3, 3, 2 blocks; last has 4 padded targets
    assert res["val/tokens"] == n
    assert res["val/loss"] == pytest.approx(nll / n, abs=1e-5)
    assert res["val/ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    target_bytes = int(token_bytes[targets[targets != IGNORE_INDEX]].sum())
    assert res["val/bpb"] == pytest.approx(nll / math.log(2) / target_bytes, abs=1e-5)
    # a mean of per-batch means would differ here (the batches hold 24, 24 and 12 targets)
    per_batch = [
        F.cross_entropy(logits[lo : lo + 3].reshape(-1, V), targets[lo : lo + 3].reshape(-1), ignore_index=IGNORE_INDEX).item()
        for lo in range(0, len(ds), 3)
    ]
    assert abs(sum(per_batch) / len(per_batch) - nll / n) > 1e-4  # 10x the tolerance above


def test_validate_twice_resets_sums(tokens: np.ndarray, token_bytes: torch.Tensor, tmp_path: Path) -> None:
    stage = _stage(token_bytes)
    first = _validate(stage, tokens, tmp_path)
    second = _validate(stage, tokens, tmp_path)
    assert second["val/tokens"] == first["val/tokens"] == tokens.size - 1
    assert second["val/loss"] == pytest.approx(first["val/loss"], rel=1e-6)


def test_no_token_bytes_means_no_bpb(tokens: np.ndarray, tmp_path: Path) -> None:
    stage = _stage(None)
    with torch.no_grad():
        stage.model.wte.weight.zero_()
    res = _validate(stage, tokens, tmp_path)
    assert "val/bpb" not in res
    assert res["val/loss"] == pytest.approx(math.log(V), abs=1e-5)
