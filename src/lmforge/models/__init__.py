"""Model families as plain nn.Modules, built from a config with `build`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from lmforge.models.config import GPTConfig
from lmforge.models.gpt import GPT
from lmforge.models.registry import FAMILIES, family_classes

__all__ = ["FAMILIES", "GPT", "GPTConfig", "build", "config_from", "family_classes"]


def config_from(model_cfg: Any, vocab_size: int | None = None) -> Any:
    """Turn a Hydra node / dict / dataclass into the family's typed config, filling vocab_size if null."""
    if isinstance(model_cfg, DictConfig):
        model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
    if isinstance(model_cfg, Mapping):
        values = dict(model_cfg)
        config_cls, _ = family_classes(values.get("family", "gpt"))
        if values.get("vocab_size") is None:
            values["vocab_size"] = vocab_size
        return config_cls.from_dict(values)
    if model_cfg.vocab_size is None and vocab_size is not None:
        model_cfg.vocab_size = vocab_size
    return model_cfg


def build(model_cfg: Any, vocab_size: int | None = None) -> nn.Module:
    """Build a model from its config (Hydra node, dict or dataclass). `vocab_size` fills a null vocab."""
    cfg = config_from(model_cfg, vocab_size)
    _, model_cls = family_classes(cfg.family)
    return model_cls(cfg)
