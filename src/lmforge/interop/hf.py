"""Hugging Face `transformers` <-> lmforge, for every family: configs, weights, and HF directories on disk.

`from_hf(hf_model)` and `to_hf(model)` dispatch on the family (ours) or `config.model_type` (HF's) to a
converter module (`hf_gpt2`, `hf_llama`, ...), each of which is a key map plus config translation.
transformers is an optional dependency: it is imported inside the functions, never at module import.
"""

from __future__ import annotations

import json
import os
import shutil
from importlib import import_module
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.interop.converter import HFConverter, transformers_module
from lmforge.models import family_classes

__all__ = ["config_from_hf", "config_to_hf", "converter_for", "from_hf", "load_hf", "load_hf_weights", "read_hf_config", "read_hf_weights",
           "save_hf", "to_hf"]

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


def _special_ids(hf: Any, tokenizer: Any) -> None:
    """eos/bos/pad ids into config.json and generation_config.json, where HF `generate`, vLLM and TGI look
    for when to stop and what to pad with. Ids a family's config already fixes (T5's pad) are kept."""
    ids = {f"{role}_token_id": tokenizer.special_id(role) for role in ("eos", "bos", "pad") if role in tokenizer.specials}
    for key, value in ids.items():
        if getattr(hf.config, key, None) is None:
            setattr(hf.config, key, value)
    if getattr(hf, "generation_config", None) is not None:
        for key in ids:
            setattr(hf.generation_config, key, getattr(hf.config, key))


def _tokenizer_config(tokenizer: Any, model: nn.Module) -> dict[str, Any]:
    """What AutoTokenizer needs beside tokenizer.json: the special tokens by role, the context, and for
    decoders the ChatML template that lmforge's chat mode, server and SFT use (so vLLM's chat API matches)."""
    from lmforge.data.chat import CHATML_JINJA

    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for role in ("eos", "bos", "pad", "mask", "unk"):
        if role in tokenizer.specials:
            cfg[f"{role}_token"] = tokenizer.specials[role]
    if getattr(model.config, "max_seq_len", None):
        cfg["model_max_length"] = int(model.config.max_seq_len)
    if model.config.kind == "decoder":
        cfg["chat_template"] = CHATML_JINJA
    return cfg


def save_hf(
    model: nn.Module, tokenizer_json: Any, out_dir: str | os.PathLike[str], dtype: torch.dtype | None = None
) -> Path:
    """Write a directory that `AutoModel*.from_pretrained` / `AutoTokenizer.from_pretrained` open offline.

    `tokenizer_json`: an lmforge `Tokenizer` (then the special tokens, their ids in config.json and
    generation_config.json, and a chat template are written too), a path to a `tokenizer.json`, or its
    JSON text. `dtype` (e.g. torch.bfloat16) casts the saved weights; config.json records it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = to_hf(model)
    if dtype is not None:
        hf = hf.to(dtype)
    is_lmforge_tokenizer = hasattr(tokenizer_json, "specials") and hasattr(tokenizer_json, "hf")
    if is_lmforge_tokenizer:
        _special_ids(hf, tokenizer_json)
    hf.save_pretrained(out, safe_serialization=True)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    if "dtype" in config and "torch_dtype" not in config:  # transformers 5 writes `dtype`; older readers want this
        config["torch_dtype"] = config["dtype"]
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if is_lmforge_tokenizer:
        (out / "tokenizer.json").write_text(tokenizer_json.hf.to_str(), encoding="utf-8")
        (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(tokenizer_json, model), indent=2) + "\n", encoding="utf-8")
    elif tokenizer_json is not None:
        if tokenizer_json.lstrip().startswith("{"):
            (out / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        elif Path(tokenizer_json).is_file():
            shutil.copyfile(tokenizer_json, out / "tokenizer.json")
        else:
            raise LmforgeError(f"tokenizer_json {tokenizer_json!r} is neither a file nor JSON text")
        # Our tokenizer is not necessarily the family's original one: tell AutoTokenizer to load tokenizer.json as-is.
        (out / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}\n', encoding="utf-8")
    return out


def read_hf_config(directory: str | os.PathLike[str]) -> tuple[HFConverter, Any]:
    """The converter and the transformers config of a local HF model directory (its config.json only)."""
    path = Path(directory)
    if not (path / "config.json").is_file():
        raise LmforgeError(f"{path} is not an HF model directory (no config.json). Fix: point at the folder holding config.json + *.safetensors")
    hf_cfg = transformers_module().AutoConfig.from_pretrained(path, local_files_only=True)
    return converter_for(model_type=hf_cfg.model_type), hf_cfg


def load_hf(directory: str | os.PathLike[str]) -> nn.Module:
    """Load a local HF model directory (never the Hub) of any supported family as an lmforge model."""
    conv, hf_cfg = read_hf_config(directory)
    hf = getattr(transformers_module(), conv.hf_class_name(hf_cfg)).from_pretrained(Path(directory), local_files_only=True)
    return from_hf(hf)


def _weight_files(path: Path) -> list[Path] | None:
    """The safetensors files holding an HF directory's model weights (one, or those its index lists); None when it
    has none (a `pytorch_model.bin` checkpoint)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / name for name in sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))]
    single = path / "model.safetensors"
    return [single] if single.is_file() else None


def read_hf_weights(directory: str | os.PathLike[str]) -> dict[str, torch.Tensor] | None:
    """Our state dict (float32) straight from an HF directory's safetensors files and the family's key map, building
    neither model: for a large checkpoint, one copy of its weights in memory instead of HF's model, ours and the
    weights. None where the files need transformers' own loading (no safetensors, keys the converter does not map):
    `load_hf` then. Every key and shape of the result is checked against the architecture."""
    from safetensors import safe_open

    path = Path(directory)
    files = _weight_files(path)
    if files is None:
        return None
    conv, hf_cfg = read_hf_config(path)
    cfg = conv.config_from_hf(hf_cfg)
    theirs: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            theirs.update({key: fh.get_tensor(key) for key in fh.keys()})
    try:
        ours = conv.weights_from_hf(theirs, cfg)
    except KeyError:  # legacy names (a bare model's, old checkpoints'): transformers' loader knows them
        return None
    from lmforge.models.counting import skip_init

    _, model_cls = family_classes(cfg.family)
    with torch.device("meta"), skip_init():  # the structure only: no storage, no init drawn
        expected = {k: v.shape for k, v in model_cls(cfg).state_dict().items()}
    if expected.keys() != ours.keys() or any(ours[k].shape != shape for k, shape in expected.items()):
        return None
    return {k: v.float().contiguous() for k, v in ours.items()}


def load_hf_weights(directory: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Our state dict (float32) of a local HF model directory: read directly where possible (`read_hf_weights`),
    else through transformers' `from_pretrained` and our model."""
    direct = read_hf_weights(directory)
    return direct if direct is not None else {k: v.float() for k, v in load_hf(directory).state_dict().items()}
