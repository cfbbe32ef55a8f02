"""task=lm on any split: which splits a datamodule offers, an in-order loader over one, and its metric names.

`eval.py split=train` measures loss / ppl / bpb over every block of the train split (tail included, as
validation reads val); metrics are then named `train/loss`, `train/ppl`, ... and written to
`eval_lm_train.json`, so they never overwrite the val results beside the checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch.utils.data import DataLoader

from lmforge.data.corpus import SPLITS
from lmforge.errors import ConfigError

DEFAULT_SPLIT = "val"


def available_splits(datamodule: Any) -> tuple[str, ...]:
    """Record datamodules (SFT) hold their splits as `records`; text datamodules offer the corpus splits."""
    records = getattr(datamodule, "records", None)
    return tuple(records) if isinstance(records, Mapping) else SPLITS


def check_split(datamodule: Any, split: object) -> str:
    """`split`, or a ConfigError naming the key and the choices when the datamodule has no such split."""
    choices = available_splits(datamodule)
    if split not in choices:
        raise ConfigError(
            "split",
            f"{type(datamodule).__name__} has no split {split!r}; it offers {', '.join(choices)}",
            f"pass split={' or split='.join(choices)} (a dataset's own test split: point the val side at it, "
            "e.g. data.corpus.val_split=test for hf_dataset or data.corpus.val_glob=<test files> for text_files, "
            "then split=val)",
        )
    return str(split)


def split_dataloader(datamodule: Any, split: str) -> DataLoader:
    """Every item of `split` once, in order, unsharded, at the datamodule's validation batch size."""
    return datamodule.ordered_dataloader(check_split(datamodule, split))


def split_metrics(metrics: Mapping[str, float], split: str) -> dict[str, float]:
    """`val/loss` -> `<split>/loss`: the stage logs validation names whatever loader it was given."""
    if split == DEFAULT_SPLIT:
        return dict(metrics)
    return {
        (f"{split}/{k.removeprefix('val/')}" if k.startswith("val/") else k): v for k, v in metrics.items()
    }


def results_task(split: str) -> str:
    """The `eval_<task>.json` name: `lm` for val (as before), `lm_<split>` otherwise."""
    return "lm" if split == DEFAULT_SPLIT else f"lm_{split}"
