"""Objective name (the conf/objective file) → class, so start-up checks can say which objectives fit a family."""

from __future__ import annotations

from importlib import import_module

OBJECTIVES: dict[str, str] = {
    "clm": "lmforge.objectives.clm:CausalLM",
    "prefix_lm": "lmforge.objectives.prefix_lm:PrefixLM",
    "mlm": "lmforge.objectives.mlm:MaskedLM",
    "span": "lmforge.objectives.span:SpanCorruption",
}


def objective_class(path: str) -> type:
    """Import `module:Class` or `module.Class` (a Hydra `_target_`)."""
    module, _, name = path.replace(":", ".").rpartition(".")
    return getattr(import_module(module), name)


def objectives_for(kind: str) -> list[str]:
    """Names of the objectives that train a model of this kind (decoder | encoder | encoder_decoder)."""
    names = []
    for name, path in OBJECTIVES.items():
        try:
            cls = objective_class(path)
        except (ImportError, AttributeError):
            continue
        if kind in cls.supported_kinds:
            names.append(name)
    return names
