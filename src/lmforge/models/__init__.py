"""Model families as plain nn.Modules, built from a config with `build`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from lmforge.errors import ConfigError
from lmforge.models.config import GPTConfig
from lmforge.models.gpt import GPT
from lmforge.models.registry import FAMILIES

__all__ = ["GPT", "GPTConfig", "build", "config_from"]


def config_from(model_cfg: Any, vocab_size: int | None = None) -> Any:
    """Turn a Hydra node / dict / dataclass into the family's typed config, filling vocab_size if null."""
    if isinstance(model_cfg, DictConfig):
        model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
    if isinstance(model_cfg, Mapping):
        values = dict(model_cfg)
        family = values.get("family", "gpt")
        if family not in FAMILIES:
            raise ConfigError("model.family", f"unknown family {family!r}", f"use one of {sorted(FAMILIES)}")
        if values.get("vocab_size") is None:
            values["vocab_size"] = vocab_size
        return FAMILIES[family][0].from_dict(values)
    if model_cfg.vocab_size is None and vocab_size is not None:
        model_cfg.vocab_size = vocab_size
    return model_cfg


def build(model_cfg: Any, vocab_size: int | None = None) -> nn.Module:
    """Build a model from its config (Hydra node, dict or dataclass). `vocab_size` fills a null vocab."""
    cfg = config_from(model_cfg, vocab_size)
    model_cls = FAMILIES[cfg.family][1]
    return model_cls(cfg)
