"""Family name → config class and model class, as import paths so that a family is imported when used.

A new family registers here and nowhere else (plus its HF converter in `lmforge.interop`).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from torch import nn

from lmforge.errors import ConfigError

FAMILIES: dict[str, tuple[str, str]] = {
    "gpt": ("lmforge.models.config:GPTConfig", "lmforge.models.gpt:GPT"),
    "llama": ("lmforge.models.llama:LlamaConfig", "lmforge.models.llama:Llama"),
    "mixtral": ("lmforge.models.mixtral:MixtralConfig", "lmforge.models.mixtral:Mixtral"),
    "bert": ("lmforge.models.bert:BertConfig", "lmforge.models.bert:Bert"),
    "t5": ("lmforge.models.t5:T5Config", "lmforge.models.t5:T5"),
}


def _load(path: str) -> Any:
    module, name = path.split(":")
    return getattr(import_module(module), name)


def family_classes(family: str) -> tuple[type, type[nn.Module]]:
    """(config class, model class) of a family; a clear error for an unknown name."""
    if family not in FAMILIES:
        raise ConfigError("model.family", f"unknown family {family!r}", f"use one of {sorted(FAMILIES)}")
    config_path, model_path = FAMILIES[family]
    return _load(config_path), _load(model_path)
