"""The contract each family's Hugging Face converter fulfils, and the lazy `transformers` import.

A converter is four pure functions (configs both ways, state dicts both ways) plus the HF class name that
`to_hf` instantiates; `lmforge.interop.hf` does the rest (building, loading, checking keys, saving).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lmforge.errors import LmforgeError

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class HFConverter:
    family: str  # lmforge family name (model.family)
    model_types: tuple[str, ...]  # HF `config.model_type` values this converter reads
    hf_class: str  # transformers class `to_hf` builds, e.g. "LlamaForCausalLM"
    config_to_hf: Callable[[Any], Any]  # our config -> transformers PretrainedConfig
    config_from_hf: Callable[[Any], Any]  # PretrainedConfig -> our config (ConfigError for what we can't compute)
    weights_to_hf: Callable[[StateDict, Any], StateDict]  # our state dict -> HF's (tied copies may be omitted)
    weights_from_hf: Callable[[StateDict, Any], StateDict]  # HF state dict -> ours (complete, for strict loading)
    ignored_hf_keys: tuple[str, ...] = ()  # HF keys with no lmforge counterpart (e.g. unused pooler) - suffixes
    prepare_hf: Callable[[Any, Any], None] | None = None  # (fresh HF model, our config): fix-ups before weights load
    # HF config -> transformers class name, where one family maps to several (llama: Llama or Mistral); None: hf_class
    hf_class_for: Callable[[Any], str] | None = None

    def hf_class_name(self, hf_cfg: Any) -> str:
        """The transformers class that builds / loads a model of this HF config."""
        return self.hf_class_for(hf_cfg) if self.hf_class_for is not None else self.hf_class


def transformers_module() -> Any:
    """Import transformers on first use, so lmforge itself does not depend on it."""
    from lmforge.parallel.zero_checkpoint import name_deepspeed_accelerator

    name_deepspeed_accelerator()  # transformers imports deepspeed (when installed) in save_pretrained
    try:
        import transformers
    except ImportError as e:
        raise LmforgeError(
            "Hugging Face interop needs the `transformers` package, which is not installed. "
            "Fix: pip install transformers (or pip install 'lmforge[dev]')"
        ) from e
    return transformers
