"""Parameter-efficient fine-tuning: LoRA (through the `peft` library), bottleneck adapters and prefix tuning
on lmforge's own models. `apply_peft(model, cfg)` (conf/peft/*.yaml) freezes the base and adds the method's
parameters; the rest of the API saves, loads, merges and switches them off. See apply.py."""

from __future__ import annotations

from lmforge.peft.apply import (
    METHODS,
    PeftReport,
    PeftState,
    adapters_disabled,
    apply_peft,
    load_adapter,
    load_trainable_state_dict,
    merge_peft,
    normalize_cfg,
    peft_state,
    remove_peft,
    save_adapter,
    trainable_parameters,
    trainable_state_dict,
)

__all__ = [
    "METHODS",
    "PeftReport",
    "PeftState",
    "adapters_disabled",
    "apply_peft",
    "load_adapter",
    "load_trainable_state_dict",
    "merge_peft",
    "normalize_cfg",
    "peft_state",
    "remove_peft",
    "save_adapter",
    "trainable_parameters",
    "trainable_state_dict",
]
