"""`train.py model=<family> objective=<objective>` for every supported pair: it trains, and val loss falls."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from conftest import train_in_process

pytestmark = pytest.mark.slow

PAIRS = [
    ("gpt-nano", "clm", []),
    ("gpt-nano", "prefix_lm", []),
    ("gpt-nano", "span", []),
    ("gpt-nano", "clm", ["model.position=alibi"]),
    ("llama-tiny", "clm", []),
    ("llama-tiny", "prefix_lm", []),
    ("llama-tiny", "span", []),
    ("mixtral-tiny", "clm", []),
    ("bert-tiny", "mlm", []),
    ("t5-tiny", "span", []),
]


def val_losses(run_dir: Path) -> dict[int, float]:
    with (run_dir / "csv" / "metrics.csv").open() as fh:
        return {int(r["step"]): float(r["val/loss"]) for r in csv.DictReader(fh) if r.get("val/loss")}


@pytest.mark.parametrize(("model", "objective", "extra"), PAIRS, ids=[f"{m}-{o}{'-' + e[0] if e else ''}" for m, o, e in PAIRS])
def test_pair_trains_and_val_loss_falls(model: str, objective: str, extra: list[str], cache_dir: Path, tmp_path: Path):
    train_in_process(  # in-process: the same config and code path as train.py, without 5 s of imports per pair
        ["debug=fast", f"model={model}", f"objective={objective}", *extra, "trainer.max_steps=10", "trainer.val_check_interval=5",
         "optimizer.lr=3e-3", f"paths.cache_dir={cache_dir}", "callbacks.progress_bar=null"],
        tmp_path,
    )
    losses = val_losses(tmp_path)
    assert len(losses) == 2, losses  # CSV steps are 0-based: validations after steps 5 and 10
    first, last = (losses[k] for k in sorted(losses))
    assert all(math.isfinite(v) for v in losses.values())
    assert last < first, f"val/loss did not fall: {losses}"
    if model.startswith("mixtral"):
        with (tmp_path / "csv" / "metrics.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        assert any(r.get("moe/aux_loss") for r in rows) and any(r.get("moe/expert_load/e0") for r in rows)
