"""Hugging Face `transformers` <-> lmforge, for every family: configs, weights, and HF directories on disk.

`from_hf(hf_model)` and `to_hf(model)` dispatch on the family (ours) or `config.model_type` (HF's) to a
converter module (`hf_gpt2`, `hf_llama`, ...), each of which is a key map plus config translation.
transformers is an optional dependency: it is imported inside the functions, never at module import.
"""

from __future__ import annotations

import os
import shutil
from importlib import import_module
from pathlib import Path
from typing import Any

from torch import nn

from lmforge.errors import LmforgeError
from lmforge.interop.converter import HFConverter, transformers_module
from lmforge.models import family_classes

__all__ = ["config_from_hf", "config_to_hf", "converter_for", "from_hf", "load_hf", "save_hf", "to_hf"]

# family -> module holding its CONVERTER; HF model_type -> family
_CONVERTER_MODULES = {
    "gpt": "lmforge.interop.hf_gpt2",
    "llama": "lmforge.interop.hf_llama",
    "mixtral": "lmforge.interop.hf_mixtral",
    "bert": "lmforge.interop.hf_bert",
    "t5": "lmforge.interop.hf_t5",
}
_FAMILY_OF_MODEL_TYPE = {"gpt2": "gpt", "llama": "llama", "mistral": "llama", "mixtral": "mixtral", "bert": "bert", "t5": "t5"}


def converter_for(family: str | None = None, model_type: str | None = None) -> HFConverter:
    """The converter of an lmforge family, or of an HF `model_type`."""
    if family is None:
        if model_type not in _FAMILY_OF_MODEL_TYPE:
            raise LmforgeError(
                f"no lmforge family for Hugging Face model_type {model_type!r}. "
                f"Fix: use a checkpoint of one of {sorted(_FAMILY_OF_MODEL_TYPE)}"
            )
        family = _FAMILY_OF_MODEL_TYPE[model_type]
    if family not in _CONVERTER_MODULES:
        raise LmforgeError(f"family {family!r} has no Hugging Face converter. Fix: use one of {sorted(_CONVERTER_MODULES)}")
    return import_module(_CONVERTER_MODULES[family]).CONVERTER


def config_to_hf(cfg: Any) -> Any:
    """Our family config -> the matching transformers config."""
    return converter_for(family=cfg.family).config_to_hf(cfg)


def config_from_hf(hf_cfg: Any) -> Any:
    """A transformers config -> our family config (ConfigError naming any key we would compute differently)."""
    return converter_for(model_type=hf_cfg.model_type).config_from_hf(hf_cfg)


def from_hf(hf_model: Any) -> nn.Module:
    """An HF model (e.g. LlamaForCausalLM) -> the lmforge model with equal weights, same dtype, on CPU."""
    model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
    conv = converter_for(model_type=model_type)
    cfg = conv.config_from_hf(hf_model.config)
    _, model_cls = family_classes(cfg.family)
    model = model_cls(cfg)
    model.load_state_dict(conv.weights_from_hf(hf_model.state_dict(), cfg), strict=True)
    return model.to(next(hf_model.parameters()).dtype)


def to_hf(model: nn.Module) -> Any:
    """An lmforge model -> the HF model with equal weights (same dtype; on CPU; eval mode)."""
    cfg = model.config
    conv = converter_for(family=cfg.family)
    hf_cfg = conv.config_to_hf(cfg)
    hf = getattr(transformers_module(), conv.hf_class_name(hf_cfg))(hf_cfg)
    if conv.prepare_hf is not None:
        conv.prepare_hf(hf, cfg)
    theirs = conv.weights_to_hf(model.state_dict(), cfg)
    missing, unexpected = hf.load_state_dict(theirs, strict=False)
    tied = set(getattr(hf, "_tied_weights_keys", None) or ())
    if isinstance(getattr(hf, "_tied_weights_keys", None), dict):
        tied = set(hf._tied_weights_keys)
    really_missing = [k for k in missing if k not in tied and not k.endswith(conv.ignored_hf_keys or ("\0",))]
    if unexpected or really_missing:
        raise LmforgeError(f"to_hf key mismatch (missing={really_missing}, unexpected={unexpected}); the key map is out of date")
    return hf.to(next(model.parameters()).dtype).eval()


def save_hf(model: nn.Module, tokenizer_json: str | None, out_dir: str | os.PathLike[str]) -> Path:
    """Write a directory that `AutoModel*.from_pretrained` / `AutoTokenizer.from_pretrained` open offline.

    `tokenizer_json` is a path to a tokenizers `tokenizer.json` or its JSON text (`Tokenizer.to_str()`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    to_hf(model).save_pretrained(out, safe_serialization=True)
    if tokenizer_json is not None:
        if tokenizer_json.lstrip().startswith("{"):
            (out / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        elif Path(tokenizer_json).is_file():
            shutil.copyfile(tokenizer_json, out / "tokenizer.json")
        else:
            raise LmforgeError(f"tokenizer_json {tokenizer_json!r} is neither a file nor JSON text")
        # Our tokenizer is not necessarily the family's original one: tell AutoTokenizer to load tokenizer.json as-is.
        (out / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}\n', encoding="utf-8")
    return out


def load_hf(directory: str | os.PathLike[str]) -> nn.Module:
    """Load a local HF model directory (never the Hub) of any supported family as an lmforge model."""
    path = Path(directory)
    if not (path / "config.json").is_file():
        raise LmforgeError(f"{path} is not an HF model directory (no config.json). Fix: point at the folder holding config.json + *.safetensors")
    transformers = transformers_module()
    hf_cfg = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    conv = converter_for(model_type=hf_cfg.model_type)
    hf = getattr(transformers, conv.hf_class_name(hf_cfg)).from_pretrained(path, local_files_only=True)
    return from_hf(hf)
