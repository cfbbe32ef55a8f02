"""Print the composed config as a rich tree and save it: the first thing to check when a run misbehaves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import rich
import rich.syntax
import rich.tree
from omegaconf import DictConfig, OmegaConf

from lmforge.utils.io import atomic_write_text

FIRST = ("data", "tokenizer", "model", "objective", "stage", "optimizer", "scheduler", "trainer", "strategy", "callbacks", "logger", "paths")


def print_config_tree(cfg: DictConfig, order: Sequence[str] = FIRST, save_to: str | Path | None = None) -> None:
    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order]
    for key in keys:
        branch = tree.add(str(key), style="bold", guide_style="dim")
        node = cfg[key]
        text = OmegaConf.to_yaml(node, resolve=True) if isinstance(node, DictConfig) else str(node)
        branch.add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark"))
    rich.print(tree)
    if save_to is not None:
        atomic_write_text(save_to, OmegaConf.to_yaml(cfg, resolve=True))
